//! The store shared by every node of a cluster, kept in one Redis server.
//!
//! Why it is built this way:
//!
//! - **Appends are one Lua script.** The idempotency check, the membership check,
//!   taking the next seq, appending, trimming, recording the DM and remembering the
//!   client id must happen as one step, or two nodes appending to one conversation
//!   could interleave and leave a gap or a duplicate. Redis runs a script without
//!   interleaving other commands, so the seq counter and the log can never disagree,
//!   and a refused message returns before anything is written (it takes no seq and
//!   its client id is not remembered).
//! - **Appends are batched.** One writer task sends every append that is waiting as
//!   one script call, one call at a time, so the batch grows with the load: a busy
//!   node pays one round trip and one script start for many messages, and a lone
//!   message goes at once. Each message is still appended as if alone (the script
//!   catches an error per message), and one whose caller gave up while it waited is
//!   not sent.
//! - **The message JSON is made by serde, not by Lua.** Rust serialises the message
//!   with a placeholder seq and sends the text before and after the seq digits; the
//!   script only splices the number in. The stored text is then exactly what
//!   [`Message`] deserialises from, and large `ts` values do not pass through Lua's
//!   doubles (cjson would print them in exponent form).
//! - **A log is a LIST whose seqs are contiguous.** The seq counter lives beside it
//!   and is never trimmed, so the first kept seq is `last_seq - LLEN + 1` and any
//!   range of seqs maps to one `LRANGE` by index, with no per-message index to keep.
//! - **Reads are one script for all requests.** The counter and the list length must
//!   be read at the same instant as the range (an append between them would shift the
//!   indexes), and a sync asks for many conversations at once; one `EVALSHA` gives both
//!   consistency and a single round trip.
//! - **Scripts go by `EVALSHA`.** [`Script`] falls back to loading the script when the
//!   server answers `NOSCRIPT` (after a restart or a failover), so nothing here has to
//!   track whether a server has seen them; `connect` loads them once up front only to
//!   fail early on a server that refuses scripts.
//! - **One multiplexed [`ConnectionManager`]** carries every call: it pipelines
//!   concurrent requests over one socket and reconnects by itself, and its response
//!   timeout turns a stalled server into [`StoreError::Unavailable`] instead of a hang.
//!
//! The keys are named in [`crate::keys`]. The scripts touch keys of several users and
//! conversations at once, so this needs a single Redis primary, not Redis Cluster.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Appended, NewMessage, Page, Range, ReadRequest, Store, StoreError, StoreLimits};
use crate::keys;
use crate::protocol::{room_conv, Conv, Message};

/// Numbers sent to the scripts are clamped to this, the largest integer Lua's doubles
/// hold exactly. No seq or limit comes near it; a client's absurd cursor still reads as
/// "past the end".
const LUA_MAX_INT: u64 = 1 << 53;

/// Longest idempotency TTL sent to Redis, in ms (about 35 years); `SET PX` refuses
/// values that overflow its clock.
const MAX_TTL_MS: u64 = 1 << 40;

/// Appends a batch of messages, each exactly as if it were alone: one script call
/// carries every append that was waiting, so a busy node pays one round trip and one
/// script start for many messages.
///
/// ARGV: 1 how many messages, 2 messages to keep per log, 3 idempotency TTL in ms,
/// then ten per message: key base (its keys are KEYS[base + 1...]), then, relative to
/// the base, the positions of its optional keys (0 = absent): idempotency key, room
/// members set, the first of two DM sets; then sender, JSON before the seq, JSON after
/// the seq, conversation id, position of the first directory hash to read
/// (`user_nodes`/`room_nodes`) and how many follow it. A message's first two keys are
/// its seq counter and its log.
/// Returns one reply per message: {'ok', seq, node...}, {'dup', first message JSON,
/// node...}, {'not_member'} or {'err', text}: the nodes are the fields of the
/// directory hashes, read in the same step so that routing sees exactly the
/// connections registered before the append. An error in one message (a key of the
/// wrong type) does not stop the others.
const APPEND_LUA: &str = r#"
local keep, ttl = tonumber(ARGV[2]), ARGV[3]
local function append(a)
  local base = tonumber(ARGV[a])
  local function key(i) return KEYS[base + i] end
  local idem, members, dms = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local function route(out)
    local from, count = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
    for i = from, from + count - 1 do
      for _, node in ipairs(redis.call('HKEYS', key(i))) do
        table.insert(out, node)
      end
    end
    return out
  end
  if idem > 0 then
    local first = redis.call('GET', key(idem))
    if first then
      return route({'dup', first})
    end
  end
  if members > 0 and redis.call('SISMEMBER', key(members), ARGV[a + 4]) == 0 then
    return {'not_member'}
  end
  local seq = redis.call('INCR', key(1))
  local json = ARGV[a + 5] .. string.format('%d', seq) .. ARGV[a + 6]
  local len = redis.call('RPUSH', key(2), json)
  if len > keep then
    if keep > 0 then
      redis.call('LTRIM', key(2), -keep, -1)
    else
      redis.call('DEL', key(2))
    end
  end
  -- The first message of a DM starts the conversation: only then is it new to the
  -- two participants' lists.
  if dms > 0 and seq == 1 then
    redis.call('SADD', key(dms), ARGV[a + 7])
    redis.call('SADD', key(dms + 1), ARGV[a + 7])
  end
  if idem > 0 then
    redis.call('SET', key(idem), json, 'PX', ttl)
  end
  return route({'ok', seq})
