//! The SQL stores: SQLite (embedded) and PostgreSQL (shared by a cluster). This module
//! and its migrations (`migrations/sqlite`, `migrations/postgres`) are the only place
//! that knows the schema.
//!
//! How a write works, the same for both databases:
//!
//! - **One writer per node, group commit.** Every write is a job on a bounded queue to
//!   one writer task with one connection. It takes every job that is waiting (up to
//!   `MAX_BATCH`) and commits the appends together in one transaction, then the marks
//!   together in another, so a busy node pays one commit (one fsync) for many messages
//!   and a lone message goes at once. A busy writer (its last pass carried several
//!   jobs) starts a pass at most every [`StoreLimits::writer_pause`]
//!   (`--writer-pause-ms`), so its passes carry more.
//!   Room changes get a transaction each.
//! - **Decide in Rust, on state read in the same transaction.** The append transaction
//!   locks each conversation's counter row (on PostgreSQL, where other nodes write
//!   too, by the upsert that takes the seqs: `INSERT ... ON CONFLICT DO UPDATE ...
//!   RETURNING`, which holds the row lock to the commit; SQLite has one writer), reads what the rules look at
//!   (the sender's role, the message an edit names, earlier client ids), lets
//!   [`super::rules`] decide, and writes the messages with the seqs it took. The
//!   counter and the messages commit together, so seqs are gap-free and strictly
//!   increasing with any number of nodes. Rows are locked in sorted order, so two
//!   nodes' batches cannot deadlock.
//! - **A batch that fails is retried one job at a time**, so a job the database
//!   refuses (or a race two nodes lost at once, such as creating the same room) fails
//!   alone.
//! - `sent` is answered only after the commit. SQLite runs in WAL mode with
//!   `synchronous=FULL`: a commit is on disk before it returns. PostgreSQL's default
//!   commit is durable.
//!
//! The files: this one holds the [`Dialect`] trait (what differs between the two
//! databases), the [`SqlStore`] that answers the [`Store`] interface, and the rows'
//! helpers; `writer.rs` the writer task, its jobs and the rules of each kind of write;
//! `dialect.rs` the statements that are the same SQL on both databases; `postgres.rs` and
//! `sqlite.rs` each database's own statements and connection settings.

mod dialect;
mod postgres;
mod sqlite;
mod writer;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use dialect::dialect;
use writer::{writer, Committed, Done, Job, Op};

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Database, Pool};
use tokio::sync::{mpsc, oneshot};

use super::rules::{self, RoomView, Target, UserView};
use super::{
    Added, Appended, By, ConvState, Created, Inbox, InboxCursor, Joined, MarkKind, NewMessage,
    NewRoom, Page, Purged, ReadRequest, Receipt, Removed, Role, RoomInfo, Store, StoreError,
    StoreLimits, UserRoom, WriteStats,
};
use crate::protocol::{room_conv, Message};

/// Most jobs one writer pass takes.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer; a caller beyond it waits for room (within its deadline).
const WRITE_QUEUE: usize = 4096;

pub type Conn<D> = <<D as Dialect>::Db as Database>::Connection;
pub type SqlResult<T> = Result<T, sqlx::Error>;

/// The message columns every query that reads messages selects, in this order.
pub(crate) const MESSAGE_COLUMNS: &str =
    "conv, seq, id, sender, body, ts, edit_of, delete_of, edited, deleted";

/// A message from columns `at..at + 10` of a row (see [`MESSAGE_COLUMNS`]), on either
/// database.
pub(crate) fn message_at<'r, R>(row: &'r R, at: usize) -> SqlResult<Message>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(MessageRow {
        conv: row.try_get(at)?,
        seq: row.try_get(at + 1)?,
        id: row.try_get(at + 2)?,
        sender: row.try_get(at + 3)?,
        body: row.try_get(at + 4)?,
        ts: row.try_get(at + 5)?,
        edit_of: row.try_get(at + 6)?,
        delete_of: row.try_get(at + 7)?,
        edited: row.try_get(at + 8)?,
        deleted: row.try_get(at + 9)?,
    }
    .into_message())
}

