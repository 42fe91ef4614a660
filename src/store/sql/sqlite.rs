//! SQLite, embedded: one node's store of record in one file.
//!
//! WAL mode with `synchronous=FULL`: a commit is in the WAL and fsynced before it
//! returns, so a `sent` survives a crash of the process or the machine. Readers use
//! their own connections and never wait for the writer (WAL). The statements that take
//! a batch on PostgreSQL are loops here: SQLite runs in-process, so a statement costs
//! microseconds and only the commit (one per batch) costs an fsync.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use super::message_at;
use super::{
    dialect, map_err, pool_timeout, prefixed, role_from, AppendWrites, Conn, Locked, SqlResult,
    SqlStore, MESSAGE_COLUMNS,
};
use crate::protocol::{room_conv, Message};
use crate::store::rules::{RoomView, Target, UserView};
use crate::store::{
    ConvState, Inbox, InboxCursor, InboxEntry, Page, Purged, Range, ReadRequest, Receipt, Role,
    RoomInfo, StoreError, StoreLimits, UserRoom,
};

/// Reader connections (WAL lets them read while the writer writes).
const READERS: u32 = 4;

pub struct SqliteDialect;

/// The SQLite store.
pub type SqliteStore = SqlStore<SqliteDialect>;

impl SqlStore<SqliteDialect> {
    /// Opens (creating if missing) the database file of a `sqlite://PATH` URL and brings
    /// its schema up to date.
    pub async fn open(
        url: &str,
        limits: StoreLimits,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad database URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(pool_timeout(timeout));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool_timeout(timeout))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {url}: {e}")))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&write)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot migrate {url}: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(pool_timeout(timeout))
            .connect_with(options.read_only(true))
            .await
            .map_err(map_err)?;
        SqlStore::start(read, write, limits).await
    }
}

fn message(row: &SqliteRow) -> SqlResult<Message> {
    message_at(row, 0)
}

/// The inbox in one statement: the page of conversations, then the last message and
/// the unread count of just those (as on PostgreSQL).
static INBOX_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH page AS ( \
           SELECT m.conv, m.read_seq, c.last_seq, c.last_ts FROM members m \
           LEFT JOIN conversations c ON c.conv = m.conv \
           WHERE m.uid = $1 AND ($2 IS NULL OR c.last_ts IS NULL OR c.last_ts < $2 \
              OR (c.last_ts = $2 AND m.conv > $4)) \
           ORDER BY c.last_ts IS NULL, c.last_ts DESC, m.conv LIMIT $3) \
         SELECT p.conv, p.read_seq, \
           (SELECT count(*) FROM messages u WHERE u.conv = p.conv AND u.seq > p.read_seq \
            AND u.sender <> $1 AND u.edit_of IS NULL AND u.delete_of IS NULL \
            AND u.deleted = 0), \
           {} \
         FROM page p LEFT JOIN messages l ON l.conv = p.conv AND l.seq = p.last_seq \
         ORDER BY p.last_ts IS NULL, p.last_ts DESC, p.conv",
        prefixed("l")
    )
});

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v as i64)
}