end
local out = {}
for m = 1, tonumber(ARGV[1]) do
  local ok, reply = pcall(append, 4 + (m - 1) * 10)
  if ok then
    out[m] = reply
  else
    out[m] = {'err', type(reply) == 'table' and reply.err or tostring(reply)}
  end
end
return out
"#;

/// KEYS: seq counter and log of each request, in pairs.
/// ARGV: three per request: 'a' (after) or 'b' (before), the bound (-1 = no bound
/// for 'b'), the limit.
/// Returns one array per request: {more (0/1), seq of the first message, message
/// JSON...}, oldest first.
const READ_LUA: &str = r#"
local out = {}
for r = 1, #KEYS / 2 do
  local seq_key, log_key = KEYS[2 * r - 1], KEYS[2 * r]
  local kind = ARGV[3 * r - 2]
  local bound = tonumber(ARGV[3 * r - 1])
  local limit = tonumber(ARGV[3 * r])
  local last = tonumber(redis.call('GET', seq_key) or '0')
  if not last then
    return redis.error_reply('CORRUPT ' .. seq_key .. ' does not hold a number')
  end
  local first = last - redis.call('LLEN', log_key) + 1
  local from, to, more = 1, 0, 0
  if kind == 'a' then
    local start = math.max(bound + 1, first)
    if start <= last then
      local available = last - start + 1
      from = start
      to = start + math.min(available, limit) - 1
      if available > limit then more = 1 end
    end
  else
    local stop = last + 1
    if bound >= 0 and bound < stop then stop = bound end
    if stop > first then
      local available = stop - first
      from = stop - math.min(available, limit)
      to = stop - 1
      if available > limit then more = 1 end
    end
  end
  local page
  if to >= from then
    page = redis.call('LRANGE', log_key, from - first, to - first)
  else
    page = {}
  end
  table.insert(page, 1, more)
  table.insert(page, 2, from)
  out[r] = page
end
return out
"#;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone, Copy)]
pub struct RedisConfig {
    /// Limit on establishing one connection.
    pub connection_timeout: Duration,
    /// Limit on the answer to one command (or pipeline, or script).
    pub response_timeout: Duration,
    /// Connection attempts after a failure before a call gives up (each later call
    /// starts a new round of attempts).
    pub reconnect_retries: usize,
    /// Longest pause between two connection attempts.
    pub max_reconnect_delay: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            connection_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(3),
            reconnect_retries: 4,
            max_reconnect_delay: Duration::from_secs(1),
        }
    }
}

/// Most appends one script call carries.
const MAX_APPEND_BATCH: usize = 256;
/// Appends waiting for the writer; beyond this a caller waits for room (within its
/// deadline).
const APPEND_QUEUE: usize = 4096;

pub struct RedisStore {
    conn: ConnectionManager,
    read_script: Script,
    appends: mpsc::Sender<AppendJob>,
}

