//! Settings: one struct, layered flag > environment > file > default.
//!
//! [`Layer`] is both the clap argument set (flags with their environment variables) and
//! the TOML file schema, so the two can never drift apart. [`Settings::load`] stacks the
//! layers and fills in defaults; [`Settings::default`] is what tests start from.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::protocol::valid_id;
use crate::store::{url_kind, RoomCreation, StoreLimits, UrlKind, DEFAULT_WRITER_PAUSE};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One layer of settings. Every field is optional so that layers can be stacked.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "chatmesh",
    version,
    about = "A distributed websocket chat server",
    long_about = "A distributed websocket chat server. Without --redis-url it runs as a single \
                  node on its embedded SQLite database (chatmesh.db); with --redis-url and a \
                  PostgreSQL --database-url, any number of nodes share the database and deliver \
                  to each other."
)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// TOML file with any of these settings (keys are the long flag names with `_`).
    #[arg(long, env = "CHATMESH_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Public listener: pages, /ws, /api, /healthz, /metrics [default: 127.0.0.1:8080]
    #[arg(long, env = "CHATMESH_LISTEN")]
    pub listen: Option<String>,
    /// Peer API listener, never served publicly [default: 127.0.0.1:8081]
    #[arg(long, env = "CHATMESH_INTERNAL_LISTEN")]
    pub internal_listen: Option<String>,
    /// Base URL peers use to reach this node's peer API [default: http://<internal-listen>]
    // These comments are clap's --help text, not markdown: `<...>` is a placeholder.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, env = "CHATMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Unique id of this node [default: random, printed at start]
    #[arg(long, env = "CHATMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Where messages, rooms and marks live: sqlite://PATH, postgres://... (required in
    /// cluster mode) or memory: (lost at exit) [default: sqlite://chatmesh.db]
    #[arg(long, env = "CHATMESH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis URL (redis:// or redis+unix://), or a Redis Cluster's seed URLs separated by
    /// commas; set means cluster mode
    #[arg(long, env = "CHATMESH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Shared secret of the peer API; required in cluster mode
    #[arg(long, env = "CHATMESH_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// HS256 secret; set means /ws requires ?token= (JWT with sub and exp)
    #[arg(long, env = "CHATMESH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Enables the server HTTP API (/api/...) with Authorization: Bearer <key>
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, env = "CHATMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Node heartbeat period into Redis, ms [default: 1000]
    #[arg(long, env = "CHATMESH_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A node not heard from for this long is dead, ms [default: 5000]
    #[arg(long, env = "CHATMESH_NODE_TTL_MS")]
    pub node_ttl_ms: Option<u64>,
    /// Largest websocket frame; larger closes the connection with 1009 [default: 65536]
    #[arg(long, env = "CHATMESH_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Longest message body in bytes [default: 4096]
    #[arg(long, env = "CHATMESH_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Messages older than this many days are deleted [default: kept forever]
    #[arg(long, env = "CHATMESH_RETENTION_DAYS")]
    pub retention_days: Option<u64>,
    /// Rooms one user may belong to [default: 1000]
    #[arg(long, env = "CHATMESH_ROOMS_PER_USER")]
    pub rooms_per_user: Option<usize>,
    /// Who creates rooms: open (any user, by join or create) or api (the server API only)
    /// [default: open]
    #[arg(long, env = "CHATMESH_ROOM_CREATION")]
    pub room_creation: Option<String>,
    /// Largest room whose members get live receipts, typing and room presence events
    /// [default: 100]
    #[arg(long, env = "CHATMESH_LIVE_ROOM_SIZE")]
    pub live_room_size: Option<u64>,
    /// Frames per second one connection may send [default: 100]
    #[arg(long, env = "CHATMESH_RATE_PER_SEC")]
    pub rate_per_sec: Option<f64>,
    /// Burst of frames one connection may send [default: 200]
    #[arg(long, env = "CHATMESH_RATE_BURST")]
    pub rate_burst: Option<f64>,
    /// Frames refused with rate_limited before a flooding connection is closed (1008) [default: 50]
    #[arg(long, env = "CHATMESH_FLOOD_STRIKES")]
    pub flood_strikes: Option<f64>,
    /// Live messages waiting for one connection; beyond it new ones are dropped and the
    /// connection is told to resync (it is never closed for this) [default: 1024]
    #[arg(long, env = "CHATMESH_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    /// Live messages over --outbound-queue are dropped only once the oldest frame
    /// waiting for the connection has waited this long, ms (a pile-up the client is
    /// taking is kept) [default: 1000]
    #[arg(long, env = "CHATMESH_OUTBOUND_GRACE_MS")]
    pub outbound_grace_ms: Option<u64>,
    /// Comma-separated allowed Origins for /ws, or * [default: same host]
    #[arg(long, env = "CHATMESH_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Deadline of every store call, ms [default: 3000]
    #[arg(long, env = "CHATMESH_STORE_TIMEOUT_MS")]
    pub store_timeout_ms: Option<u64>,
    /// Websocket ping period, ms [default: 10000]
    #[arg(long, env = "CHATMESH_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    /// A client silent (no pong, no frame) this long is dropped, ms [default: 30000]
    #[arg(long, env = "CHATMESH_CLIENT_TIMEOUT_MS")]
    pub client_timeout_ms: Option<u64>,
    /// Worker threads serving both listeners; the first also runs the node's core
    /// [default: number of CPUs]
    #[arg(long, env = "CHATMESH_WORKERS")]
    pub workers: Option<usize>,
    /// Idempotency window of client_id, seconds [default: 86400]
    #[arg(long, env = "CHATMESH_IDEMPOTENCY_TTL_SECS")]
    pub idempotency_ttl_secs: Option<u64>,
    /// Shortest time between two passes of a busy database writer, ms: longer means
    /// larger group commits, less CPU per message, more latency [default: 10]
    #[arg(long, env = "CHATMESH_WRITER_PAUSE_MS")]
    pub writer_pause_ms: Option<u64>,
}

