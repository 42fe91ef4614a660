//! Every Redis key chatmesh uses, and the only place that spells them out.
//!
//! Keeping the names here means the store, the cluster code and any operator
//! tooling cannot drift apart, and a change of layout is one diff. All keys live
//! under [`PREFIX`] so that chatmesh can share a Redis database with other
//! programs and its data can be found (or removed) with one `SCAN` pattern.
//!
//! Every variable part is the *last* segment of its key, so an id that itself
//! contains `:` (a conversation id such as `dm:alice:bob`) cannot make two keys
//! collide. The idempotency key has two variable parts; the first is a user id,
//! which never contains `:` (see [`crate::protocol::valid_id`]).
//!
//! # Layout
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `chatmesh:seq:{conv}` | STRING (integer) | seq of the newest message of `conv`; `INCR`ed by the append script, never reset, never trimmed |
//! | `chatmesh:log:{conv}` | LIST of message JSON | the newest messages of `conv`, oldest first, seqs contiguous and ending at `seq:{conv}`, trimmed to the history limit |
//! | `chatmesh:idem:{from}:{client_id}` | STRING (message JSON), `PX` = idempotency TTL | the message first stored for this client id of `from`, returned for a resend |
//! | `chatmesh:members:{room}` | SET of user ids | the members of `room` |
//! | `chatmesh:rooms:{uid}` | SET of room ids | the rooms `uid` belongs to; always the mirror of `members:*` |
//! | `chatmesh:dms:{uid}` | SET of conversation ids | the DM conversations `uid` has taken part in |
//! | `chatmesh:nodes` | ZSET of node ids, score = last heartbeat (unix ms) | the live nodes of the cluster; entries with an old score are dead nodes |
//! | `chatmesh:node:{id}` | HASH | what other nodes need to know about node `id` (address, start time, ...) |
//! | `chatmesh:user_nodes:{uid}` | HASH node id -> connection count | the nodes that hold connections of `uid`; a field is removed when its count reaches 0 |
//! | `chatmesh:room_nodes:{room}` | HASH node id -> connection count | the nodes that hold connections of members of `room` |
//! | `chatmesh:node_users:{id}` | SET of user ids | the users with a connection on node `id`, so a dead node's entries can be removed |
//! | `chatmesh:node_rooms:{id}` | SET of room ids | the rooms with a member connected to node `id`, likewise |
//! | `chatmesh:node_conns:{id}` | SET of session ids | the connections of node `id` that the counts include, so adding or removing one twice changes nothing |
//!
//! `{conv}` is a conversation id (`dm:A:B` or `room:R`), `{room}` a room id
//! without the `room:` prefix, `{uid}` a user id, `{id}` a node id.
//!
//! A message is appended by one Lua script that touches `seq`, `log`, `idem`,
//! `members` and both `dms` sets at once, so these keys must live on one Redis
//! server: the layout is for a single primary (with replicas or Sentinel), not
//! for Redis Cluster.

/// The namespace of every chatmesh key.
pub const PREFIX: &str = "chatmesh:";

/// Seq counter of a conversation (STRING holding an integer).
pub fn conv_seq(conv: &str) -> String {
    format!("{PREFIX}seq:{conv}")
}

/// Kept messages of a conversation (LIST of message JSON, oldest first).
pub fn conv_log(conv: &str) -> String {
    format!("{PREFIX}log:{conv}")
}

/// The message first stored for `client_id` of user `from` (STRING with a TTL).
pub fn idempotency(from: &str, client_id: &str) -> String {
    format!("{PREFIX}idem:{from}:{client_id}")
}

/// Members of a room (SET of user ids).
pub fn room_members(room: &str) -> String {
    format!("{PREFIX}members:{room}")
}

/// Rooms of a user (SET of room ids).
pub fn user_rooms(uid: &str) -> String {
    format!("{PREFIX}rooms:{uid}")
}

/// DM conversations of a user (SET of conversation ids).
pub fn user_dms(uid: &str) -> String {
    format!("{PREFIX}dms:{uid}")
}

/// Live nodes of the cluster (ZSET of node ids scored by last heartbeat, unix ms).
pub fn nodes() -> String {
    format!("{PREFIX}nodes")
}

/// What is known about one node (HASH).
pub fn node(id: &str) -> String {
    format!("{PREFIX}node:{id}")
}

/// Nodes holding connections of a user (HASH node id -> connection count).
pub fn user_nodes(uid: &str) -> String {
    format!("{PREFIX}user_nodes:{uid}")
}

/// Nodes holding connections of members of a room (HASH node id -> connection count).
pub fn room_nodes(room: &str) -> String {
    format!("{PREFIX}room_nodes:{room}")
}

/// Users with a connection on a node (SET of user ids), for cleaning up after it.
pub fn node_users(id: &str) -> String {
    format!("{PREFIX}node_users:{id}")
}

/// Rooms with a member connected to a node (SET of room ids), for cleaning up after it.
pub fn node_rooms(id: &str) -> String {
    format!("{PREFIX}node_rooms:{id}")
}

/// The connections of a node that the directory counts include (SET of session ids).
pub fn node_conns(id: &str) -> String {
    format!("{PREFIX}node_conns:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(conv_seq("dm:alice:bob"), "chatmesh:seq:dm:alice:bob");
        assert_eq!(conv_log("room:lobby"), "chatmesh:log:room:lobby");
        assert_eq!(idempotency("alice", "k:1"), "chatmesh:idem:alice:k:1");
        assert_eq!(room_members("lobby"), "chatmesh:members:lobby");
        assert_eq!(user_rooms("alice"), "chatmesh:rooms:alice");
        assert_eq!(user_dms("alice"), "chatmesh:dms:alice");
        assert_eq!(nodes(), "chatmesh:nodes");
        assert_eq!(node("n1"), "chatmesh:node:n1");
        assert_eq!(user_nodes("alice"), "chatmesh:user_nodes:alice");
        assert_eq!(room_nodes("lobby"), "chatmesh:room_nodes:lobby");
    }

    #[test]
    fn kinds_never_collide() {
        // A conversation id may contain ':', but the kind segment always comes first,
        // so no key of one kind can equal a key of another.
        let all = [
            conv_seq("x"),
            conv_log("x"),
            idempotency("x", "x"),
            room_members("x"),
            user_rooms("x"),
            user_dms("x"),
            nodes(),
            node("x"),
            user_nodes("x"),
            room_nodes("x"),
            node_users("x"),
            node_rooms("x"),
            node_conns("x"),
        ];
        let kinds: std::collections::BTreeSet<&str> = all
            .iter()
            .map(|k| k.trim_start_matches(PREFIX).split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(kinds.len(), all.len());
    }
}
