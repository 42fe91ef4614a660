//! The message store: one interface, two implementations.
//!
//! - [`memory::MemoryStore`]: embedded, for a single node (no `--redis-url`).
//! - [`redis::RedisStore`]: shared by every node of a cluster.
//!
//! Both pass the same [`conformance`] suite. [`Timed`] wraps either one so that no call
//! can hang: a call that does not finish in time fails with [`StoreError::Timeout`], which
//! the sender sees as `unavailable`.

pub mod conformance;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::protocol::Message;

/// A message to store. `id` and `ts` are chosen by the caller; `seq` by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub conv: String,
    pub from: String,
    pub to: Option<String>,
    pub room: Option<String>,
    pub body: String,
    /// With a client id, the store keeps the message's identity for the idempotency
    /// window and answers a resend with the first message instead of storing it again.
    pub client_id: Option<String>,
    pub id: String,
    pub ts: u64,
    /// For room messages from users: refuse unless `from` is a member of `room`,
    /// checked in the same atomic step as the append.
    pub require_member: bool,
}

impl NewMessage {
    /// The message as stored, with the seq the store gave it.
    pub fn into_message(self, seq: u64) -> Message {
        Message {
            conv: self.conv,
            seq,
            id: self.id,
            from: self.from,
            to: self.to,
            room: self.room,
            body: self.body,
            ts: self.ts,
        }
    }
}

/// What [`Store::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: Message,
    /// True when the client id was seen before: `message` is the one stored then.
    pub duplicate: bool,
    /// Where the store also keeps the cluster directory (Redis): the nodes holding a
    /// connection of a recipient (or of the sender's other devices), read in the same
    /// atomic step as the append. A connection registered after that step reads the
    /// message through its own sync, so none falls between the two. `None` for a
    /// store without a directory (a single node delivers locally).
    pub nodes: Option<Vec<String>>,
}

/// Which part of a conversation to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Messages with `seq > after`, oldest first, at most `limit`; `more` says whether
    /// there were more than `limit`.
    After { after: u64, limit: usize },
    /// The newest messages with `seq < before` (all when `None`), at most `limit`,
    /// oldest first; `more` says whether older ones are kept.
    Before { before: Option<u64>, limit: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub conv: String,
    pub range: Range,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub conv: String,
    pub messages: Vec<Message>,
    pub more: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{uid} is not a member of room {room}")]
    NotMember { uid: String, room: String },
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store returned data it should not hold: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a message with the next seq of its conversation, atomically with the
    /// membership check and the idempotency key. Records the conversation for the
    /// participants of a DM.
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError>;
    /// Makes `uid` a member of `room`; true when it was not one before.
    async fn join(&self, uid: &str, room: &str) -> Result<bool, StoreError>;
    /// Ends `uid`'s membership of `room`; true when it was one before.
    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError>;
    /// The rooms `uid` belongs to, sorted.
    async fn rooms_of(&self, uid: &str) -> Result<Vec<String>, StoreError>;
    async fn is_member(&self, uid: &str, room: &str) -> Result<bool, StoreError>;
    /// Every conversation of `uid`: DMs they took part in and rooms they belong to.
    async fn conversations_of(&self, uid: &str) -> Result<Vec<String>, StoreError>;
    /// Reads several conversations in one go (one round trip where the store allows).
    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError>;
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

pub type SharedStore = Arc<dyn Store>;

/// Limits every store implementation honours.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Messages kept per conversation; older ones are dropped from history.
    pub history_per_conv: usize,
    /// How long a client id is remembered.
    pub idempotency_ttl: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            history_per_conv: 10_000,
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Puts a deadline on every call of the wrapped store.
pub struct Timed<S> {
    inner: S,
    timeout: Duration,
}

impl<S: Store> Timed<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Timed { inner, timeout }
    }

    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)))
    }
}

#[async_trait]
impl<S: Store> Store for Timed<S> {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        self.within(self.inner.append(msg)).await
    }
    async fn join(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        self.within(self.inner.join(uid, room)).await
    }
    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        self.within(self.inner.leave(uid, room)).await
    }
    async fn rooms_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        self.within(self.inner.rooms_of(uid)).await
    }
    async fn is_member(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        self.within(self.inner.is_member(uid, room)).await
    }
    async fn conversations_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        self.within(self.inner.conversations_of(uid)).await
    }
    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError> {
        self.within(self.inner.read(requests)).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.within(self.inner.ping()).await
    }
}
