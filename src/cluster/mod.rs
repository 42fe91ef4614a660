//! Cluster mode (`--redis-url`): the nodes share one PostgreSQL database (the store of
//! record) and one Redis, which holds only what they can rebuild: the registry of live
//! nodes and the directory of who is connected where. Stored messages travel between
//! nodes over the peer API, to exactly the nodes that hold a recipient.
//!
//! Each job has its file:
//!
//! - [`directory`]: the Redis side of registry and directory (one key per command).
//! - [`liveness`]: heartbeats as data: the live table, dead nodes, being cut off.
//! - [`upkeep`]: this node's directory entries, written in order from its ChatServer.
//! - [`delivery`] and [`queue`]: a bounded, batching queue per peer.
//! - [`recent_presence`]: presence announcements replayed to a peer that appears.
//! - [`bridge`]: the ClusterBridge actor that drives liveness and delivery.
//!
//! The receiving end, `POST /internal/deliver`, is [`crate::http::peer`].

pub mod bridge;
pub mod delivery;
pub mod directory;
pub mod liveness;
pub mod queue;
pub mod recent_presence;
pub mod upkeep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;

use self::bridge::{BridgeConfig, Busy, ClusterBridge, Deregister, Forward, Route, Routed, Stop};
use self::directory::{Directory, Timeouts};
use self::liveness::{LiveTable, Liveness};
use self::queue::MembershipEvent;
use self::upkeep::UpkeepState;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::Message as ChatMessage;
use crate::server::{AttachCluster, ChatServer, Membership, PeerEvent};
use crate::store::{SharedStore, StoreError};

/// How long shutdown waits for directory writes and in-flight peer deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a note of this node's server-API sends lives in Redis; renewed once half
/// of it has passed (see [`Cluster::note_api_send`]).
pub const API_SENDS_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use Redis at {url}: {source}")]
    Redis { url: String, source: StoreError },
    #[error("cannot register this node: {0}")]
    Register(StoreError),
}

/// The handle the rest of the node uses.
#[derive(Clone)]
pub struct Cluster {
    node_id: String,
    bridge: Addr<ClusterBridge>,
    directory: Arc<Directory>,
    registered: Arc<AtomicBool>,
    timeout: Duration,
    ttl_ms: u64,
    /// When this node last noted its server-API sends in Redis.
    api_noted: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Cluster {
    /// Called before a message for the server API is stored: such a message may be to
    /// any conversation, so if this node dies before delivering it, the survivors
    /// cannot tell whom to resync by its users alone. Notes in Redis (at most once per
    /// half [`API_SENDS_WINDOW`]) that it stores them; while the note lives, its death
    /// resyncs every connection.
    pub async fn note_api_send(&self) {
        let lock = || self.api_noted.lock().unwrap_or_else(|p| p.into_inner());
        if lock().is_some_and(|t| t.elapsed() < API_SENDS_WINDOW / 2) {
            return;
        }
        let started = Instant::now();
        match within(
            self.timeout,
            self.directory.note_api_sends(API_SENDS_WINDOW),
        )
        .await
        {
            Ok(()) => *lock() = Some(started),
            Err(e) => log::warn!(
                "cannot note this node's server-API sends in Redis ({e}); should it die now, \
                 the survivors resync only its users' conversations"
            ),
        }
    }

    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Carries a stored message to the peers that hold its recipients. Waits for room
    /// in the bridge's mailbox, so a node under load slows its senders.
    /// `frame` is its `message` frame, which the peers pass on as it is.
    pub async fn route(&self, message: Arc<ChatMessage>, frame: Arc<RawValue>) {
        let routed = Routed::Message(message, frame);
        if self.bridge.send(Route { routed }).await.is_err() {
            log::warn!("the cluster bridge has stopped: a stored message was not routed");
        }
    }

    /// Carries a mark or typing event to the peers that hold the conversation's
    /// participants.
    pub async fn route_event(&self, event: PeerEvent) {
        let routed = Routed::Event(Arc::new(event));
        if self.bridge.send(Route { routed }).await.is_err() {
            log::warn!("the cluster bridge has stopped: an event was not routed");
        }
    }

    /// Tells the other nodes holding connections of the user about a membership change
    /// this node has applied, and waits until they confirm it (or the store deadline
    /// passes): a removal is then in force everywhere.
    pub async fn membership(&self, change: Membership) {
        let event = MembershipEvent {
            uid: change.uid,
            room: change.room,
            joined: change.joined,
            members: change.members,
            by: change.by,
        };
        let confirmed = self
            .bridge
            .send(Forward {
                event,
                timeout: self.timeout,
            })
            .await;
        if !matches!(confirmed, Ok(true)) {
            log::warn!("a membership change was not confirmed by every node in time");
        }
    }

    /// Whether each user has a connection on a live node, as Redis sees it now.
    pub async fn online(&self, uids: &[String]) -> Result<Vec<bool>, StoreError> {
        let nodes = within(self.timeout, self.directory.user_nodes(uids)).await?;
        let mut all: Vec<String> = nodes.iter().flatten().cloned().collect();
        all.sort();
        all.dedup();
        let live = within(self.timeout, self.directory.are_live(&all, self.ttl_ms)).await?;
        let live: std::collections::HashSet<&String> = all
            .iter()
            .zip(live)
            .filter(|(_, l)| *l)
            .map(|(n, _)| n)
            .collect();
        Ok(nodes
            .iter()
            .map(|ns| ns.iter().any(|n| live.contains(n)))
            .collect())
    }

    /// Waits for directory writes and peer deliveries under way (at most a few seconds).
    pub async fn drain(&self) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        while Instant::now() < deadline {
            match self.bridge.send(Busy).await {
                Ok(true) => actix_web::rt::time::sleep(Duration::from_millis(10)).await,
                _ => break,
            }
        }
    }

