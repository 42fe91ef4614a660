//! The outbound queue of one peer: bounded, batching, with retry backoff. Plain data so
//! the batching rules are unit-tested; the ClusterBridge actor does the I/O.
//!
//! Nothing leaves silently: a message that does not fit is dropped but its conversation
//! is remembered and sent with the next batch as `lost`, so the peer tells exactly the
//! connections that may have missed it to resync. A membership change can be waited
//! for: its acknowledgement fires once the batch that carried it was accepted (or with
//! false when the queue is given up).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

/// A user came online (first connection anywhere) or went offline, with their rooms
/// small enough for live presence events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub uid: String,
    pub online: bool,
    #[serde(default)]
    pub rooms: Vec<String>,
    /// A replay (see [`super::recent_presence`]): announced before the receiver was in
    /// the sender's live table, so `online` may be stale; the receiver reads the
    /// user's presence now and gives its connections that.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recheck: bool,
}

/// A membership change of a user who also has connections on the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipEvent {
    pub uid: String,
    pub room: String,
    pub joined: bool,
    #[serde(default)]
    pub members: Option<u64>,
    #[serde(default)]
    pub by: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Item {
    /// A stored message's `message` frame, serialised once for this node's sessions and
    /// every peer it goes to (which pass it on as it is).
    Message(Arc<RawValue>),
    Presence(Arc<PresenceEvent>),
    Membership(Arc<MembershipEvent>),
    /// A mark or typing event of a conversation.
    Event(Arc<crate::server::PeerEvent>),
}

/// First retry delay after a failed POST; doubles per failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Conversations remembered as lost before the peer is told to resync everyone.
pub const MAX_LOST: usize = 256;
/// Conversations a peer may be told by name to resync (after a node died, see
/// [`PeerQueue::lose`]) before it is told to resync everyone.
pub const MAX_NAMED_RESYNC: usize = 10_000;

/// What one POST carries.
#[derive(Debug, Default)]
pub struct Batch {
    pub items: Vec<Item>,
    /// Conversations whose messages were dropped for this peer.
    pub lost: BTreeSet<String>,
    /// Too many were: the peer resyncs every connection.
    pub lost_all: bool,
    /// Number (see [`PeerQueue::push`]) of the last item in the batch.
    last: u64,
}

#[derive(Debug)]
pub struct PeerQueue {
    /// When the queue was made: a peer not yet in the live table is only given up
    /// after a heartbeat that started later still does not list it.
    pub created: Instant,
    items: VecDeque<(u64, Item)>,
    capacity: usize,
    next: u64,
    acks: VecDeque<(u64, oneshot::Sender<bool>)>,
    lost: BTreeSet<String>,
    lost_all: bool,
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

impl PeerQueue {
    pub fn new(capacity: usize) -> Self {
        PeerQueue {
            created: Instant::now(),
            items: VecDeque::new(),
            capacity,
            next: 1,
            acks: VecDeque::new(),
            lost: BTreeSet::new(),
            lost_all: false,
            in_flight: false,
            failures: 0,
            retry_at: None,
        }
    }

    /// Queues an item; false (and nothing queued) when the queue is full. An item
    /// that is not a message (presence, membership) is always queued: they are few,
    /// and a membership change must not be lost.
    pub fn push(&mut self, item: Item, ack: Option<oneshot::Sender<bool>>) -> bool {
        if matches!(item, Item::Message(_)) && self.items.len() >= self.capacity {
            return false;
        }
        let n = self.next;
        self.next += 1;
        self.items.push_back((n, item));
        if let Some(ack) = ack {
            self.acks.push_back((n, ack));
        }
        true
    }

    /// Queues a message of `conv`, or remembers `conv` as lost when full.
    pub fn push_message(&mut self, json: Arc<RawValue>, conv: &str) -> bool {
        if self.push(Item::Message(json), None) {
            return true;
        }
        self.mark_lost(conv, MAX_LOST);
        false
    }

