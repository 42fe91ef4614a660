//! The chat rules shared by websocket sessions and the server HTTP API: validate, store,
//! then deliver. A message is handed to delivery only after the store accepted it, so
//! whatever a sender saw confirmed is never lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use crate::cluster::Cluster;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::protocol::{
    dm_conv, room_conv, valid_id, Conv, ErrorCode, Message, Sent, MAX_CLIENT_ID_LEN,
    MAX_HISTORY_LIMIT, MAX_PRESENCE_UIDS, SYNC_LATEST, SYNC_PAGE,
};
use crate::registry::SessionId;
use crate::server::{ChatServer, Fanout, LocalOnline, Membership};
use crate::store::{NewMessage, Page, Range, ReadRequest, SharedStore, StoreError};

/// Most cursors one `sync` frame may carry.
pub const MAX_SYNC_CURSORS: usize = 10_000;

/// Why a chat operation was refused; each maps to an error code of the contract.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    Invalid(String),
    #[error("body is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    NotMember(String),
    #[error("store unavailable, retry with the same client_id: {0}")]
    Unavailable(String),
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::Invalid(_) => ErrorCode::Invalid,
            ChatError::TooLarge { .. } => ErrorCode::TooLarge,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotMember { room, .. } => {
                ChatError::NotMember(format!("join room {room} first"))
            }
            other => ChatError::Unavailable(other.to_string()),
        }
    }
}

/// Where a message goes.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Room(String),
}

/// A send request, from a websocket or the HTTP API.
#[derive(Debug, Clone)]
pub struct Send {
    pub from: String,
    pub target: Target,
    pub body: String,
    pub client_id: Option<String>,
    /// The sending connection (gets `sent`, not a copy); None for the HTTP API.
    pub origin: Option<SessionId>,
    /// Users must be room members; the API may post to any room.
    pub require_member: bool,
}

/// The answer to a `sync`.
pub struct Synced {
    pub pages: Vec<Page>,
    pub more: Vec<String>,
}

