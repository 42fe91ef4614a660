//! The store of record: messages, each conversation's seq counter, rooms with their
//! owners, members and bans, read and delivered marks, idempotency records and the
//! epoch. Everything a client was told is stored lives here; Redis (cluster mode) holds
//! only what can be rebuilt.
//!
//! One interface, [`Store`], three implementations that pass one conformance suite
//! ([`conformance`]):
//!
//! - [`memory::MemoryStore`] (`memory:`): a throwaway store for demos and tests;
//! - [`sql::SqliteStore`] (`sqlite://PATH`): embedded, one node, durable;
//! - [`sql::PgStore`] (`postgres://...`): shared by every node of a cluster.
//!
//! The rules that decide whether a write is allowed (membership, authorship, bans,
//! limits) are plain functions in [`rules`], so every implementation decides the same
//! way; an implementation only loads the state the rules look at and writes what they
//! decided, in one transaction.

pub mod conformance;
pub mod memory;
pub mod rules;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::protocol::Message;
pub use crate::protocol::RoomInfo;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The rules refuse the request; nothing was written.
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// The store could not be reached or did not answer; the write may or may not have
    /// happened (a retry with the same client id finds out).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// The store holds data this program did not write.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

/// A request the rules refuse, with the contract's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotMember(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Invalid(String),
}

/// Who makes a change: a user (the rules apply) or the server API (trusted: it may post
/// to any room and moderate any message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum By {
    User(String),
    Server,
}

impl By {
    pub fn user(&self) -> Option<&str> {
        match self {
            By::User(u) => Some(u),
            By::Server => None,
        }
    }
}

/// What an appended message does to an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Edit(u64),
    Delete(u64),
}

/// A message to store. The store assigns its seq.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conv: String,
    pub from: String,
    /// None only for a delete.
    pub body: Option<String>,
    pub change: Option<Change>,
    pub client_id: Option<String>,
    pub id: String,
    pub ts: u64,
    /// `By::Server` posts without membership and deletes as a moderator.
    pub by: By,
}

impl NewMessage {
    /// The stored message, once it has a seq.
    pub fn into_message(self, seq: u64) -> Message {
        let mut m = Message::new(&self.conv, seq, self.id, &self.from, self.body, self.ts);
        match self.change {
            Some(Change::Edit(t)) => m.edit = Some(t),
            Some(Change::Delete(t)) => m.delete = Some(t),
            None => {}
        }
        m
    }
}

#[derive(Debug, Clone)]
pub struct Appended {
    pub message: Message,
    /// A resend of a client id stored earlier: `message` is the first one.
    pub duplicate: bool,
}

/// A member's standing in a room (or a participant of a DM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
    /// A participant of a one-to-one conversation.
    Dm,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
            Role::Dm => "dm",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "member" => Some(Role::Member),
            "dm" => Some(Role::Dm),
            _ => None,
        }
    }
}

/// Who may create rooms (contract section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomCreation {
    /// Any user, by `join` or `create`.
    Open,
    /// Only the server API.
    Api,
}

/// What `join` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The user was not a member before.
    pub changed: bool,
    /// The room did not exist and was created (public, the joiner its owner).
    pub created: bool,
    pub role: Role,
    pub private: bool,
    /// Members after the join.
    pub members: u64,
    /// See [`Added::marked`].
    pub marked: Option<u64>,
}

/// A room to create.
#[derive(Debug, Clone, Default)]
pub struct NewRoom {
    pub room: String,
    pub private: bool,
    pub owners: Vec<String>,
    pub members: Vec<String>,
}

/// What `add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The user was not a member (or had another role) before.
    pub changed: bool,
    pub role: Role,
    pub members: u64,
    /// Some when this call made the user a member of a room that has messages: their
    /// read and delivered marks were set to this seq, the room's newest message, so its
    /// history does not count as unread. The caller pushes it like an explicit `read`
    /// mark (contract section 8). None: no mark was set (already a member, or no
    /// message yet).
    pub marked: Option<u64>,
}

/// What `create_room` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The new room, every member listed.
    pub info: RoomInfo,
    /// See [`Added::marked`]: the marks every initial member starts with (a room gets
    /// messages before it exists only from the server API).
    pub marked: Option<u64>,
}

/// The mark a new member starts with, if it is one to tell anyone about.
pub fn implicit_mark(last_seq: u64) -> Option<u64> {
    (last_seq > 0).then_some(last_seq)
}

