//! The outbound queue of one peer: bounded, batching, with retry backoff. Plain data so
//! the batching rules are unit-tested; the ClusterBridge actor does the I/O.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A room presence change to forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub room: String,
    pub uid: String,
    pub online: bool,
}

/// A membership change of a user who also has connections on the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipEvent {
    pub uid: String,
    pub room: String,
    pub joined: bool,
}

#[derive(Debug, Clone)]
pub enum Item {
    /// A stored message, serialised once for every peer it goes to.
    Message(Arc<RawValue>),
    Presence(Arc<PresenceEvent>),
    Membership(Arc<MembershipEvent>),
}

/// First retry delay after a failed POST; doubles per failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct PeerQueue {
    /// When the queue was made: a peer not yet in the live table is only given up
    /// after a heartbeat that started later still does not list it.
    pub created: Instant,
    items: VecDeque<Item>,
    capacity: usize,
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
            in_flight: false,
            failures: 0,
            retry_at: None,
        }
    }

    /// Queues an item; false (and nothing queued) when the queue is full.
    pub fn push(&mut self, item: Item) -> bool {
        if self.items.len() >= self.capacity {
            return false;
        }
        self.items.push_back(item);
        true
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// The next batch to POST, if nothing is in flight and no retry is pending: send at
    /// once when idle, and while a POST is in flight let items pile up into one batch.
    pub fn take_batch(&mut self, max: usize, now: Instant) -> Option<Vec<Item>> {
        if self.in_flight || self.items.is_empty() {
            return None;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.retry_at = None;
        self.in_flight = true;
        let n = self.items.len().min(max);
        Some(self.items.drain(..n).collect())
    }

    pub fn succeeded(&mut self) {
        self.in_flight = false;
        self.failures = 0;
    }

    /// Puts a failed batch back in front and returns how long to wait before retrying.
    pub fn failed(&mut self, batch: Vec<Item>, now: Instant) -> Duration {
        self.in_flight = false;
        for item in batch.into_iter().rev() {
            self.items.push_front(item);
        }
        // A batch put back may overfill the queue; the oldest are kept (they were
        // first), the newest dropped would be wrong to lose silently, so keep all: the
        // overshoot is at most one batch.
        self.failures = self.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << self.failures.min(10).saturating_sub(1))
            .min(MAX_BACKOFF);
        self.retry_at = Some(now + backoff);
        backoff
    }

    /// Empties the queue (the peer is dead); returns how many items were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.items.len();
        self.items.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    fn msg(seq: u64) -> Item {
        let m = Message {
            conv: "room:x".into(),
            seq,
            id: seq.to_string(),
            from: "a".into(),
            to: None,
            room: Some("x".into()),
            body: "b".into(),
            ts: 0,
        };
        Item::Message(serde_json::value::to_raw_value(&m).unwrap().into())
    }

    fn seqs(batch: &[Item]) -> Vec<u64> {
        batch
            .iter()
            .map(|i| match i {
                Item::Message(m) => serde_json::from_str::<Message>(m.get()).unwrap().seq,
                Item::Presence(_) | Item::Membership(_) => 0,
            })
            .collect()
    }

    #[test]
    fn sends_at_once_then_batches_while_in_flight() {
        let now = Instant::now();
        let mut q = PeerQueue::new(100);
        q.push(msg(1));
        assert_eq!(seqs(&q.take_batch(10, now).unwrap()), vec![1]);
        for s in 2..=6 {
            q.push(msg(s));
        }
        assert!(q.take_batch(10, now).is_none(), "one POST at a time");
        q.succeeded();
        assert_eq!(seqs(&q.take_batch(3, now).unwrap()), vec![2, 3, 4]);
        q.succeeded();
        assert_eq!(seqs(&q.take_batch(10, now).unwrap()), vec![5, 6]);
        q.succeeded();
        assert!(q.take_batch(10, now).is_none());
    }

    #[test]
    fn is_bounded() {
        let mut q = PeerQueue::new(2);
        assert!(q.push(msg(1)) && q.push(msg(2)));
        assert!(!q.push(msg(3)));
        assert_eq!(q.len(), 2);
        assert_eq!(q.clear(), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn failed_batch_is_retried_first_after_backoff() {
        let now = Instant::now();
        let mut q = PeerQueue::new(100);
        q.push(msg(1));
        q.push(msg(2));
        let batch = q.take_batch(10, now).unwrap();
        q.push(msg(3));
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
