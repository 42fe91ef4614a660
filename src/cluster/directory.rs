//! The cluster's soft state in Redis: which nodes are alive (the registry) and which
//! nodes hold the connections of each user and of each room's members (the directory).
//! Plain async functions over a Redis connection; no actors.
//!
//! Why it is built this way:
//!
//! - **Every command and script touches one key** (the layout is in [`crate::keys`]), so
//!   nothing needs two keys in one slot and the same code runs on a Redis Cluster.
//!   Where two keys must agree (a user's set of nodes and a node's set of users), they
//!   are written in an order that is safe to split: the node's own index first when
//!   adding, last when removing, so a cleaner never misses an entry.
//! - **Sets of nodes, not counts.** A node is in `user_nodes:{uid}` while it holds at
//!   least one of the user's connections. Only the node itself knows that, and only its
//!   ChatServer decides it, so the node's updates are idempotent (`SADD`/`SREM`) and
//!   arrive in order from one writer ([`super::upkeep`]); anything that went wrong is
//!   repaired by writing the node's entries again from its own tables
//!   ([`Directory::reconcile`]).
//! - **`SADD` and `SCARD` in one script** tell whether this was the user's first
//!   connection anywhere (or their last), so exactly one node announces a user online
//!   or offline however many connect at once.
//! - **Redis's clock** stamps heartbeats (`TIME` in the script), so nodes whose clocks
//!   differ still agree on who is dead.
//! - **Heartbeats have their own connection** with a short timeout, so a slow directory
//!   write never delays a heartbeat past the TTL.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisError, Script, Value};

use crate::keys;
use crate::store::StoreError;

/// KEYS: 1 the nodes ZSET. ARGV: 1 node id, 2 ttl ms.
/// Returns {existed (0/1), {live ids}, {dead ids}}.
const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local existed = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
redis.call('ZADD', KEYS[1], now, ARGV[1])
local cutoff = now - tonumber(ARGV[2])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
return {existed, live, dead}
"#;

/// KEYS: 1 a set. ARGV: 1 a member. Returns {added (0/1), cardinality afterwards}.
const ADD_LUA: &str = r#"
local added = redis.call('SADD', KEYS[1], ARGV[1])
return {added, redis.call('SCARD', KEYS[1])}
"#;

/// KEYS: 1 a set. ARGV: 1 a member. Returns {removed (0/1), cardinality afterwards}.
const REMOVE_LUA: &str = r#"
local removed = redis.call('SREM', KEYS[1], ARGV[1])
return {removed, redis.call('SCARD', KEYS[1])}
"#;

/// How long a node's claim to clean up a dead node lasts.
const CLEANUP_CLAIM: Duration = Duration::from_secs(10);

/// A change of this node's directory entries, in the order its ChatServer made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirOp {
    /// The user's first connection on this node opened.
    UserOnline(String),
    /// The user's last connection on this node closed.
    UserOffline(String),
    /// A member of the room is now connected here (none was).
    RoomOccupied(String),
    /// No member of the room is connected here any more.
    RoomVacated(String),
}

/// What applying one [`DirOp`] showed about the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The user had no connection anywhere before: announce them online.
    FirstAnywhere,
    /// The user has no connection anywhere now: announce them offline.
    GoneEverywhere,
    None,
}

/// What one heartbeat learned.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// This node was not in the registry: its first beat, or Redis lost its data, or
    /// other nodes declared it dead. Its entries must be written again.
    pub was_missing: bool,
    /// Live nodes (including this one) and their advertised URLs.
    pub live: Vec<(String, String)>,
    /// Nodes whose heartbeat is older than the TTL.
    pub dead: Vec<String>,
}

/// How long Redis may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Directory writes and look-ups.
    pub directory: Duration,
    /// One heartbeat (shorter: it must finish well within the TTL).
    pub heartbeat: Duration,
}