macro_rules! stack {
    ($top:expr, $bottom:expr, $($field:ident),* $(,)?) => {
        Layer { $($field: $top.$field.or($bottom.$field),)* }
    };
}

impl Layer {
    /// `self` where set, else `below`.
    pub fn over(self, below: Layer) -> Layer {
        stack!(
            self,
            below,
            config,
            listen,
            internal_listen,
            advertise,
            node_id,
            database_url,
            redis_url,
            cluster_secret,
            jwt_secret,
            api_key,
            heartbeat_ms,
            node_ttl_ms,
            max_frame_bytes,
            max_body_bytes,
            retention_days,
            rooms_per_user,
            room_creation,
            live_room_size,
            rate_per_sec,
            rate_burst,
            flood_strikes,
            outbound_queue,
            outbound_grace_ms,
            allowed_origins,
            store_timeout_ms,
            ping_interval_ms,
            client_timeout_ms,
            workers,
            idempotency_ttl_secs,
            writer_pause_ms,
        )
    }

    pub fn from_file(path: &std::path::Path) -> Result<Layer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

/// Per-connection and per-message limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    pub flood_strikes: f64,
    pub outbound_queue: usize,
    /// How long the oldest frame waiting for a connection may wait before live
    /// messages over `outbound_queue` are dropped.
    pub outbound_grace: Duration,
    /// Largest room whose members get live receipts, typing and room presence events.
    pub live_room_size: u64,
}

/// The resolved settings of one node.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub internal_listen: String,
    /// `None` until the internal listener is bound: then `http://<its address>`.
    pub advertise: Option<String>,
    pub node_id: String,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub cluster_secret: Option<String>,
    pub jwt_secret: Option<String>,
    pub api_key: Option<String>,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
    pub limits: Limits,
    /// What the store enforces: idempotency window, retention, rooms per user, creation.
    pub store: StoreLimits,
    /// Empty: same host only. `*`: any origin.
    pub allowed_origins: Vec<String>,
    pub store_timeout: Duration,
    pub ping_interval: Duration,
    pub client_timeout: Duration,
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        match Settings::resolve(Layer::default()) {
            Ok(s) => s,
            // The defaults are constants that resolve() accepts; a failure here is a bug
            // in this file, caught by the unit test below.
            Err(e) => unreachable!("default settings are invalid: {e}"),
        }
    }
}

impl Settings {
    /// Flags and environment from the process, then the file they name, then defaults.
    pub fn load() -> Result<Settings, ConfigError> {
        Settings::load_from(Layer::parse())
    }

