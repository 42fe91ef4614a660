//! The statements that are the same SQL on SQLite and PostgreSQL, written once in the
//! [`dialect!`] macro that `postgres.rs` and `sqlite.rs` implement [`super::Dialect`]
//! with.

/// Implements [`super::Dialect`] for `$name` on database `$db`: the statements that are the
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
