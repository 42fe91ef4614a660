//! The throwaway store (`memory:`): everything in one process's memory, behind one
//! mutex, lost at exit. For demos and tests; it passes the same conformance suite as
//! the databases.
//!
//! Every operation is a short critical section with no await inside, so a plain
//! `std::sync::Mutex` is the right tool; the async signatures only match the interface.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::rules::{self, AppendView, JoinPlan, RoomView, Target, UserView};
use super::{
    Added, Appended, By, Change, ConvState, Created, Inbox, InboxCursor, InboxEntry, Joined,
    MarkKind, NewMessage, NewRoom, Page, Purged, Range, ReadRequest, Receipt, Removed, Role,
    RoomInfo, Store, StoreError, StoreLimits, UserRoom,
};
use crate::protocol::{now_ms, room_conv, Conv, Message};

#[derive(Default)]
struct ConvData {
    last_seq: u64,
    last_ts: Option<u64>,
    messages: BTreeMap<u64, Message>,
}

#[derive(Clone, Copy)]
struct Member {
    role: Role,
    read: u64,
    delivered: u64,
}

struct RoomRow {
    private: bool,
}

#[derive(Default)]
struct Inner {
    convs: HashMap<String, ConvData>,
    /// conv -> uid -> marks and role
    members: HashMap<String, BTreeMap<String, Member>>,
    /// uid -> their conversations (the index the databases keep on members.uid)
    user_convs: HashMap<String, BTreeSet<String>>,
    rooms: HashMap<String, RoomRow>,
    bans: HashSet<(String, String)>,
    /// (sender, client_id) -> (conv, seq, expires ms)
    idempotency: HashMap<(String, String), (String, u64, u64)>,
    /// Keys in insertion order, to expire them without scanning the map.
    idempotency_order: VecDeque<((String, String), u64)>,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    limits: StoreLimits,
    epoch: String,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            limits,
            epoch: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than losing the node, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn role(&self, conv: &str, uid: &str) -> Option<Role> {
        self.members.get(conv)?.get(uid).map(|m| m.role)
    }

    fn room_view(&self, room: &str) -> RoomView {
        match self.rooms.get(room) {
            Some(r) => RoomView {
                exists: true,
                private: r.private,
                members: self.member_count(room),
            },
            None => RoomView::default(),
        }
    }

    fn member_count(&self, room: &str) -> u64 {
        self.members
            .get(&room_conv(room))
            .map_or(0, |m| m.len() as u64)
    }

    fn user_view(&self, room: &str, uid: &str) -> UserView {
        UserView {
            role: self.role(&room_conv(room), uid),
            banned: self.bans.contains(&(room.to_owned(), uid.to_owned())),
            rooms: self.user_convs.get(uid).map_or(0, |c| {
                c.iter().filter(|c| c.starts_with("room:")).count() as u64
            }),
        }
    }

    fn last_seq(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |c| c.last_seq)
    }

    /// Adds or changes a member; a new member starts with nothing unread. Answers the
    /// mark a new member got (see [`Added::marked`]).
    fn put_member(&mut self, conv: &str, uid: &str, role: Role) -> Option<u64> {
        let last = self.last_seq(conv);
        let mut new = false;
        self.members
            .entry(conv.to_owned())
            .or_default()
            .entry(uid.to_owned())
            .and_modify(|m| m.role = role)
            .or_insert_with(|| {
                new = true;
                Member {
                    role,
                    read: last,
                    delivered: last,
                }
            });
        self.user_convs
            .entry(uid.to_owned())
            .or_default()
            .insert(conv.to_owned());
        new.then(|| super::implicit_mark(last)).flatten()
    }

    fn drop_member(&mut self, conv: &str, uid: &str) -> bool {
        let was = self
            .members
            .get_mut(conv)
            .and_then(|m| m.remove(uid))
            .is_some();
        if let Some(c) = self.user_convs.get_mut(uid) {
            c.remove(conv);
        }
        was
    }

    fn expire_idempotency(&mut self, now: u64) {
        while let Some((_, expires)) = self.idempotency_order.front() {
            if *expires > now {
                break;
            }
            if let Some((key, expires)) = self.idempotency_order.pop_front() {
                if self
                    .idempotency
                    .get(&key)
                    .is_some_and(|(_, _, e)| *e <= expires)
                {
                    self.idempotency.remove(&key);
                }
            }
        }
    }

    fn room_info(&self, room: &str, max_members: usize) -> RoomInfo {
        let members = self.members.get(&room_conv(room));
        let all = members.into_iter().flatten();
        RoomInfo {
            room: room.to_owned(),
            private: self.rooms.get(room).is_some_and(|r| r.private),
            owners: all
                .clone()
                .filter(|(_, m)| m.role == Role::Owner)
                .map(|(u, _)| u.clone())
                .collect(),
            members: all
                .clone()
                .take(max_members)
                .map(|(u, _)| u.clone())
                .collect(),
            count: all.count() as u64,
        }
    }

    fn unread(&self, conv: &str, uid: &str, read: u64) -> u64 {
        self.convs.get(conv).map_or(0, |c| {
            c.messages
                .range(read + 1..)
                .filter(|(_, m)| m.from != uid && !m.is_event() && !m.deleted)
                .count() as u64
        })
    }
}