/// [`MESSAGE_COLUMNS`] of table alias `prefix` (`l.conv, l.seq, ...`).
pub(crate) fn prefixed(prefix: &str) -> String {
    MESSAGE_COLUMNS
        .split(", ")
        .map(|col| format!("{prefix}.{col}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A message row, as both databases return it.
pub(crate) struct MessageRow {
    pub conv: String,
    pub seq: i64,
    pub id: String,
    pub sender: String,
    pub body: Option<String>,
    pub ts: i64,
    pub edit_of: Option<i64>,
    pub delete_of: Option<i64>,
    pub edited: bool,
    pub deleted: bool,
}

impl MessageRow {
    pub fn into_message(self) -> Message {
        let mut m = Message::new(
            &self.conv,
            self.seq as u64,
            self.id,
            &self.sender,
            self.body,
            self.ts as u64,
        );
        m.edit = self.edit_of.map(|s| s as u64);
        m.delete = self.delete_of.map(|s| s as u64);
        m.edited = self.edited;
        m.deleted = self.deleted;
        m
    }
}

/// Everything one append batch writes, gathered so each database can write it in as
/// few statements as it can.
#[derive(Default)]
pub struct AppendWrites {
    pub messages: Vec<Message>,
    /// conv -> (last seq, last ts)
    pub last: BTreeMap<String, (u64, u64)>,
    /// DM conversations whose first message is in this batch: (conv, participant,
    /// the participant's marks: the highest seq they sent in the batch, or 0).
    pub dm_members: Vec<(String, String, u64)>,
    /// (conv, sender) -> highest seq they sent, for senders whose member row exists:
    /// their read and delivered marks move there.
    pub sender_marks: BTreeMap<(String, String), u64>,
    /// (conv, seq) -> the latest body an edit gave it.
    pub edits: BTreeMap<(String, u64), Option<String>>,
    /// (conv, seq) deleted.
    pub deletes: Vec<(String, u64)>,
    /// (sender, client id, conv, seq, expires ms)
    pub idempotency: Vec<(String, String, String, u64, u64)>,
}

/// What [`Dialect::lock_for_append`] answers: the conversations' last seqs and the
/// roles of the member rows it locked.
#[derive(Debug, Default)]
pub struct Locked {
    pub last: HashMap<String, u64>,
    pub roles: HashMap<(String, String), Role>,
}

/// What a database must do for the shared algorithms below: small queries, each one
/// statement (or a loop of them where SQLite has no arrays).
#[async_trait]
pub trait Dialect: Send + Sync + 'static {
    type Db: Database;

    /// The messages first stored under these (sender, client id) keys, unexpired.
    async fn find_idempotent(
        c: &mut Conn<Self>,
        keys: &[(String, String)],
        now: u64,
    ) -> SqlResult<HashMap<(String, String), Message>>;
    /// What an append batch decides on, locked: locks each conversation's counter row
    /// (sorted), making those missing if `create`, then locks the member rows of the
    /// (conv, uid) pairs (sorted) against removal. Answers the last seqs of the
    /// conversations that have a counter row and the roles of the pairs that have one.
    /// Counters before members, each in sorted order: every transaction that locks both
    /// locks them in this order, so none deadlock. A database may make the counter rows
    /// whether or not `create` asks (SQLite does: making them costs it nothing more).
    async fn lock_for_append(
        c: &mut Conn<Self>,
        convs: &[String],
        pairs: &[(String, String)],
        create: bool,
    ) -> SqlResult<Locked>;
    /// The messages edits and deletes name, where they exist.
    async fn targets(
        c: &mut Conn<Self>,
        pairs: &[(String, u64)],
    ) -> SqlResult<HashMap<(String, u64), Target>>;
    /// Writes an append batch. Answers false when another node stored one of its
    /// client ids meanwhile (the caller rolls back and decides again). On a first try
    /// (not `again`), a client id stored before may instead fail the write with a
    /// unique violation on the idempotency table's key, which the caller also takes
    /// as a reason to decide again.
    async fn write_appends(
        c: &mut Conn<Self>,
        w: &AppendWrites,
        now: u64,
        again: bool,
    ) -> SqlResult<bool>;

    /// (read, delivered) of a participant, locked; None if not a participant.
    async fn marks_for_update(
        c: &mut Conn<Self>,
        conv: &str,
        uid: &str,
    ) -> SqlResult<Option<(u64, u64)>>;
    async fn last_seq(c: &mut Conn<Self>, conv: &str) -> SqlResult<u64>;
    async fn set_marks(
        c: &mut Conn<Self>,
        conv: &str,
        uid: &str,
        read: u64,
        delivered: u64,
    ) -> SqlResult<()>;

    /// The room; with `lock`, its row locked: every membership change of a room takes
    /// this lock first, so checks and changes of one room never interleave.
    async fn room(c: &mut Conn<Self>, room: &str, lock: bool) -> SqlResult<RoomView>;
    async fn user_view(c: &mut Conn<Self>, room: &str, uid: &str) -> SqlResult<UserView>;
    async fn role(c: &mut Conn<Self>, conv: &str, uid: &str) -> SqlResult<Option<Role>>;
    /// Inserts the room; false (and nothing written) if it exists, which a concurrent
    /// creator on another node may have just committed.
    async fn insert_room(c: &mut Conn<Self>, room: &str, private: bool, ts: u64)
        -> SqlResult<bool>;
    /// Adds a member (marks at the newest message: nothing before counts as unread)
    /// or changes their role. Answers the member's read mark.
    async fn put_member(c: &mut Conn<Self>, conv: &str, uid: &str, role: Role) -> SqlResult<u64>;
    async fn drop_member(c: &mut Conn<Self>, conv: &str, uid: &str) -> SqlResult<bool>;
    async fn set_ban(
        c: &mut Conn<Self>,
        room: &str,
        uid: &str,
        banned: bool,
        ts: u64,
    ) -> SqlResult<()>;
    /// Adds `delta` to the room's member count; answers the new count.
    async fn adjust_members(c: &mut Conn<Self>, room: &str, delta: i64) -> SqlResult<u64>;
    async fn room_info(c: &mut Conn<Self>, room: &str, max: usize) -> SqlResult<RoomInfo>;

    async fn purge(c: &mut Conn<Self>, cutoff: Option<u64>, now: u64) -> SqlResult<Purged>;

    async fn conversations(c: &mut Conn<Self>, uid: &str) -> SqlResult<Vec<ConvState>>;
    async fn read_pages(c: &mut Conn<Self>, requests: Vec<ReadRequest>) -> SqlResult<Vec<Page>>;
    async fn inbox(
        c: &mut Conn<Self>,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> SqlResult<Inbox>;
    async fn receipts(c: &mut Conn<Self>, conv: &str) -> SqlResult<Vec<Receipt>>;
    async fn rooms_of(c: &mut Conn<Self>, uid: &str) -> SqlResult<Vec<UserRoom>>;
    /// Stores `candidate` as the epoch unless one exists; answers the stored one.
    async fn epoch(c: &mut Conn<Self>, candidate: &str) -> SqlResult<String>;
    async fn ping(c: &mut Conn<Self>) -> SqlResult<()>;
}

/// Connection trouble is `Unavailable`; data that cannot be what we wrote is `Corrupt`.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt_role(s: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("unknown role {s:?}").into())
}

/// Parses a role column.
pub(crate) fn role_from(s: &str) -> SqlResult<Role> {
    Role::parse(s).ok_or_else(|| corrupt_role(s))
}

/// A store on one database: a read pool and the writer task's queue.
pub struct SqlStore<D: Dialect> {
    read: Pool<D::Db>,
    jobs: mpsc::Sender<Job>,
    epoch: String,
    committed: Arc<Committed>,
    _dialect: PhantomData<D>,
}

impl<D: Dialect> SqlStore<D>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    /// Starts the writer on `write` (a pool of one connection) and reads the epoch.
    pub(crate) async fn start(
        read: Pool<D::Db>,
        write: Pool<D::Db>,
        limits: StoreLimits,
    ) -> Result<Self, StoreError> {
        let epoch = {
            let mut c = write.acquire().await.map_err(map_err)?;
            let candidate = uuid::Uuid::new_v4().simple().to_string();
            D::epoch(&mut c, &candidate).await.map_err(map_err)?
        };
        let (jobs, queue) = mpsc::channel(WRITE_QUEUE);
        let committed = Arc::new(Committed::default());
        tokio::spawn(writer::<D>(write, queue, limits, committed.clone()));
        Ok(SqlStore {
            read,
            jobs,
            epoch,
            committed,
            _dialect: PhantomData,
        })
    }

    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the database writer has stopped".into());
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<D::Db>, StoreError> {
        self.read.acquire().await.map_err(map_err)
    }
}

fn unexpected() -> StoreError {
    StoreError::Corrupt("the database writer answered another kind of job".into())
}

#[async_trait]
impl<D: Dialect> Store for SqlStore<D>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn write_stats(&self) -> Option<WriteStats> {
        Some(WriteStats {
            commits: self.committed.commits.load(Ordering::Relaxed),
            writes: self.committed.writes.load(Ordering::Relaxed),
        })
    }

    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        match self.write(Op::Append(msg)).await? {
            Done::Appended(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    async fn join(&self, uid: &str, room: &str) -> Result<Joined, StoreError> {
        match self
            .write(Op::Join {
                uid: uid.into(),
                room: room.into(),
            })
            .await?
        {
            Done::Joined(j) => Ok(j),
            _ => Err(unexpected()),
        }
    }

    async fn create_room(&self, by: &By, room: NewRoom) -> Result<Created, StoreError> {
        match self
            .write(Op::Create {
                by: by.clone(),
                room,
            })
            .await?
        {
            Done::Created(created) => Ok(created),
            _ => Err(unexpected()),
        }
    }

    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        match self
            .write(Op::Leave {
                uid: uid.into(),
                room: room.into(),
            })
            .await?
        {
            Done::Left(l) => Ok(l),
            _ => Err(unexpected()),
        }
    }

    async fn add_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        role: Role,
    ) -> Result<Added, StoreError> {
        match self
            .write(Op::Add {
                by: by.clone(),
                room: room.into(),
                uid: uid.into(),
                role,
            })
            .await?
        {
            Done::Added(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    async fn remove_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        ban: bool,
    ) -> Result<Removed, StoreError> {
        match self
            .write(Op::Remove {
                by: by.clone(),
                room: room.into(),
                uid: uid.into(),
                ban,
            })
            .await?
        {
            Done::Removed(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn room_info(
        &self,
        asker: &By,
        room: &str,
        max_members: usize,
    ) -> Result<RoomInfo, StoreError> {
        let mut c = self.reader().await?;
        let r = D::room(&mut c, room, false).await.map_err(map_err)?;
        let role = match asker.user() {
            Some(u) => D::role(&mut c, &room_conv(room), u)
                .await
                .map_err(map_err)?,
            None => None,
        };
        rules::check_reader(asker, room, &r, role)?;
        D::room_info(&mut c, room, max_members)
            .await
            .map_err(map_err)
    }

    async fn rooms_of(&self, uid: &str) -> Result<Vec<UserRoom>, StoreError> {
        let mut c = self.reader().await?;
        D::rooms_of(&mut c, uid).await.map_err(map_err)
    }

    async fn role(&self, uid: &str, room: &str) -> Result<Option<Role>, StoreError> {
        let mut c = self.reader().await?;
        D::role(&mut c, &room_conv(room), uid)
            .await
            .map_err(map_err)
    }

    async fn conversations(&self, uid: &str) -> Result<Vec<ConvState>, StoreError> {
        let mut c = self.reader().await?;
        D::conversations(&mut c, uid).await.map_err(map_err)
    }

    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.reader().await?;
        D::read_pages(&mut c, requests).await.map_err(map_err)
    }

    async fn inbox(
        &self,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> Result<Inbox, StoreError> {
        let mut c = self.reader().await?;
        D::inbox(&mut c, uid, limit, before).await.map_err(map_err)
    }

    async fn mark(
        &self,
        uid: &str,
        conv: &str,
        kind: MarkKind,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        match self
            .write(Op::Mark {
                uid: uid.into(),
                conv: conv.into(),
                kind,
                seq,
            })
            .await?
        {
            Done::Marked(m) => Ok(m),
            _ => Err(unexpected()),
        }
    }

    async fn receipts(&self, conv: &str) -> Result<Vec<Receipt>, StoreError> {
        let mut c = self.reader().await?;
        D::receipts(&mut c, conv).await.map_err(map_err)
    }

    async fn purge(&self, now_ms: u64) -> Result<Purged, StoreError> {
        match self.write(Op::Purge { now: now_ms }).await? {
            Done::Purged(p) => Ok(p),
            _ => Err(unexpected()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.reader().await?;
        D::ping(&mut c).await.map_err(map_err)
    }
}

/// How long a pool waits for a connection, and a connection for the database.
pub(crate) fn pool_timeout(store_timeout: Duration) -> Duration {
    store_timeout.max(Duration::from_millis(100))
}
