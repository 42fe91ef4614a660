//! The cluster's shared state in Redis: which nodes are alive (the registry) and which
//! nodes hold the connections of each user and of each room's members (the directory).
//!
//! Why it is built this way:
//!
//! - **Counts, not sets.** A node adds one per connection and removes one when it
//!   closes (`HINCRBY`), so updates commute: a disconnect and a reconnect racing each
//!   other cannot leave the directory wrong, whichever Redis sees first.
//! - **Each connection counts once.** The node's `node_conns` set holds the session
//!   ids the counts include, and an update changes the counts only if it changes that
//!   set. So a removal can always be sent, and sent again: after an add that timed
//!   out (it may or may not have landed; if it lands late, the removal that follows
//!   it on the same connection undoes it), and as a retry after a removal failed.
//! - **Every update is one script**, so the user's hash, the room hashes and the node's
//!   own indexes (`node_users`, `node_rooms`, kept so a dead node can be cleaned up
//!   without a scan) never disagree.
//! - **Redis's clock** stamps heartbeats (`TIME` inside the script), so nodes whose
//!   clocks differ still agree on who is dead.
//! - **Anyone cleans up a dead node**, atomically; a second cleaner finds nothing left.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::keys;
use crate::store::StoreError;

/// KEYS: 1 nodes zset, 2 this node's hash. ARGV: 1 node id, 2 advertise URL,
/// 3 ttl ms, 4 prefix of node hashes.
/// Returns {existed (0/1), {id, url, id, url, ...} of live nodes, {dead ids}}.
const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local existed = redis.call('EXISTS', KEYS[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'advertise', ARGV[2])
local cutoff = now - tonumber(ARGV[3])
local live = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')) do
  table.insert(live, id)
  table.insert(live, redis.call('HGET', ARGV[4] .. id, 'advertise') or '')
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
return {existed, live, dead}
"#;

/// KEYS: 1 user_nodes of the user, 2 node_users of this node, 3 node_rooms of this
/// node, 4 node_conns of this node, 5.. room_nodes of each room. ARGV: 1 node id,
/// 2 uid, 3 delta (1 or -1), 4 session id, 5.. the rooms (ARGV[i] is the room of
/// KEYS[i]).
/// Returns {changed (0/1), the user's connection count over all nodes afterwards}:
/// adding a connection already counted, or removing one that is not, changes nothing.
const CONNECTION_LUA: &str = r#"
local node, uid, d = ARGV[1], ARGV[2], tonumber(ARGV[3])
local changed
if d > 0 then
  changed = redis.call('SADD', KEYS[4], ARGV[4])
else
  changed = redis.call('SREM', KEYS[4], ARGV[4])
end
if changed == 1 then
  if redis.call('HINCRBY', KEYS[1], node, d) <= 0 then
    redis.call('HDEL', KEYS[1], node)
    redis.call('SREM', KEYS[2], uid)
  else
    redis.call('SADD', KEYS[2], uid)
  end
  for i = 5, #KEYS do
    if redis.call('HINCRBY', KEYS[i], node, d) <= 0 then
      redis.call('HDEL', KEYS[i], node)
      redis.call('SREM', KEYS[3], ARGV[i])
    else
      redis.call('SADD', KEYS[3], ARGV[i])
    end
  end
end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  total = total + tonumber(v)
end
return {changed, total}
"#;

/// KEYS: 1 nodes zset, 2.. user_nodes of each user. ARGV: 1 ttl ms.
/// Returns 1 or 0 per user: whether one of their nodes heartbeat within the ttl.
const ONLINE_LUA: &str = r#"
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local out = {}
for i = 2, #KEYS do
  local online = 0
  for _, node in ipairs(redis.call('HKEYS', KEYS[i])) do
    local beat = redis.call('ZSCORE', KEYS[1], node)
    if beat and tonumber(beat) >= cutoff then
      online = 1
      break
    end
  end
  out[i - 1] = online
end
return out
"#;

/// KEYS: 1 room_nodes of the room, 2 node_rooms of this node. ARGV: 1 node id, 2 room,
/// 3 delta.
const ROOM_LUA: &str = r#"
if redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[3])) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
else
  redis.call('SADD', KEYS[2], ARGV[2])
end
return 1
"#;

/// KEYS: 1 nodes zset, 2 node hash, 3 node_users, 4 node_rooms, 5 node_conns of the
/// dead node.
/// ARGV: 1 node id, 2 prefix of user_nodes keys, 3 prefix of room_nodes keys.
/// Returns the users who had connections only on that node.
const CLEANUP_LUA: &str = r#"
local offline = {}
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local k = ARGV[2] .. uid
  redis.call('HDEL', k, ARGV[1])
  if redis.call('HLEN', k) == 0 then
    table.insert(offline, uid)
  end
end
for _, room in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('HDEL', ARGV[3] .. room, ARGV[1])
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[1], ARGV[1])
return offline
"#;

/// What one heartbeat learned.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// This node's entry was missing: first beat, or Redis lost its data, or another
    /// node declared this one dead. The local directory entries must be written again.
    pub was_missing: bool,
    /// Live nodes (including this one) and their advertised URLs.
    pub live: Vec<(String, String)>,
    /// Nodes whose heartbeat is older than the TTL.
    pub dead: Vec<String>,
}