pub struct Chat {
    pub node_id: String,
    pub store: SharedStore,
    pub server: Addr<ChatServer>,
    pub cluster: Option<Cluster>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    next_sid: AtomicU64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Chat {
    pub fn new(
        node_id: String,
        store: SharedStore,
        server: Addr<ChatServer>,
        cluster: Option<Cluster>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        Chat {
            node_id,
            store,
            server,
            cluster,
            metrics,
            limits,
            next_sid: AtomicU64::new(1),
        }
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = fut.await;
        self.metrics
            .store_latency
            .observe(start.elapsed().as_secs_f64());
        r
    }

    /// Checks a send without touching the store.
    pub fn validate(&self, send: &Send) -> Result<(), ChatError> {
        if !valid_id(&send.from) {
            return Err(ChatError::Invalid(
                "from must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into(),
            ));
        }
        match &send.target {
            Target::User(to) if !valid_id(to) => {
                return Err(ChatError::Invalid(
                    "to must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into(),
                ))
            }
            Target::User(to) if *to == send.from => {
                return Err(ChatError::Invalid(
                    "cannot send a direct message to yourself".into(),
                ))
            }
            Target::Room(room) if !valid_id(room) => {
                return Err(ChatError::Invalid(
                    "room must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into(),
                ))
            }
            _ => {}
        }
        if send.body.is_empty() {
            return Err(ChatError::Invalid("body must not be empty".into()));
        }
        if send.body.len() > self.limits.max_body_bytes {
            return Err(ChatError::TooLarge {
                len: send.body.len(),
                max: self.limits.max_body_bytes,
            });
        }
        if let Some(c) = &send.client_id {
            if c.is_empty() || c.len() > MAX_CLIENT_ID_LEN {
                return Err(ChatError::Invalid(format!(
                    "client_id must be 1 to {MAX_CLIENT_ID_LEN} bytes"
                )));
            }
        }
        Ok(())
    }

    /// Stores a message, then delivers it to every other connection that should have it.
    pub async fn send(&self, send: Send) -> Result<Sent, ChatError> {
        self.validate(&send)?;
        let (conv, to, room) = match &send.target {
            Target::User(to) => (dm_conv(&send.from, to), Some(to.clone()), None),
            Target::Room(room) => (room_conv(room), None, Some(room.clone())),
        };
        let new = NewMessage {
            conv,
            from: send.from,
            to,
            room,
            body: send.body,
            client_id: send.client_id.clone(),
            id: uuid::Uuid::new_v4().to_string(),
            ts: now_ms(),
            require_member: send.require_member && matches!(send.target, Target::Room(_)),
        };
        let appended = self.timed(self.store.append(new)).await?;
        if !appended.duplicate {
            self.metrics.messages_stored.inc();
        }
        let message = Arc::new(appended.message);
        // A resend is delivered again: the first attempt may have timed out before its
        // delivery, and clients deduplicate by (conv, seq).
        self.deliver(message.clone(), appended.nodes, send.origin);
        Ok(Sent {
            client_id: send.client_id,
            conv: message.conv.clone(),
            seq: message.seq,
            id: message.id.clone(),
            ts: message.ts,
        })
    }

    /// Hands a stored message to local sessions and, in a cluster, to the peers that
    /// hold recipients (`nodes`, as the store's directory said when it stored it).
    pub fn deliver(
        &self,
        message: Arc<Message>,
        nodes: Option<Vec<String>>,
        origin: Option<SessionId>,
    ) {
        if let (Some(cluster), Some(nodes)) = (&self.cluster, nodes) {
            cluster.route(message.clone(), nodes);
        }
        self.server.do_send(Fanout {
            message,
            exclude: origin,
        });
    }

    /// Joins (`joined`) or leaves a room.
    pub async fn change_membership(
        &self,
        uid: &str,
        room: &str,
        joined: bool,
    ) -> Result<(), ChatError> {
        if !valid_id(room) {
            return Err(ChatError::Invalid(
                "room must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into(),
            ));
        }
        let changed = if joined {
            self.timed(self.store.join(uid, room)).await?
        } else {
            self.timed(self.store.leave(uid, room)).await?
        };
        // Applied here (and in the directory) before the client hears `joined`, so
        // every room message stored after that answer is routed to this node.
        self.apply_membership(uid, room, joined).await?;
        if let (Some(cluster), true) = (&self.cluster, changed) {
            cluster.membership_changed(uid, room, joined);
        }
        Ok(())
    }

    /// Makes this node's sessions of `uid` follow a membership the store already holds
    /// (sent even when the store saw no change: a membership made on another node
    /// becomes known here), and records the change in the cluster directory.
    pub async fn apply_membership(
        &self,
        uid: &str,
        room: &str,
        joined: bool,
    ) -> Result<(), ChatError> {
        let change = |joined| Membership {
            uid: uid.to_owned(),
            room: room.to_owned(),
            joined,
        };
        let delta = self
            .server
            .send(change(joined))
            .await
            .map_err(|e| ChatError::Unavailable(e.to_string()))?;
        if let (Some(cluster), true) = (&self.cluster, delta != 0) {
            if let Err(e) = cluster.room_delta(room, delta).await {
                // Undo the local change so that a retry records it again.
                let _ = self.server.send(change(!joined)).await;
                return Err(e);
            }
        }
        Ok(())
    }

    pub async fn rooms_of(&self, uid: &str) -> Result<Vec<String>, ChatError> {
        Ok(self.timed(self.store.rooms_of(uid)).await?)
    }

    /// Catch-up for every conversation of `uid` (contract: `sync`).
    pub async fn sync(
        &self,
        uid: &str,
        cursors: &BTreeMap<String, u64>,
    ) -> Result<Synced, ChatError> {
        if cursors.len() > MAX_SYNC_CURSORS {
            return Err(ChatError::Invalid(format!(
                "at most {MAX_SYNC_CURSORS} cursors per sync"
            )));
        }
        let convs = self.timed(self.store.conversations_of(uid)).await?;
        let requests: Vec<ReadRequest> = convs
            .into_iter()
            .map(|conv| {
                let range = match cursors.get(&conv) {
                    Some(&after) => Range::After {
                        after,
                        limit: SYNC_PAGE,
                    },
                    None => Range::Before {
                        before: None,
                        limit: SYNC_LATEST,
                    },
                };
                ReadRequest { conv, range }
            })
            .collect();
        let pages = if requests.is_empty() {
            Vec::new()
        } else {
            self.timed(self.store.read(requests)).await?
        };
        // Only a cursor read has "more after the cursor"; the latest-20 read's `more`
        // means older history, which sync does not page through.
        let more = pages
            .iter()
            .filter(|p| p.more && cursors.contains_key(&p.conv))
            .map(|p| p.conv.clone())
            .collect();
        Ok(Synced { pages, more })
    }

    /// A page of history of a conversation `uid` may read.
    pub async fn history(
        &self,
        uid: Option<&str>,
        conv: &str,
        before: Option<u64>,
        limit: Option<u64>,
    ) -> Result<Page, ChatError> {
        let Some(parsed) = Conv::parse(conv) else {
            return Err(ChatError::Invalid(
                "conv must be dm:A:B (A < B) or room:R".into(),
            ));
        };
        if let Some(uid) = uid {
            match parsed {
                Conv::Dm(..) if !parsed.dm_includes(uid) => {
                    return Err(ChatError::NotMember(format!("{conv} is not yours")))
                }
                Conv::Room(room) => {
                    if !self.timed(self.store.is_member(uid, room)).await? {
                        return Err(ChatError::NotMember(format!("join room {room} first")));
                    }
                }
                Conv::Dm(..) => {}
            }
        }
        let limit = match limit {
            None => 50,
            Some(0) => return Err(ChatError::Invalid("limit must be at least 1".into())),
            Some(l) => (l as usize).min(MAX_HISTORY_LIMIT),
        };
        let mut pages = self
            .timed(self.store.read(vec![ReadRequest {
                conv: conv.to_owned(),
                range: Range::Before { before, limit },
            }]))
            .await?;
        pages
            .pop()
            .ok_or_else(|| ChatError::Unavailable("store answered no page".into()))
    }

    /// Whether each user has a connection on any live node.
    pub async fn online(&self, uids: Vec<String>) -> Result<Vec<(String, bool)>, ChatError> {
        if uids.len() > MAX_PRESENCE_UIDS {
            return Err(ChatError::Invalid(format!(
                "at most {MAX_PRESENCE_UIDS} uids per presence request"
            )));
        }
        if let Some(bad) = uids.iter().find(|u| !valid_id(u)) {
            return Err(ChatError::Invalid(format!(
                "uid {:?} is not a valid id",
                bad.chars().take(70).collect::<String>()
            )));
        }
        let online = match &self.cluster {
            Some(cluster) => cluster.online(&uids).await?,
            None => self
                .server
                .send(LocalOnline { uids: uids.clone() })
                .await
                .map_err(|e| ChatError::Unavailable(e.to_string()))?,
        };
        Ok(uids.into_iter().zip(online).collect())
    }
}
