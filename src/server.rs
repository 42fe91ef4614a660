//! The ChatServer actor: the local sessions of this node and the online members of each
//! room, and the fan-out of stored messages and events to them. Routing rules live in
//! [`Registry`]; this actor turns its answers into frames on sessions' outboxes.
//!
//! Frames go straight into each connection's [`Outbox`] (bounded, never blocking), so a
//! slow client costs this actor nothing and a session busy with the store still gets its
//! deliveries. In a cluster, every change of which users and rooms this node holds is
//! handed, in order, to a [`ClusterSink`] that mirrors it into the Redis directory; the
//! sink is implemented by the cluster module, which this module does not know.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
// foldhash, not SipHash: these maps are looked up for every delivery (keys are
// session ids, user ids and room names; the seed is random per process).
use bytestring::ByteString;
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};
use crate::protocol::{Conv, Message as ChatMessage, ServerFrame, MAX_PRESENCE_UIDS};
use crate::ratelimit::TypingGate;
use crate::registry::{Registry, SessionId};
use crate::store::UserRoom;

/// A change of what this node holds, for the cluster directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalChange {
    /// The user's first connection here; `rooms` are their rooms small enough for live
    /// presence events.
    UserOnline { uid: String, rooms: Vec<String> },
    /// The user's last connection here closed.
    UserOffline { uid: String, rooms: Vec<String> },
    /// A member of the room is now connected here.
    RoomOccupied(String),
    /// No member of the room is connected here any more.
    RoomVacated(String),
}

/// Where this node's changes go in cluster mode. Implementations must keep the order.
pub trait ClusterSink: Send + 'static {
    /// Hands over changes; `ack` is answered true once they are recorded (false if
    /// they could not be).
    fn record(&self, changes: Vec<LocalChange>, ack: Option<oneshot::Sender<bool>>);
    /// Hands over everything this node holds, to be written again in full; afterwards,
    /// with `resync_after`, every connection here is told to sync.
    fn reconcile(&self, users: BTreeSet<String>, rooms: BTreeSet<String>, resync_after: bool);
}

/// How the server reaches one session.
#[derive(Clone)]
pub struct SessionHandle {
    pub outbox: Arc<Outbox>,
}

/// Registers a session. Answers, in cluster mode, a receiver that resolves once the
/// directory records the connection (the session waits for it before `welcome`).
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<bool>>")]
pub struct Connect {
    pub sid: SessionId,
    pub uid: String,
    pub rooms: Vec<UserRoom>,
    pub handle: SessionHandle,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub sid: SessionId,
}

/// A membership change the store has already accepted: this node's sessions of `uid`
/// follow it, and get `joined` / `left` (all but `origin`, which gets its [`Answer`]).
/// Answers, in cluster mode, a receiver that resolves once the directory records it.
#[derive(Message, Clone)]
#[rtype(result = "Option<oneshot::Receiver<bool>>")]
pub struct Membership {
    pub uid: String,
    pub room: String,
    pub joined: bool,
    /// Members after the change, when known.
    pub members: Option<u64>,
    /// The owner who added or removed them.
    pub by: Option<String>,
    /// The connection whose own `join`, `leave` or `create` this is: it gets
    /// [`Answer`] instead, once the change is in force on every node.
    pub origin: Option<SessionId>,
}

/// The answer to a connection's own `join`, `leave` or `create`, sent once the change
/// is in force on every node. It goes through the ChatServer, like the frames of other
/// changes, so it stays in order with them: if a later change of the membership was
/// applied here first, the connection is told where it really stands right after.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Answer {
    pub sid: SessionId,
    pub uid: String,
    pub room: String,
    /// What the answer says: a member (`joined`) or not (`left`).
    pub joined: bool,
    pub frame: ByteString,
}

/// Delivers a stored message to the local sessions that should get it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fanout {
    pub message: Arc<ChatMessage>,
    /// Its `message` frame ([`ChatMessage::frame`]).
    pub frame: ByteString,
    /// The sending connection, which gets `sent` instead.
    pub exclude: Option<SessionId>,
}

/// Stored messages from a peer, delivered in one go.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FanoutBatch {
    pub messages: Vec<PeerMessage>,
}

