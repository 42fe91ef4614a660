//! The chat rules shared by websocket sessions and the server HTTP API: validate, store,
//! then deliver. A message is handed to delivery only after the store committed it, so
//! whatever a sender saw confirmed is never lost; and it is handed to delivery even when
//! its sender stopped waiting (the store call runs on its own task), so a message the
//! store kept never silently misses the live path.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;

use crate::cluster::Cluster;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::protocol::{
    dm_conv, new_message_id, now_ms, room_conv, valid_id, Conv, ErrorCode, InboxItem, Message,
    Sent, ServerFrame, MAX_CLIENT_ID_LEN, MAX_HISTORY_LIMIT, MAX_PRESENCE_UIDS, SYNC_LATEST,
    SYNC_PAGE,
};
use crate::registry::SessionId;
use crate::server::{Answer, ChatServer, ConvEvent, Fanout, LocalOnline, Membership, Subscribe};
use crate::store::{
    By, Change, Joined, MarkKind, NewMessage, NewRoom, Page, Range, ReadRequest, Refusal, Role,
    RoomInfo, SharedStore, StoreError,
};

/// Most cursors one `sync` frame may carry.
pub const MAX_SYNC_CURSORS: usize = 10_000;
/// Conversations one `sync` answer reads; the others are listed in `more`.
pub const SYNC_CONVS: usize = 20;
/// Members `room_info` lists (the count is exact).
pub const ROOM_INFO_MEMBERS: usize = 1000;
/// Conversations one `inbox` page holds at most (and by default).
pub const INBOX_MAX: usize = 100;
pub const INBOX_DEFAULT: usize = 50;

/// Why a chat operation was refused; each maps to an error code of the contract.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    Invalid(String),
    #[error("body is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    Refused(Refusal),
    /// A send that gets this may or may not have been stored: resend it with the same
    /// client id.
    #[error("unavailable, try again (a message: with the same client_id): {0}")]
    Unavailable(String),
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::Invalid(_) => ErrorCode::Invalid,
            ChatError::TooLarge { .. } => ErrorCode::TooLarge,
            ChatError::Refused(r) => match r {
                Refusal::NotMember(_) => ErrorCode::NotMember,
                Refusal::Forbidden(_) => ErrorCode::Forbidden,
                Refusal::NotFound(_) => ErrorCode::NotFound,
                Refusal::Conflict(_) => ErrorCode::Conflict,
                Refusal::Limit(_) => ErrorCode::Limit,
                Refusal::Invalid(_) => ErrorCode::Invalid,
            },
            ChatError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    fn not_member(message: String) -> Self {
        ChatError::Refused(Refusal::NotMember(message))
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(r) => ChatError::Refused(r),
            other => ChatError::Unavailable(other.to_string()),
        }
    }
}

fn bad_id(what: &str) -> ChatError {
    ChatError::Invalid(format!(
        "{what} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
    ))
}

/// Where a message goes.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Room(String),
}

/// A message to send, from a websocket or the HTTP API.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub from: String,
    pub target: Target,
    pub body: String,
    pub client_id: Option<String>,
    /// The sending connection (gets `sent`, not a copy); None for the HTTP API.
    pub origin: Option<SessionId>,
    /// A user (membership required) or the server API (may post to any room).
    pub by: By,
}

/// An edit or delete, from a websocket or the HTTP API.
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    pub by: By,
    /// Whom the change message is from (the user, or a name for the server).
    pub from: String,
    pub conv: String,
    pub change: Change,
    /// The new body (edits only).
    pub body: Option<String>,
    pub client_id: Option<String>,
    pub origin: Option<SessionId>,
}

/// The answer to a `sync`.
pub struct Synced {
    pub pages: Vec<Page>,
    pub more: Vec<String>,
}

/// Hands stored messages to this node's sessions and, in a cluster, to the peers
/// that hold recipients. Cheap to clone, so a detached store call can deliver.
#[derive(Clone)]
pub struct Delivery {
    server: Addr<ChatServer>,
    cluster: Option<Cluster>,
}