/// What `remove` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The user was a member.
    pub changed: bool,
    pub members: u64,
}

/// One room of a user, with its size (live events go only to rooms up to a size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRoom {
    pub room: String,
    pub members: u64,
}

/// One conversation of a user, as `sync` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvState {
    pub conv: String,
    /// seq of its newest message (0: none yet).
    pub last_seq: u64,
    pub read: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Messages with seq > `after`, oldest first, at most `limit`.
    After { after: u64, limit: usize },
    /// Messages with seq < `before` (the newest if None), at most `limit`, oldest first.
    Before { before: Option<u64>, limit: usize },
}

#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub conv: String,
    pub range: Range,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub conv: String,
    pub messages: Vec<Message>,
    /// `After`: newer messages than the page exist. `Before`: older ones are kept.
    pub more: bool,
}

/// Read and delivered marks (contract section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    Read,
    Delivered,
}

impl MarkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MarkKind::Read => "read",
            MarkKind::Delivered => "delivered",
        }
    }
}

/// One participant's marks in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub uid: String,
    pub read: u64,
    pub delivered: u64,
}

/// One conversation in a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub conv: String,
    /// The newest message, if any.
    pub last: Option<Message>,
    pub read: u64,
    /// Messages from others above `read`, not counting edit and delete events or
    /// deleted messages.
    pub unread: u64,
}

/// Where an inbox page starts: after the conversation shown last, whose newest message
/// has `ts`. Without `conv`, after every conversation with a message at `ts` or later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxCursor {
    pub ts: u64,
    pub conv: Option<String>,
}

impl InboxCursor {
    /// Whether a conversation whose newest message has `ts` comes after this cursor.
    pub fn admits(&self, ts: u64, conv: &str) -> bool {
        ts < self.ts || (ts == self.ts && self.conv.as_deref().is_some_and(|c| conv > c))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbox {
    pub conversations: Vec<InboxEntry>,
    pub more: bool,
}

/// What one upkeep pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub idempotency: u64,
}

/// Rules and bounds every implementation enforces in the same step as the write.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// How long a client id is remembered.
    pub idempotency_ttl: Duration,
    /// Messages older than this are purged (None: kept forever).
    pub retention: Option<Duration>,
    /// Rooms one user may belong to.
    pub rooms_per_user: usize,
    pub room_creation: RoomCreation,
    /// Shortest time between the starts of two passes of a busy database writer (one
    /// whose last pass carried more than one job; a lone write never waits): longer
    /// means larger group commits, less CPU per message and more latency.
    pub writer_pause: Duration,
}

/// [`StoreLimits::writer_pause`] unless set. A pass costs about the same however many
/// messages it carries (a few round trips and one commit, in the node and in the
/// database), so a busy writer that started a pass as soon as the last one ended would
/// pay that for a few messages each time. Measured with three nodes on one PostgreSQL
/// at 5,000 messages/s (bench/profile.sh direct 5; BENCHMARKS.md has the sweep): with
/// no pause the passes carried about 5 messages, the two cores were saturated and the
/// p99 latency was 40 ms; with 10 ms the nodes used a third less CPU, PostgreSQL half,
/// and the p99 was 21 ms.
pub const DEFAULT_WRITER_PAUSE: Duration = Duration::from_millis(10);

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            idempotency_ttl: Duration::from_secs(24 * 3600),
            retention: None,
            rooms_per_user: 1000,
            room_creation: RoomCreation::Open,
            writer_pause: DEFAULT_WRITER_PAUSE,
        }
    }
}

/// What a store's writer has committed since it started: how well group commit works
/// (`writes / commits` is the average group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Writes (appends, marks, room changes) those transactions carried.
    pub writes: u64,
}

/// The store of record. Every method is one transaction (or one consistent read).
#[async_trait]
pub trait Store: Send + Sync {
    /// The life of this database: made with it, the same across restarts.
    fn epoch(&self) -> &str;

    /// The writer's commits, for stores that commit (not the memory store).
    fn write_stats(&self) -> Option<WriteStats> {
        None
    }

    /// Stores a message with the next seq of its conversation, or answers the message
    /// first stored under its client id. Refused: `NotMember` (a room message from a
    /// non-member), `NotFound` / `Forbidden` (an edit or delete the rules refuse).
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError>;

