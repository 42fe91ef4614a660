//! PostgreSQL: the store of record shared by every node of a cluster.
//!
//! Every node has its own writer, so here the rows a transaction depends on are locked:
//! the conversations' counter rows (`FOR UPDATE`, or, on a retry when one is missing, an
//! upsert that makes it and locks the rows it conflicts with; sorted), then, in a batch
//! with room messages, the senders' member rows (`FOR UPDATE`, sorted: a concurrent
//! removal waits), in one statement; the write then locks the member rows whose marks
//! it writes, sorted, as the marks transaction does, so neither deadlocks with it.
//! Batches are written with arrays (`unnest`), so an append batch costs a fixed number
//! of round trips whatever its size.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Row;

use super::message_at;
use super::{
    dialect, pool_timeout, prefixed, role_from, AppendWrites, Conn, Locked, SqlResult, SqlStore,
    MESSAGE_COLUMNS,
};
use crate::protocol::{room_conv, Conv, Message};
use crate::store::rules::{RoomView, Target, UserView};
use crate::store::{
    ConvState, Inbox, InboxCursor, InboxEntry, Page, Purged, Range, ReadRequest, Receipt, Role,
    RoomInfo, StoreError, StoreLimits, UserRoom,
};

/// Reader connections per node.
const READERS: u32 = 4;

pub struct PgDialect;

/// The PostgreSQL store.
pub type PgStore = SqlStore<PgDialect>;

impl SqlStore<PgDialect> {
    /// Connects to a `postgres://` URL and brings the schema up to date (nodes starting
    /// together take turns: sqlx holds an advisory lock while it migrates).
    pub async fn connect(
        url: &str,
        limits: StoreLimits,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad database URL: {e}")))?;
        let write = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool_timeout(timeout))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        sqlx::migrate!("migrations/postgres")
            .run(&write)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot migrate PostgreSQL: {e}")))?;
        let read = PgPoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(pool_timeout(timeout))
            .connect_lazy_with(options);
        SqlStore::start(read, write, limits).await
    }
}

/// [`MESSAGE_COLUMNS`] of table alias `m` (`m.conv, m.seq, ...`), built once.
static M_COLUMNS: LazyLock<String> = LazyLock::new(|| prefixed("m"));

fn i64s(v: impl IntoIterator<Item = u64>) -> Vec<i64> {
    v.into_iter().map(|x| x as i64).collect()
}

