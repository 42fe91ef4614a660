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
//! - **A Redis Cluster works the same.** `--redis-url` listing several seed nodes
//!   connects to a cluster; commands are batched in one pipeline on a single Redis and in
//!   one pipeline per hash slot on a cluster (`Steps`), keeping the order above.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, RedisError, RedisFuture, Script, Value};

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
/// How long a user whose last connection on a node closed stays noted for that node's
/// cleaner: far longer than a stored message waits for its delivery to a peer.
pub const LEFT_KEPT: Duration = Duration::from_secs(60);

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

/// One Redis server, or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Commands to send together, in order. On a single Redis they go as one pipeline; on
/// a cluster a pipeline may only hold one hash slot, so they go as one pipeline per
/// slot, phase by phase (phase 0 before 1 before 2), and a command that touches a key
/// an earlier command of the batch touched starts a new round, so what must come first
/// still does.
#[derive(Default)]
struct Steps {
    steps: Vec<(Cmd, Option<String>, u8)>,
}

impl Steps {
    fn push(&mut self, cmd: Cmd, key: Option<String>, phase: u8) {
        self.steps.push((cmd, key, phase));
    }

    fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Every command's reply, in order.
    async fn run(self, conn: &Conn) -> Result<Vec<Value>, StoreError> {
        if self.steps.is_empty() {
            return Ok(Vec::new());
        }
        match conn {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for (cmd, _, _) in &self.steps {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(&mut c.clone()).await.map_err(unavailable)
            }
            Conn::Cluster(c) => run_on_cluster(c, self.steps).await,
        }
    }
}

async fn run_on_cluster(
    conn: &ClusterConnection,
    steps: Vec<(Cmd, Option<String>, u8)>,
) -> Result<Vec<Value>, StoreError> {
    let mut replies: Vec<Option<Value>> = vec![None; steps.len()];
    // Rounds: a key seen again starts the next one.
    let mut rounds: Vec<Vec<usize>> = vec![Vec::new()];
    let mut seen = std::collections::HashSet::new();
    for (i, (_, key, _)) in steps.iter().enumerate() {
        if let Some(k) = key {
            if !seen.insert(k.clone()) {
                rounds.push(Vec::new());
                seen.clear();
                seen.insert(k.clone());
            }
        }
        if let Some(round) = rounds.last_mut() {
            round.push(i);
        }
    }
    for round in rounds {
        for phase in 0..3u8 {
            let mut by_slot: HashMap<Option<Slot>, Vec<usize>> = HashMap::new();
            for &i in &round {
                if steps[i].2 == phase {
                    let slot = steps[i].1.as_ref().map(Slot::for_key);
                    by_slot.entry(slot).or_default().push(i);
                }
            }
            let pipelines = by_slot.into_values().map(|idx| {
                let mut pipe = redis::pipe();
                for &i in &idx {
                    pipe.add_command(steps[i].0.clone());
                }
                let mut conn = conn.clone();
                async move {
                    let r: Result<Vec<Value>, RedisError> = pipe.query_async(&mut conn).await;
                    (idx, r)
                }
            });
            for (idx, r) in futures_util::future::join_all(pipelines).await {
                for (i, v) in idx.into_iter().zip(r.map_err(unavailable)?) {
                    replies[i] = Some(v);
                }
            }
        }
    }
    Ok(replies
        .into_iter()
        .map(|v| v.unwrap_or(Value::Nil))
        .collect())
}

