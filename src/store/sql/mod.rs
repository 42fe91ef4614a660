//! The SQL stores: SQLite (embedded) and PostgreSQL (shared by a cluster). This module
//! and its migrations (`migrations/sqlite`, `migrations/postgres`) are the only place
//! that knows the schema.
//!
//! How a write works, the same for both databases:
//!
//! - **One writer per node, group commit.** Every write is a job on a bounded queue to
//!   one writer task with one connection. It takes every job that is waiting (up to
//!   [`MAX_BATCH`]) and commits the appends together in one transaction, then the marks
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

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Connection as _, Database, Pool};
use tokio::sync::{mpsc, oneshot};

use super::rules::{self, AppendView, JoinPlan, RoomView, Target, UserView};
use super::{
    implicit_mark, Added, Appended, By, Change, ConvState, Created, Inbox, InboxCursor, Joined,
    MarkKind, NewMessage, NewRoom, Page, Purged, ReadRequest, Receipt, Refusal, Removed, Role,
    RoomInfo, Store, StoreError, StoreLimits, UserRoom, WriteStats,
};
use crate::protocol::{now_ms, room_conv, Conv, Message};

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
    /// What an append batch decides on, locked: makes sure each conversation has its
    /// counter row and locks them (sorted), then locks the member rows of the (conv, uid)
    /// pairs (sorted) against removal. Answers the conversations' last seqs and the
    /// roles of the pairs that have one. Counters before members, each in sorted order:
    /// every transaction that locks both locks them in this order, so none deadlock.
    async fn lock_for_append(
        c: &mut Conn<Self>,
        convs: &[String],
        pairs: &[(String, String)],
    ) -> SqlResult<Locked>;
    /// The messages edits and deletes name, where they exist.
    async fn targets(
        c: &mut Conn<Self>,
        pairs: &[(String, u64)],
    ) -> SqlResult<HashMap<(String, u64), Target>>;
    /// Writes an append batch. Answers false when another node stored one of its
    /// client ids meanwhile (the caller rolls back and decides again).
    async fn write_appends(c: &mut Conn<Self>, w: &AppendWrites, now: u64) -> SqlResult<bool>;

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

/// A write for the writer task.
enum Op {
    Append(NewMessage),
    Mark {
        uid: String,
        conv: String,
        kind: MarkKind,
        seq: u64,
    },
    Join {
        uid: String,
        room: String,
    },
    Create {
        by: By,
        room: NewRoom,
    },
    Leave {
        uid: String,
        room: String,
    },
    Add {
        by: By,
        room: String,
        uid: String,
        role: Role,
    },
    Remove {
        by: By,
        room: String,
        uid: String,
        ban: bool,
    },
    Purge {
        now: u64,
    },
}