/// A stored message from a peer: whom it is for, and its `message` frame as the peer
/// serialised it.
pub struct PeerMessage {
    pub from: String,
    pub to: Option<String>,
    pub room: Option<String>,
    pub frame: ByteString,
}

/// A user came online (first connection anywhere) or went offline (last one closed)
/// somewhere in the cluster: the members of their small rooms here are told.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Presence {
    pub uid: String,
    pub online: bool,
    pub rooms: Vec<String>,
}

/// An event about a conversation that is not a message (a mark, typing): pushed to the
/// participants' connections here. Answers whether it passed the rules here (so the
/// caller forwards it to the peers).
#[derive(Message, Clone)]
#[rtype(result = "bool")]
pub struct ConvEvent {
    pub conv: String,
    pub frame: ByteString,
    /// The user the event is about.
    pub from: String,
    /// Skip all of `from`'s connections (typing), not only `origin` (marks).
    pub skip_sender: bool,
    /// The connection it came from; None when it came from a peer.
    pub origin: Option<SessionId>,
    /// At most one a second per user and conversation; others are dropped (also when
    /// it came from a peer: the user may be typing on two nodes at once).
    pub typing: bool,
}

/// A [`ConvEvent`] as it travels to peers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerEvent {
    pub conv: String,
    pub frame: String,
    pub from: String,
    #[serde(default)]
    pub skip_sender: bool,
    /// A typing event: the receiving node applies the typing rate too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub typing: bool,
}

impl ConvEvent {
    pub fn forwardable(&self) -> PeerEvent {
        PeerEvent {
            conv: self.conv.clone(),
            frame: self.frame.to_string(),
            from: self.from.clone(),
            skip_sender: self.skip_sender,
            typing: self.typing,
        }
    }
}

impl From<PeerEvent> for ConvEvent {
    fn from(e: PeerEvent) -> Self {
        ConvEvent {
            conv: e.conv,
            frame: e.frame.into(),
            from: e.from,
            skip_sender: e.skip_sender,
            origin: None,
            typing: e.typing,
        }
    }
}

/// Subscribes a connection to these users' presence changes. Answers false (and
/// subscribes to none) when it would pass the bound.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Subscribe {
    pub sid: SessionId,
    pub uids: Vec<String>,
}

/// Which connections may have missed live messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncScope {
    All,
    /// Participants of these conversations.
    Convs(Vec<String>),
}

/// Tells connections to sync.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Resync {
    pub scope: ResyncScope,
}

/// Which of these users have a connection on this node.
#[derive(Message)]
#[rtype(result = "Vec<bool>")]
pub struct LocalOnline {
    pub uids: Vec<String>,
}

/// Closes every session with 1012 (service restart); answers how many there were.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

/// Where directory changes go in cluster mode.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachCluster {
    pub sink: Box<dyn ClusterSink>,
}

/// Hands the cluster sink everything this node holds (see [`ClusterSink::reconcile`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconcile {
    pub resync_after: bool,
}

/// Mailbox bound of the ChatServer. Senders use `send` (which waits for room) or
/// `try_send` (which counts a refusal): never `do_send`.
pub const MAILBOX_CAPACITY: usize = 16_384;

pub struct ChatServer {
    registry: Registry<SessionHandle>,
    metrics: Arc<Metrics>,
    cluster: Option<Box<dyn ClusterSink>>,
    /// Member counts of rooms with members here, for the live-event bound.
    room_sizes: HashMap<String, u64>,
    live_room_size: u64,
    /// Presence subscriptions: connection -> users, and user -> connections.
    subscriptions: HashMap<SessionId, HashSet<String>>,
    subscribers: HashMap<String, HashSet<SessionId>>,
    /// One typing event a second per user and conversation, whether it came from a
    /// connection here or from a peer.
    typing: TypingGate,
    closing: bool,
}

/// Typing events of one user in one conversation are forwarded at most this often.
const TYPING_EVERY: Duration = Duration::from_secs(1);

impl ChatServer {
    pub fn new(metrics: Arc<Metrics>, live_room_size: u64) -> Self {
        ChatServer {
            registry: Registry::default(),
            metrics,
            cluster: None,
            room_sizes: HashMap::new(),
            live_room_size,
            subscriptions: HashMap::new(),
            subscribers: HashMap::new(),
            typing: TypingGate::new(TYPING_EVERY),
            closing: false,
        }
    }

