//! Peer delivery: one bounded, batching queue per peer, and what a stored message needs
//! from the directory to find its peers. Plain data; the ClusterBridge does the I/O.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::queue::{Batch, Item, MembershipEvent, PeerQueue, PresenceEvent};
use crate::protocol::Conv;
use crate::server::{PeerEvent, ResyncScope};

/// Most items in one POST.
pub const MAX_BATCH: usize = 512;
/// Most messages waiting for one peer; more are dropped and their conversations sent
/// as `lost` (they are stored: the peer's connections resync).
pub const PEER_QUEUE_CAPACITY: usize = 20_000;

/// The directory entries a set of messages needs: the nodes of these users and rooms.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookups {
    pub users: Vec<String>,
    pub rooms: Vec<String>,
}

/// Who must get what happens in these conversations: the nodes of both participants
/// of a DM (the sender's other devices too), or of the room's members.
pub fn lookups<'a>(convs: impl IntoIterator<Item = &'a str>) -> Lookups {
    let mut users = BTreeSet::new();
    let mut rooms = BTreeSet::new();
    for conv in convs {
        match Conv::parse(conv) {
            Some(Conv::Dm(a, b)) => {
                users.insert(a.to_owned());
                users.insert(b.to_owned());
            }
            Some(Conv::Room(r)) => {
                rooms.insert(r.to_owned());
            }
            None => {}
        }
    }
    Lookups {
        users: users.into_iter().collect(),
        rooms: rooms.into_iter().collect(),
    }
}

/// The nodes what happens in `conv` goes to, given the answers to [`lookups`].
pub fn nodes_of<'a>(
    conv: &str,
    users: &'a HashMap<String, Vec<String>>,
    rooms: &'a HashMap<String, Vec<String>>,
) -> BTreeSet<&'a str> {
    let mut out = BTreeSet::new();
    match Conv::parse(conv) {
        Some(Conv::Dm(a, b)) => {
            for uid in [a, b] {
                out.extend(users.get(uid).into_iter().flatten().map(String::as_str));
            }
        }
        Some(Conv::Room(r)) => {
            out.extend(rooms.get(r).into_iter().flatten().map(String::as_str));
        }
        None => {}
    }
    out
}

#[derive(Serialize)]
struct BatchOut<'a> {
    from: &'a str,
    messages: Vec<&'a RawValue>,
    presence: Vec<&'a PresenceEvent>,
    membership: Vec<&'a MembershipEvent>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<&'a PeerEvent>,
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    lost: &'a BTreeSet<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lost_all: bool,
}

/// The body of a POST to `/internal/deliver`.
pub fn encode(from: &str, batch: &Batch) -> Vec<u8> {
    let mut out = BatchOut {
        from,
        messages: Vec::new(),
        presence: Vec::new(),
        membership: Vec::new(),
        events: Vec::new(),
        lost: &batch.lost,
        lost_all: batch.lost_all,
    };
    for item in &batch.items {
        match item {
            Item::Message(m) => out.messages.push(m),
            Item::Presence(p) => out.presence.push(p),
            Item::Membership(m) => out.membership.push(m),
            Item::Event(e) => out.events.push(e),
        }
    }
    serde_json::to_vec(&out).unwrap_or_else(|e| {
        log::error!("cannot encode a peer batch: {e}");
        b"{}".to_vec()
    })
}

/// Every peer's queue.
#[derive(Default)]
pub struct Delivery {
    queues: HashMap<String, PeerQueue>,
}

impl Delivery {
    fn queue(&mut self, node: &str) -> &mut PeerQueue {
        self.queues
            .entry(node.to_owned())
            .or_insert_with(|| PeerQueue::new(PEER_QUEUE_CAPACITY))
    }

    /// Queues a stored message; false when it had to be dropped (remembered as lost).
    pub fn message(&mut self, node: &str, json: Arc<RawValue>, conv: &str) -> bool {
        self.queue(node).push_message(json, conv)
    }

    pub fn event(&mut self, node: &str, item: Item, ack: Option<oneshot::Sender<bool>>) {
        self.queue(node).push(item, ack);
    }

    /// Tells `node`, with its next batch, to resync the connections in `scope`.
    pub fn resync(&mut self, node: &str, scope: &ResyncScope) {
        let q = self.queue(node);
        match scope {
            ResyncScope::All => q.lose_all(),
            ResyncScope::Convs(convs) => convs.iter().for_each(|c| q.lose(c)),
        }
    }

    pub fn take(&mut self, node: &str, now: Instant) -> Option<Batch> {
        self.queues.get_mut(node)?.take_batch(MAX_BATCH, now)
    }

    pub fn succeeded(&mut self, node: &str, batch: &Batch) {
        if let Some(q) = self.queues.get_mut(node) {
            q.succeeded(batch);
        }
    }

    /// Puts a failed batch back; answers when to retry (None: the queue is gone).
    pub fn failed(&mut self, node: &str, batch: Batch, now: Instant) -> Option<Duration> {
        Some(self.queues.get_mut(node)?.failed(batch, now))
    }

    /// Drops a dead peer's queue; answers how many items went with it.
    pub fn give_up(&mut self, node: &str) -> usize {
        self.queues.remove(node).map_or(0, |mut q| q.clear())
    }

    /// Peers whose queue was made before `before` (for giving up on nodes that never
    /// showed up in the registry).
    pub fn older_than(&self, before: Instant) -> Vec<String> {
        self.queues
            .iter()
            .filter(|(_, q)| q.created < before)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn depth(&self) -> usize {
        self.queues.values().map(PeerQueue::len).sum()
    }

    pub fn busy(&self) -> bool {
        self.queues.values().any(|q| q.in_flight() || !q.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::Message;

    fn msg(conv: &str, from: &str) -> Arc<Message> {
        Arc::new(Message::new(conv, 1, "i".into(), from, Some("b".into()), 0))
    }

    #[test]
    fn a_dm_goes_to_both_participants_nodes_a_room_to_its_members_nodes() {
        let ms = [msg("dm:alice:bob", "alice"), msg("room:lobby", "carol")];
        let l = lookups(ms.iter().map(|m| m.conv.as_str()));
        assert_eq!(l.users, vec!["alice", "bob"]);
        assert_eq!(l.rooms, vec!["lobby"]);
        let users = HashMap::from([
            (
                "alice".to_string(),
                vec!["n1".to_string(), "n2".to_string()],
            ),
            ("bob".to_string(), vec!["n2".to_string(), "n3".to_string()]),
        ]);
        let rooms = HashMap::from([("lobby".to_string(), vec!["n4".to_string()])]);
        let dm: Vec<&str> = nodes_of(&ms[0].conv, &users, &rooms).into_iter().collect();
        assert_eq!(dm, vec!["n1", "n2", "n3"], "one copy per node");
        let room: Vec<&str> = nodes_of(&ms[1].conv, &users, &rooms).into_iter().collect();
        assert_eq!(room, vec!["n4"]);
    }

    #[test]
    fn a_batch_carries_what_was_lost() {
        let mut d = Delivery::default();
        let json: Arc<RawValue> = serde_json::value::to_raw_value(&*msg("room:x", "a"))
            .unwrap()
            .into();
        assert!(d.message("n1", json, "room:x"));
        let b = d.take("n1", Instant::now()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&encode("me", &b)).unwrap();
        assert_eq!(v["from"], "me");
        assert_eq!(v["messages"][0]["conv"], "room:x");
        assert!(v.get("lost").is_none());
        assert!(d.busy());
        d.succeeded("n1", &b);
        assert!(!d.busy());
    }
}
