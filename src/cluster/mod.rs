//! Cluster mode (`--redis-url`): Redis is the store, the registry of live nodes and the
//! directory of who is connected where; the [`bridge::ClusterBridge`] actor carries
//! stored messages to exactly the peers that hold a recipient, in batched POSTs.
//!
//! - [`directory`]: the Redis side of registry and directory (scripts, no actors).
//! - [`queue`]: one peer's bounded, batching outbound queue.
//! - [`bridge`]: the actor: heartbeat, live peers, dead-node cleanup, peer POSTs.
//! - [`peer`]: the receiving end, `POST /internal/deliver`.

pub mod bridge;
pub mod directory;
pub mod peer;
pub mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use self::bridge::{
    Announce, BridgeConfig, Busy, ClusterBridge, Deregister, MembershipChanged, Route, SharedState,
    Stop,
};
use self::directory::Directory;
use crate::chat::ChatError;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::Message as ChatMessage;
use crate::server::{AttachCluster, ChatServer};
use crate::store::redis::{RedisConfig, RedisStore};
use crate::store::{SharedStore, StoreError, StoreLimits, Timed};

pub use self::peer::peer_routes;

/// How long shutdown waits for in-flight peer deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Changes of this node's connections that the directory must follow.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ClusterEvent {
    /// Connection `sid` of `uid` closed after it was registered here; it counts in each
    /// of `rooms` if the directory counted it at all.
    Disconnected {
        uid: String,
        sid: u64,
        rooms: Vec<String>,
    },
}

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
    shared: Arc<SharedState>,
    timeout: Duration,
    ttl_ms: u64,
}

impl Cluster {
    pub fn registered(&self) -> bool {
        self.shared.registered.load(Ordering::Relaxed)
    }

    /// Carries a stored message to the peers among `nodes` (this node is skipped: the
    /// caller delivers locally).
    pub fn route(&self, message: Arc<ChatMessage>, nodes: Vec<String>) {
        let nodes: Vec<String> = nodes.into_iter().filter(|n| *n != self.node_id).collect();
        if !nodes.is_empty() {
            self.bridge.do_send(Route { message, nodes });
        }
    }

    /// Records connection `sid` of `uid` here before it is welcomed, so any message
    /// stored from now on is routed to this node; announces the user if this is their
    /// first connection anywhere. On an error the record may still land later; the
    /// removal the ChatServer sends when the connection closes undoes it.
    pub async fn connected(&self, uid: &str, sid: u64, rooms: &[String]) -> Result<(), ChatError> {
        let change = tokio::time::timeout(
            self.timeout,
            self.directory.connection(uid, sid, rooms, true),
        )
        .await
        .unwrap_or(Err(StoreError::Timeout(self.timeout)))?;
        if change.changed && change.total == 1 {
            self.bridge.do_send(Announce {
                uid: uid.to_owned(),
                rooms: rooms.to_vec(),
                online: true,
            });
        }
        Ok(())
    }

    /// Records that this node now holds `delta` more (or fewer) connections of members
    /// of `room`.
    pub async fn room_delta(&self, room: &str, delta: i64) -> Result<(), ChatError> {
        Ok(
            tokio::time::timeout(self.timeout, self.directory.room_delta(room, delta))
                .await
                .unwrap_or(Err(StoreError::Timeout(self.timeout)))?,
        )
    }

    /// Tells the other nodes holding connections of `uid` about a membership change.
    pub fn membership_changed(&self, uid: &str, room: &str, joined: bool) {
        self.bridge.do_send(MembershipChanged {
            uid: uid.to_owned(),
            room: room.to_owned(),
            joined,
        });
    }

    /// Whether each user has a connection on a live node.
    pub async fn online(&self, uids: &[String]) -> Result<Vec<bool>, ChatError> {
        Ok(
            tokio::time::timeout(self.timeout, self.directory.online(uids, self.ttl_ms))
                .await
                .unwrap_or(Err(StoreError::Timeout(self.timeout)))?,
        )
    }

    /// Removes this node from the registry and the directory.
    pub async fn deregister(&self) {
        let _ = tokio::time::timeout(self.timeout, self.bridge.send(Deregister)).await;
    }

    /// Waits for in-flight directory updates and peer deliveries, then stops the bridge.
    pub async fn stop(&self) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        while Instant::now() < deadline {
            match self.bridge.send(Busy).await {
                Ok(true) => actix_web::rt::time::sleep(Duration::from_millis(10)).await,
                _ => break,
            }
        }
        let _ = self.bridge.send(Stop).await;
    }
}

/// Connects to Redis, registers this node and starts the bridge.
pub async fn start(
    settings: Arc<Settings>,
    limits: StoreLimits,
    server: Addr<ChatServer>,
    metrics: Arc<Metrics>,
) -> Result<(SharedStore, Cluster), ClusterError> {
    let url = settings.redis_url.clone().unwrap_or_default();
    let redis_config = RedisConfig {
        response_timeout: settings.store_timeout,
        connection_timeout: settings.store_timeout,
        ..RedisConfig::default()
    };
    let redis = RedisStore::connect_with(&url, limits, redis_config)
        .await
        .map_err(|source| ClusterError::Redis {
            url: url.clone(),
            source,
        })?;
    let directory = Arc::new(Directory::new(redis.connection(), settings.node_id.clone()));
    let store: SharedStore = Arc::new(Timed::new(redis, settings.store_timeout));
    let advertise = settings.advertise.clone().unwrap_or_default();
    // Entries left by an earlier process with this node id (killed without a goodbye)
    // would count connections that no longer exist.
    directory
        .remove_node(&settings.node_id)
        .await
        .map_err(ClusterError::Register)?;
    // Register before serving, so the node is never up without being routable.
    let first = directory
        .heartbeat(&advertise, settings.node_ttl.as_millis() as u64)
        .await
        .map_err(ClusterError::Register)?;
    let shared = Arc::new(SharedState {
        live: RwLock::new(first.live.into_iter().collect::<HashMap<_, _>>()),
        registered: AtomicBool::new(true),
    });
    let bridge = ClusterBridge::new(
        BridgeConfig {
            node_id: settings.node_id.clone(),
            advertise,
            secret: settings.cluster_secret.clone().unwrap_or_default(),
            heartbeat: settings.heartbeat,
            node_ttl: settings.node_ttl,
        },
        directory.clone(),
        store.clone(),
        server.clone(),
        metrics,
        shared.clone(),
    )
    .start();
    server.do_send(AttachCluster {
        events: bridge.clone().recipient(),
    });
    let cluster = Cluster {
        node_id: settings.node_id.clone(),
        bridge,
        directory,
        shared,
        timeout: settings.store_timeout,
        ttl_ms: settings.node_ttl.as_millis() as u64,
    };
    Ok((store, cluster))
}