impl Delivery {
    /// Waits for room in the ChatServer's and the bridge's mailboxes (bounded), so a
    /// node under load slows its senders instead of dropping their messages.
    pub async fn deliver(&self, message: Arc<Message>, origin: Option<SessionId>) {
        let Some(json) = message.frame() else {
            return;
        };
        let frame = ByteString::from(json.get());
        if let Some(cluster) = &self.cluster {
            cluster.route(message.clone(), json.into()).await;
        }
        if self
            .server
            .send(Fanout {
                message,
                frame,
                exclude: origin,
            })
            .await
            .is_err()
        {
            log::warn!("the ChatServer has stopped: a stored message was not delivered live");
        }
    }
}

pub struct Chat {
    pub node_id: String,
    pub store: SharedStore,
    pub server: Addr<ChatServer>,
    pub cluster: Option<Cluster>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Deadline of every store call.
    pub timeout: Duration,
    delivery: Delivery,
    next_sid: AtomicU64,
    /// Membership changes are applied here one at a time, each as the store has it when
    /// its turn comes (see [`Chat::apply_membership`]).
    membership_order: tokio::sync::Mutex<()>,
}

impl Chat {
    pub fn new(
        node_id: String,
        store: SharedStore,
        server: Addr<ChatServer>,
        cluster: Option<Cluster>,
        metrics: Arc<Metrics>,
        limits: Limits,
        timeout: Duration,
    ) -> Self {
        Chat {
            node_id,
            store,
            delivery: Delivery {
                server: server.clone(),
                cluster: cluster.clone(),
            },
            server,
            cluster,
            metrics,
            limits,
            timeout,
            next_sid: AtomicU64::new(1),
            membership_order: tokio::sync::Mutex::new(()),
        }
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    pub fn epoch(&self) -> &str {
        self.store.epoch()
    }

    /// A store call with the store deadline, timed for the metrics.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)));
        self.metrics
            .store_latency
            .observe(start.elapsed().as_secs_f64());
        r
    }