enum Done {
    Appended(Appended),
    Marked(Option<u64>),
    Joined(Joined),
    Created(Created),
    Left(bool),
    Added(Added),
    Removed(Removed),
    Purged(Purged),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// A store on one database: a read pool and the writer task's queue.
pub struct SqlStore<D: Dialect> {
    read: Pool<D::Db>,
    jobs: mpsc::Sender<Job>,
    epoch: String,
    committed: Arc<Committed>,
    _dialect: PhantomData<D>,
}

/// The writer's counts behind [`Store::write_stats`].
#[derive(Default)]
struct Committed {
    commits: AtomicU64,
    writes: AtomicU64,
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

/// The writer task: one connection, every job that is waiting in one pass. Ends when
/// the store is dropped.
///
/// It keeps its connection between passes: a pool checks a connection with a round
/// trip (a ping) when it is taken and another when it is given back, which was a third
/// of the round trips of a busy writer. After a pass in which the database failed, the
/// connection goes back to the pool (whose ping closes it if it is broken) and the next
/// pass takes one afresh.
async fn writer<D: Dialect>(
    pool: Pool<D::Db>,
    mut queue: mpsc::Receiver<Job>,
    limits: StoreLimits,
    committed: Arc<Committed>,
) where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // When the last pass started, if it carried more than one job: a writer fed one job
    // at a time (one client waiting for each answer) never waits.
    let mut last_busy_pass: Option<tokio::time::Instant> = None;
    let mut held: Option<sqlx::pool::PoolConnection<D::Db>> = None;
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if let Some(next) = last_busy_pass.map(|t| t + limits.writer_pause) {
            if next > tokio::time::Instant::now() && batch.len() < MAX_BATCH {
                tokio::time::sleep_until(next).await;
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
        }
        last_busy_pass = (batch.len() > 1).then(tokio::time::Instant::now);
        let mut appends = Vec::new();
        let mut marks = Vec::new();
        let mut others = Vec::new();
        for job in batch.drain(..) {
            match job.op {
                Op::Append(_) => appends.push(job),
                Op::Mark { .. } => marks.push(job),
                _ => others.push(job),
            }
        }
        let conn = match held.as_mut() {
            Some(c) => c,
            None => match pool.acquire().await {
                Ok(c) => held.insert(c),
                Err(e) => {
                    let e = map_err(e);
                    log::warn!("database writer cannot get a connection: {e}");
                    for job in appends.into_iter().chain(marks).chain(others) {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            },
        };
        let c = &*committed;
        let mut healthy = run_group::<D>(conn, appends, &limits, c, append_batch::<D>).await;
        healthy &= run_group::<D>(conn, marks, &limits, c, mark_batch::<D>).await;
        for job in others {
            healthy &= run_group::<D>(conn, vec![job], &limits, c, single::<D>).await;
        }
        if !healthy {
            held = None;
        }
    }
}

type Outcome = Result<Done, Refusal>;

/// Which try of a group's transaction this is.
///
/// An append batch's first try assumes that none of its client ids was stored before
/// (a resend is rare), and so saves the round trip of looking them up: the write finds
/// out, as it finds out that another node stored one meanwhile, and the transaction is
/// then rolled back and tried again with the look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Try {
    First,
    Again,
}

/// Runs a group of jobs inside a transaction the caller opened.
type GroupFn<D> = for<'a> fn(
    &'a mut Conn<D>,
    &'a [&'a Op],
    &'a StoreLimits,
    Try,
) -> futures_util::future::BoxFuture<'a, SqlResult<Vec<Outcome>>>;

/// Runs `jobs` in one transaction with `f`; if that fails, each job alone, so one
/// job's failure is its own. Answers false if the database failed (a refusal by the
/// rules is not a failure).
async fn run_group<D: Dialect>(
    conn: &mut Conn<D>,
    jobs: Vec<Job>,
    limits: &StoreLimits,
    committed: &Committed,
    f: GroupFn<D>,
) -> bool
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    if jobs.is_empty() {
        return true;
    }
    match transact::<D>(conn, &jobs, limits, committed, f).await {
        Ok(outcomes) => {
            answer(jobs, outcomes);
            true
        }
        Err(e) if jobs.len() > 1 => {
            log::info!(
                "a batch of {} writes failed ({e}); writing them one at a time",
                jobs.len()
            );
            let mut healthy = true;
            for job in jobs {
                match transact::<D>(conn, std::slice::from_ref(&job), limits, committed, f).await {
                    Ok(outcomes) => answer(vec![job], outcomes),
                    Err(e) => {
                        healthy = false;
                        let _ = job.reply.send(Err(map_err(e)));
                    }
                }
            }
            healthy
        }
        Err(e) => {
            let e = map_err(e);
            log::warn!("database write failed: {e}");
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
            false
        }
    }
}

async fn transact<D: Dialect>(
    conn: &mut Conn<D>,
    jobs: &[Job],
    limits: &StoreLimits,
    committed: &Committed,
    f: GroupFn<D>,
) -> SqlResult<Vec<Outcome>>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
    // A client id may have been stored before (a resend: the first try does not look
    // them up), or by another node between our look-up and our insert: then the
    // transaction is rolled back and decided again with what is stored (a few rounds at
    // most; it is rare).
    for n in 0..3 {
        let attempt = if n == 0 { Try::First } else { Try::Again };
        let mut tx = conn.begin().await?;
        match f(&mut *tx, &ops, limits, attempt).await {
            Ok(outcomes) => {
                tx.commit().await?;
                committed.commits.fetch_add(1, Ordering::Relaxed);
                committed
                    .writes
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                return Ok(outcomes);
            }
            Err(e) if is_lost_race(&e) => tx.rollback().await?,
            Err(e) => return Err(e),
        }
    }
    Err(sqlx::Error::Protocol(LOST_RACE.into()))
}