    /// Tells the peer to resync the connections of `conv` with the next batch (up to
    /// [`MAX_NAMED_RESYNC`] conversations; beyond, everyone).
    pub fn lose(&mut self, conv: &str) {
        self.mark_lost(conv, MAX_NAMED_RESYNC);
    }

    /// Tells the peer to resync every connection with the next batch.
    pub fn lose_all(&mut self) {
        self.lost.clear();
        self.lost_all = true;
    }

    fn mark_lost(&mut self, conv: &str, max: usize) {
        if !self.lost_all {
            self.lost.insert(conv.to_owned());
            if self.lost.len() > max {
                self.lost.clear();
                self.lost_all = true;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.lost.is_empty() && !self.lost_all
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// The next batch to POST, if nothing is in flight and no retry is pending: send at
    /// once when idle, and while a POST is in flight let items pile up into one batch.
    pub fn take_batch(&mut self, max: usize, now: Instant) -> Option<Batch> {
        if self.in_flight || self.is_empty() {
            return None;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.retry_at = None;
        self.in_flight = true;
        let n = self.items.len().min(max);
        let mut batch = Batch {
            lost: std::mem::take(&mut self.lost),
            lost_all: std::mem::replace(&mut self.lost_all, false),
            ..Batch::default()
        };
        for (seq, item) in self.items.drain(..n) {
            batch.last = seq;
            batch.items.push(item);
        }
        Some(batch)
    }

    /// The batch was accepted: acknowledges what it carried.
    pub fn succeeded(&mut self, batch: &Batch) {
        self.in_flight = false;
        self.failures = 0;
        while self.acks.front().is_some_and(|(n, _)| *n <= batch.last) {
            if let Some((_, ack)) = self.acks.pop_front() {
                let _ = ack.send(true);
            }
        }
    }

    /// Puts a failed batch back in front and returns how long to wait before retrying.
    pub fn failed(&mut self, batch: Batch, now: Instant) -> Duration {
        self.in_flight = false;
        let mut seq = batch.last + 1;
        for item in batch.items.into_iter().rev() {
            seq -= 1;
            self.items.push_front((seq, item));
        }
        if batch.lost_all {
            self.lost_all = true;
            self.lost.clear();
        } else {
            for conv in batch.lost {
                self.mark_lost(&conv, MAX_NAMED_RESYNC);
            }
        }
        self.failures = self.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << self.failures.min(10).saturating_sub(1))
            .min(MAX_BACKOFF);
        self.retry_at = Some(now + backoff);
        backoff
    }

    /// Empties the queue (the peer is dead; it resyncs its connections when it finds
    /// itself expelled); returns how many items were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.items.len();
        self.items.clear();
        self.lost.clear();
        self.lost_all = false;
        for (_, ack) in self.acks.drain(..) {
            let _ = ack.send(false);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    fn json(seq: u64) -> Arc<RawValue> {
        let m = Message::new("room:x", seq, seq.to_string(), "a", Some("b".into()), 0);
        serde_json::value::to_raw_value(&m).unwrap().into()
    }

    fn msg(seq: u64) -> Item {
        Item::Message(json(seq))
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch
            .items
            .iter()
            .map(|i| match i {
                Item::Message(m) => serde_json::from_str::<Message>(m.get()).unwrap().seq,
                Item::Presence(_) | Item::Membership(_) | Item::Event(_) => 0,
            })
            .collect()
    }

    #[test]
    fn sends_at_once_then_batches_while_in_flight() {
        let now = Instant::now();
        let mut q = PeerQueue::new(100);
        q.push(msg(1), None);
        let b = q.take_batch(10, now).unwrap();
        assert_eq!(seqs(&b), vec![1]);
        for s in 2..=6 {
            q.push(msg(s), None);
        }
        assert!(q.take_batch(10, now).is_none(), "one POST at a time");
        q.succeeded(&b);
        let b = q.take_batch(3, now).unwrap();
        assert_eq!(seqs(&b), vec![2, 3, 4]);
        q.succeeded(&b);
        let b = q.take_batch(10, now).unwrap();
        assert_eq!(seqs(&b), vec![5, 6]);
        q.succeeded(&b);
        assert!(q.take_batch(10, now).is_none());
    }

    #[test]
    fn a_full_queue_remembers_what_it_lost() {
        let now = Instant::now();
        let mut q = PeerQueue::new(2);
        assert!(q.push_message(json(1), "room:x") && q.push_message(json(2), "room:x"));
        assert!(!q.push_message(json(3), "room:y"));
        assert_eq!(q.len(), 2);
        let b = q.take_batch(10, now).unwrap();
        assert_eq!(b.lost.iter().collect::<Vec<_>>(), vec!["room:y"]);
        // a failed batch keeps its lost conversations for the retry
        q.failed(b, now);
        let b = q.take_batch(10, now + MAX_BACKOFF).unwrap();
        assert_eq!(b.lost.len(), 1);
        q.succeeded(&b);
        for i in 0..MAX_LOST as u64 + 4 {
            q.push_message(json(i), &format!("c{i}"));
        }
        let b = q.take_batch(10, now + MAX_BACKOFF).unwrap();
        assert!(b.lost_all, "too many lost conversations: resync everyone");
        assert_eq!(q.clear(), 0);
        // a dead node's conversations are named up to a larger bound
        q.succeeded(&b);
        for i in 0..MAX_LOST + 4 {
            q.lose(&format!("c{i}"));
        }
        let b = q.take_batch(10, now + MAX_BACKOFF).unwrap();
        assert_eq!((b.lost.len(), b.lost_all), (MAX_LOST + 4, false));
        q.succeeded(&b);
        for i in 0..=MAX_NAMED_RESYNC {
            q.lose(&format!("c{i}"));
        }
        let b = q.take_batch(10, now + MAX_BACKOFF).unwrap();
        assert!(b.lost_all && b.lost.is_empty());
    }

    #[test]
    fn membership_is_acknowledged_by_its_batch_or_refused_by_a_clear() {
        let now = Instant::now();
        let mut q = PeerQueue::new(1);
        q.push(msg(1), None);
        let event = Arc::new(MembershipEvent {
            uid: "u".into(),
            room: "r".into(),
            joined: false,
            members: None,
            by: None,
        });
        let (ack, mut acked) = oneshot::channel();
        assert!(
            q.push(Item::Membership(event.clone()), Some(ack)),
            "never refused"
        );
        let b = q.take_batch(1, now).unwrap();
        q.succeeded(&b);
        assert!(acked.try_recv().is_err(), "not carried yet");
        let b = q.take_batch(10, now).unwrap();
        q.succeeded(&b);
        assert_eq!(acked.try_recv(), Ok(true));
        let (ack, mut refused) = oneshot::channel();
        q.push(Item::Membership(event), Some(ack));
        q.clear();
        assert_eq!(refused.try_recv(), Ok(false));
    }

    #[test]
    fn failed_batch_is_retried_first_after_backoff() {
        let now = Instant::now();
        let mut q = PeerQueue::new(100);
        q.push(msg(1), None);
        q.push(msg(2), None);
        let batch = q.take_batch(10, now).unwrap();
        q.push(msg(3), None);
        let wait = q.failed(batch, now);
        assert_eq!(wait, FIRST_BACKOFF);
        assert!(q.take_batch(10, now).is_none(), "waits for the backoff");
        let batch = q.take_batch(10, now + wait).unwrap();
        assert_eq!(seqs(&batch), vec![1, 2, 3], "order kept");
        let wait2 = q.failed(batch, now + wait);
        assert_eq!(wait2, FIRST_BACKOFF * 2);
        for _ in 0..20 {
            let b = q.take_batch(10, now + Duration::from_secs(3600)).unwrap();
            assert!(q.failed(b, now) <= MAX_BACKOFF);
        }
    }
}