dialect!(PgDialect, sqlx::Postgres, " FOR UPDATE", {
    async fn find_idempotent(
        c: &mut Conn<Self>,
        keys: &[(String, String)],
        now: u64,
    ) -> SqlResult<HashMap<(String, String), Message>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        // LATERAL ... LIMIT 1: one primary-key probe per key, whatever the planner
        // guesses of the table's or the array's size. Without the LIMIT the planner
        // flattens the subquery into a join and, with statistics from when the table was
        // small, hashes the array and scans the whole table (measured: 5 ms a batch at
        // 25,000 rows, the largest cost of an append).
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {}, k.sender, k.client_id \
                 FROM unnest($1::text[], $2::text[]) AS k(sender, client_id) \
                 CROSS JOIN LATERAL (SELECT conv, seq FROM idempotency i \
                   WHERE i.sender = k.sender AND i.client_id = k.client_id \
                   AND i.expires > $3 LIMIT 1) i \
                 CROSS JOIN LATERAL (SELECT * FROM messages \
                   WHERE conv = i.conv AND seq = i.seq LIMIT 1) m",
                *M_COLUMNS
            )
        });
        let rows = sqlx::query(SQL.as_str())
            .bind(keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.1.as_str()).collect::<Vec<_>>())
            .bind(now as i64)
            .fetch_all(&mut *c)
            .await?;
        let mut found = HashMap::new();
        for row in rows {
            found.insert((row.try_get(10)?, row.try_get(11)?), message_at(&row, 0)?);
        }
        Ok(found)
    }

    async fn lock_for_append(
        c: &mut Conn<Self>,
        convs: &[String],
        pairs: &[(String, String)],
        create: bool,
    ) -> SqlResult<Locked> {
        // One statement, one round trip: the counter rows, locked in sorted order, then
        // the member rows, by LATERAL probes in the (sorted) order of the arrays, each
        // locking its row (LIMIT 1 keeps them probes: see find_idempotent). The member
        // probes name `k.n`, the count of the counter rows, so none can run before every
        // counter is locked: counters first, then members, as every transaction that
        // locks both does.
        //
        // Without `create`, the counters are locked with FOR UPDATE, which writes no new
        // row version; the batch's own update of them then needs no lock of its own
        // (measured: four WAL records a conversation per batch became two). With
        // `create`, they are made if missing (a first message on two nodes at once: one
        // inserts, the other waits for it) and locked, as `ON CONFLICT DO UPDATE` locks
        // the row it conflicts with, at the cost of a new row version. Both lock in byte
        // order, as the caller sorted the arrays: the probes follow the array, and the
        // upsert's ORDER BY says `COLLATE "C"`, so that a database made with another
        // collation does not lock the counters in an order of its own.
        static LOCK: &str = "WITH c AS ( \
               SELECT r.conv, r.last_seq FROM unnest($1::text[]) AS t(v) \
               CROSS JOIN LATERAL (SELECT conv, last_seq FROM conversations \
                 WHERE conv = t.v LIMIT 1 FOR UPDATE) r), ";
        static CREATE: &str = "WITH c AS ( \
               INSERT INTO conversations AS c (conv) SELECT v FROM unnest($1::text[]) AS t(v) \
               ORDER BY v COLLATE \"C\" ON CONFLICT (conv) DO UPDATE SET conv = excluded.conv \
               RETURNING c.conv, c.last_seq), ";
        static MEMBERS: &str = "k AS (SELECT count(*) AS n FROM c) \
             SELECT conv, NULL, last_seq, NULL FROM c \
             UNION ALL \
             SELECT m.conv, m.uid, NULL, m.role FROM k \
             CROSS JOIN LATERAL (SELECT r.conv, r.uid, r.role \
               FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS p(conv, uid, n) \
               CROSS JOIN LATERAL (SELECT conv, uid, role FROM members \
                 WHERE conv = p.conv AND uid = p.uid AND k.n >= 0 LIMIT 1 FOR UPDATE) r) m";
        static SQL_LOCK: LazyLock<String> = LazyLock::new(|| format!("{LOCK}{MEMBERS}"));
        static SQL_CREATE: LazyLock<String> = LazyLock::new(|| format!("{CREATE}{MEMBERS}"));
        let sql = if create { &*SQL_CREATE } else { &*SQL_LOCK };
        let rows: Vec<(String, Option<String>, Option<i64>, Option<String>)> =
            sqlx::query_as(sql.as_str())
                .bind(convs)
                .bind(pairs.iter().map(|p| p.0.as_str()).collect::<Vec<_>>())
                .bind(pairs.iter().map(|p| p.1.as_str()).collect::<Vec<_>>())
                .fetch_all(&mut *c)
                .await?;
        let mut locked = Locked::default();
        for (conv, uid, last_seq, role) in rows {
            match (uid, last_seq, role) {
                (None, Some(seq), _) => {
                    locked.last.insert(conv, seq as u64);
                }
                (Some(uid), _, Some(role)) => {
                    locked.roles.insert((conv, uid), role_from(&role)?);
                }
                _ => {
                    return Err(sqlx::Error::Protocol(
                        "lock_for_append: a row of neither kind".into(),
                    ))
                }
            }
        }
        Ok(locked)
    }

    async fn targets(
        c: &mut Conn<Self>,
        pairs: &[(String, u64)],
    ) -> SqlResult<HashMap<(String, u64), Target>> {
        if pairs.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, i64, String, bool, bool)> = sqlx::query_as(
            "SELECT m.conv, m.seq, m.sender, m.deleted, \
             (m.edit_of IS NOT NULL OR m.delete_of IS NOT NULL) \
             FROM unnest($1::text[], $2::bigint[]) AS t(conv, seq) \
             CROSS JOIN LATERAL (SELECT * FROM messages \
               WHERE conv = t.conv AND seq = t.seq LIMIT 1) m",
        )
        .bind(pairs.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
        .bind(i64s(pairs.iter().map(|p| p.1)))
        .fetch_all(&mut *c)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(conv, seq, from, deleted, is_event)| {
                (
                    (conv, seq as u64),
                    Target {
                        from,
                        deleted,
                        is_event,
                    },
                )
            })
            .collect())
    }

    async fn write_appends(
        c: &mut Conn<Self>,
        w: &AppendWrites,
        now: u64,
        again: bool,
    ) -> SqlResult<bool> {
        // Messages, counters, new DM participants, senders' marks and client ids in one
        // statement (one round trip). The parts touch different rows (a DM's new
        // participants carry their marks; decide_appends took them out of sender_marks).
        let m = &w.messages;
        let i = &w.idempotency;
        if m.is_empty() && i.is_empty() && w.sender_marks.is_empty() {
            return Ok(true);
        }
        // Counters and members are written with `INSERT ... ON CONFLICT DO UPDATE`, not
        // `UPDATE ... FROM unnest(...)`: the conflict check probes the primary key row by
        // row, where a join is planned, and a plan made while a table was small (cached
        // with the prepared statement) scans it whole once it is large. The counter rows
        // exist and lock_for_append locked them, so their update takes no lock of its
        // own. The member rows are the batch's new DM participants (inserted) and its
        // senders, whose rows exist (a room sender's was read FOR UPDATE by
        // lock_for_append, and the rules refuse one without it; a DM's participants have
        // theirs from its first message), so the role given for them is never written.
        // Sorted, so two nodes lock the rows in the same order.
        let mut member_rows: Vec<(&str, &str, Role, i64)> = w
            .dm_members
            .iter()
            .map(|(conv, uid, seq)| (conv.as_str(), uid.as_str(), Role::Dm, *seq as i64))
            .chain(w.sender_marks.iter().map(|((conv, uid), seq)| {
                let role = match Conv::parse(conv) {
                    Some(Conv::Room(_)) => Role::Member,
                    _ => Role::Dm,
                };
                (conv.as_str(), uid.as_str(), role, *seq as i64)
            }))
            .collect();
        member_rows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        // One row once: an upsert may not touch a row twice.
        member_rows.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
        // The client ids: on a first try, taken to be new (see the writer's `Try`), a
        // plain insert; a stored one fails the statement on the primary key, and the
        // writer tries again. An `ON CONFLICT` insert of a new row is a speculative
        // insertion: a probe of the index before, a lock while inserting and a WAL
        // record to confirm it, for every message. On a later try, the conflict either
        // replaces an expired row or leaves the row and is counted as a lost race. (The
        // first form names $21, the time the second compares with, only so that both
        // take the same parameters.)
        static IDS_NEW: &str = "ids AS ( \
               INSERT INTO idempotency (sender, client_id, conv, seq, expires) \
               SELECT * FROM unnest($16::text[], $17::text[], $18::text[], $19::bigint[], \
                 $20::bigint[]) WHERE $21::bigint IS NOT NULL \
               RETURNING 1) ";
        static IDS_AGAIN: &str = "ids AS ( \
               INSERT INTO idempotency AS x (sender, client_id, conv, seq, expires) \
               SELECT * FROM unnest($16::text[], $17::text[], $18::text[], $19::bigint[], \
                 $20::bigint[]) \
               ON CONFLICT (sender, client_id) DO UPDATE SET conv = excluded.conv, \
                 seq = excluded.seq, expires = excluded.expires WHERE x.expires <= $21 \
               RETURNING 1) ";
        static WRITE: &str = "WITH msgs AS ( \
               INSERT INTO messages (conv, seq, id, sender, body, ts, edit_of, delete_of) \
               SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], \
                 $5::text[], $6::bigint[], $7::bigint[], $8::bigint[])), \
             counters AS ( \
               INSERT INTO conversations AS c (conv, last_seq, last_ts) \
               SELECT * FROM unnest($9::text[], $10::bigint[], $11::bigint[]) \
               ON CONFLICT (conv) DO UPDATE SET last_seq = excluded.last_seq, \
                 last_ts = excluded.last_ts), \
             marks AS ( \
               INSERT INTO members AS mb (conv, uid, role, read_seq, delivered_seq) \
               SELECT c, u, r, s, s FROM unnest($12::text[], $13::text[], $14::text[], \
                 $15::bigint[]) AS t(c, u, r, s) \
               ON CONFLICT (conv, uid) DO UPDATE SET \
                 read_seq = GREATEST(mb.read_seq, excluded.read_seq), \
                 delivered_seq = GREATEST(mb.delivered_seq, excluded.delivered_seq)), ";
        static SQL_NEW: LazyLock<String> =
            LazyLock::new(|| format!("{WRITE}{IDS_NEW}SELECT count(*) FROM ids"));
        static SQL_AGAIN: LazyLock<String> =
            LazyLock::new(|| format!("{WRITE}{IDS_AGAIN}SELECT count(*) FROM ids"));
        let sql = if again { &*SQL_AGAIN } else { &*SQL_NEW };
        let (inserted,): (i64,) = sqlx::query_as(sql.as_str())
            .bind(m.iter().map(|m| m.conv.as_str()).collect::<Vec<_>>())
            .bind(i64s(m.iter().map(|m| m.seq)))
            .bind(m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>())
            .bind(m.iter().map(|m| m.from.as_str()).collect::<Vec<_>>())
            .bind(m.iter().map(|m| m.body.as_deref()).collect::<Vec<_>>())
            .bind(i64s(m.iter().map(|m| m.ts)))
            .bind(
                m.iter()
                    .map(|m| m.edit.map(|s| s as i64))
                    .collect::<Vec<_>>(),
            )
            .bind(
                m.iter()
                    .map(|m| m.delete.map(|s| s as i64))
                    .collect::<Vec<_>>(),
            )
            .bind(w.last.keys().map(String::as_str).collect::<Vec<_>>())
            .bind(i64s(w.last.values().map(|v| v.0)))
            .bind(i64s(w.last.values().map(|v| v.1)))
            .bind(member_rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(member_rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(member_rows.iter().map(|r| r.2.as_str()).collect::<Vec<_>>())
            .bind(member_rows.iter().map(|r| r.3).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.2.as_str()).collect::<Vec<_>>())
            .bind(i64s(i.iter().map(|r| r.3)))
            .bind(i64s(i.iter().map(|r| r.4)))
            .bind(now as i64)
            .fetch_one(&mut *c)
            .await?;
        if !w.edits.is_empty() {
            sqlx::query(
                "UPDATE messages m SET body = v.body, edited = TRUE \
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS v(conv, seq, body) \
                 WHERE m.conv = v.conv AND m.seq = v.seq",
            )
            .bind(w.edits.keys().map(|k| k.0.clone()).collect::<Vec<_>>())
            .bind(i64s(w.edits.keys().map(|k| k.1)))
            .bind(w.edits.values().cloned().collect::<Vec<_>>())
            .execute(&mut *c)
            .await?;
        }
        if !w.deletes.is_empty() {
            let convs: Vec<String> = w.deletes.iter().map(|d| d.0.clone()).collect();
            let seqs = i64s(w.deletes.iter().map(|d| d.1));
            sqlx::query(
                "UPDATE messages m SET body = NULL, deleted = TRUE \
                 FROM unnest($1::text[], $2::bigint[]) AS v(conv, seq) \
                 WHERE m.conv = v.conv AND m.seq = v.seq",
            )
            .bind(&convs)
            .bind(&seqs)
            .execute(&mut *c)
            .await?;
            sqlx::query(
                "UPDATE messages m SET body = NULL \
                 FROM unnest($1::text[], $2::bigint[]) AS v(conv, seq) \
                 WHERE m.conv = v.conv AND m.edit_of = v.seq",
            )
            .bind(&convs)
            .bind(&seqs)
            .execute(&mut *c)
            .await?;
        }
        Ok(inserted as usize == i.len())
    }

    async fn read_pages(c: &mut Conn<Self>, requests: Vec<ReadRequest>) -> SqlResult<Vec<Page>> {
        // One query for the "after" requests and one for the "before" ones, each
        // reading every conversation's page through the primary key.
        let mut pages: Vec<Page> = requests
            .iter()
            .map(|r| Page {
                conv: r.conv.clone(),
                messages: Vec::new(),
                more: false,
            })
            .collect();
        for after in [true, false] {
            let mut idx = Vec::new();
            let mut convs = Vec::new();
            let mut bounds = Vec::new();
            let mut limits = Vec::new();
            for (i, r) in requests.iter().enumerate() {
                match (after, r.range) {
                    (true, Range::After { after, limit }) => {
                        idx.push(i as i64);
                        convs.push(r.conv.clone());
                        bounds.push(after.min(i64::MAX as u64) as i64);
                        limits.push(limit as i64 + 1);
                    }
                    (false, Range::Before { before, limit }) => {
                        idx.push(i as i64);
                        convs.push(r.conv.clone());
                        bounds.push(before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64));
                        limits.push(limit as i64 + 1);
                    }
                    _ => {}
                }
            }
            if idx.is_empty() {
                continue;
            }
            let (cmp, order) = if after { (">", "") } else { ("<", " DESC") };
            let sql = format!(
                "SELECT r.i, {cols} FROM unnest($1::bigint[], $2::text[], $3::bigint[], \
                 $4::bigint[]) AS r(i, conv, bound, lim) CROSS JOIN LATERAL \
                 (SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = r.conv AND seq {cmp} r.bound \
                 ORDER BY seq{order} LIMIT r.lim) m ORDER BY r.i, m.seq",
                cols = *M_COLUMNS,
            );
            let rows = sqlx::query(&sql)
                .bind(&idx)
                .bind(&convs)
                .bind(&bounds)
                .bind(&limits)
                .fetch_all(&mut *c)
                .await?;
            for row in rows {
                let i: i64 = row.try_get(0)?;
                if let Some(page) = pages.get_mut(i as usize) {
                    page.messages.push(message_at(&row, 1)?);
                }
            }
        }
        for (page, req) in pages.iter_mut().zip(&requests) {
            let limit = match req.range {
                Range::After { limit, .. } | Range::Before { limit, .. } => limit,
            };
            page.more = page.messages.len() > limit;
            if page.more {
                // The one beyond the page: the newest for "after", the oldest for
                // "before" (rows came oldest first).
                match req.range {
                    Range::After { .. } => {
                        page.messages.truncate(limit);
                    }
                    Range::Before { .. } => {
                        page.messages.remove(0);
                    }
                }
            }
        }
        Ok(pages)
    }

    async fn inbox(
        c: &mut Conn<Self>,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> SqlResult<Inbox> {
        // The page of conversations first, then the last message and the unread count
        // of just those.
        let sql = format!(
            "WITH page AS ( \
               SELECT m.conv, m.read_seq, c.last_seq, c.last_ts FROM members m \
               LEFT JOIN conversations c ON c.conv = m.conv \
               WHERE m.uid = $1 AND ($2::bigint IS NULL OR c.last_ts IS NULL OR c.last_ts < $2 \
                  OR (c.last_ts = $2 AND m.conv > $4::text)) \
               ORDER BY c.last_ts DESC NULLS LAST, m.conv LIMIT $3) \
             SELECT p.conv, p.read_seq, \
               (SELECT count(*) FROM messages u WHERE u.conv = p.conv AND u.seq > p.read_seq \
                AND u.sender <> $1 AND u.edit_of IS NULL AND u.delete_of IS NULL \
                AND NOT u.deleted), \
               {} \
             FROM page p LEFT JOIN messages l ON l.conv = p.conv AND l.seq = p.last_seq \
             ORDER BY p.last_ts DESC NULLS LAST, p.conv",
            prefixed("l")
        );
        let rows = sqlx::query(&sql)
            .bind(uid)
            .bind(before.as_ref().map(|b| b.ts as i64))
            .bind(limit as i64 + 1)
            .bind(before.and_then(|b| b.conv))
            .fetch_all(&mut *c)
            .await?;
        let more = rows.len() > limit;
        let mut conversations = Vec::with_capacity(limit.min(rows.len()));
        for row in rows.iter().take(limit) {
            let last_conv: Option<String> = row.try_get(3)?;
            let read: i64 = row.try_get(1)?;
            let unread: i64 = row.try_get(2)?;
            conversations.push(InboxEntry {
                conv: row.try_get(0)?,
                last: match last_conv {
                    Some(_) => Some(message_at(row, 3)?),
                    None => None,
                },
                read: read as u64,
                unread: unread as u64,
            });
        }
        Ok(Inbox {
            conversations,
            more,
        })
    }
});