/// One local user's entries, for rewriting the directory.
#[derive(Debug, Clone)]
pub struct LocalUser {
    pub uid: String,
    /// Session ids of the user's connections here.
    pub sessions: Vec<u64>,
    pub rooms: Vec<String>,
}

/// What one connection update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionChange {
    /// False when the connection was already counted (add) or was not (remove).
    pub changed: bool,
    /// The user's connections over the whole cluster afterwards.
    pub total: i64,
}

pub struct Directory {
    conn: ConnectionManager,
    node_id: String,
    heartbeat: Script,
    connection: Script,
    room: Script,
    online: Script,
    cleanup: Script,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Directory {
    pub fn new(conn: ConnectionManager, node_id: String) -> Self {
        Directory {
            conn,
            node_id,
            heartbeat: Script::new(HEARTBEAT_LUA),
            connection: Script::new(CONNECTION_LUA),
            room: Script::new(ROOM_LUA),
            online: Script::new(ONLINE_LUA),
            cleanup: Script::new(CLEANUP_LUA),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub async fn heartbeat(&self, advertise: &str, ttl_ms: u64) -> Result<Heartbeat, StoreError> {
        let (existed, live, dead): (i64, Vec<String>, Vec<String>) = self
            .heartbeat
            .key(keys::nodes())
            .key(keys::node(&self.node_id))
            .arg(&self.node_id)
            .arg(advertise)
            .arg(ttl_ms)
            .arg(keys::node(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let live = live
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect();
        Ok(Heartbeat {
            was_missing: existed == 0,
            live,
            dead,
        })
    }

    /// Counts connection `sid` of `uid` here (`added`) or stops counting it, in the
    /// user's entry and in each of `rooms`. Idempotent: see [`ConnectionChange`].
    pub async fn connection(
        &self,
        uid: &str,
        sid: u64,
        rooms: &[String],
        added: bool,
    ) -> Result<ConnectionChange, StoreError> {
        let mut inv = self.connection.prepare_invoke();
        inv.key(keys::user_nodes(uid))
            .key(keys::node_users(&self.node_id))
            .key(keys::node_rooms(&self.node_id))
            .key(keys::node_conns(&self.node_id))
            .arg(&self.node_id)
            .arg(uid)
            .arg(if added { 1 } else { -1 })
            .arg(sid);
        for room in rooms {
            inv.key(keys::room_nodes(room)).arg(room);
        }
        let (changed, total): (i64, i64) = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(ConnectionChange {
            changed: changed == 1,
            total,
        })
    }

    /// A membership change of a user with `delta` connections here.
    pub async fn room_delta(&self, room: &str, delta: i64) -> Result<(), StoreError> {
        self.room
            .key(keys::room_nodes(room))
            .key(keys::node_rooms(&self.node_id))
            .arg(&self.node_id)
            .arg(room)
            .arg(delta)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Whether each user has a connection on a node that heartbeat within `ttl_ms`,
    /// judged by Redis at this instant (a node's own table of peers may be a beat old).
    pub async fn online(&self, uids: &[String], ttl_ms: u64) -> Result<Vec<bool>, StoreError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.online.prepare_invoke();
        inv.key(keys::nodes()).arg(ttl_ms);
        for uid in uids {
            inv.key(keys::user_nodes(uid));
        }
        let online: Vec<i64> = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(online.into_iter().map(|o| o == 1).collect())
    }

    /// The nodes holding connections of `uid`.
    pub async fn user_nodes(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        redis::cmd("HKEYS")
            .arg(keys::user_nodes(uid))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// The nodes with members of each room online.
    pub async fn room_nodes(&self, rooms: &[String]) -> Result<Vec<Vec<String>>, StoreError> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for room in rooms {
            pipe.hkeys(keys::room_nodes(room));
        }
        pipe.query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Removes every trace of node `id`; returns the users who are now offline.
    pub async fn remove_node(&self, id: &str) -> Result<Vec<String>, StoreError> {
        self.cleanup
            .key(keys::nodes())
            .key(keys::node(id))
            .key(keys::node_users(id))
            .key(keys::node_rooms(id))
            .key(keys::node_conns(id))
            .arg(id)
            .arg(keys::user_nodes(""))
            .arg(keys::room_nodes(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Writes this node's entries again from what it holds, after Redis lost them.
    pub async fn rewrite(&self, users: &[LocalUser]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut room_counts: std::collections::HashMap<&str, usize> = Default::default();
        for u in users {
            pipe.hset(keys::user_nodes(&u.uid), &self.node_id, u.sessions.len())
                .sadd(keys::node_users(&self.node_id), &u.uid);
            if !u.sessions.is_empty() {
                pipe.sadd(keys::node_conns(&self.node_id), &u.sessions);
            }
            for r in &u.rooms {
                *room_counts.entry(r).or_default() += u.sessions.len();
            }
        }
        for (room, n) in room_counts {
            pipe.hset(keys::room_nodes(room), &self.node_id, n)
                .sadd(keys::node_rooms(&self.node_id), room);
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }
}