/// One message's part of an append batch. Key positions are relative to its own keys,
/// the first two being its seq counter and its log.
struct AppendJob {
    keys: Vec<String>,
    idem: usize,
    members: usize,
    dms: usize,
    sender: String,
    head: String,
    tail: String,
    conv: String,
    route_from: usize,
    route_count: usize,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// Sends the appends that are waiting as one script call, one call at a time: while a
/// call is out, the next batch gathers, so the batch grows with the load and a lone
/// message goes at once. Ends when the store is dropped.
async fn append_writer(
    mut conn: ConnectionManager,
    script: Script,
    limits: StoreLimits,
    mut jobs: mpsc::Receiver<AppendJob>,
) {
    let keep = lua_limit(limits.history_per_conv);
    let ttl_ms = u64::try_from(limits.idempotency_ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS);
    let mut batch = Vec::with_capacity(MAX_APPEND_BATCH);
    while jobs.recv_many(&mut batch, MAX_APPEND_BATCH).await > 0 {
        // A caller whose deadline passed while it waited has answered `unavailable`;
        // its client resends, so its message must not be stored now.
        batch.retain(|job: &AppendJob| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut invocation = script.prepare_invoke();
        invocation.arg(batch.len()).arg(keep).arg(ttl_ms);
        let mut base = 0;
        for job in &batch {
            invocation
                .key(&job.keys)
                .arg(base)
                .arg(job.idem)
                .arg(job.members)
                .arg(job.dms)
                .arg(&job.sender)
                .arg(&job.head)
                .arg(&job.tail)
                .arg(&job.conv)
                .arg(job.route_from)
                .arg(job.route_count);
            base += job.keys.len();
        }
        let replies: Result<Vec<Value>, StoreError> =
            invocation.invoke_async(&mut conn).await.map_err(map_err);
        let replies = match replies {
            Ok(replies) if replies.len() == batch.len() => replies.into_iter().map(Ok).collect(),
            Ok(replies) => {
                let e = corrupt(format!(
                    "append script answered {} replies for {} messages",
                    replies.len(),
                    batch.len()
                ));
                vec![Err(e); batch.len()]
            }
            Err(e) => vec![Err(e); batch.len()],
        };
        for (job, reply) in batch.drain(..).zip(replies) {
            // The caller may have given up meanwhile; the message is stored either way
            // and a resend with its client id finds it.
            let _ = job.reply.send(reply);
        }
    }
}

impl RedisStore {
    /// Connects to `redis://host:port[/db]` or `redis+unix:///path[?db=N]` with the
    /// default [`RedisConfig`].
    pub async fn connect(url: &str, limits: StoreLimits) -> Result<RedisStore, StoreError> {
        Self::connect_with(url, limits, RedisConfig::default()).await
    }

    /// Connects and loads the scripts, so that a wrong URL, an unreachable server or
    /// one that refuses scripts fails here rather than on the first message.
    pub async fn connect_with(
        url: &str,
        limits: StoreLimits,
        config: RedisConfig,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("bad redis url {url:?}: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connection_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(config.reconnect_retries)
            .set_max_delay(config.max_reconnect_delay);
        let mut conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(map_err)?;
        let append_script = Script::new(APPEND_LUA);
        let (appends, jobs) = mpsc::channel(APPEND_QUEUE);
        let store = RedisStore {
            conn: conn.clone(),
            read_script: Script::new(READ_LUA),
            appends,
        };
        let (append_sha, read_sha): (String, String) = redis::pipe()
            .cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPEND_LUA)
            .cmd("SCRIPT")
            .arg("LOAD")
            .arg(READ_LUA)
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        if append_sha != append_script.get_hash() || read_sha != store.read_script.get_hash() {
            return Err(StoreError::Unavailable(
                "redis answered SCRIPT LOAD with an unexpected hash".into(),
            ));
        }
        tokio::spawn(append_writer(conn, append_script, limits, jobs));
        Ok(store)
    }

    /// The connection this store uses, for other Redis work (the cluster code) that
    /// should share its socket and reconnection.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

/// Connection trouble, timeouts and refusals by the server are `Unavailable` (worth
/// retrying later); answers that show the data is not what this module wrote are
/// `Corrupt`.
fn map_err(e: RedisError) -> StoreError {
    let corrupt = matches!(e.kind(), ErrorKind::Parse | ErrorKind::UnexpectedReturnType)
        || matches!(e.code(), Some("WRONGTYPE" | "CORRUPT"))
        || e.detail().is_some_and(|d| d.contains("not an integer"));
    if corrupt {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// An error a script caught in one message, classified as [`map_err`] does.
fn script_error(text: &str) -> StoreError {
    if text.starts_with("WRONGTYPE") || text.contains("not an integer") {
        corrupt(text)
    } else {
        StoreError::Unavailable(text.to_owned())
    }
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

fn parse_message(raw: &[u8]) -> Result<Message, StoreError> {
    serde_json::from_slice(raw).map_err(|e| {
        corrupt(format!(
            "stored message is not a message ({e}): {}",
            String::from_utf8_lossy(raw)
        ))
    })
}

/// The JSON of `message` cut around its seq, so the script can put the real seq
/// between the two parts. `"seq":` can only occur in serde's output as the key: inside
/// a JSON string every `"` is escaped, so `q"` never appears there.
fn split_at_seq(message: &Message) -> Result<(String, String), StoreError> {
    const KEY: &str = "\"seq\":";
    let json = serde_json::to_string(&Message {
        seq: 0,
        ..message.clone()
    })
    .map_err(|e| corrupt(format!("cannot serialise message: {e}")))?;
    let at = json
        .find(KEY)
        .map(|i| i + KEY.len())
        .filter(|&i| json[i..].starts_with('0'))
        .ok_or_else(|| corrupt(format!("no seq in serialised message {json}")))?;
    Ok((json[..at].to_owned(), json[at + 1..].to_owned()))
}

/// Node ids from the directory, without repeats (a user's own node appears in both
/// DM hashes).
fn parse_nodes(values: &[Value]) -> Result<Vec<String>, StoreError> {
    let mut nodes: Vec<String> = Vec::with_capacity(values.len());
    for v in values {
        let Value::BulkString(raw) = v else {
            return Err(corrupt(format!("directory entry is {v:?}")));
        };
        let node = String::from_utf8_lossy(raw);
        if !nodes.iter().any(|n| *n == node) {
            nodes.push(node.into_owned());
        }
    }
    Ok(nodes)
}

fn lua_int(n: u64) -> u64 {
    n.min(LUA_MAX_INT)
}

fn lua_limit(n: usize) -> u64 {
    lua_int(u64::try_from(n).unwrap_or(u64::MAX))
}

/// Checks that a page read from a log is what the layout promises: messages of the
/// requested conversation whose seqs are the ones the script computed from the
/// counter. A log that fell out of step with its counter would otherwise serve the
/// wrong page silently.
fn check_page(conv: &str, first_seq: i64, messages: &[Message]) -> Result<(), StoreError> {
    let in_step = messages
        .iter()
        .zip(first_seq..)
        .all(|(m, seq)| m.conv == conv && i64::try_from(m.seq) == Ok(seq));
    if !in_step {
        return Err(corrupt(format!(
            "log of {conv} is out of step with its seq counter: expected seqs from {first_seq}, read {:?}",
            messages.iter().map(|m| m.seq).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

fn parse_page(req: ReadRequest, value: Value) -> Result<Page, StoreError> {
    let Value::Array(items) = value else {
        return Err(corrupt(format!("read script answered {value:?}")));
    };
    let mut items = items.into_iter();
    let (more, first_seq) = match (items.next(), items.next()) {
        (Some(Value::Int(more)), Some(Value::Int(first_seq))) => (more != 0, first_seq),
        other => return Err(corrupt(format!("read script answered {other:?}"))),
    };
    let messages = items
        .map(|item| match item {
            Value::BulkString(raw) => parse_message(&raw),
            other => Err(corrupt(format!("log entry is {other:?}"))),
        })
        .collect::<Result<Vec<Message>, StoreError>>()?;
    check_page(&req.conv, first_seq, &messages)?;
    Ok(Page {
        conv: req.conv,
        messages,
        more,
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        let require_member = msg.require_member;
        let client_id = msg.client_id.clone();
        let mut message = msg.into_message(0);
        let (head, tail) = split_at_seq(&message)?;

        // The optional keys go after the two fixed ones; the script learns where each
        // one is (0 = absent) from its first three arguments.
        let mut script_keys = vec![keys::conv_seq(&message.conv), keys::conv_log(&message.conv)];
        let mut optional = |key: Option<String>| {
            key.map_or(0, |key| {
                script_keys.push(key);
                script_keys.len()
            })
        };
        let idem = optional(
            client_id
                .as_deref()
                .map(|c| keys::idempotency(&message.from, c)),
        );
        let members = optional(
            message
                .room
                .as_deref()
                .filter(|_| require_member)
                .map(keys::room_members),
        );
        let dms = match Conv::parse(&message.conv) {
            Some(Conv::Dm(a, b)) => {
                let first = optional(Some(keys::user_dms(a)));
                script_keys.push(keys::user_dms(b));
                first
            }
            _ => 0,
        };
        // The directory hashes of everyone who should get the message.
        let route_keys: Vec<String> = match (&message.room, &message.to) {
            (Some(room), _) => vec![keys::room_nodes(room)],
            (None, Some(to)) => vec![keys::user_nodes(to), keys::user_nodes(&message.from)],
            (None, None) => Vec::new(),
        };
        let route_from = script_keys.len() + 1;
        let route_count = route_keys.len();
        script_keys.extend(route_keys);

        let (reply, answer) = oneshot::channel();
        let job = AppendJob {
            keys: script_keys,
            idem,
            members,
            dms,
            sender: message.from.clone(),
            head,
            tail,
            conv: message.conv.clone(),
            route_from,
            route_count,
            reply,
        };
        let stopped = || StoreError::Unavailable("the append writer has stopped".into());
        self.appends.send(job).await.map_err(|_| stopped())?;
        let Value::Array(reply) = answer.await.map_err(|_| stopped())?? else {
            return Err(corrupt("append script answered a message with a non-array"));
        };
        match reply.as_slice() {
            [Value::BulkString(tag), Value::Int(seq), nodes @ ..] if tag == b"ok" => {
                message.seq = u64::try_from(*seq)
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| corrupt(format!("append took seq {seq}")))?;
                Ok(Appended {
                    message,
                    duplicate: false,
                    nodes: Some(parse_nodes(nodes)?),
                })
            }
            [Value::BulkString(tag), Value::BulkString(first), nodes @ ..] if tag == b"dup" => {
                Ok(Appended {
                    message: parse_message(first)?,
                    duplicate: true,
                    nodes: Some(parse_nodes(nodes)?),
                })
            }
            [Value::BulkString(tag)] if tag == b"not_member" => Err(StoreError::NotMember {
                uid: message.from,
                room: message.room.unwrap_or_default(),
            }),
            [Value::BulkString(tag), Value::BulkString(text)] if tag == b"err" => {
                Err(script_error(&String::from_utf8_lossy(text)))
            }
            _ => Err(corrupt(format!("append script answered {reply:?}"))),
        }
    }

    async fn join(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        let (added,): (bool,) = redis::pipe()
            .atomic()
            .sadd(keys::room_members(room), uid)
            .sadd(keys::user_rooms(uid), room)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        Ok(added)
    }

    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        let (removed,): (bool,) = redis::pipe()
            .atomic()
            .srem(keys::room_members(room), uid)
            .srem(keys::user_rooms(uid), room)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        Ok(removed)
    }

    async fn rooms_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::user_rooms(uid))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        rooms.sort_unstable();
        Ok(rooms)
    }

    async fn is_member(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        redis::cmd("SISMEMBER")
            .arg(keys::room_members(room))
            .arg(uid)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)
    }

    async fn conversations_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        let (mut dms, mut rooms): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(keys::user_dms(uid))
            .cmd("SMEMBERS")
            .arg(keys::user_rooms(uid))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        dms.sort_unstable();
        rooms.sort_unstable();
        dms.extend(rooms.iter().map(|r| room_conv(r)));
        Ok(dms)
    }

    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.read_script.prepare_invoke();
        for req in &requests {
            invocation
                .key(keys::conv_seq(&req.conv))
                .key(keys::conv_log(&req.conv));
            match req.range {
                Range::After { after, limit } => {
                    invocation
                        .arg("a")
                        .arg(lua_int(after))
                        .arg(lua_limit(limit));
                }
                Range::Before { before, limit } => {
                    let bound = before.map_or(-1, |b| lua_int(b) as i64);
                    invocation.arg("b").arg(bound).arg(lua_limit(limit));
                }
            }
        }
        let pages: Vec<Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        if pages.len() != requests.len() {
            return Err(corrupt(format!(
                "read script answered {} pages for {} requests",
                pages.len(),
                requests.len()
            )));
        }
        requests
            .into_iter()
            .zip(pages)
            .map(|(req, page)| parse_page(req, page))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(corrupt(format!("PING answered {pong:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> Message {
        Message {
            conv: "room:seq".into(),
            seq: 7,
            id: "id".into(),
            from: "alice".into(),
            to: None,
            room: Some("seq".into()),
            body: body.into(),
            ts: u64::MAX,
        }
    }

    #[test]
    fn seq_is_spliced_into_serde_json() {
        for body in ["plain", "\"seq\":0", "\\\"seq\":0,", "{\"seq\":0}"] {
            let m = message(body);
            let (head, tail) = split_at_seq(&m).unwrap();
            let spliced = format!("{head}{}{tail}", m.seq);
            assert_eq!(spliced, serde_json::to_string(&m).unwrap());
            assert_eq!(serde_json::from_str::<Message>(&spliced).unwrap(), m);
        }
    }

    #[test]
    fn pages_out_of_step_are_corrupt() {
        let at = |seq| Message {
            seq,
            ..message("x")
        };
        assert!(check_page("room:seq", 4, &[at(4), at(5)]).is_ok());
        assert!(check_page("room:seq", 4, &[]).is_ok());
        assert!(check_page("room:seq", 4, &[at(4), at(6)]).is_err());
        assert!(check_page("room:seq", 4, &[at(3)]).is_err());
        assert!(check_page("room:other", 4, &[at(4)]).is_err());
    }
}