/// The error a write returns when another node stored one of its client ids first.
const LOST_RACE: &str = "another node stored one of these client ids meanwhile";

fn is_lost_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Protocol(m) if m == LOST_RACE)
}

fn answer(jobs: Vec<Job>, outcomes: Vec<Outcome>) {
    for (job, outcome) in jobs.into_iter().zip(outcomes) {
        // The caller may have given up (its client resends with the same client id).
        let _ = job.reply.send(outcome.map_err(StoreError::Refused));
    }
}

fn append_batch<'a, D: Dialect>(
    c: &'a mut Conn<D>,
    ops: &'a [&'a Op],
    limits: &'a StoreLimits,
    attempt: Try,
) -> futures_util::future::BoxFuture<'a, SqlResult<Vec<Outcome>>>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    Box::pin(async move {
        let msgs: Vec<&NewMessage> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Append(m) => Some(m),
                _ => None,
            })
            .collect();
        let look_up = attempt == Try::Again;
        let (outcomes, writes, now) = decide_appends::<D>(c, &msgs, limits, look_up).await?;
        if D::write_appends(c, &writes, now).await? {
            Ok(outcomes)
        } else {
            Err(sqlx::Error::Protocol(LOST_RACE.into()))
        }
    })
}

/// Reads what the rules need for a batch of appends and decides each in order. Without
/// `look_up`, no client id is taken to have been stored before (see [`Try`]).
async fn decide_appends<D: Dialect>(
    c: &mut Conn<D>,
    msgs: &[&NewMessage],
    limits: &StoreLimits,
    look_up: bool,
) -> SqlResult<(Vec<Outcome>, AppendWrites, u64)>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    let now = now_ms();
    let mut firsts = if look_up {
        let keys: Vec<(String, String)> = msgs
            .iter()
            .filter_map(|m| Some((m.from.clone(), m.client_id.clone()?)))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        D::find_idempotent(c, &keys, now).await?
    } else {
        HashMap::new()
    };
    let convs: Vec<String> = msgs
        .iter()
        .map(|m| m.conv.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // A room message is decided by its sender's role, so in a batch with one, every
    // sender's member row (rooms and DMs) is read and, on PostgreSQL, locked here, in
    // sorted order (a removal waits), before the batch writes its marks. A batch of DMs
    // reads none: a DM's participants are named by its conversation, and the write
    // locks their rows in the same sorted order as it writes their marks. All or none:
    // locking the rooms' rows here and the DMs' in the write would take the DMs' rows
    // ("dm:" sorts first) after the rooms', against the order of the marks transaction.
    let rooms = msgs
        .iter()
        .any(|m| matches!(Conv::parse(&m.conv), Some(Conv::Room(_))));
    let role_pairs: Vec<(String, String)> = if rooms {
        msgs.iter()
            .map(|m| (m.conv.clone(), m.from.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        Vec::new()
    };
    let Locked { mut last, roles } = D::lock_for_append(c, &convs, &role_pairs).await?;
    let target_pairs: Vec<(String, u64)> = msgs
        .iter()
        .filter_map(|m| match m.change {
            Some(Change::Edit(t) | Change::Delete(t)) => Some((m.conv.clone(), t)),
            None => None,
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut targets = D::targets(c, &target_pairs).await?;

    let ttl = limits.idempotency_ttl.as_millis() as u64;
    let mut w = AppendWrites::default();
    let mut outcomes = Vec::with_capacity(msgs.len());
    for &msg in msgs {
        let key = msg.client_id.clone().map(|cid| (msg.from.clone(), cid));
        if let Some(first) = key.as_ref().and_then(|k| firsts.get(k)) {
            outcomes.push(Ok(Done::Appended(Appended {
                message: first.clone(),
                duplicate: true,
            })));
            continue;
        }
        let last_seq = last.get(&msg.conv).copied().unwrap_or(0);
        let target_key = match msg.change {
            Some(Change::Edit(t) | Change::Delete(t)) => Some((msg.conv.clone(), t)),
            None => None,
        };
        let view = AppendView {
            last_seq,
            sender_role: roles.get(&(msg.conv.clone(), msg.from.clone())).copied(),
            target: target_key.as_ref().and_then(|k| targets.get(k)).cloned(),
        };
        let seq = match rules::decide_append(msg, &view) {
            Ok(seq) => seq,
            Err(r) => {
                outcomes.push(Err(r));
                continue;
            }
        };
        let message = msg.clone().into_message(seq);
        last.insert(msg.conv.clone(), seq);
        w.last.insert(msg.conv.clone(), (seq, message.ts));
        if let (1, Some(Conv::Dm(a, b))) = (seq, Conv::parse(&msg.conv)) {
            w.dm_members.push((msg.conv.clone(), a.to_owned(), 0));
            w.dm_members.push((msg.conv.clone(), b.to_owned(), 0));
        }
        // Sending marks the message read by its sender, if a participant: the server
        // API posts and moderates under names that are none (no member row is made).
        let participant = match Conv::parse(&msg.conv) {
            Some(dm @ Conv::Dm(..)) => dm.dm_includes(&msg.from),
            _ => view.sender_role.is_some(),
        };
        if participant {
            w.sender_marks
                .insert((msg.conv.clone(), msg.from.clone()), seq);
        }
        match msg.change {
            Some(Change::Edit(t)) => {
                w.edits.insert((msg.conv.clone(), t), message.body.clone());
            }
            Some(Change::Delete(t)) => {
                w.deletes.push((msg.conv.clone(), t));
                w.edits.remove(&(msg.conv.clone(), t));
                if let Some(target) = targets.get_mut(&(msg.conv.clone(), t)) {
                    target.deleted = true;
                }
            }
            None => {}
        }
        // Later messages of this batch may edit or delete this one.
        targets.insert(
            (msg.conv.clone(), seq),
            Target {
                from: msg.from.clone(),
                deleted: false,
                is_event: msg.change.is_some(),
            },
        );
        if let Some(key) = key {
            w.idempotency.push((
                key.0.clone(),
                key.1.clone(),
                msg.conv.clone(),
                seq,
                now.saturating_add(ttl),
            ));
            firsts.insert(key, message.clone());
        }
        w.messages.push(message.clone());
        outcomes.push(Ok(Done::Appended(Appended {
            message,
            duplicate: false,
        })));
    }
    // The marks of participants whose row this batch creates go into the insert.
    for (conv, uid, marks) in &mut w.dm_members {
        if let Some(seq) = w.sender_marks.remove(&(conv.clone(), uid.clone())) {
            *marks = seq;
        }
    }
    Ok((outcomes, w, now))
}

fn mark_batch<'a, D: Dialect>(
    c: &'a mut Conn<D>,
    ops: &'a [&'a Op],
    _: &'a StoreLimits,
    _: Try,
) -> futures_util::future::BoxFuture<'a, SqlResult<Vec<Outcome>>>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    Box::pin(async move {
        // Locked in sorted order (see the module doc); answered in the jobs' order.
        let mut order: Vec<usize> = (0..ops.len()).collect();
        let key = |i: &usize| match ops[*i] {
            Op::Mark { conv, uid, .. } => (conv.clone(), uid.clone()),
            _ => (String::new(), String::new()),
        };
        order.sort_by_key(key);
        let mut outcomes: Vec<Option<Outcome>> = (0..ops.len()).map(|_| None).collect();
        for i in order {
            let Op::Mark {
                uid,
                conv,
                kind,
                seq,
            } = ops[i]
            else {
                continue;
            };
            let current = D::marks_for_update(c, conv, uid).await?;
            let last = D::last_seq(c, conv).await?;
            let (read, delivered) = current.unwrap_or((0, 0));
            let now = match kind {
                MarkKind::Read => read,
                MarkKind::Delivered => delivered,
            };
            let outcome = match rules::decide_mark(conv, current.is_some(), last, now, *seq) {
                Ok(Some(seq)) => {
                    let read = if *kind == MarkKind::Read { seq } else { read };
                    D::set_marks(c, conv, uid, read, delivered.max(seq)).await?;
                    Ok(Done::Marked(Some(seq)))
                }
                Ok(None) => Ok(Done::Marked(None)),
                Err(r) => Err(r),
            };
            outcomes[i] = Some(outcome);
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(Refusal::Invalid("not a mark".into()))))
            .collect())
    })
}

