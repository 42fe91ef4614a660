//! Every Redis key chatmesh uses, and the only place that spells them out.
//!
//! Redis holds only what the nodes can rebuild: which nodes are alive (the registry) and
//! which nodes hold connections of each user and of each room's members (the
//! directory). Messages, rooms, memberships and marks live in the database; losing
//! Redis's data loses none of them (the nodes write their entries again within a
//! heartbeat and tell their connections to sync).
//!
//! Every command and script touches exactly one key, so the layout works unchanged on
//! a Redis Cluster: no key needs to share a slot with another. All keys live under
//! [`PREFIX`] so that chatmesh can share a Redis database with other programs.
//!
//! Every variable part is the *last* segment of its key; ids never contain `:`
//! (see [`crate::protocol::valid_id`]), so no two keys collide.
//!
//! # Layout
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `chatmesh:nodes` | ZSET of node ids, score = last heartbeat (Redis clock, ms) | the registry; members with an old score are dead nodes |
//! | `chatmesh:node_addrs` | HASH node id -> advertised URL | how to reach each node's peer API |
//! | `chatmesh:user_nodes:{uid}` | SET of node ids | the nodes holding at least one connection of `uid` |
//! | `chatmesh:room_nodes:{room}` | SET of node ids | the nodes holding at least one connection of a member of `room` |
//! | `chatmesh:node_users:{id}` | SET of user ids | the users with a connection on node `id`, so a dead node's entries can be removed |
//! | `chatmesh:node_rooms:{id}` | SET of room ids | the rooms with a member connected to node `id`, likewise |
//! | `chatmesh:node_left:{id}` | ZSET of user ids, score = when (unix ms) | the users whose last connection on node `id` closed in the last minute: its cleaner resyncs their conversations too |
//! | `chatmesh:cleanup:{id}` | STRING with a TTL | taken (`SET NX PX`) by the node that removes dead node `id`'s entries |
//! | `chatmesh:api_sends:{id}` | STRING with a TTL | set by node `id` before it stores a message for the server API; while it lives, the death of `id` resyncs every connection (an API message may be to any conversation) |
//!
//! `{uid}` is a user id, `{room}` a room id, `{id}` a node id.

/// The namespace of every chatmesh key.
pub const PREFIX: &str = "chatmesh:";

/// Live nodes (ZSET of node ids scored by last heartbeat, unix ms).
pub fn nodes() -> String {
    format!("{PREFIX}nodes")
}

/// Advertised peer API URL of each node (HASH node id -> URL).
pub fn node_addrs() -> String {
    format!("{PREFIX}node_addrs")
}

/// Nodes holding connections of a user (SET of node ids).
pub fn user_nodes(uid: &str) -> String {
    format!("{PREFIX}user_nodes:{uid}")
}

/// Nodes holding connections of members of a room (SET of node ids).
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

/// Users whose last connection on a node closed lately (ZSET user id -> unix ms), for
/// cleaning up after it: a message one of them sent just before may be undelivered.
pub fn node_left(id: &str) -> String {
    format!("{PREFIX}node_left:{id}")
}

/// The claim of the node cleaning up after dead node `id` (STRING with a TTL).
pub fn cleanup(id: &str) -> String {
    format!("{PREFIX}cleanup:{id}")
}

/// Node `id` stored messages for the server API lately (STRING with a TTL).
pub fn api_sends(id: &str) -> String {
    format!("{PREFIX}api_sends:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(nodes(), "chatmesh:nodes");
        assert_eq!(node_addrs(), "chatmesh:node_addrs");
        assert_eq!(user_nodes("alice"), "chatmesh:user_nodes:alice");
        assert_eq!(room_nodes("lobby"), "chatmesh:room_nodes:lobby");
        assert_eq!(node_users("n1"), "chatmesh:node_users:n1");
        assert_eq!(node_rooms("n1"), "chatmesh:node_rooms:n1");
        assert_eq!(node_left("n1"), "chatmesh:node_left:n1");
        assert_eq!(cleanup("n1"), "chatmesh:cleanup:n1");
        assert_eq!(api_sends("n1"), "chatmesh:api_sends:n1");
    }

    #[test]
    fn kinds_never_collide() {
        let all = [
            nodes(),
            node_addrs(),
            user_nodes("x"),
            room_nodes("x"),
            node_users("x"),
            node_rooms("x"),
            node_left("x"),
            cleanup("x"),
            api_sends("x"),
        ];
        let kinds: std::collections::BTreeSet<&str> = all
            .iter()
            .map(|k| k.trim_start_matches(PREFIX).split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(kinds.len(), all.len());
    }
}