    /// Tells the connections subscribed to `uid` that they came online or went offline.
    fn presence_changed(&self, uid: &str, online: bool) {
        let Some(sids) = self.subscribers.get(uid) else {
            return;
        };
        let frame = ServerFrame::Presence {
            room: None,
            uid,
            online,
        }
        .to_text();
        for sid in sids {
            if let Some(h) = self.registry.handle(*sid) {
                h.outbox.presence(None, uid, frame.clone());
            }
        }
    }

    fn unsubscribe(&mut self, sid: SessionId) {
        for uid in self.subscriptions.remove(&sid).into_iter().flatten() {
            if let Some(sids) = self.subscribers.get_mut(&uid) {
                sids.remove(&sid);
                if sids.is_empty() {
                    self.subscribers.remove(&uid);
                }
            }
        }
    }

    fn small(&self, room: &str) -> bool {
        self.room_sizes
            .get(room)
            .is_some_and(|n| *n <= self.live_room_size)
    }

    fn small_rooms(&self, rooms: &[String]) -> Vec<String> {
        rooms.iter().filter(|r| self.small(r)).cloned().collect()
    }

    fn push_message(&self, handle: &SessionHandle, frame: &ByteString) {
        if handle.outbox.message(frame.clone()) == Pushed::Dropped {
            self.metrics.outbox_dropped.inc();
        }
    }

    fn room_presence(&self, room: &str, uid: &str, online: bool) {
        if !self.small(room) {
            return;
        }
        let frame = ServerFrame::Presence {
            room: Some(room),
            uid,
            online,
        }
        .to_text();
        for member in self.registry.online_members(room) {
            if member == uid {
                continue;
            }
            for (_, h) in self.registry.sessions_of(member) {
                h.outbox.presence(Some(room), uid, frame.clone());
            }
        }
    }

    fn record(&self, changes: Vec<LocalChange>) -> Option<oneshot::Receiver<bool>> {
        let sink = self.cluster.as_ref()?;
        let (ack, recorded) = oneshot::channel();
        sink.record(changes, Some(ack));
        Some(recorded)
    }

    /// Pushes a message's frame to the local sessions of a room's members, or of a
    /// DM's two participants, but `exclude` (the sending connection).
    fn fanout(
        &self,
        from: &str,
        to: Option<&str>,
        room: Option<&str>,
        frame: &ByteString,
        exclude: Option<SessionId>,
    ) {
        let targets = match (room, to) {
            (Some(room), _) => self.registry.targets(&[], Some(room), exclude),
            (None, Some(to)) => self.registry.targets(&[from, to], None, exclude),
            (None, None) => Vec::new(),
        };
        for h in targets {
            self.push_message(h, frame);
        }
    }
}

impl Actor for ChatServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

impl Handler<Connect> for ChatServer {
    type Result = Option<oneshot::Receiver<bool>>;

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> Self::Result {
        if self.closing {
            msg.handle.outbox.close(1012, "server shutting down");
        }
        for r in &msg.rooms {
            self.room_sizes.insert(r.room.clone(), r.members);
        }
        let rooms: Vec<String> = msg.rooms.into_iter().map(|r| r.room).collect();
        let arrival = self.registry.connect(msg.sid, &msg.uid, &rooms, msg.handle);
        if self.cluster.is_none() {
            // A single node knows at once that this is the user's first connection.
            if arrival.first {
                for room in &rooms {
                    self.room_presence(room, &msg.uid, true);
                }
                self.presence_changed(&msg.uid, true);
            }
            return None;
        }
        let mut changes = Vec::new();
        if arrival.first {
            changes.push(LocalChange::UserOnline {
                uid: msg.uid.clone(),
                rooms: self.small_rooms(&rooms),
            });
        }
        changes.extend(arrival.occupied.into_iter().map(LocalChange::RoomOccupied));
        // Recorded even with no change: the session must not be welcomed before the
        // changes of an earlier connection of the same user are.
        self.record(changes)
    }
}