    /// Like [`Settings::load`] with an already parsed flag/environment layer.
    pub fn load_from(cli: Layer) -> Result<Settings, ConfigError> {
        let file = match &cli.config {
            Some(path) => Layer::from_file(path)?,
            None => Layer::default(),
        };
        Settings::resolve(cli.over(file))
    }

    /// Fills in defaults and checks the combination.
    pub fn resolve(l: Layer) -> Result<Settings, ConfigError> {
        let node_id = match l.node_id {
            Some(id) if valid_id(&id) => id,
            Some(id) => {
                return Err(ConfigError::Invalid(format!(
                    "node id {id:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
                )))
            }
            None => format!("node-{:08x}", rand::random::<u32>()),
        };
        let redis_url = l.redis_url.filter(|u| !u.is_empty());
        let cluster_secret = l.cluster_secret.filter(|s| !s.is_empty());
        if redis_url.is_some() && cluster_secret.is_none() {
            return Err(ConfigError::Invalid(
                "cluster mode (--redis-url) needs --cluster-secret (or CHATMESH_CLUSTER_SECRET): \
                 peers authenticate each other with it"
                    .into(),
            ));
        }
        let database_url = l
            .database_url
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "sqlite://chatmesh.db".into());
        match (url_kind(&database_url), &redis_url) {
            (None, _) => {
                return Err(ConfigError::Invalid(format!(
                    "--database-url {database_url:?} is not sqlite://PATH, postgres://... or memory:"
                )))
            }
            (Some(UrlKind::Sqlite | UrlKind::Memory), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "cluster mode (--redis-url) needs a PostgreSQL --database-url (postgres://...): \
                     the nodes must share one database, and sqlite:// or memory: is one node's own"
                        .into(),
                ))
            }
            _ => {}
        }
        let room_creation = match l.room_creation.as_deref() {
            None | Some("open") => RoomCreation::Open,
            Some("api") => RoomCreation::Api,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "--room-creation {other:?} must be open or api"
                )))
            }
        };
        if let Some(a) = &l.advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "--advertise {a:?} must be an http:// or https:// base URL"
                )));
            }
        }
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(ConfigError::Invalid(format!("{name} must be positive")))
            }
        };
        let limits = Limits {
            max_frame_bytes: l.max_frame_bytes.unwrap_or(64 * 1024).max(1024),
            max_body_bytes: l.max_body_bytes.unwrap_or(4096).max(1),
            rate_per_sec: positive("rate_per_sec", l.rate_per_sec.unwrap_or(100.0))?,
            rate_burst: positive("rate_burst", l.rate_burst.unwrap_or(200.0))?,
            flood_strikes: positive("flood_strikes", l.flood_strikes.unwrap_or(50.0))?,
            outbound_queue: l.outbound_queue.unwrap_or(1024).max(1),
            outbound_grace: Duration::from_millis(l.outbound_grace_ms.unwrap_or(1000)),
            live_room_size: l.live_room_size.unwrap_or(100),
        };
        let store = StoreLimits {
            idempotency_ttl: Duration::from_secs(l.idempotency_ttl_secs.unwrap_or(24 * 3600)),
            retention: l
                .retention_days
                .filter(|d| *d > 0)
                .map(|d| Duration::from_secs(d.saturating_mul(24 * 3600))),
            rooms_per_user: l.rooms_per_user.unwrap_or(1000).max(1),
            room_creation,
            writer_pause: l
                .writer_pause_ms
                .map_or(DEFAULT_WRITER_PAUSE, Duration::from_millis),
        };
        let heartbeat = Duration::from_millis(l.heartbeat_ms.unwrap_or(1000).max(10));
        let node_ttl = Duration::from_millis(l.node_ttl_ms.unwrap_or(5000));
        // A heartbeat may take up to one period to answer (its own Redis timeout), and a
        // node must be able to miss one beat without being declared dead.
        if node_ttl < heartbeat * 3 {
            return Err(ConfigError::Invalid(format!(
                "--node-ttl-ms ({}) must be at least three times --heartbeat-ms ({}): a node \
                 would be declared dead for one slow heartbeat",
                node_ttl.as_millis(),
                heartbeat.as_millis()
            )));
        }
        Ok(Settings {
            listen: l.listen.unwrap_or_else(|| "127.0.0.1:8080".into()),
            internal_listen: l.internal_listen.unwrap_or_else(|| "127.0.0.1:8081".into()),
            advertise: l.advertise.map(|a| a.trim_end_matches('/').to_owned()),
            node_id,
            database_url,
            redis_url,
            cluster_secret,
            jwt_secret: l.jwt_secret.filter(|s| !s.is_empty()),
            api_key: l.api_key.filter(|s| !s.is_empty()),
            heartbeat,
            node_ttl,
            limits,
            store,
            allowed_origins: l
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            store_timeout: Duration::from_millis(l.store_timeout_ms.unwrap_or(3000).max(1)),
            ping_interval: Duration::from_millis(l.ping_interval_ms.unwrap_or(10_000).max(10)),
            client_timeout: Duration::from_millis(l.client_timeout_ms.unwrap_or(30_000).max(20)),
            workers: l
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .max(1),
        })
    }

    pub fn cluster_mode(&self) -> bool {
        self.redis_url.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::default();
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert_eq!(s.internal_listen, "127.0.0.1:8081");
        assert_eq!(s.heartbeat, Duration::from_millis(1000));
        assert_eq!(s.node_ttl, Duration::from_millis(5000));
        assert_eq!(s.limits.max_frame_bytes, 65536);
        assert_eq!(s.limits.max_body_bytes, 4096);
        assert_eq!(s.database_url, "sqlite://chatmesh.db");
        assert_eq!(s.store.rooms_per_user, 1000);
        assert_eq!(s.store.retention, None);
        assert_eq!(s.store.room_creation, RoomCreation::Open);
        assert_eq!(s.store.writer_pause, Duration::from_millis(10));
        assert_eq!(s.limits.live_room_size, 100);
        assert_eq!(s.limits.rate_per_sec, 100.0);
        assert_eq!(s.limits.rate_burst, 200.0);
        assert!(s.allowed_origins.is_empty());
        assert!(!s.cluster_mode());
        assert!(s.node_id.starts_with("node-"));
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nnode_id = \"from-file\"\nmax_body_bytes = 100\n",
        )
        .unwrap();
        let cli = Layer::try_parse_from([
            "chatmesh",
            "--config",
            file.to_str().unwrap(),
            "--node-id",
            "from-flag",
            "--writer-pause-ms",
            "0",
        ])
        .unwrap();
        let s = Settings::load_from(cli).unwrap();
        assert_eq!(s.node_id, "from-flag");
        assert_eq!(s.store.writer_pause, Duration::ZERO);
        assert_eq!(s.listen, "127.0.0.1:9000");
        assert_eq!(s.limits.max_body_bytes, 100);
        assert_eq!(s.internal_listen, "127.0.0.1:8081");
    }

    #[test]
    fn cluster_mode_needs_a_secret() {
        let err = Settings::resolve(Layer {
            redis_url: Some("redis://127.0.0.1".into()),
            ..Layer::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--cluster-secret"), "{err}");
    }

    #[test]
    fn cluster_mode_needs_postgres() {
        for url in [None, Some("memory:"), Some("sqlite://x.db")] {
            let err = Settings::resolve(Layer {
                redis_url: Some("redis://127.0.0.1".into()),
                cluster_secret: Some("s".into()),
                database_url: url.map(Into::into),
                ..Layer::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("PostgreSQL"), "{err}");
        }
        assert!(Settings::resolve(Layer {
            redis_url: Some("redis://127.0.0.1".into()),
            cluster_secret: Some("s".into()),
            database_url: Some("postgres://localhost/chat".into()),
            ..Layer::default()
        })
        .is_ok());
    }

    #[test]
    fn a_ttl_shorter_than_three_heartbeats_is_refused() {
        let err = Settings::resolve(Layer {
            heartbeat_ms: Some(1000),
            node_ttl_ms: Some(2500),
            ..Layer::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("three times"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        assert!(matches!(
            Layer::from_file(&file),
            Err(ConfigError::ParseFile { .. })
        ));
    }

    #[test]
    fn bad_node_id_is_refused() {
        assert!(Settings::resolve(Layer {
            node_id: Some("a b".into()),
            ..Layer::default()
        })
        .is_err());
    }
}