    /// Makes `uid` a member of a public room; creates a missing one (public, `uid` its
    /// owner) when creation is open. Refused: `Forbidden` (private or banned),
    /// `NotFound` (missing, creation by API only), `Limit` (rooms per user). A new
    /// member's read and delivered marks start at the room's newest message, answered
    /// in `marked` (the same holds for `add_member` and `create_room`).
    async fn join(&self, uid: &str, room: &str) -> Result<Joined, StoreError>;
    /// Creates a room. `by` a user: they become its (first) owner and creation must be
    /// open. Refused: `Conflict` (exists), `Forbidden` (creation by API only), `Limit`.
    async fn create_room(&self, by: &By, room: NewRoom) -> Result<Created, StoreError>;
    /// `uid` leaves `room`; false if they were not a member.
    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError>;
    /// Adds `uid` to `room` with `role` (lifting a ban). Only owners (or the server).
    async fn add_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        role: Role,
    ) -> Result<Added, StoreError>;
    /// Removes `uid` from `room`, banning them if `ban`. Only owners (or the server).
    async fn remove_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        ban: bool,
    ) -> Result<Removed, StoreError>;
    /// The room; for a user only if they are a member (`NotMember`). At most
    /// `max_members` members are listed.
    async fn room_info(
        &self,
        asker: &By,
        room: &str,
        max_members: usize,
    ) -> Result<RoomInfo, StoreError>;
    /// The rooms `uid` belongs to, sorted, with their sizes.
    async fn rooms_of(&self, uid: &str) -> Result<Vec<UserRoom>, StoreError>;
    /// `uid`'s role in `room`, None if not a member.
    async fn role(&self, uid: &str, room: &str) -> Result<Option<Role>, StoreError>;

    /// Every conversation of `uid` (DMs they took part in, rooms they belong to) with
    /// its newest seq and the user's marks, sorted by conversation id.
    async fn conversations(&self, uid: &str) -> Result<Vec<ConvState>, StoreError>;
    /// Reads several conversations in one go.
    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError>;
    /// `uid`'s conversations, the one with the newest message first (ties by
    /// conversation id); `before` pages on after the last one shown. Conversations
    /// without a message come last.
    async fn inbox(
        &self,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> Result<Inbox, StoreError>;

    /// Moves a mark forward. Answers the new value, or None when `seq` is not above
    /// the stored one (marks never move back). Refused: `NotMember` (not a
    /// participant), `Invalid` (above the newest message). A read mark also moves the
    /// delivered mark.
    async fn mark(
        &self,
        uid: &str,
        conv: &str,
        kind: MarkKind,
        seq: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// Every participant's marks in `conv`, sorted by uid.
    async fn receipts(&self, conv: &str) -> Result<Vec<Receipt>, StoreError>;

    /// Removes messages past the retention and expired idempotency records.
    async fn purge(&self, now_ms: u64) -> Result<Purged, StoreError>;
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

pub type SharedStore = Arc<dyn Store>;

/// Opens the store a `--database-url` names: `memory:`, `sqlite://PATH` or
/// `postgres://...`; runs pending migrations. `timeout` bounds connecting; callers put
/// their own deadline on each call (an append must be able to outlive its caller, so
/// that what the database committed is still delivered).
pub async fn open(
    url: &str,
    limits: StoreLimits,
    timeout: Duration,
) -> Result<SharedStore, StoreError> {
    let store: SharedStore = match url_kind(url) {
        Some(UrlKind::Memory) => Arc::new(memory::MemoryStore::new(limits)),
        Some(UrlKind::Sqlite) => Arc::new(sql::SqliteStore::open(url, limits, timeout).await?),
        Some(UrlKind::Postgres) => Arc::new(sql::PgStore::connect(url, limits, timeout).await?),
        None => {
            return Err(StoreError::Unavailable(format!(
                "unknown database URL {url:?}: use sqlite://PATH, postgres://... or memory:"
            )))
        }
    };
    Ok(store)
}

/// The kinds of database URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    Memory,
    Sqlite,
    Postgres,
}

pub fn url_kind(url: &str) -> Option<UrlKind> {
    if url == "memory:" {
        Some(UrlKind::Memory)
    } else if url.starts_with("sqlite:") {
        Some(UrlKind::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(UrlKind::Postgres)
    } else {
        None
    }
}