impl Handler<Disconnect> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.unsubscribe(msg.sid);
        let Some(departure) = self.registry.disconnect(msg.sid) else {
            return;
        };
        if !departure.last {
            return;
        }
        match &self.cluster {
            Some(sink) => {
                let mut changes = vec![LocalChange::UserOffline {
                    uid: departure.uid.clone(),
                    rooms: self.small_rooms(&departure.rooms),
                }];
                changes.extend(
                    departure
                        .vacated
                        .iter()
                        .cloned()
                        .map(LocalChange::RoomVacated),
                );
                sink.record(changes, None);
            }
            None => {
                for room in &departure.rooms {
                    self.room_presence(room, &departure.uid, false);
                }
                self.presence_changed(&departure.uid, false);
            }
        }
        // Sizes are kept for rooms with members here; forgotten only after they served
        // the announcement above.
        for room in &departure.vacated {
            self.room_sizes.remove(room);
        }
    }
}

impl Handler<Membership> for ChatServer {
    type Result = Option<oneshot::Receiver<bool>>;

    fn handle(&mut self, msg: Membership, _: &mut Context<Self>) -> Self::Result {
        if let (true, Some(n)) = (self.registry.is_online(&msg.uid), msg.members) {
            self.room_sizes.insert(msg.room.clone(), n);
        }
        let was = self.registry.is_member(&msg.uid, &msg.room);
        let change = if msg.joined {
            self.registry
                .join(&msg.uid, &msg.room)
                .then(|| LocalChange::RoomOccupied(msg.room.clone()))
        } else {
            let vacated = self.registry.leave(&msg.uid, &msg.room);
            if vacated {
                self.room_sizes.remove(&msg.room);
            }
            vacated.then(|| LocalChange::RoomVacated(msg.room.clone()))
        };
        if was != msg.joined {
            let frame = if msg.joined {
                ServerFrame::Joined {
                    room: &msg.room,
                    role: None,
                    private: None,
                    by: msg.by.as_deref(),
                }
                .to_text()
            } else {
                ServerFrame::Left {
                    room: &msg.room,
                    by: msg.by.as_deref(),
                }
                .to_text()
            };
            for (sid, h) in self.registry.sessions_of(&msg.uid) {
                if Some(sid) != msg.origin {
                    h.outbox.control(frame.clone());
                }
            }
        }
        self.cluster.as_ref()?;
        self.record(change.into_iter().collect())
    }
}

impl Handler<Answer> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Answer, _: &mut Context<Self>) {
        let Some((_, h)) = self
            .registry
            .sessions_of(&msg.uid)
            .find(|(sid, _)| *sid == msg.sid)
        else {
            return;
        };
        h.outbox.control(msg.frame);
        let member = self.registry.is_member(&msg.uid, &msg.room);
        if member != msg.joined {
            // Overtaken by a later change: where the user stands, as their other
            // connections heard it.
            h.outbox.control(if member {
                ServerFrame::Joined {
                    room: &msg.room,
                    role: None,
                    private: None,
                    by: None,
                }
                .to_text()
            } else {
                ServerFrame::Left {
                    room: &msg.room,
                    by: None,
                }
                .to_text()
            });
        }
    }
}

impl Handler<Fanout> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Fanout, _: &mut Context<Self>) {
        let m = &msg.message;
        let (to, room) = (m.to.as_deref(), m.room.as_deref());
        self.fanout(&m.from, to, room, &msg.frame, msg.exclude);
    }
}

impl Handler<FanoutBatch> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: FanoutBatch, _: &mut Context<Self>) {
        for m in &msg.messages {
            let (to, room) = (m.to.as_deref(), m.room.as_deref());
            self.fanout(&m.from, to, room, &m.frame, None);
        }
    }
}

impl Handler<Presence> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Presence, _: &mut Context<Self>) {
        for room in &msg.rooms {
            self.room_presence(room, &msg.uid, msg.online);
        }
        self.presence_changed(&msg.uid, msg.online);
    }
}

impl Handler<ConvEvent> for ChatServer {
    type Result = bool;