fn single<'a, D: Dialect>(
    c: &'a mut Conn<D>,
    ops: &'a [&'a Op],
    limits: &'a StoreLimits,
    _: Try,
) -> futures_util::future::BoxFuture<'a, SqlResult<Vec<Outcome>>>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    Box::pin(async move {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(room_op::<D>(c, op, limits).await?);
        }
        Ok(out)
    })
}

/// One room change (or a purge), in the caller's transaction.
async fn room_op<D: Dialect>(c: &mut Conn<D>, op: &Op, limits: &StoreLimits) -> SqlResult<Outcome>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    let now = now_ms();
    Ok(match op {
        Op::Join { uid, room } => {
            let conv = room_conv(room);
            // The room's lock first, then what the rules read: a ban committed by
            // another node before we got the lock is seen.
            let mut r = D::room(c, room, true).await?;
            let mut u = D::user_view(c, room, uid).await?;
            let mut plan = rules::decide_join(limits, room, &r, &u);
            if plan == Ok(JoinPlan::Create) && !D::insert_room(c, room, false, now).await? {
                // Another node created it a moment ago: its row is there now (the
                // insert waited for that commit), so this is a join of its room.
                r = D::room(c, room, true).await?;
                u = D::user_view(c, room, uid).await?;
                plan = rules::decide_join(limits, room, &r, &u);
            }
            match plan {
                Err(refusal) => Err(refusal),
                Ok(JoinPlan::Nothing(role)) => Ok(Done::Joined(Joined {
                    changed: false,
                    created: false,
                    role,
                    private: r.private,
                    members: r.members,
                    marked: None,
                })),
                Ok(plan) => {
                    let created = plan == JoinPlan::Create;
                    let role = if created { Role::Owner } else { Role::Member };
                    let read = D::put_member(c, &conv, uid, role).await?;
                    let members = D::adjust_members(c, room, 1).await?;
                    Ok(Done::Joined(Joined {
                        changed: true,
                        created,
                        role,
                        private: r.private,
                        members,
                        marked: implicit_mark(read),
                    }))
                }
            }
        }
        Op::Create { by, room } => {
            let r = D::room(c, &room.room, true).await?;
            let initial = rules::initial_members(by, &room.owners, &room.members);
            let mut counts = HashMap::new();
            for (uid, _) in &initial {
                counts.insert(uid.clone(), D::user_view(c, &room.room, uid).await?.rooms);
            }
            match rules::decide_create(limits, by, &room.room, r.exists, &counts) {
                Err(refusal) => Err(refusal),
                Ok(()) if !D::insert_room(c, &room.room, room.private, now).await? => {
                    // Another node created it a moment ago.
                    Err(Refusal::Conflict(format!("room {} exists", room.room)))
                }
                Ok(()) => {
                    let conv = room_conv(&room.room);
                    let mut read = 0;
                    for (uid, role) in &initial {
                        read = D::put_member(c, &conv, uid, *role).await?;
                    }
                    D::adjust_members(c, &room.room, initial.len() as i64).await?;
                    Ok(Done::Created(Created {
                        info: D::room_info(c, &room.room, usize::MAX).await?,
                        marked: implicit_mark(read),
                    }))
                }
            }
        }
        Op::Leave { uid, room } => {
            let r = D::room(c, room, true).await?;
            let left = r.exists && D::drop_member(c, &room_conv(room), uid).await?;
            if left {
                D::adjust_members(c, room, -1).await?;
            }
            Ok(Done::Left(left))
        }
        Op::Add {
            by,
            room,
            uid,
            role,
        } => {
            let r = D::room(c, room, true).await?;
            let conv = room_conv(room);
            let by_role = match by.user() {
                Some(u) => D::role(c, &conv, u).await?,
                None => None,
            };
            if let Err(refusal) = rules::check_owner(by, room, &r, by_role) {
                return Ok(Err(refusal));
            }
            let u = D::user_view(c, room, uid).await?;
            match rules::decide_add(limits, &u, *role) {
                Err(refusal) => Err(refusal),
                Ok(changed) => {
                    if u.banned {
                        D::set_ban(c, room, uid, false, now).await?;
                    }
                    let read = D::put_member(c, &conv, uid, *role).await?;
                    let (members, marked) = if u.role.is_none() {
                        (D::adjust_members(c, room, 1).await?, implicit_mark(read))
                    } else {
                        (r.members, None)
                    };
                    Ok(Done::Added(Added {
                        changed,
                        role: *role,
                        members,
                        marked,
                    }))
                }
            }
        }
        Op::Remove { by, room, uid, ban } => {
            let r = D::room(c, room, true).await?;
            let conv = room_conv(room);
            let by_role = match by.user() {
                Some(u) => D::role(c, &conv, u).await?,
                None => None,
            };
            if let Err(refusal) = rules::check_owner(by, room, &r, by_role) {
                return Ok(Err(refusal));
            }
            if *ban {
                D::set_ban(c, room, uid, true, now).await?;
            }
            let changed = D::drop_member(c, &conv, uid).await?;
            let members = if changed {
                D::adjust_members(c, room, -1).await?
            } else {
                r.members
            };
            Ok(Done::Removed(Removed { changed, members }))
        }
        Op::Purge { now } => {
            let cutoff = limits
                .retention
                .map(|r| now.saturating_sub(r.as_millis() as u64));
            Ok(Done::Purged(D::purge(c, cutoff, *now).await?))
        }
        Op::Append(_) | Op::Mark { .. } => Err(Refusal::Invalid("not a room change".into())),
    })
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

