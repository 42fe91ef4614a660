//! The ChatServer actor: the local sessions of this node and the online members of each
//! room, and the fan-out of stored messages to them. Routing rules live in
//! [`Registry`]; this actor only turns its answers into frames on sessions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;

use crate::cluster::directory::LocalUser;
use crate::cluster::ClusterEvent;
use crate::metrics::Metrics;
use crate::protocol::{Message as ChatMessage, ServerFrame};
use crate::registry::{Registry, SessionId};

/// A frame for a session to write. Sent with `try_send`, so a session whose mailbox
/// (its outbound queue) is full is noticed instead of growing without bound.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub frame: ByteString,
    /// Counted as a delivered message (not a control frame).
    pub is_message: bool,
}

/// Tells a session to close its websocket.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Close {
    pub code: CloseCode,
    pub reason: &'static str,
}

/// How the server reaches one session.
#[derive(Clone)]
pub struct SessionHandle {
    pub deliver: Recipient<Deliver>,
    pub close: Recipient<Close>,
    /// Set once the outbound queue overflowed: nothing more is queued for it.
    pub overflowed: Arc<AtomicBool>,
}

#[derive(Message)]
#[rtype(result = "bool")]
pub struct Connect {
    pub sid: SessionId,
    pub uid: String,
    pub rooms: Vec<String>,
    pub handle: SessionHandle,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub sid: SessionId,
}

/// A membership change that the store has already accepted. Answers the change in
/// this node's connection count for the room (the user's local connections, positive or
/// negative; 0 when nothing changed), which the caller records in the cluster directory.
#[derive(Message)]
#[rtype(result = "i64")]
pub struct Membership {
    pub uid: String,
    pub room: String,
    pub joined: bool,
}

/// Delivers a stored message to the local sessions that should get it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fanout {
    pub message: Arc<ChatMessage>,
    /// The sending connection, which gets `sent` instead.
    pub exclude: Option<SessionId>,
}

/// A member of a room came online or went offline (somewhere in the cluster); tell the
/// other members online here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomPresence {
    pub room: String,
    pub uid: String,
    pub online: bool,
}

/// Which of these users have a connection on this node.
#[derive(Message)]
#[rtype(result = "Vec<bool>")]
pub struct LocalOnline {
    pub uids: Vec<String>,
}

/// Users online here with their connection counts and rooms, so the cluster directory
/// can be written again after Redis lost it.
#[derive(Message)]
#[rtype(result = "LocalSnapshot")]
pub struct Snapshot;

#[derive(Debug, Default, Clone, MessageResponse)]
pub struct LocalSnapshot {
    pub users: Vec<LocalUser>,
}

/// Closes every session with 1012 (service restart); answers how many there were.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

/// Where presence transitions go in cluster mode.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachCluster {
    pub events: Recipient<ClusterEvent>,
}

/// Mailbox bound of the ChatServer and the ClusterBridge.
pub const MAILBOX_CAPACITY: usize = 65_536;

pub struct ChatServer {
    registry: Registry<SessionHandle>,
    metrics: Arc<Metrics>,
    cluster: Option<Recipient<ClusterEvent>>,
    closing: bool,
}

impl ChatServer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ChatServer {
            registry: Registry::default(),
            metrics,
            cluster: None,
            closing: false,
        }
    }

    fn push(&self, handle: &SessionHandle, frame: &ByteString, is_message: bool) {
        if handle.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let msg = Deliver {
            frame: frame.clone(),
            is_message,
        };
        match handle.deliver.try_send(msg) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                // The client is not reading. Stop queueing for it and close it; what it
                // missed is stored and reaches it at its next sync.
                handle.overflowed.store(true, Ordering::Relaxed);
                self.metrics.slow_consumers.inc();
                handle.close.do_send(Close {
                    code: CloseCode::Policy,
                    reason: "outbound queue full: not reading",
                });
            }
            Err(SendError::Closed(_)) => {}
        }
    }

    fn room_presence(&self, room: &str, uid: &str, online: bool) {
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
                self.push(h, &frame, false);
            }
        }
    }
}