    /// Removes this node from the registry and the directory.
    pub async fn deregister(&self) {
        let _ = tokio::time::timeout(self.timeout, self.bridge.send(Deregister)).await;
    }

    pub async fn stop(&self) {
        let _ = self.bridge.send(Stop).await;
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// `fut`, or `Timeout` after `t`.
async fn within<T>(
    t: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(t, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(t)))
}

/// Connects to Redis, registers this node, starts the bridge and the directory upkeep,
/// and attaches them to the ChatServer.
pub async fn start(
    settings: Arc<Settings>,
    store: SharedStore,
    server: Addr<ChatServer>,
    metrics: Arc<Metrics>,
) -> Result<Cluster, ClusterError> {
    let url = settings.redis_url.clone().unwrap_or_default();
    let timeouts = Timeouts {
        directory: settings.store_timeout,
        heartbeat: settings.heartbeat,
    };
    let directory = Arc::new(
        Directory::connect(&url, &settings.node_id, timeouts)
            .await
            .map_err(|source| ClusterError::Redis {
                url: url.clone(),
                source,
            })?,
    );
    let advertise = settings.advertise.clone().unwrap_or_default();
    // Entries left by an earlier process with this node id (killed without a goodbye)
    // would route to connections that no longer exist; the conversations of its users
    // are resynced once the bridge runs (see [`bridge::Predecessor`]).
    let predecessor = directory
        .remove_node(&settings.node_id)
        .await
        .map_err(ClusterError::Register)?;
    // Register before serving, so the node is never up without being routable.
    let sent = Instant::now();
    let first = directory
        .heartbeat(&advertise, settings.node_ttl.as_millis() as u64)
        .await
        .map_err(ClusterError::Register)?;
    let live: LiveTable = Arc::new(RwLock::new(HashMap::new()));
    let mut liveness = Liveness::new(
        settings.node_id.clone(),
        live,
        settings.heartbeat,
        settings.node_ttl,
    );
    liveness.beat(first, sent, Instant::now());
    let registered = Arc::new(AtomicBool::new(true));
    let upkeep = Arc::new(UpkeepState::default());
    let bridge = ClusterBridge::new(
        BridgeConfig {
            node_id: settings.node_id.clone(),
            advertise,
            secret: settings.cluster_secret.clone().unwrap_or_default(),
            heartbeat: settings.heartbeat,
            node_ttl: settings.node_ttl,
        },
        directory.clone(),
        store,
        server.clone(),
        metrics,
        registered.clone(),
        upkeep.clone(),
        liveness,
    )
    .start();
    if !predecessor.users.is_empty() || !predecessor.left.is_empty() || predecessor.api_sends {
        // The bridge's mailbox is empty: it has only just started.
        if bridge
            .try_send(bridge::Predecessor {
                removed: predecessor,
            })
            .is_err()
        {
            log::warn!("the cluster bridge did not take its predecessor's cleanup");
        }
    }
    let (sink, queue) = upkeep::channel(upkeep.clone());
    actix_web::rt::spawn(upkeep::run(
        directory.clone(),
        queue,
        upkeep,
        bridge.clone(),
        server.clone(),
    ));
    server
        .send(AttachCluster {
            sink: Box::new(sink),
        })
        .await
        .map_err(|e| ClusterError::Register(StoreError::Unavailable(e.to_string())))?;
    Ok(Cluster {
        node_id: settings.node_id.clone(),
        bridge,
        directory,
        registered,
        timeout: settings.store_timeout,
        ttl_ms: settings.node_ttl.as_millis() as u64,
        api_noted: Arc::default(),
    })
}
