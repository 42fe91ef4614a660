//! The writer task of a SQL store: one connection, group commit, and the rules of each
//! kind of write (see the module above for how a write works).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::{Connection as _, Pool};
use tokio::sync::{mpsc, oneshot};

use super::{map_err, AppendWrites, Conn, Dialect, Locked, SqlResult, MAX_BATCH};
use crate::protocol::{now_ms, room_conv, Conv};
use crate::store::rules::{self, AppendView, JoinPlan, Target};
use crate::store::{
    implicit_mark, Added, Appended, By, Change, Created, Joined, MarkKind, NewMessage, NewRoom,
    Purged, Refusal, Removed, Role, StoreError, StoreLimits,
};

/// A write for the writer task.
pub(super) enum Op {
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

pub(super) enum Done {
    Appended(Appended),
    Marked(Option<u64>),
    Joined(Joined),
    Created(Created),
    Left(bool),
    Added(Added),
    Removed(Removed),
    Purged(Purged),
}

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The writer's counts behind [`Store::write_stats`].
#[derive(Default)]
pub(super) struct Committed {
    pub(super) commits: AtomicU64,
    pub(super) writes: AtomicU64,
}

/// The writer task: one connection, every job that is waiting in one pass. Ends when
/// the store is dropped.
///
/// It keeps its connection between passes: a pool checks a connection with a round
/// trip (a ping) when it is taken and another when it is given back, which was a third
/// of the round trips of a busy writer. After a pass in which the database failed, the
/// connection goes back to the pool (whose ping closes it if it is broken) and the next
/// pass takes one afresh.
pub(super) async fn writer<D: Dialect>(
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
    let mut known = KnownCounters::default();
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
        let k = &mut known;
        let mut healthy = run_group::<D>(conn, appends, &limits, k, c, append_batch::<D>).await;
        healthy &= run_group::<D>(conn, marks, &limits, k, c, mark_batch::<D>).await;
        for job in others {
            healthy &= run_group::<D>(conn, vec![job], &limits, k, c, single::<D>).await;
        }
        if !healthy {
            held = None;
        }
    }
}

type Outcome = Result<Done, Refusal>;

/// Which try of a group's transaction this is.
///
/// An append batch's first try assumes two things that are rare to be false, and so
/// saves their cost:
/// - that none of its client ids was stored before (a resend): it does not look them
///   up, and the write finds out, as it finds out that another node stored one
///   meanwhile;
/// - that each of its conversations has its counter row, when this writer has seen
///   them all committed ([`KnownCounters`]; otherwise it makes them at once): it only
///   locks them, which is cheaper on PostgreSQL than making them if missing, and finds
///   out if one is missing all the same.
///
/// Either way the transaction is rolled back and tried again, looking the client ids up
/// and making the counter rows.
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
    &'a KnownCounters,
    Try,
) -> futures_util::future::BoxFuture<'a, SqlResult<Vec<Outcome>>>;

/// The conversations this writer has seen committed with their counter row, so that a
/// first try of a batch of theirs only locks the rows (see [`Try`]), and a batch with a
/// conversation new to this writer makes its row at once instead of failing its first
/// try. Counter rows are never deleted, so an entry stays true; the set is bounded, and
/// forgotten whole when full (each conversation's next batch then makes sure of its row
/// once more, as after a restart).
#[derive(Debug, Default)]
struct KnownCounters(HashSet<String>);

impl KnownCounters {
    /// How many conversations a writer remembers (about 4 MiB of keys at most).
    const MAX: usize = 65_536;

    fn all(&self, convs: &[String]) -> bool {
        convs.iter().all(|c| self.0.contains(c))
    }

    /// After a commit: the conversations of its appends have their counter rows.
    fn committed(&mut self, ops: &[&Op]) {
        for op in ops {
            if let Op::Append(m) = op {
                if !self.0.contains(&m.conv) {
                    if self.0.len() >= Self::MAX {
                        self.0.clear();
                    }
                    self.0.insert(m.conv.clone());
                }
            }
        }
    }
}

/// Runs `jobs` in one transaction with `f`; if that fails, each job alone, so one
/// job's failure is its own. Answers false if the database failed (a refusal by the
/// rules is not a failure).
async fn run_group<D: Dialect>(
    conn: &mut Conn<D>,
    jobs: Vec<Job>,
    limits: &StoreLimits,
    known: &mut KnownCounters,
    committed: &Committed,
    f: GroupFn<D>,
) -> bool
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    if jobs.is_empty() {
        return true;
    }
    match transact::<D>(conn, &jobs, limits, known, committed, f).await {
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
                let one = std::slice::from_ref(&job);
                match transact::<D>(conn, one, limits, known, committed, f).await {
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
    known: &mut KnownCounters,
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
        match f(&mut *tx, &ops, limits, known, attempt).await {
            Ok(outcomes) => {
                tx.commit().await?;
                known.committed(&ops);
                committed.commits.fetch_add(1, Ordering::Relaxed);
                committed
                    .writes
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                return Ok(outcomes);
            }
            Err(e) if try_again(&e) => tx.rollback().await?,
            Err(e) => return Err(e),
        }
    }
    Err(sqlx::Error::Protocol(LOST_RACE.into()))
}

