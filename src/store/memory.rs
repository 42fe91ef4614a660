//! The embedded store: everything in one process's memory, behind one mutex.
//!
//! Every operation is a short critical section with no await inside, so a plain
//! `std::sync::Mutex` is the right tool; the async signatures only match the interface.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use async_trait::async_trait;

use super::{Appended, NewMessage, Page, Range, ReadRequest, Store, StoreError, StoreLimits};
use crate::protocol::{room_conv, Conv, Message};

#[derive(Default)]
struct ConvLog {
    /// seq of the newest message (0 when empty).
    last_seq: u64,
    /// The kept messages, oldest first; their seqs are contiguous and end at last_seq.
    kept: VecDeque<Message>,
}

impl ConvLog {
    fn first_kept_seq(&self) -> u64 {
        self.kept.front().map_or(self.last_seq + 1, |m| m.seq)
    }

    fn read(&self, range: Range) -> (Vec<Message>, bool) {
        let first = self.first_kept_seq();
        let index = |seq: u64| (seq - first) as usize;
        match range {
            Range::After { after, limit } => {
                let start = after.saturating_add(1).max(first);
                if start > self.last_seq {
                    return (Vec::new(), false);
                }
                let available = (self.last_seq - start + 1) as usize;
                let take = available.min(limit);
                let i = index(start);
                (
                    self.kept.range(i..i + take).cloned().collect(),
                    available > limit,
                )
            }
            Range::Before { before, limit } => {
                let end = before.unwrap_or(u64::MAX).min(self.last_seq + 1);
                if end <= first {
                    return (Vec::new(), false);
                }
                let available = (end - first) as usize;
                let take = available.min(limit);
                let j = index(end);
                (
                    self.kept.range(j - take..j).cloned().collect(),
                    available > limit,
                )
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    convs: HashMap<String, ConvLog>,
    /// (from, client_id) -> the message first stored under that key.
    idempotency: HashMap<(String, String), (Message, Instant)>,
    /// Keys in insertion order, to expire them without scanning the map.
    idempotency_order: VecDeque<((String, String), Instant)>,
    members: HashMap<String, BTreeSet<String>>,
    user_rooms: HashMap<String, BTreeSet<String>>,
    user_dms: HashMap<String, BTreeSet<String>>,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    limits: StoreLimits,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than losing the node, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn expire_idempotency(&mut self, now: Instant) {
        while let Some((_, expires)) = self.idempotency_order.front() {
            if *expires > now {
                break;
            }
            if let Some((key, expires)) = self.idempotency_order.pop_front() {
                if self
                    .idempotency
                    .get(&key)
                    .is_some_and(|(_, e)| *e <= expires)
                {
                    self.idempotency.remove(&key);
                }
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire_idempotency(now);
        let key = msg.client_id.clone().map(|c| (msg.from.clone(), c));
        if let Some(key) = &key {
            if let Some((first, _)) = inner.idempotency.get(key) {
                return Ok(Appended {
                    message: first.clone(),
                    duplicate: true,
                    nodes: None,
                });
            }
        }
        if msg.require_member {
            if let Some(room) = &msg.room {
                let member = inner
                    .members
                    .get(room)
                    .is_some_and(|m| m.contains(&msg.from));
                if !member {
                    return Err(StoreError::NotMember {
                        uid: msg.from,
                        room: room.clone(),
                    });
                }
            }
        }
        let log = inner.convs.entry(msg.conv.clone()).or_default();
        log.last_seq += 1;
        let message = msg.into_message(log.last_seq);
        log.kept.push_back(message.clone());
        while log.kept.len() > self.limits.history_per_conv {
            log.kept.pop_front();
        }
        if let Some(Conv::Dm(a, b)) = Conv::parse(&message.conv) {
            for uid in [a, b] {
                inner
                    .user_dms
                    .entry(uid.to_owned())
                    .or_default()
                    .insert(message.conv.clone());
            }
        }
        if let Some(key) = key {
            let expires = now + self.limits.idempotency_ttl;
            inner
                .idempotency
                .insert(key.clone(), (message.clone(), expires));
            inner.idempotency_order.push_back((key, expires));
        }
        Ok(Appended {
            message,
            duplicate: false,
            nodes: None,
        })
    }

    async fn join(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let new = inner
            .members
            .entry(room.to_owned())
            .or_default()
            .insert(uid.to_owned());
        inner
            .user_rooms
            .entry(uid.to_owned())
            .or_default()
            .insert(room.to_owned());
        Ok(new)
    }

    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let was = inner.members.get_mut(room).is_some_and(|m| m.remove(uid));
        if let Some(rooms) = inner.user_rooms.get_mut(uid) {
            rooms.remove(room);
        }
        Ok(was)
    }

    async fn rooms_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .user_rooms
            .get(uid)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn is_member(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        let inner = self.lock();
        Ok(inner.members.get(room).is_some_and(|m| m.contains(uid)))
    }

    async fn conversations_of(&self, uid: &str) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        let mut convs: Vec<String> = inner
            .user_dms
            .get(uid)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(rooms) = inner.user_rooms.get(uid) {
            convs.extend(rooms.iter().map(|r| room_conv(r)));
        }
        Ok(convs)
    }

    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError> {
        let inner = self.lock();
        Ok(requests
            .into_iter()
            .map(|req| {
                let (messages, more) = inner
                    .convs
                    .get(&req.conv)
                    .map(|log| log.read(req.range))
                    .unwrap_or_default();
                Page {
                    conv: req.conv,
                    messages,
                    more,
                }
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