pub struct Directory {
    conn: ConnectionManager,
    beat: ConnectionManager,
    node_id: String,
    heartbeat: Script,
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url)
        .map_err(|e| StoreError::Unavailable(format!("bad redis url {url:?}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(timeout);
    tokio::time::timeout(
        timeout.saturating_mul(4),
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .map_err(|_| StoreError::Timeout(timeout.saturating_mul(4)))?
    .map_err(unavailable)
}

fn eval(pipe: &mut Pipeline, lua: &str, key: String, member: &str) {
    pipe.cmd("EVAL").arg(lua).arg(1).arg(key).arg(member);
}

/// `{flag, count}` from [`ADD_LUA`] / [`REMOVE_LUA`].
fn flag_and_count(v: &Value) -> Option<(bool, i64)> {
    match v {
        Value::Array(a) => match a.as_slice() {
            [Value::Int(flag), Value::Int(n)] => Some((*flag == 1, *n)),
            _ => None,
        },
        _ => None,
    }
}

impl Directory {
    /// Connects twice: one connection for heartbeats, one for everything else.
    pub async fn connect(url: &str, node_id: &str, t: Timeouts) -> Result<Self, StoreError> {
        Ok(Directory {
            conn: connect(url, t.directory).await?,
            beat: connect(url, t.heartbeat).await?,
            node_id: node_id.to_owned(),
            heartbeat: Script::new(HEARTBEAT_LUA),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Registers (or keeps registered) this node and reads the registry.
    pub async fn heartbeat(&self, advertise: &str, ttl_ms: u64) -> Result<Heartbeat, StoreError> {
        let mut beat = self.beat.clone();
        // The address first: a node is never live without one.
        let () = redis::cmd("HSET")
            .arg(keys::node_addrs())
            .arg(&self.node_id)
            .arg(advertise)
            .query_async::<i64>(&mut beat)
            .await
            .map(|_| ())
            .map_err(unavailable)?;
        let (existed, live, dead): (i64, Vec<String>, Vec<String>) = self
            .heartbeat
            .key(keys::nodes())
            .arg(&self.node_id)
            .arg(ttl_ms)
            .invoke_async(&mut beat)
            .await
            .map_err(unavailable)?;
        let urls: Vec<Option<String>> = if live.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(keys::node_addrs())
                .arg(&live)
                .query_async(&mut beat)
                .await
                .map_err(unavailable)?
        };
        Ok(Heartbeat {
            was_missing: existed == 0,
            live: live
                .into_iter()
                .zip(urls)
                .filter_map(|(id, url)| Some((id, url?)))
                .collect(),
            dead,
        })
    }

    /// Applies this node's changes in order, in one round trip.
    pub async fn apply(&self, ops: &[DirOp]) -> Result<Vec<Transition>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let me = &self.node_id;
        let mut pipe = redis::pipe();
        for op in ops {
            match op {
                DirOp::UserOnline(uid) => {
                    pipe.sadd(keys::node_users(me), uid).ignore();
                    eval(&mut pipe, ADD_LUA, keys::user_nodes(uid), me);
                }
                DirOp::UserOffline(uid) => {
                    eval(&mut pipe, REMOVE_LUA, keys::user_nodes(uid), me);
                    pipe.srem(keys::node_users(me), uid).ignore();
                }
                DirOp::RoomOccupied(room) => {
                    pipe.sadd(keys::node_rooms(me), room).ignore();
                    pipe.sadd(keys::room_nodes(room), me).ignore();
                }
                DirOp::RoomVacated(room) => {
                    pipe.srem(keys::room_nodes(room), me).ignore();
                    pipe.srem(keys::node_rooms(me), room).ignore();
                }
            }
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut replies = replies.iter();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let t = match op {
                DirOp::UserOnline(_) => match replies.next().and_then(flag_and_count) {
                    Some((true, 1)) => Transition::FirstAnywhere,
                    Some(_) => Transition::None,
                    None => return Err(StoreError::Corrupt("bad reply to a directory add".into())),
                },
                DirOp::UserOffline(_) => match replies.next().and_then(flag_and_count) {
                    Some((true, 0)) => Transition::GoneEverywhere,
                    Some(_) => Transition::None,
                    None => {
                        return Err(StoreError::Corrupt(
                            "bad reply to a directory removal".into(),
                        ))
                    }
                },
                DirOp::RoomOccupied(_) | DirOp::RoomVacated(_) => Transition::None,
            };
            out.push(t);
        }
        Ok(out)
    }

    /// Makes this node's entries exactly `users` and `rooms`: adds what is missing
    /// and removes what it no longer holds (after Redis lost its data, after this
    /// node was declared dead, or after a write failed).
    pub async fn reconcile(
        &self,
        users: &BTreeSet<String>,
        rooms: &BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let me = &self.node_id;
        let (had_users, had_rooms): (BTreeSet<String>, BTreeSet<String>) = redis::pipe()
            .smembers(keys::node_users(me))
            .smembers(keys::node_rooms(me))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        for uid in users {
            pipe.sadd(keys::node_users(me), uid).ignore();
            pipe.sadd(keys::user_nodes(uid), me).ignore();
        }
        for uid in had_users.difference(users) {
            pipe.srem(keys::user_nodes(uid), me).ignore();
            pipe.srem(keys::node_users(me), uid).ignore();
        }
        for room in rooms {
            pipe.sadd(keys::node_rooms(me), room).ignore();
            pipe.sadd(keys::room_nodes(room), me).ignore();
        }
        for room in had_rooms.difference(rooms) {
            pipe.srem(keys::room_nodes(room), me).ignore();
            pipe.srem(keys::node_rooms(me), room).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// The nodes holding connections of each user.
    pub async fn user_nodes(&self, uids: &[String]) -> Result<Vec<Vec<String>>, StoreError> {
        self.members(uids.iter().map(|u| keys::user_nodes(u))).await
    }

    /// The nodes holding connections of members of each room.
    pub async fn room_nodes(&self, rooms: &[String]) -> Result<Vec<Vec<String>>, StoreError> {
        self.members(rooms.iter().map(|r| keys::room_nodes(r)))
            .await
    }

    async fn members(
        &self,
        keys: impl Iterator<Item = String>,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let mut pipe = redis::pipe();
        let mut n = 0;
        for key in keys {
            pipe.smembers(key);
            n += 1;
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        pipe.query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Whether each node heartbeat within `ttl_ms`, judged by Redis's clock now (a
    /// node's own live table may be a heartbeat old).
    pub async fn are_live(&self, ids: &[String], ttl_ms: u64) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ((secs, micros), scores): ((u64, u64), Vec<Option<f64>>) = redis::pipe()
            .cmd("TIME")
            .cmd("ZMSCORE")
            .arg(keys::nodes())
            .arg(ids)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let cutoff = (secs * 1000 + micros / 1000).saturating_sub(ttl_ms) as f64;
        Ok(scores
            .into_iter()
            .map(|s| s.is_some_and(|beat| beat >= cutoff))
            .collect())
    }

    /// Claims the cleanup of dead node `id`; false when another node has it.
    pub async fn claim_cleanup(&self, id: &str) -> Result<bool, StoreError> {
        let claimed: Option<String> = redis::cmd("SET")
            .arg(keys::cleanup(id))
            .arg(&self.node_id)
            .arg("NX")
            .arg("PX")
            .arg(CLEANUP_CLAIM.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(claimed.is_some())
    }

    /// Removes every trace of node `id`; answers the users who now have no
    /// connection anywhere. The registry entry goes last, so a node that comes back
    /// meanwhile finds itself missing at its next heartbeat and writes its entries
    /// again.
    pub async fn remove_node(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let (users, rooms): (Vec<String>, Vec<String>) = redis::pipe()
            .smembers(keys::node_users(id))
            .smembers(keys::node_rooms(id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        for uid in &users {
            eval(&mut pipe, REMOVE_LUA, keys::user_nodes(uid), id);
        }
        for room in &rooms {
            pipe.srem(keys::room_nodes(room), id).ignore();
        }
        pipe.del(keys::node_users(id)).ignore();
        pipe.del(keys::node_rooms(id)).ignore();
        pipe.hdel(keys::node_addrs(), id).ignore();
        pipe.zrem(keys::nodes(), id).ignore();
        let replies: Vec<Value> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(users
            .into_iter()
            .zip(replies.iter())
            .filter(|(_, r)| matches!(flag_and_count(r), Some((true, 0))))
            .map(|(uid, _)| uid)
            .collect())
    }
}