impl Actor for ChatServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Senders that await (`send`) wait for room; `do_send` (fan-out, session
        // events) is bounded by its sources: one request in flight per connection and
        // bounded peer batches.
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

impl Handler<Connect> for ChatServer {
    type Result = bool;

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> bool {
        if self.closing {
            msg.handle.close.do_send(Close {
                code: CloseCode::Restart,
                reason: "server shutting down",
            });
        }
        let first = self
            .registry
            .connect(msg.sid, &msg.uid, &msg.rooms, msg.handle);
        // In a cluster the session announces the user once the directory says this is
        // their first connection anywhere; a single node knows it here.
        if first && self.cluster.is_none() {
            for room in &msg.rooms {
                self.room_presence(room, &msg.uid, true);
            }
        }
        first
    }
}

impl Handler<Disconnect> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        let Some(uid) = self.registry.uid_of(msg.sid).map(str::to_owned) else {
            return;
        };
        // The rooms this connection was counted in, read before it is removed.
        let rooms = self.registry.rooms_of(&uid);
        let Some(departure) = self.registry.disconnect(msg.sid) else {
            return;
        };
        match &self.cluster {
            // Sent whether or not the directory recorded the connection: its update may
            // have timed out and still land, and removing what is not there is a no-op.
            Some(cluster) => {
                cluster.do_send(ClusterEvent::Disconnected {
                    uid,
                    sid: msg.sid,
                    rooms,
                });
            }
            None if departure.last => {
                for room in &departure.rooms {
                    self.room_presence(room, &departure.uid, false);
                }
            }
            None => {}
        }
    }
}

impl Handler<Membership> for ChatServer {
    type Result = i64;

    fn handle(&mut self, msg: Membership, _: &mut Context<Self>) -> i64 {
        let connections = self.registry.connections_of(&msg.uid) as i64;
        let was_member = self.registry.rooms_of(&msg.uid).contains(&msg.room);
        if msg.joined {
            self.registry.join(&msg.uid, &msg.room);
        } else {
            self.registry.leave(&msg.uid, &msg.room);
        }
        match (was_member, msg.joined) {
            (false, true) => connections,
            (true, false) => -connections,
            _ => 0,
        }
    }
}

impl Handler<Fanout> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: Fanout, _: &mut Context<Self>) {
        let m = &msg.message;
        let targets = match (&m.room, &m.to) {
            (Some(room), _) => self.registry.targets(&[], Some(room), msg.exclude),
            (None, Some(to)) => self.registry.targets(&[&m.from, to], None, msg.exclude),
            (None, None) => return,
        };
        if targets.is_empty() {
            return;
        }
        // Serialised once, shared by every recipient.
        let frame = ServerFrame::Message(m).to_text();
        for h in targets {
            self.push(h, &frame, true);
        }
    }
}

impl Handler<RoomPresence> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: RoomPresence, _: &mut Context<Self>) {
        self.room_presence(&msg.room, &msg.uid, msg.online);
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

impl Handler<Snapshot> for ChatServer {
    type Result = LocalSnapshot;

    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> LocalSnapshot {
        LocalSnapshot {
            users: self
                .registry
                .users()
                .map(|uid| LocalUser {
                    uid: uid.to_owned(),
                    sessions: self.registry.sessions_of(uid).map(|(sid, _)| sid).collect(),
                    rooms: self.registry.rooms_of(uid),
                })
                .collect(),
        }
    }
}

impl Handler<Shutdown> for ChatServer {
    type Result = usize;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> usize {
        self.closing = true;
        let mut n = 0;
        for (_, h) in self.registry.all() {
            h.close.do_send(Close {
                code: CloseCode::Restart,
                reason: "server restarting",
            });
            n += 1;
        }
        n
    }
}

impl Handler<AttachCluster> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: AttachCluster, _: &mut Context<Self>) {
        self.cluster = Some(msg.events);
    }
}