    fn handle(&mut self, msg: ConvEvent, _: &mut Context<Self>) -> bool {
        // In a room larger than the live bound only the user's own devices hear it.
        let targets = match Conv::parse(&msg.conv) {
            Some(Conv::Dm(a, b)) => self.registry.targets(&[a, b], None, None),
            Some(Conv::Room(room)) => {
                if msg.origin.is_some() && !self.registry.is_member(&msg.from, room) {
                    return false;
                }
                let small = self.small(room);
                if msg.typing && !small {
                    return false;
                }
                if small {
                    self.registry.targets(&[], Some(room), None)
                } else {
                    self.registry.targets(&[&msg.from], None, None)
                }
            }
            None => return false,
        };
        let targets: Vec<SessionHandle> = targets.into_iter().cloned().collect();
        if msg.typing && !self.typing.allow(&msg.from, &msg.conv, Instant::now()) {
            return false;
        }
        let origin_outbox = msg
            .origin
            .and_then(|sid| self.registry.handle(sid))
            .map(|h| Arc::as_ptr(&h.outbox));
        let sender_outboxes: HashSet<*const crate::outbox::Outbox> = if msg.skip_sender {
            self.registry
                .sessions_of(&msg.from)
                .map(|(_, h)| Arc::as_ptr(&h.outbox))
                .collect()
        } else {
            HashSet::new()
        };
        for h in &targets {
            let p = Arc::as_ptr(&h.outbox);
            if Some(p) == origin_outbox || sender_outboxes.contains(&p) {
                continue;
            }
            h.outbox.control(msg.frame.clone());
        }
        true
    }
}

impl Handler<Subscribe> for ChatServer {
    type Result = bool;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> bool {
        let current = self.subscriptions.entry(msg.sid).or_default();
        let new: Vec<&String> = msg.uids.iter().filter(|u| !current.contains(*u)).collect();
        if current.len() + new.len() > MAX_PRESENCE_UIDS {
            return false;
        }
        for uid in new {
            current.insert(uid.clone());
            self.subscribers
                .entry(uid.clone())
                .or_default()
                .insert(msg.sid);
        }
        true
    }
}

impl Handler<Resync> for ChatServer {
    type Result = usize;

    fn handle(&mut self, msg: Resync, _: &mut Context<Self>) -> usize {
        let mut told = 0;
        match msg.scope {
            ResyncScope::All => {
                for (_, h) in self.registry.all() {
                    h.outbox.resync();
                    told += 1;
                }
            }
            ResyncScope::Convs(convs) => {
                let mut seen = std::collections::HashSet::new();
                for conv in &convs {
                    let handles = match crate::protocol::Conv::parse(conv) {
                        Some(crate::protocol::Conv::Room(room)) => {
                            self.registry.targets(&[], Some(room), None)
                        }
                        Some(crate::protocol::Conv::Dm(a, b)) => {
                            self.registry.targets(&[a, b], None, None)
                        }
                        None => Vec::new(),
                    };
                    for h in handles {
                        if seen.insert(Arc::as_ptr(&h.outbox)) {
                            h.outbox.resync();
                            told += 1;
                        }
                    }
                }
            }
        }
        // chatmesh_resyncs_total counts the frames as they are written (session::wire).
        told
    }
}

impl Handler<LocalOnline> for ChatServer {
    type Result = Vec<bool>;

    fn handle(&mut self, msg: LocalOnline, _: &mut Context<Self>) -> Vec<bool> {
        msg.uids
            .iter()
            .map(|u| self.registry.is_online(u))
            .collect()
    }
}

impl Handler<Shutdown> for ChatServer {
    type Result = usize;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> usize {
        self.closing = true;
        let mut n = 0;
        for (_, h) in self.registry.all() {
            h.outbox.close(1012, "server restarting");
            n += 1;
        }
        n
    }
}

impl Handler<AttachCluster> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: AttachCluster, _: &mut Context<Self>) {
        self.cluster = Some(msg.sink);
    }
}

impl Handler<Reconcile> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Reconcile, _: &mut Context<Self>) {
        if let Some(sink) = &self.cluster {
            let users = self.registry.users().map(str::to_owned).collect();
            let rooms = self.registry.rooms().map(str::to_owned).collect();
            sink.reconcile(users, rooms, msg.resync_after);
        }
    }
}