/// The error a write returns when another node stored one of its client ids first.
const LOST_RACE: &str = "another node stored one of these client ids meanwhile";
/// The error a first try returns when one of its conversations has no counter row.
const NEW_CONVERSATION: &str = "a conversation of this batch has no counter row yet";

/// Whether a try failed for a reason that another try, deciding on what is stored,
/// gets past: a lost race, a new conversation, or a client id stored before (a
/// first try inserts them without looking: [`Dialect::write_appends`]).
fn try_again(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Protocol(m) => m == LOST_RACE || m == NEW_CONVERSATION,
        sqlx::Error::Database(d) => {
            d.is_unique_violation() && d.constraint() == Some(IDEMPOTENCY_KEY)
        }
        _ => false,
    }
}

/// The name PostgreSQL gives the idempotency table's primary key.
const IDEMPOTENCY_KEY: &str = "idempotency_pkey";

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
    known: &'a KnownCounters,
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
        let again = attempt == Try::Again;
        let (outcomes, writes, now) = decide_appends::<D>(c, &msgs, limits, known, again).await?;
        if D::write_appends(c, &writes, now, again).await? {
            Ok(outcomes)
        } else {
            Err(sqlx::Error::Protocol(LOST_RACE.into()))
        }
    })
}

/// Reads what the rules need for a batch of appends and decides each in order. Without
/// `again` (a first try), no client id is taken to have been stored before, and each
/// conversation this writer knows to have its counter row is taken to have it still
/// (see [`Try`]).
async fn decide_appends<D: Dialect>(
    c: &mut Conn<D>,
    msgs: &[&NewMessage],
    limits: &StoreLimits,
    known: &KnownCounters,
    again: bool,
) -> SqlResult<(Vec<Outcome>, AppendWrites, u64)>
where
    for<'c> &'c mut Conn<D>: sqlx::Executor<'c, Database = D::Db>,
{
    let now = now_ms();
    let mut firsts = if again {
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
    let create = again || !known.all(&convs);
    let Locked { mut last, roles } = D::lock_for_append(c, &convs, &role_pairs, create).await?;
    if convs.iter().any(|conv| !last.contains_key(conv)) {
        return Err(sqlx::Error::Protocol(NEW_CONVERSATION.into()));
    }
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
    _: &'a KnownCounters,
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
    _: &'a KnownCounters,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{dm, room};

    fn convs(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn known_counters_are_the_committed_appends_conversations() {
        let mut known = KnownCounters::default();
        let (a, b) = (
            dm("alice", "bob", "x", None),
            room("carol", "lobby", "y", None),
        );
        let (ca, cb) = (a.conv.clone(), b.conv.clone());
        assert!(!known.all(&convs(&[&ca])));
        assert!(known.all(&[]), "a batch without appends needs no counter");
        let join = Op::Join {
            uid: "dave".into(),
            room: "hall".into(),
        };
        known.committed(&[&Op::Append(a), &join]);
        assert!(known.all(&convs(&[&ca])));
        assert!(
            !known.all(&convs(&[&ca, &cb])),
            "one unknown: make them all"
        );
        assert!(
            !known.all(&convs(&["room:hall"])),
            "a join makes no counter row"
        );
        known.committed(&[&Op::Append(b)]);
        assert!(known.all(&convs(&[&ca, &cb])));
    }

    #[test]
    fn known_counters_are_forgotten_whole_when_full() {
        let mut known = KnownCounters::default();
        let first = dm("u0", "hub", "x", None);
        let first_conv = first.conv.clone();
        known.committed(&[&Op::Append(first)]);
        for i in 1..KnownCounters::MAX {
            known.committed(&[&Op::Append(dm(&format!("u{i}"), "hub", "x", None))]);
        }
        assert_eq!(known.0.len(), KnownCounters::MAX);
        assert!(known.all(&convs(&[&first_conv])));
        let last = dm("one-more", "hub", "x", None);
        let last_conv = last.conv.clone();
        known.committed(&[&Op::Append(last)]);
        assert_eq!(known.0.len(), 1, "full: forgotten, then the new one kept");
        assert!(known.all(&convs(&[&last_conv])));
        assert!(!known.all(&convs(&[&first_conv])));
    }
}