    /// Whether the store answers within the deadline (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(self.store.ping()).await
    }

    /// Checks a message without touching the store.
    pub fn validate(&self, out: &Outgoing) -> Result<(), ChatError> {
        if !valid_id(&out.from) {
            return Err(bad_id("from"));
        }
        match &out.target {
            Target::User(to) if !valid_id(to) => return Err(bad_id("to")),
            Target::User(to) if *to == out.from => {
                return Err(ChatError::Invalid(
                    "cannot send a direct message to yourself".into(),
                ))
            }
            Target::Room(room) if !valid_id(room) => return Err(bad_id("room")),
            _ => {}
        }
        self.check_body(&out.body)?;
        if let Some(c) = &out.client_id {
            if c.is_empty() || c.chars().count() > MAX_CLIENT_ID_LEN {
                return Err(ChatError::Invalid(format!(
                    "client_id must be 1 to {MAX_CLIENT_ID_LEN} characters"
                )));
            }
        }
        Ok(())
    }

    fn check_body(&self, body: &str) -> Result<(), ChatError> {
        if body.is_empty() {
            return Err(ChatError::Invalid("body must not be empty".into()));
        }
        if body.len() > self.limits.max_body_bytes {
            return Err(ChatError::TooLarge {
                len: body.len(),
                max: self.limits.max_body_bytes,
            });
        }
        Ok(())
    }

    /// Stores a message, then delivers it to every other connection that should have it.
    pub async fn send(&self, out: Outgoing) -> Result<Sent, ChatError> {
        self.validate(&out)?;
        let conv = match &out.target {
            Target::User(to) => dm_conv(&out.from, to),
            Target::Room(room) => room_conv(room),
        };
        let new = NewMessage {
            conv,
            from: out.from,
            body: Some(out.body),
            change: None,
            client_id: out.client_id,
            id: new_message_id(),
            ts: now_ms(),
            by: out.by,
        };
        self.append(new, out.origin).await
    }

    /// Stores `new` on a task of its own and delivers it from there, so a message the
    /// store kept is delivered even if this caller's deadline passes first (the client
    /// then resends with the same client id and gets the same `sent`).
    pub async fn append(
        &self,
        new: NewMessage,
        origin: Option<SessionId>,
    ) -> Result<Sent, ChatError> {
        if new.by == By::Server {
            if let Some(cluster) = &self.cluster {
                cluster.note_api_send().await;
            }
        }
        let client_id = new.client_id.clone();
        let store = self.store.clone();
        let delivery = self.delivery.clone();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let task = tokio::spawn(async move {
            let appended = store.append(new).await?;
            metrics.store_latency.observe(start.elapsed().as_secs_f64());
            if !appended.duplicate {
                metrics.messages_stored.inc();
            }
            let message = Arc::new(appended.message);
            // A resend is delivered again: the first attempt's node may have died
            // between its commit and its delivery. Clients deduplicate by (conv, seq).
            delivery.deliver(message.clone(), origin).await;
            Ok::<_, StoreError>(message)
        });
        let message = match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => return Err(ChatError::Unavailable(format!("store task failed: {e}"))),
            Err(_) => return Err(StoreError::Timeout(self.timeout).into()),
        };
        Ok(Sent {
            client_id,
            conv: message.conv.clone(),
            seq: message.seq,
            id: message.id.clone(),
            ts: message.ts,
        })
    }

    fn check_room(room: &str) -> Result<(), ChatError> {
        if valid_id(room) {
            Ok(())
        } else {
            Err(bad_id("room"))
        }
    }

    /// `join`: member of a public room, or owner of a new one (contract section 7).
    /// `origin` is answered once the change is in force on every node (see [`Answer`]).
    pub async fn join(
        &self,
        uid: &str,
        room: &str,
        origin: Option<SessionId>,
    ) -> Result<Joined, ChatError> {
        Self::check_room(room)?;
        let joined = self.call(self.store.join(uid, room)).await?;
        let answer = ServerFrame::Joined {
            room,
            role: joined.created.then_some(joined.role.as_str()),
            private: joined.created.then_some(joined.private),
            by: None,
        };
        let answer = origin.map(|sid| (sid, answer.to_text()));
        self.follow(uid, room, true, Some(joined.members), None, answer)
            .await?;
        self.joining_mark(uid, room, joined.marked, origin).await;
        Ok(joined)
    }

    /// `leave`; `origin` is answered like a join's.
    pub async fn leave(
        &self,
        uid: &str,
        room: &str,
        origin: Option<SessionId>,
    ) -> Result<(), ChatError> {
        Self::check_room(room)?;
        self.call(self.store.leave(uid, room)).await?;
        let origin = origin.map(|sid| (sid, ServerFrame::Left { room, by: None }.to_text()));
        self.follow(uid, room, false, None, None, origin).await
    }

    /// `create` (a user: they own it, and `origin` is answered like a join's) or
    /// `POST /api/rooms` (the server).
    pub async fn create(
        &self,
        by: &By,
        room: NewRoom,
        origin: Option<SessionId>,
    ) -> Result<RoomInfo, ChatError> {
        Self::check_room(&room.room)?;
        if let Some(bad) = room
            .owners
            .iter()
            .chain(&room.members)
            .find(|u| !valid_id(u))
        {
            return Err(ChatError::Invalid(format!(
                "{:?} is not a valid user id",
                bad.chars().take(70).collect::<String>()
            )));
        }
        let created = self.call(self.store.create_room(by, room)).await?;
        let mut info = created.info;
        for uid in &info.members {
            let by_user = by.user().filter(|u| *u != uid.as_str());
            let origin = origin.filter(|_| by.user() == Some(uid));
            let answer = origin.map(|sid| {
                let answer = ServerFrame::Joined {
                    room: &info.room,
                    role: Some(Role::Owner.as_str()),
                    private: Some(info.private),
                    by: None,
                };
                (sid, answer.to_text())
            });
            self.follow(uid, &info.room, true, Some(info.count), by_user, answer)
                .await?;
            self.joining_mark(uid, &info.room, created.marked, origin)
                .await;
        }
        info.members.truncate(ROOM_INFO_MEMBERS);
        Ok(info)
    }

    /// `add` (owners) or `PUT /api/rooms/R/members/U` (the server).
    pub async fn add(&self, by: &By, room: &str, uid: &str, role: Role) -> Result<(), ChatError> {
        Self::check_room(room)?;
        if !valid_id(uid) {
            return Err(bad_id("uid"));
        }
        let added = self
            .call(self.store.add_member(by, room, uid, role))
            .await?;
        self.follow(uid, room, true, Some(added.members), by.user(), None)
            .await?;
        self.joining_mark(uid, room, added.marked, None).await;
        Ok(())
    }

    /// Pushes the read mark the store gave a new member (their history is not unread)
    /// exactly as an explicit `read` to that seq would be: to the others, not to the
    /// connection that joined. After [`Chat::follow`], so every node routes it to the
    /// room's connections, the new member's included.
    async fn joining_mark(
        &self,
        uid: &str,
        room: &str,
        marked: Option<u64>,
        origin: Option<SessionId>,
    ) {
        if let Some(seq) = marked {
            self.push_mark(&room_conv(room), uid, MarkKind::Read, seq, origin)
                .await;
        }
    }

    /// `remove` (owners) or `DELETE /api/rooms/R/members/U` (the server). The removal
    /// is in force on every node holding the user before this answers.
    pub async fn remove(&self, by: &By, room: &str, uid: &str, ban: bool) -> Result<(), ChatError> {
        Self::check_room(room)?;
        if !valid_id(uid) {
            return Err(bad_id("uid"));
        }
        let removed = self
            .call(self.store.remove_member(by, room, uid, ban))
            .await?;
        self.follow(uid, room, false, Some(removed.members), by.user(), None)
            .await
    }

    /// `room_info`.
    pub async fn room_info(&self, by: &By, room: &str) -> Result<RoomInfo, ChatError> {
        Self::check_room(room)?;
        Ok(self
            .call(self.store.room_info(by, room, ROOM_INFO_MEMBERS))
            .await?)
    }

    /// Makes every node's sessions of `uid` follow a membership the store holds: this
    /// node's first (and its directory entry, before the caller answers, so every room
    /// message stored afterwards is routed here), then the other nodes holding the
    /// user's connections; then `origin`, the connection that asked, gets its answer.
    async fn follow(
        &self,
        uid: &str,
        room: &str,
        joined: bool,
        members: Option<u64>,
        by: Option<&str>,
        origin: Option<(SessionId, ByteString)>,
    ) -> Result<(), ChatError> {
        let change = Membership {
            uid: uid.to_owned(),
            room: room.to_owned(),
            joined,
            members,
            by: by.map(str::to_owned),
            origin: origin.as_ref().map(|(sid, _)| *sid),
        };
        self.apply_membership(change.clone()).await?;
        if let Some(cluster) = &self.cluster {
            cluster.membership(change).await;
        }
        if let Some((sid, frame)) = origin {
            let answer = Answer {
                sid,
                uid: uid.to_owned(),
                room: room.to_owned(),
                joined,
                frame,
            };
            self.server
                .send(answer)
                .await
                .map_err(|e| ChatError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Applies a membership change to this node's sessions and directory entry, from
    /// this node or from a peer, and waits until the directory recorded it.
    ///
    /// Changes of one membership can reach a node in another order than the store made
    /// them (a join forwarded by one node, a removal by another). So each is applied as
    /// the store has it when its turn comes, one at a time: whatever order the events
    /// come in, the last one applied shows the store's latest word, and a stale join
    /// can never undo a removal here. When the store cannot say in time, the change is
    /// applied as announced.
    pub async fn apply_membership(&self, mut change: Membership) -> Result<(), ChatError> {
        let recorded = {
            let _turn = self.membership_order.lock().await;
            match self.call(self.store.role(&change.uid, &change.room)).await {
                Ok(role) => {
                    let member = role.is_some();
                    if member != change.joined {
                        log::debug!(
                            "membership of {} in {} changed again before it was applied here",
                            change.uid,
                            change.room
                        );
                        change.joined = member;
                        change.by = None;
                    }
                }
                Err(e) => log::warn!(
                    "cannot read the membership of {} in {} ({e}); applying the change as announced",
                    change.uid,
                    change.room
                ),
            }
            self.server
                .send(change)
                .await
                .map_err(|e| ChatError::Unavailable(e.to_string()))?
        };
        if let Some(recorded) = recorded {
            if !matches!(
                tokio::time::timeout(self.timeout, recorded).await,
                Ok(Ok(true))
            ) {
                return Err(ChatError::Unavailable(
                    "the cluster directory did not record the change in time".into(),
                ));
            }
        }
        Ok(())
    }

    /// The rooms of `uid` with their sizes.
    pub async fn rooms_of(&self, uid: &str) -> Result<Vec<crate::store::UserRoom>, ChatError> {
        Ok(self.call(self.store.rooms_of(uid)).await?)
    }

    /// Catch-up for the conversations of `uid` (contract: `sync`), bounded: at most
    /// [`SYNC_CONVS`] conversations are read, and `more` lists every one not complete.
    pub async fn sync(
        &self,
        uid: &str,
        cursors: &BTreeMap<String, u64>,
    ) -> Result<Synced, ChatError> {
        if cursors.len() > MAX_SYNC_CURSORS {
            return Err(ChatError::Invalid(format!(
                "at most {MAX_SYNC_CURSORS} cursors per sync"
            )));
        }
        let convs = self.call(self.store.conversations(uid)).await?;
        let mut wanted: Vec<ReadRequest> = Vec::new();
        let mut after_cursor: Vec<bool> = Vec::new();
        for c in convs {
            let (range, is_after) = match cursors.get(&c.conv) {
                Some(&after) if c.last_seq > after => (
                    Range::After {
                        after,
                        limit: SYNC_PAGE,
                    },
                    true,
                ),
                Some(_) => continue,
                None if c.delivered > 0 && c.last_seq > c.delivered => (
                    Range::After {
                        after: c.delivered,
                        limit: SYNC_PAGE,
                    },
                    true,
                ),
                None if c.delivered > 0 || c.last_seq == 0 => continue,
                None => (
                    Range::Before {
                        before: None,
                        limit: SYNC_LATEST,
                    },
                    false,
                ),
            };
            wanted.push(ReadRequest {
                conv: c.conv,
                range,
            });
            after_cursor.push(is_after);
        }
        let later: Vec<String> = wanted
            .iter()
            .skip(SYNC_CONVS)
            .map(|r| r.conv.clone())
            .collect();
        wanted.truncate(SYNC_CONVS);
        let pages = if wanted.is_empty() {
            Vec::new()
        } else {
            self.call(self.store.read(wanted)).await?
        };
        // Only a read after a cursor or mark has "more after it"; the latest-20 read's
        // `more` means older history, which sync does not page through.
        let mut more: Vec<String> = pages
            .iter()
            .zip(&after_cursor)
            .filter(|(p, after)| p.more && **after)
            .map(|(p, _)| p.conv.clone())
            .collect();
        more.extend(later);
        Ok(Synced { pages, more })
    }

    /// A page of history of a conversation `by` may read.
    pub async fn history(
        &self,
        by: &By,
        conv: &str,
        before: Option<u64>,
        limit: Option<u64>,
    ) -> Result<Page, ChatError> {
        let Some(parsed) = Conv::parse(conv) else {
            return Err(ChatError::Invalid(
                "conv must be dm:A:B (A < B) or room:R".into(),
            ));
        };
        if let By::User(uid) = by {
            match parsed {
                Conv::Dm(..) if !parsed.dm_includes(uid) => {
                    return Err(ChatError::not_member(format!("{conv} is not yours")))
                }
                Conv::Room(room) => {
                    let role = self.call(self.store.role(uid, room)).await?;
                    if !matches!(role, Some(Role::Owner | Role::Member)) {
                        return Err(ChatError::not_member(format!("join room {room} first")));
                    }
                }
                Conv::Dm(..) => {}
            }
        }
        let limit = match limit {
            None => 50,
            Some(0) => return Err(ChatError::Invalid("limit must be at least 1".into())),
            Some(l) => (l as usize).min(MAX_HISTORY_LIMIT),
        };
        let mut pages = self
            .call(self.store.read(vec![ReadRequest {
                conv: conv.to_owned(),
                range: Range::Before { before, limit },
            }]))
            .await?;
        pages
            .pop()
            .ok_or_else(|| ChatError::Unavailable("store answered no page".into()))
    }

    /// `inbox`: the user's conversations, newest first.
    pub async fn inbox(
        &self,
        uid: &str,
        limit: Option<u64>,
        before: Option<u64>,
        before_conv: Option<String>,
    ) -> Result<(Vec<InboxItem>, bool), ChatError> {
        let limit = match limit {
            None => INBOX_DEFAULT,
            Some(0) => return Err(ChatError::Invalid("limit must be at least 1".into())),
            Some(l) => (l as usize).min(INBOX_MAX),
        };
        let before = before.map(|ts| crate::store::InboxCursor {
            ts,
            conv: before_conv,
        });
        let inbox = self.call(self.store.inbox(uid, limit, before)).await?;
        let items = inbox
            .conversations
            .into_iter()
            .map(|e| {
                let (with, room) = match Conv::parse(&e.conv) {
                    Some(Conv::Dm(a, b)) => (Some(if a == uid { b } else { a }.to_owned()), None),
                    Some(Conv::Room(r)) => (None, Some(r.to_owned())),
                    None => (None, None),
                };
                InboxItem {
                    conv: e.conv,
                    with,
                    room,
                    last: e.last,
                    read: e.read,
                    unread: e.unread,
                }
            })
            .collect();
        Ok((items, inbox.more))
    }

    fn parse_conv(conv: &str) -> Result<Conv<'_>, ChatError> {
        Conv::parse(conv)
            .ok_or_else(|| ChatError::Invalid("conv must be dm:A:B (A < B) or room:R".into()))
    }

    /// `read` / `delivered`: moves the mark and pushes it to the user's other
    /// connections and the other participants (rooms: up to the live size).
    pub async fn mark(
        &self,
        uid: &str,
        conv: &str,
        kind: MarkKind,
        seq: u64,
        origin: Option<SessionId>,
    ) -> Result<(), ChatError> {
        Self::parse_conv(conv)?;
        let Some(seq) = self.call(self.store.mark(uid, conv, kind, seq)).await? else {
            return Ok(());
        };
        self.push_mark(conv, uid, kind, seq, origin).await;
        Ok(())
    }

    /// Pushes a stored mark to the user's other connections and the other participants
    /// (rooms: up to the live size), on every node.
    async fn push_mark(
        &self,
        conv: &str,
        uid: &str,
        kind: MarkKind,
        seq: u64,
        origin: Option<SessionId>,
    ) {
        let frame = match kind {
            MarkKind::Read => ServerFrame::Read { conv, uid, seq },
            MarkKind::Delivered => ServerFrame::Delivered { conv, uid, seq },
        };
        self.event(conv, uid, frame.to_text(), false, origin, false)
            .await;
    }

    /// `typing`: forwarded live to the other participants, at most once a second per
    /// user and conversation; only in DMs and rooms up to the live size.
    pub async fn typing(
        &self,
        uid: &str,
        conv: &str,
        origin: Option<SessionId>,
    ) -> Result<(), ChatError> {
        let parsed = Self::parse_conv(conv)?;
        if let Conv::Dm(..) = parsed {
            if !parsed.dm_includes(uid) {
                return Err(ChatError::not_member(format!("{conv} is not yours")));
            }
        }
        let frame = ServerFrame::Typing { conv, uid }.to_text();
        self.event(conv, uid, frame, true, origin, true).await;
        Ok(())
    }

    /// Hands an event about `conv` to this node's ChatServer and, if it passed the
    /// rules there (rate, room size, membership), to the peers.
    async fn event(
        &self,
        conv: &str,
        uid: &str,
        frame: bytestring::ByteString,
        skip_sender: bool,
        origin: Option<SessionId>,
        typing: bool,
    ) {
        let event = ConvEvent {
            conv: conv.to_owned(),
            frame,
            from: uid.to_owned(),
            skip_sender,
            origin,
            typing,
        };
        let forward = event.forwardable();
        match self.server.send(event).await {
            Ok(true) => {
                if let Some(cluster) = &self.cluster {
                    cluster.route_event(forward).await;
                }
            }
            Ok(false) => {}
            Err(e) => log::warn!("the ChatServer has stopped: an event was not delivered: {e}"),
        }
    }

    /// `receipts`: every participant's marks (for participants).
    pub async fn receipts(
        &self,
        by: &By,
        conv: &str,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>), ChatError> {
        let parsed = Self::parse_conv(conv)?;
        if let By::User(uid) = by {
            let allowed = match parsed {
                Conv::Dm(..) => parsed.dm_includes(uid),
                Conv::Room(room) => self.call(self.store.role(uid, room)).await?.is_some(),
            };
            if !allowed {
                return Err(ChatError::not_member(format!(
                    "{conv} is not one of your conversations"
                )));
            }
        }
        let receipts = self.call(self.store.receipts(conv)).await?;
        let read = receipts.iter().map(|r| (r.uid.clone(), r.read)).collect();
        let delivered = receipts
            .iter()
            .map(|r| (r.uid.clone(), r.delivered))
            .collect();
        Ok((read, delivered))
    }

    /// `edit` (the author) and `delete` (the author, a room owner, or the server): a
    /// message of its own naming the seq it changes.
    pub async fn change(&self, req: ChangeRequest) -> Result<Sent, ChatError> {
        let ChangeRequest {
            by,
            from,
            conv,
            change,
            body,
            client_id,
            origin,
        } = req;
        let conv = conv.as_str();
        Self::parse_conv(conv)?;
        if let Some(body) = &body {
            self.check_body(body)?;
        }
        if let Some(c) = &client_id {
            if c.is_empty() || c.chars().count() > MAX_CLIENT_ID_LEN {
                return Err(ChatError::Invalid(format!(
                    "client_id must be 1 to {MAX_CLIENT_ID_LEN} characters"
                )));
            }
        }
        if let (Some(Conv::Dm(..)), By::User(uid)) = (Conv::parse(conv), &by) {
            if !Conv::parse(conv).is_some_and(|c| c.dm_includes(uid)) {
                return Err(ChatError::not_member(format!("{conv} is not yours")));
            }
        }
        let new = NewMessage {
            conv: conv.to_owned(),
            from,
            body,
            change: Some(change),
            client_id,
            id: new_message_id(),
            ts: now_ms(),
            by,
        };
        self.append(new, origin).await
    }

    /// `presence` with `subscribe`: this connection also gets every change of these
    /// users' presence while it is open.
    pub async fn subscribe(&self, sid: SessionId, uids: &[String]) -> Result<(), ChatError> {
        let accepted = self
            .server
            .send(Subscribe {
                sid,
                uids: uids.to_vec(),
            })
            .await
            .map_err(|e| ChatError::Unavailable(e.to_string()))?;
        if accepted {
            Ok(())
        } else {
            Err(ChatError::Refused(Refusal::Limit(format!(
                "a connection subscribes to at most {MAX_PRESENCE_UIDS} users"
            ))))
        }
    }

    /// Whether each user has a connection on any live node.
    pub async fn online(&self, uids: Vec<String>) -> Result<Vec<(String, bool)>, ChatError> {
        if uids.len() > MAX_PRESENCE_UIDS {
            return Err(ChatError::Invalid(format!(
                "at most {MAX_PRESENCE_UIDS} uids per presence request"
            )));
        }
        if let Some(bad) = uids.iter().find(|u| !valid_id(u)) {
            return Err(ChatError::Invalid(format!(
                "uid {:?} is not a valid id",
                bad.chars().take(70).collect::<String>()
            )));
        }
        let online = match &self.cluster {
            Some(cluster) => cluster.online(&uids).await?,
            None => self
                .server
                .send(LocalOnline { uids: uids.clone() })
                .await
                .map_err(|e| ChatError::Unavailable(e.to_string()))?,
        };
        Ok(uids.into_iter().zip(online).collect())
    }
}