/// Implements [`Dialect`] for `$name` on database `$db`: the statements that are the
/// same SQL on both databases are written here once; `$lock` is appended to the
/// reads that must lock their row (` FOR UPDATE` on PostgreSQL, nothing on SQLite,
/// whose one writer already excludes everyone else); the rest come in `$own`.
macro_rules! dialect {
    ($name:ident, $db:ty, $lock:literal, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::store::sql::Dialect for $name {
            type Db = $db;

            async fn marks_for_update(
                c: &mut Conn<Self>,
                conv: &str,
                uid: &str,
            ) -> SqlResult<Option<(u64, u64)>> {
                let row: Option<(i64, i64)> = sqlx::query_as(concat!(
                    "SELECT read_seq, delivered_seq FROM members WHERE conv = $1 AND uid = $2",
                    $lock
                ))
                .bind(conv)
                .bind(uid)
                .fetch_optional(&mut *c)
                .await?;
                Ok(row.map(|(r, d)| (r as u64, d as u64)))
            }

            async fn last_seq(c: &mut Conn<Self>, conv: &str) -> SqlResult<u64> {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT last_seq FROM conversations WHERE conv = $1")
                        .bind(conv)
                        .fetch_optional(&mut *c)
                        .await?;
                Ok(row.map_or(0, |(s,)| s as u64))
            }

            async fn set_marks(
                c: &mut Conn<Self>,
                conv: &str,
                uid: &str,
                read: u64,
                delivered: u64,
            ) -> SqlResult<()> {
                sqlx::query(
                    "UPDATE members SET read_seq = $3, delivered_seq = $4 \
                     WHERE conv = $1 AND uid = $2",
                )
                .bind(conv)
                .bind(uid)
                .bind(read as i64)
                .bind(delivered as i64)
                .execute(&mut *c)
                .await?;
                Ok(())
            }

            async fn room(c: &mut Conn<Self>, room: &str, lock: bool) -> SqlResult<RoomView> {
                let sql = if lock {
                    concat!("SELECT private, members FROM rooms WHERE room = $1", $lock)
                } else {
                    "SELECT private, members FROM rooms WHERE room = $1"
                };
                let row: Option<(bool, i64)> = sqlx::query_as(sql)
                    .bind(room)
                    .fetch_optional(&mut *c)
                    .await?;
                Ok(match row {
                    Some((private, members)) => RoomView {
                        exists: true,
                        private,
                        members: members as u64,
                    },
                    None => RoomView::default(),
                })
            }

            async fn user_view(c: &mut Conn<Self>, room: &str, uid: &str) -> SqlResult<UserView> {
                let role = Self::role(c, &room_conv(room), uid).await?;
                let banned: Option<(String,)> =
                    sqlx::query_as("SELECT uid FROM bans WHERE room = $1 AND uid = $2")
                        .bind(room)
                        .bind(uid)
                        .fetch_optional(&mut *c)
                        .await?;
                let (rooms,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM members WHERE uid = $1 AND role <> 'dm'",
                )
                .bind(uid)
                .fetch_one(&mut *c)
                .await?;
                Ok(UserView {
                    role,
                    banned: banned.is_some(),
                    rooms: rooms as u64,
                })
            }

            async fn role(c: &mut Conn<Self>, conv: &str, uid: &str) -> SqlResult<Option<Role>> {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT role FROM members WHERE conv = $1 AND uid = $2")
                        .bind(conv)
                        .bind(uid)
                        .fetch_optional(&mut *c)
                        .await?;
                row.map(|(r,)| role_from(&r)).transpose()
            }

            async fn insert_room(
                c: &mut Conn<Self>,
                room: &str,
                private: bool,
                ts: u64,
            ) -> SqlResult<bool> {
                let done = sqlx::query(
                    "INSERT INTO rooms (room, private, created_ts, members) VALUES ($1, $2, $3, 0) \
                     ON CONFLICT (room) DO NOTHING",
                )
                .bind(room)
                .bind(private)
                .bind(ts as i64)
                .execute(&mut *c)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn put_member(
                c: &mut Conn<Self>,
                conv: &str,
                uid: &str,
                role: Role,
            ) -> SqlResult<u64> {
                let (read,): (i64,) = sqlx::query_as(
                    "INSERT INTO members (conv, uid, role, read_seq, delivered_seq) \
                     SELECT $1, $2, $3, COALESCE(MAX(last_seq), 0), COALESCE(MAX(last_seq), 0) \
                     FROM conversations WHERE conv = $1 \
                     ON CONFLICT (conv, uid) DO UPDATE SET role = excluded.role \
                     RETURNING read_seq",
                )
                .bind(conv)
                .bind(uid)
                .bind(role.as_str())
                .fetch_one(&mut *c)
                .await?;
                Ok(read as u64)
            }

            async fn drop_member(c: &mut Conn<Self>, conv: &str, uid: &str) -> SqlResult<bool> {
                let done = sqlx::query(
                    "DELETE FROM members WHERE conv = $1 AND uid = $2 AND role <> 'dm'",
                )
                .bind(conv)
                .bind(uid)
                .execute(&mut *c)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn set_ban(
                c: &mut Conn<Self>,
                room: &str,
                uid: &str,
                banned: bool,
                ts: u64,
            ) -> SqlResult<()> {
                if banned {
                    sqlx::query(
                        "INSERT INTO bans (room, uid, ts) VALUES ($1, $2, $3) \
                         ON CONFLICT (room, uid) DO NOTHING",
                    )
                    .bind(room)
                    .bind(uid)
                    .bind(ts as i64)
                    .execute(&mut *c)
                    .await?;
                } else {
                    sqlx::query("DELETE FROM bans WHERE room = $1 AND uid = $2")
                        .bind(room)
                        .bind(uid)
                        .execute(&mut *c)
                        .await?;
                }
                Ok(())
            }

            async fn adjust_members(c: &mut Conn<Self>, room: &str, delta: i64) -> SqlResult<u64> {
                let row: Option<(i64,)> = sqlx::query_as(
                    "UPDATE rooms SET members = members + $2 WHERE room = $1 RETURNING members",
                )
                .bind(room)
                .bind(delta)
                .fetch_optional(&mut *c)
                .await?;
                Ok(row.map_or(0, |(n,)| n.max(0) as u64))
            }

            async fn room_info(c: &mut Conn<Self>, room: &str, max: usize) -> SqlResult<RoomInfo> {
                let conv = room_conv(room);
                let r = Self::room(c, room, false).await?;
                let owners: Vec<(String,)> = sqlx::query_as(
                    "SELECT uid FROM members WHERE conv = $1 AND role = 'owner' ORDER BY uid",
                )
                .bind(&conv)
                .fetch_all(&mut *c)
                .await?;
                let members: Vec<(String,)> = sqlx::query_as(
                    "SELECT uid FROM members WHERE conv = $1 ORDER BY uid LIMIT $2",
                )
                .bind(&conv)
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .fetch_all(&mut *c)
                .await?;
                Ok(RoomInfo {
                    room: room.to_owned(),
                    private: r.private,
                    owners: owners.into_iter().map(|(u,)| u).collect(),
                    members: members.into_iter().map(|(u,)| u).collect(),
                    count: r.members,
                })
            }

            async fn purge(c: &mut Conn<Self>, cutoff: Option<u64>, now: u64) -> SqlResult<Purged> {
                let messages = match cutoff {
                    Some(cutoff) => sqlx::query("DELETE FROM messages WHERE ts < $1")
                        .bind(cutoff as i64)
                        .execute(&mut *c)
                        .await?
                        .rows_affected(),
                    None => 0,
                };
                let idempotency = sqlx::query("DELETE FROM idempotency WHERE expires <= $1")
                    .bind(now as i64)
                    .execute(&mut *c)
                    .await?
                    .rows_affected();
                Ok(Purged {
                    messages,
                    idempotency,
                })
            }

            async fn conversations(c: &mut Conn<Self>, uid: &str) -> SqlResult<Vec<ConvState>> {
                let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
                    "SELECT m.conv, COALESCE(c.last_seq, 0), m.read_seq, m.delivered_seq \
                     FROM members m LEFT JOIN conversations c ON c.conv = m.conv \
                     WHERE m.uid = $1 ORDER BY m.conv",
                )
                .bind(uid)
                .fetch_all(&mut *c)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(conv, last, read, delivered)| ConvState {
                        conv,
                        last_seq: last as u64,
                        read: read as u64,
                        delivered: delivered as u64,
                    })
                    .collect())
            }

            async fn receipts(c: &mut Conn<Self>, conv: &str) -> SqlResult<Vec<Receipt>> {
                let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                    "SELECT uid, read_seq, delivered_seq FROM members WHERE conv = $1 ORDER BY uid",
                )
                .bind(conv)
                .fetch_all(&mut *c)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(uid, read, delivered)| Receipt {
                        uid,
                        read: read as u64,
                        delivered: delivered as u64,
                    })
                    .collect())
            }

            async fn rooms_of(c: &mut Conn<Self>, uid: &str) -> SqlResult<Vec<UserRoom>> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT r.room, r.members FROM members m \
                     JOIN rooms r ON r.room = substr(m.conv, 6) \
                     WHERE m.uid = $1 AND m.role <> 'dm' ORDER BY r.room",
                )
                .bind(uid)
                .fetch_all(&mut *c)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(room, members)| UserRoom {
                        room,
                        members: members as u64,
                    })
                    .collect())
            }

            async fn epoch(c: &mut Conn<Self>, candidate: &str) -> SqlResult<String> {
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT (key) DO NOTHING",
                )
                .bind(candidate)
                .execute(&mut *c)
                .await?;
                let (epoch,): (String,) =
                    sqlx::query_as("SELECT value FROM meta WHERE key = 'epoch'")
                        .fetch_one(&mut *c)
                        .await?;
                Ok(epoch)
            }

            async fn ping(c: &mut Conn<Self>) -> SqlResult<()> {
                sqlx::query("SELECT 1").execute(&mut *c).await?;
                Ok(())
            }

            $($own)*
        }
    };
}
pub(crate) use dialect;