fn page(data: Option<&ConvData>, conv: String, range: Range) -> Page {
    let Some(data) = data else {
        return Page {
            conv,
            messages: Vec::new(),
            more: false,
        };
    };
    let (messages, more) = match range {
        Range::After { after, limit } => {
            let mut m: Vec<Message> = data
                .messages
                .range(after.saturating_add(1)..)
                .take(limit + 1)
                .map(|(_, m)| m.clone())
                .collect();
            let more = m.len() > limit;
            m.truncate(limit);
            (m, more)
        }
        Range::Before { before, limit } => {
            let end = before.unwrap_or(u64::MAX);
            let mut m: Vec<Message> = data
                .messages
                .range(..end)
                .rev()
                .take(limit + 1)
                .map(|(_, m)| m.clone())
                .collect();
            let more = m.len() > limit;
            m.truncate(limit);
            m.reverse();
            (m, more)
        }
    };
    Page {
        conv,
        messages,
        more,
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn append(&self, msg: NewMessage) -> Result<Appended, StoreError> {
        let now = now_ms();
        let mut inner = self.lock();
        inner.expire_idempotency(now);
        let key = msg.client_id.clone().map(|c| (msg.from.clone(), c));
        if let Some(key) = &key {
            if let Some((conv, seq, _)) = inner.idempotency.get(key) {
                if let Some(first) = inner.convs.get(conv).and_then(|c| c.messages.get(seq)) {
                    return Ok(Appended {
                        message: first.clone(),
                        duplicate: true,
                    });
                }
            }
        }
        let target = match msg.change {
            Some(Change::Edit(t) | Change::Delete(t)) => inner
                .convs
                .get(&msg.conv)
                .and_then(|c| c.messages.get(&t))
                .map(|m| Target {
                    from: m.from.clone(),
                    deleted: m.deleted,
                    is_event: m.is_event(),
                }),
            None => None,
        };
        let view = AppendView {
            last_seq: inner.last_seq(&msg.conv),
            sender_role: inner.role(&msg.conv, &msg.from),
            target,
        };
        let seq = rules::decide_append(&msg, &view)?;
        let conv = msg.conv.clone();
        let from = msg.from.clone();
        let change = msg.change;
        let message = msg.into_message(seq);
        let data = inner.convs.entry(conv.clone()).or_default();
        data.last_seq = seq;
        data.last_ts = Some(message.ts);
        data.messages.insert(seq, message.clone());
        match change {
            Some(Change::Edit(t)) => {
                if let Some(m) = data.messages.get_mut(&t) {
                    m.body = message.body.clone();
                    m.edited = true;
                }
            }
            Some(Change::Delete(t)) => {
                if let Some(m) = data.messages.get_mut(&t) {
                    m.body = None;
                    m.deleted = true;
                }
                // The edits carried the body too: it is gone with them.
                for m in data.messages.values_mut() {
                    if m.edit == Some(t) {
                        m.body = None;
                    }
                }
            }
            None => {}
        }
        if let Some(Conv::Dm(a, b)) = Conv::parse(&conv) {
            for uid in [a, b] {
                if inner.role(&conv, uid).is_none() {
                    inner.put_member(&conv, uid, Role::Dm);
                    // A DM's participants start with nothing read (the sender's marks
                    // move just below).
                    if let Some(m) = inner.members.get_mut(&conv).and_then(|m| m.get_mut(uid)) {
                        m.read = 0;
                        m.delivered = 0;
                    }
                }
            }
        }
        // Sending a message marks it read (and delivered) by its sender.
        if let Some(m) = inner.members.get_mut(&conv).and_then(|m| m.get_mut(&from)) {
            m.read = m.read.max(seq);
            m.delivered = m.delivered.max(seq);
        }
        if let Some(key) = key {
            let expires = now.saturating_add(self.limits.idempotency_ttl.as_millis() as u64);
            inner.idempotency.insert(key.clone(), (conv, seq, expires));
            inner.idempotency_order.push_back((key, expires));
        }
        Ok(Appended {
            message,
            duplicate: false,
        })
    }

    async fn join(&self, uid: &str, room: &str) -> Result<Joined, StoreError> {
        let mut inner = self.lock();
        let r = inner.room_view(room);
        let u = inner.user_view(room, uid);
        let conv = room_conv(room);
        let (changed, created, role, marked) = match rules::decide_join(&self.limits, room, &r, &u)?
        {
            JoinPlan::Nothing(role) => (false, false, role, None),
            JoinPlan::Join => {
                let marked = inner.put_member(&conv, uid, Role::Member);
                (true, false, Role::Member, marked)
            }
            JoinPlan::Create => {
                inner
                    .rooms
                    .insert(room.to_owned(), RoomRow { private: false });
                let marked = inner.put_member(&conv, uid, Role::Owner);
                (true, true, Role::Owner, marked)
            }
        };
        Ok(Joined {
            changed,
            created,
            role,
            private: r.private,
            members: inner.member_count(room),
            marked,
        })
    }

    async fn create_room(&self, by: &By, room: NewRoom) -> Result<Created, StoreError> {
        let mut inner = self.lock();
        let initial = rules::initial_members(by, &room.owners, &room.members);
        let counts = initial
            .iter()
            .map(|(u, _)| (u.clone(), inner.user_view(&room.room, u).rooms))
            .collect();
        let exists = inner.rooms.contains_key(&room.room);
        rules::decide_create(&self.limits, by, &room.room, exists, &counts)?;
        inner.rooms.insert(
            room.room.clone(),
            RoomRow {
                private: room.private,
            },
        );
        let conv = room_conv(&room.room);
        let mut marked = None;
        for (uid, role) in &initial {
            marked = inner.put_member(&conv, uid, *role);
        }
        Ok(Created {
            info: inner.room_info(&room.room, usize::MAX),
            marked,
        })
    }

    async fn leave(&self, uid: &str, room: &str) -> Result<bool, StoreError> {
        Ok(self.lock().drop_member(&room_conv(room), uid))
    }

    async fn add_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        role: Role,
    ) -> Result<Added, StoreError> {
        let mut inner = self.lock();
        let conv = room_conv(room);
        let r = inner.room_view(room);
        let by_role = by.user().and_then(|u| inner.role(&conv, u));
        rules::check_owner(by, room, &r, by_role)?;
        let u = inner.user_view(room, uid);
        let changed = rules::decide_add(&self.limits, &u, role)?;
        inner.bans.remove(&(room.to_owned(), uid.to_owned()));
        let marked = inner.put_member(&conv, uid, role);
        Ok(Added {
            changed,
            role,
            members: inner.member_count(room),
            marked,
        })
    }

    async fn remove_member(
        &self,
        by: &By,
        room: &str,
        uid: &str,
        ban: bool,
    ) -> Result<Removed, StoreError> {
        let mut inner = self.lock();
        let conv = room_conv(room);
        let r = inner.room_view(room);
        let by_role = by.user().and_then(|u| inner.role(&conv, u));
        rules::check_owner(by, room, &r, by_role)?;
        if ban {
            inner.bans.insert((room.to_owned(), uid.to_owned()));
        }
        let changed = inner.drop_member(&conv, uid);
        Ok(Removed {
            changed,
            members: inner.member_count(room),
        })
    }

    async fn room_info(
        &self,
        asker: &By,
        room: &str,
        max_members: usize,
    ) -> Result<RoomInfo, StoreError> {
        let inner = self.lock();
        let r = inner.room_view(room);
        let role = asker.user().and_then(|u| inner.role(&room_conv(room), u));
        rules::check_reader(asker, room, &r, role)?;
        Ok(inner.room_info(room, max_members))
    }

    async fn rooms_of(&self, uid: &str) -> Result<Vec<UserRoom>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .user_convs
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|c| c.strip_prefix("room:"))
            .map(|room| UserRoom {
                room: room.to_owned(),
                members: inner.member_count(room),
            })
            .collect())
    }

    async fn role(&self, uid: &str, room: &str) -> Result<Option<Role>, StoreError> {
        Ok(self.lock().role(&room_conv(room), uid))
    }

    async fn conversations(&self, uid: &str) -> Result<Vec<ConvState>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .user_convs
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|conv| {
                let m = inner.members.get(conv)?.get(uid)?;
                Some(ConvState {
                    conv: conv.clone(),
                    last_seq: inner.last_seq(conv),
                    read: m.read,
                    delivered: m.delivered,
                })
            })
            .collect())
    }

    async fn read(&self, requests: Vec<ReadRequest>) -> Result<Vec<Page>, StoreError> {
        let inner = self.lock();
        Ok(requests
            .into_iter()
            .map(|req| page(inner.convs.get(&req.conv), req.conv, req.range))
            .collect())
    }

    async fn inbox(
        &self,
        uid: &str,
        limit: usize,
        before: Option<InboxCursor>,
    ) -> Result<Inbox, StoreError> {
        let inner = self.lock();
        let mut rows: Vec<(Option<u64>, &String)> = inner
            .user_convs
            .get(uid)
            .into_iter()
            .flatten()
            .map(|c| (inner.convs.get(c).and_then(|d| d.last_ts), c))
            .filter(|(ts, conv)| match (&before, ts) {
                (Some(b), Some(ts)) => b.admits(*ts, conv),
                // Paging on by ts: conversations without a message come after all.
                (Some(_), None) => true,
                (None, _) => true,
            })
            .collect();
        // Newest first, no message last, then by id for a stable order.
        rows.sort_by(|(ta, ca), (tb, cb)| match (ta, tb) {
            (Some(a), Some(b)) => b.cmp(a).then(ca.cmp(cb)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => ca.cmp(cb),
        });
        let more = rows.len() > limit;
        let conversations = rows
            .into_iter()
            .take(limit)
            .map(|(_, conv)| {
                let read = inner
                    .members
                    .get(conv)
                    .and_then(|m| m.get(uid))
                    .map_or(0, |m| m.read);
                let last = inner
                    .convs
                    .get(conv)
                    .and_then(|d| d.messages.get(&d.last_seq).cloned());
                InboxEntry {
                    conv: conv.clone(),
                    last,
                    read,
                    unread: inner.unread(conv, uid, read),
                }
            })
            .collect();
        Ok(Inbox {
            conversations,
            more,
        })
    }

    async fn mark(
        &self,
        uid: &str,
        conv: &str,
        kind: MarkKind,
        seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut inner = self.lock();
        let last = inner.last_seq(conv);
        let current = inner.members.get(conv).and_then(|m| m.get(uid)).copied();
        let now = match (kind, current) {
            (MarkKind::Read, Some(m)) => m.read,
            (MarkKind::Delivered, Some(m)) => m.delivered,
            (_, None) => 0,
        };
        let moved = rules::decide_mark(conv, current.is_some(), last, now, seq)?;
        if let (Some(seq), Some(m)) = (
            moved,
            inner.members.get_mut(conv).and_then(|m| m.get_mut(uid)),
        ) {
            if kind == MarkKind::Read {
                m.read = seq;
            }
            m.delivered = m.delivered.max(seq);
        }
        Ok(moved)
    }

    async fn receipts(&self, conv: &str) -> Result<Vec<Receipt>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .members
            .get(conv)
            .into_iter()
            .flatten()
            .map(|(uid, m)| Receipt {
                uid: uid.clone(),
                read: m.read,
                delivered: m.delivered,
            })
            .collect())
    }

    async fn purge(&self, now_ms: u64) -> Result<Purged, StoreError> {
        let mut inner = self.lock();
        let before = inner.idempotency.len();
        inner.expire_idempotency(now_ms);
        let mut purged = Purged {
            idempotency: (before - inner.idempotency.len()) as u64,
            messages: 0,
        };
        if let Some(retention) = self.limits.retention {
            let cutoff = now_ms.saturating_sub(retention.as_millis() as u64);
            for data in inner.convs.values_mut() {
                let n = data.messages.len();
                data.messages.retain(|_, m| m.ts >= cutoff);
                purged.messages += (n - data.messages.len()) as u64;
            }
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