dialect!(SqliteDialect, sqlx::Sqlite, "", {
    async fn find_idempotent(
        c: &mut Conn<Self>,
        keys: &[(String, String)],
        now: u64,
    ) -> SqlResult<HashMap<(String, String), Message>> {
        let sql = format!(
            "SELECT {} FROM idempotency i JOIN messages m ON m.conv = i.conv AND m.seq = i.seq \
             WHERE i.sender = $1 AND i.client_id = $2 AND i.expires > $3",
            MESSAGE_COLUMNS
                .split(", ")
                .map(|col| format!("m.{col}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut found = HashMap::new();
        for (sender, cid) in keys {
            if let Some(row) = sqlx::query(&sql)
                .bind(sender)
                .bind(cid)
                .bind(now as i64)
                .fetch_optional(&mut *c)
                .await?
            {
                found.insert((sender.clone(), cid.clone()), message(&row)?);
            }
        }
        Ok(found)
    }

    async fn lock_for_append(
        c: &mut Conn<Self>,
        convs: &[String],
        pairs: &[(String, String)],
        _create: bool,
    ) -> SqlResult<Locked> {
        // SQLite has one writer, this node's: nothing else writes meanwhile, and no row
        // lock costs a write of its own, so the counter rows are always made.
        let mut locked = Locked::default();
        for conv in convs {
            let (seq,): (i64,) = sqlx::query_as(
                "INSERT INTO conversations (conv) VALUES ($1) \
                 ON CONFLICT (conv) DO UPDATE SET last_seq = last_seq RETURNING last_seq",
            )
            .bind(conv)
            .fetch_one(&mut *c)
            .await?;
            locked.last.insert(conv.clone(), seq as u64);
        }
        for (conv, uid) in pairs {
            if let Some(role) = Self::role(c, conv, uid).await? {
                locked.roles.insert((conv.clone(), uid.clone()), role);
            }
        }
        Ok(locked)
    }

    async fn targets(
        c: &mut Conn<Self>,
        pairs: &[(String, u64)],
    ) -> SqlResult<HashMap<(String, u64), Target>> {
        let mut targets = HashMap::new();
        for (conv, seq) in pairs {
            let row: Option<(String, bool, bool)> = sqlx::query_as(
                "SELECT sender, deleted, edit_of IS NOT NULL OR delete_of IS NOT NULL \
                 FROM messages WHERE conv = $1 AND seq = $2",
            )
            .bind(conv)
            .bind(*seq as i64)
            .fetch_optional(&mut *c)
            .await?;
            if let Some((from, deleted, is_event)) = row {
                targets.insert(
                    (conv.clone(), *seq),
                    Target {
                        from,
                        deleted,
                        is_event,
                    },
                );
            }
        }
        Ok(targets)
    }

    async fn write_appends(
        c: &mut Conn<Self>,
        w: &AppendWrites,
        now: u64,
        _again: bool,
    ) -> SqlResult<bool> {
        for m in &w.messages {
            sqlx::query(
                "INSERT INTO messages (conv, seq, id, sender, body, ts, edit_of, delete_of) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&m.conv)
            .bind(m.seq as i64)
            .bind(&m.id)
            .bind(&m.from)
            .bind(&m.body)
            .bind(m.ts as i64)
            .bind(opt_i64(m.edit))
            .bind(opt_i64(m.delete))
            .execute(&mut *c)
            .await?;
        }
        for (conv, (seq, ts)) in &w.last {
            sqlx::query("UPDATE conversations SET last_seq = $2, last_ts = $3 WHERE conv = $1")
                .bind(conv)
                .bind(*seq as i64)
                .bind(*ts as i64)
                .execute(&mut *c)
                .await?;
        }
        for (conv, uid, marks) in &w.dm_members {
            sqlx::query(
                "INSERT INTO members (conv, uid, role, read_seq, delivered_seq) \
                 VALUES ($1, $2, 'dm', $3, $3) ON CONFLICT (conv, uid) DO NOTHING",
            )
            .bind(conv)
            .bind(uid)
            .bind(*marks as i64)
            .execute(&mut *c)
            .await?;
        }
        for ((conv, uid), seq) in &w.sender_marks {
            sqlx::query(
                "UPDATE members SET read_seq = MAX(read_seq, $3), \
                 delivered_seq = MAX(delivered_seq, $3) WHERE conv = $1 AND uid = $2",
            )
            .bind(conv)
            .bind(uid)
            .bind(*seq as i64)
            .execute(&mut *c)
            .await?;
        }
        for ((conv, seq), body) in &w.edits {
            sqlx::query("UPDATE messages SET body = $3, edited = 1 WHERE conv = $1 AND seq = $2")
                .bind(conv)
                .bind(*seq as i64)
                .bind(body)
                .execute(&mut *c)
                .await?;
        }
        for (conv, seq) in &w.deletes {
            sqlx::query(
                "UPDATE messages SET body = NULL, deleted = 1 WHERE conv = $1 AND seq = $2",
            )
            .bind(conv)
            .bind(*seq as i64)
            .execute(&mut *c)
            .await?;
            sqlx::query("UPDATE messages SET body = NULL WHERE conv = $1 AND edit_of = $2")
                .bind(conv)
                .bind(*seq as i64)
                .execute(&mut *c)
                .await?;
        }
        for (sender, cid, conv, seq, expires) in &w.idempotency {
            let done = sqlx::query(
                "INSERT INTO idempotency (sender, client_id, conv, seq, expires) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (sender, client_id) DO UPDATE SET conv = excluded.conv, \
                 seq = excluded.seq, expires = excluded.expires \
                 WHERE idempotency.expires <= $6",
            )
            .bind(sender)
            .bind(cid)
            .bind(conv)
            .bind(*seq as i64)
            .bind(*expires as i64)
            .bind(now as i64)
            .execute(&mut *c)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn read_pages(c: &mut Conn<Self>, requests: Vec<ReadRequest>) -> SqlResult<Vec<Page>> {
        let after = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        );
        let before = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3"
        );
        let mut pages = Vec::with_capacity(requests.len());
        for req in requests {
            let (sql, bound, limit) = match req.range {
                Range::After { after: a, limit } => (&after, a.min(i64::MAX as u64) as i64, limit),
                Range::Before { before: b, limit } => (
                    &before,
                    b.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64),
                    limit,
                ),
            };
            let rows = sqlx::query(sql)
                .bind(&req.conv)
                .bind(bound)
                .bind(limit as i64 + 1)
                .fetch_all(&mut *c)
                .await?;
            let mut messages = rows.iter().map(message).collect::<SqlResult<Vec<_>>>()?;
            let more = messages.len() > limit;
            messages.truncate(limit);
            if matches!(req.range, Range::Before { .. }) {
                messages.reverse();
            }
            pages.push(Page {
                conv: req.conv,
                messages,
                more,
            });
        }
        Ok(pages)
    }

    async fn inbox(
        c: &mut Conn<Self>,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> SqlResult<Inbox> {
        let rows = sqlx::query(&INBOX_SQL)
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