pub struct Directory {
    conn: Conn,
    beat: Conn,
    node_id: String,
    heartbeat: Script,
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// `url` is one Redis URL, or several separated by commas: the seed nodes of a Redis
/// Cluster.
async fn connect(url: &str, timeout: Duration) -> Result<Conn, StoreError> {
    let attempt = timeout.saturating_mul(4);
    if url.contains(',') {
        let seeds: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("bad redis cluster urls {url:?}: {e}")))?;
        let conn = tokio::time::timeout(attempt, client.get_async_connection())
            .await
            .map_err(|_| StoreError::Timeout(attempt))?
            .map_err(unavailable)?;
        return Ok(Conn::Cluster(conn));
    }
    let client = redis::Client::open(url)
        .map_err(|e| StoreError::Unavailable(format!("bad redis url {url:?}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(timeout);
    let manager = tokio::time::timeout(attempt, ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| StoreError::Timeout(attempt))?
        .map_err(unavailable)?;
    Ok(Conn::Single(manager))
}

/// A one-key script, sent with its text (no script cache to lose).
fn eval(steps: &mut Steps, lua: &str, key: String, member: &str, phase: u8) {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(lua).arg(1).arg(&key).arg(member);
    steps.push(cmd, Some(key), phase);
}

/// `NAME key member`.
fn set_cmd(steps: &mut Steps, name: &str, key: String, member: &str, phase: u8) {
    let mut cmd = redis::cmd(name);
    cmd.arg(&key).arg(member);
    steps.push(cmd, Some(key), phase);
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

/// What a removed node held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Every user with a connection on it.
    pub users: Vec<String>,
    /// Those of them with no connection left anywhere.
    pub offline: Vec<String>,
    /// Users whose last connection on it closed within [`LEFT_KEPT`] of its last
    /// directory update, not among `users`: a message one of them sent just before may
    /// not have been delivered either.
    pub left: Vec<String>,
    /// It stored messages for the server API lately (see [`Directory::note_api_sends`]):
    /// some may be to any conversation and undelivered.
    pub api_sends: bool,
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
        redis::cmd("HSET")
            .arg(keys::node_addrs())
            .arg(&self.node_id)
            .arg(advertise)
            .query_async::<i64>(&mut beat)
            .await
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

    /// Applies this node's changes in order, in one round trip (on a cluster: one per
    /// hash slot).
    pub async fn apply(&self, ops: &[DirOp]) -> Result<Vec<Transition>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let me = &self.node_id;
        let now = crate::protocol::now_ms();
        let mut steps = Steps::default();
        let mut pruned = false;
        // Where each op's script reply is.
        let mut at = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                DirOp::UserOnline(uid) => {
                    set_cmd(&mut steps, "SADD", keys::node_users(me), uid, 0);
                    at.push(Some(steps.steps.len()));
                    eval(&mut steps, ADD_LUA, keys::user_nodes(uid), me, 1);
                }
                DirOp::UserOffline(uid) => {
                    at.push(Some(steps.steps.len()));
                    eval(&mut steps, REMOVE_LUA, keys::user_nodes(uid), me, 1);
                    // Noted before the user leaves the node's list, so a cleaner after
                    // this node's death finds them in one or the other.
                    let left = keys::node_left(me);
                    let cmd = redis::cmd("ZADD").arg(&left).arg(now).arg(uid).clone();
                    steps.push(cmd, Some(left), 1);
                    set_cmd(&mut steps, "SREM", keys::node_users(me), uid, 2);
                    pruned = true;
                }
                DirOp::RoomOccupied(room) => {
                    at.push(None);
                    set_cmd(&mut steps, "SADD", keys::node_rooms(me), room, 0);
                    set_cmd(&mut steps, "SADD", keys::room_nodes(room), me, 1);
                }
                DirOp::RoomVacated(room) => {
                    at.push(None);
                    set_cmd(&mut steps, "SREM", keys::room_nodes(room), me, 1);
                    set_cmd(&mut steps, "SREM", keys::node_rooms(me), room, 2);
                }
            }
        }
        if pruned {
            let left = keys::node_left(me);
            let cutoff = now.saturating_sub(LEFT_KEPT.as_millis() as u64);
            let cmd = redis::cmd("ZREMRANGEBYSCORE")
                .arg(&left)
                .arg("-inf")
                .arg(format!("({cutoff}"))
                .clone();
            steps.push(cmd, Some(left), 2);
        }
        let replies = steps.run(&self.conn).await?;
        ops.iter()
            .zip(at)
            .map(|(op, at)| {
                let reply = at.and_then(|i| replies.get(i));
                Ok(match (op, reply.and_then(flag_and_count)) {
                    (DirOp::UserOnline(_), Some((true, 1))) => Transition::FirstAnywhere,
                    (DirOp::UserOffline(_), Some((true, 0))) => Transition::GoneEverywhere,
                    (DirOp::UserOnline(_) | DirOp::UserOffline(_), None) => {
                        return Err(StoreError::Corrupt(
                            "bad reply to a directory update".into(),
                        ))
                    }
                    _ => Transition::None,
                })
            })
            .collect()
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
        let mut read = Steps::default();
        read.push(
            redis::cmd("SMEMBERS").arg(keys::node_users(me)).clone(),
            Some(keys::node_users(me)),
            0,
        );
        read.push(
            redis::cmd("SMEMBERS").arg(keys::node_rooms(me)).clone(),
            Some(keys::node_rooms(me)),
            0,
        );
        let had = read.run(&self.conn).await?;
        let set = |v: Option<&Value>| -> Result<BTreeSet<String>, StoreError> {
            v.map(redis::from_redis_value_ref)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
                .map(Option::unwrap_or_default)
        };
        let (had_users, had_rooms) = (set(had.first())?, set(had.get(1))?);
        let mut steps = Steps::default();
        for uid in users {
            set_cmd(&mut steps, "SADD", keys::node_users(me), uid, 0);
            set_cmd(&mut steps, "SADD", keys::user_nodes(uid), me, 1);
        }
        for uid in had_users.difference(users) {
            set_cmd(&mut steps, "SREM", keys::user_nodes(uid), me, 1);
            set_cmd(&mut steps, "SREM", keys::node_users(me), uid, 2);
        }
        for room in rooms {
            set_cmd(&mut steps, "SADD", keys::node_rooms(me), room, 0);
            set_cmd(&mut steps, "SADD", keys::room_nodes(room), me, 1);
        }
        for room in had_rooms.difference(rooms) {
            set_cmd(&mut steps, "SREM", keys::room_nodes(room), me, 1);
            set_cmd(&mut steps, "SREM", keys::node_rooms(me), room, 2);
        }
        steps.run(&self.conn).await.map(|_| ())
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
        let mut steps = Steps::default();
        for key in keys {
            steps.push(redis::cmd("SMEMBERS").arg(&key).clone(), Some(key), 0);
        }
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        steps
            .run(&self.conn)
            .await?
            .iter()
            .map(|v| redis::from_redis_value_ref(v).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    /// Whether each node heartbeat within `ttl_ms`, judged by Redis's clock now (a
    /// node's own live table may be a heartbeat old).
    pub async fn are_live(&self, ids: &[String], ttl_ms: u64) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(keys::nodes())
            .arg(ids)
            .query_async(&mut conn)
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

    /// Notes, for `window`, that this node stores messages for the server API (see
    /// [`Removed::api_sends`]).
    pub async fn note_api_sends(&self, window: Duration) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(keys::api_sends(&self.node_id))
            .arg(1)
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Lets go of the cleanup claim on this node: it was declared dead and is back, so
    /// should it really die now it must be cleaned up at once, not once the old claim
    /// expires.
    pub async fn release_own_cleanup(&self) -> Result<(), StoreError> {
        redis::cmd("DEL")
            .arg(keys::cleanup(&self.node_id))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Removes every trace of node `id`; answers what it held. The registry entry goes
    /// last, so a node that comes back meanwhile finds itself missing at its next
    /// heartbeat and writes its entries again.
    pub async fn remove_node(&self, id: &str) -> Result<Removed, StoreError> {
        let mut read = Steps::default();
        read.push(
            redis::cmd("SMEMBERS").arg(keys::node_users(id)).clone(),
            Some(keys::node_users(id)),
            0,
        );
        read.push(
            redis::cmd("SMEMBERS").arg(keys::node_rooms(id)).clone(),
            Some(keys::node_rooms(id)),
            0,
        );
        read.push(
            redis::cmd("GET").arg(keys::api_sends(id)).clone(),
            Some(keys::api_sends(id)),
            0,
        );
        read.push(
            redis::cmd("ZRANGE")
                .arg(keys::node_left(id))
                .arg(0)
                .arg(-1)
                .clone(),
            Some(keys::node_left(id)),
            0,
        );
        let had = read.run(&self.conn).await?;
        let api_sends = !matches!(had.get(2), None | Some(Value::Nil));
        let list = |v: Option<&Value>| -> Result<Vec<String>, StoreError> {
            v.map(redis::from_redis_value_ref)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
                .map(Option::unwrap_or_default)
        };
        let (users, rooms) = (list(had.first())?, list(had.get(1))?);
        let mut left = list(had.get(3))?;
        left.retain(|uid| !users.contains(uid));
        let mut steps = Steps::default();
        for uid in &users {
            eval(&mut steps, REMOVE_LUA, keys::user_nodes(uid), id, 0);
        }
        for room in &rooms {
            set_cmd(&mut steps, "SREM", keys::room_nodes(room), id, 0);
        }
        // The node's own keys, each deleted whole.
        for key in [
            keys::node_users(id),
            keys::node_rooms(id),
            keys::api_sends(id),
            keys::node_left(id),
        ] {
            steps.push(redis::cmd("DEL").arg(&key).clone(), Some(key), 1);
        }
        set_cmd(&mut steps, "HDEL", keys::node_addrs(), id, 1);
        set_cmd(&mut steps, "ZREM", keys::nodes(), id, 2);
        let replies = steps.run(&self.conn).await?;
        let offline = users
            .iter()
            .zip(replies.iter())
            .filter(|(_, r)| matches!(flag_and_count(r), Some((true, 0))))
            .map(|(uid, _)| uid.clone())
            .collect();
        Ok(Removed {
            users,
            offline,
            left,
            api_sends,
        })
    }
}
