//! One websocket connection: the WsSession actor.
//!
//! The session is an ordinary actor on the worker that accepted the connection. It reads
//! frames from the request payload ([`wire::FrameReader`]), runs each request through
//! [`Chat`] and writes every answer into the connection's [`Outbox`], which the response
//! body ([`wire::OutboxBody`]) drains as fast as the socket takes it. So:
//!
//! - **Requests are answered in order**, one in flight; up to [`MAX_PENDING`] more wait,
//!   and beyond that the session stops reading the socket (TCP backpressure).
//! - **Deliveries never wait for requests.** The ChatServer pushes into the outbox
//!   directly, so a session waiting on the store keeps receiving messages.
//! - **Timers always run**, whether or not the client reads: the ping, the client
//!   timeout, and the check that closes a client whose outbox has not moved for the
//!   grace period. A connection that must end but cannot write its close frame is
//!   dropped with its [`KillSwitch`].

pub mod wire;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix::fut::ActorFuture;
use actix::prelude::*;
use actix_http::ws::{CloseCode, Frame, Item, ProtocolError};
use actix_web::web::Payload;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use self::wire::FrameReader;
use crate::chat::{ChangeRequest, Chat, ChatError, Outgoing, Target};
use crate::outbox::{OutFrame, Outbox};
use crate::protocol::{parse_client_frame, ClientFrame, ErrorCode, ServerFrame};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::registry::SessionId;
use crate::server::{Connect, Disconnect, Membership, SessionHandle};
use crate::socket::KillSwitch;
use crate::store::{By, Change, MarkKind, NewRoom, Role, UserRoom};

/// Requests waiting behind the one in flight before the session stops reading.
pub const MAX_PENDING: usize = 32;

/// Timings of one session.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How often we ping the client.
    pub ping_interval: Duration,
    /// A client silent for this long (no frame, no pong) is dropped; one whose outbox
    /// has not moved for half of it is not reading and is closed with 1008.
    pub client_timeout: Duration,
}

impl Timings {
    /// How long the socket may take nothing while frames wait.
    pub fn grace(&self) -> Duration {
        self.client_timeout / 2
    }

    /// How long a closing connection may take to write its close frame before it is
    /// dropped: grace + a check + this stays within the client timeout.
    pub fn close_grace(&self) -> Duration {
        (self.client_timeout / 4).min(Duration::from_secs(2))
    }

    fn check_every(&self) -> Duration {
        self.ping_interval
            .min(self.client_timeout / 8)
            .max(Duration::from_millis(10))
    }
}

pub struct WsSession {
    sid: SessionId,
    uid: String,
    chat: Arc<Chat>,
    outbox: Arc<Outbox>,
    kill: Option<Arc<KillSwitch>>,
    timings: Timings,
    last_heard: Instant,
    last_ping: Instant,
    limiter: RateLimiter,
    /// A fragmented message being reassembled (text or not), bounded by the frame limit.
    fragments: Option<(bool, BytesMut)>,
    reader: Option<FrameReader<Payload>>,
    read_waker: Option<Waker>,
    requests: VecDeque<ClientFrame>,
    busy: bool,
    registered: bool,
    /// Close with this once the requests already taken are answered (a flooder's
    /// admitted burst is still served).
    close_when_done: Option<(CloseCode, &'static str)>,
}

impl WsSession {
    pub fn new(
        uid: String,
        chat: Arc<Chat>,
        timings: Timings,
        outbox: Arc<Outbox>,
        kill: Option<Arc<KillSwitch>>,
        payload: Payload,
    ) -> Self {
        let limits = &chat.limits;
        let now = Instant::now();
        WsSession {
            sid: chat.next_session_id(),
            uid,
            limiter: RateLimiter::new(
                limits.rate_per_sec,
                limits.rate_burst,
                limits.flood_strikes,
                now,
            ),
            reader: Some(FrameReader::new(payload, limits.max_frame_bytes)),
            chat,
            outbox,
            kill,
            timings,
            last_heard: now,
            last_ping: now,
            fragments: None,
            read_waker: None,
            requests: VecDeque::new(),
            busy: false,
            registered: false,
            close_when_done: None,
        }
    }

    fn write(&self, frame: ServerFrame<'_>) {
        if let ServerFrame::Error { code, .. } = &frame {
            self.chat.metrics.error(*code);
        }
        self.outbox.control(frame.to_text());
    }

    fn error(&self, code: ErrorCode, message: &str, client_id: Option<&str>) {
        log::debug!(
            "session {} ({}): {} {}",
            self.sid,
            self.uid,
            code.as_str(),
            message
        );
        self.write(ServerFrame::Error {
            code,
            message,
            client_id,
        });
    }

    fn chat_error(&self, e: &ChatError, client_id: Option<&str>) {
        if let ChatError::Unavailable(reason) = e {
            log::warn!(
                "store unavailable for {} (session {}): {reason}",
                self.uid,
                self.sid
            );
        }
        self.error(e.code(), &e.to_string(), client_id);
    }

    /// Ends the connection after what is queued (or at once: `now`).
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode, reason: &str, now: bool) {
        let code = u16::from(code);
        if now {
            self.outbox.close_now(code, reason);
        } else {
            self.outbox.close(code, reason);
        }
        self.stop_reading();
        ctx.stop();
    }

    fn stop_reading(&mut self) {
        self.reader = None;
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if now.duration_since(self.last_heard) > self.timings.client_timeout {
            log::info!(
                "session {} ({}): silent for {:?}, dropping",
                self.sid,
                self.uid,
                self.timings.client_timeout
            );
            self.close(ctx, CloseCode::Away, "client timeout", true);
            return;
        }
        if self.outbox.stalled(now) {
            log::info!(
                "session {} ({}): took nothing for {:?} while frames waited; closing with 1008",
                self.sid,
                self.uid,
                self.timings.grace()
            );
            self.chat.metrics.slow_consumers.inc();
            self.close(
                ctx,
                CloseCode::Policy,
                "not reading: outbound queue stalled",
                true,
            );
            return;
        }
        if now.duration_since(self.last_ping) >= self.timings.ping_interval {
            self.last_ping = now;
            self.outbox.raw(OutFrame::Ping(Bytes::new()));
        }
    }

    /// Registers the connection, then welcomes it. In a cluster the directory records
    /// the connection before the welcome, and the user's rooms are read again after it
    /// did: a join made on another node in between is either routed here (it saw the
    /// directory entry) or in the second read.
    fn register(&mut self, ctx: &mut Context<Self>) {
        let chat = self.chat.clone();
        let uid = self.uid.clone();
        let sid = self.sid;
        let handle = SessionHandle {
            outbox: self.outbox.clone(),
        };
        let fut = async move {
            let rooms = chat.rooms_of(&uid).await?;
            let recorded = chat
                .server
                .send(Connect {
                    sid,
                    uid: uid.clone(),
                    rooms: rooms.clone(),
                    handle,
                })
                .await
                .map_err(|e| ChatError::Unavailable(e.to_string()))?;
            let Some(recorded) = recorded else {
                return Ok(rooms);
            };
            match tokio::time::timeout(chat.timeout, recorded).await {
                Ok(Ok(true)) => {}
                _ => {
                    return Err(ChatError::Unavailable(
                        "the cluster directory did not record the connection in time".into(),
                    ))
                }
            }
            let now = chat.rooms_of(&uid).await?;
            follow_changes(&chat, &uid, &rooms, &now).await;
            Ok::<_, ChatError>(now)
        };
        ctx.spawn(fut.into_actor(self).map(|r, act, ctx| match r {
            Ok(rooms) => {
                log::debug!("session {} ({}) connected", act.sid, act.uid);
                let names: Vec<String> = rooms.into_iter().map(|r| r.room).collect();
                act.outbox.welcome(
                    ServerFrame::Welcome {
                        uid: &act.uid,
                        node: &act.chat.node_id,
                        rooms: &names,
                        epoch: act.chat.epoch(),
                    }
                    .to_text(),
                );
                act.registered = true;
                act.pump(ctx);
            }
            Err(e) => {
                // The close lets the error out; no welcome comes.
                act.chat_error(&e, None);
                act.close(ctx, CloseCode::Again, "store unavailable, try again", false);
            }
        }));
    }

    /// Starts the next request if none is in flight.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.registered || self.busy {
            return;
        }
        let Some(frame) = self.requests.pop_front() else {
            if let Some((code, reason)) = self.close_when_done.take() {
                self.close(ctx, code, reason, false);
            }
            return;
        };
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        self.busy = true;
        self.start(frame, ctx);
    }

    /// Runs `fut`, then `done` with its result, then the next request.
    fn run<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        fut: impl std::future::Future<Output = T> + 'static,
        done: impl FnOnce(&mut Self, T) + 'static,
    ) {
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            done(act, r);
            act.busy = false;
            act.pump(ctx);
        }));
    }

    fn start(&mut self, frame: ClientFrame, ctx: &mut Context<Self>) {
        let chat = self.chat.clone();
        let uid = self.uid.clone();
        let sid = self.sid;
        match frame {
            ClientFrame::Direct {
                to,
                body,
                client_id,
            } => self.send(Target::User(to), body, client_id, ctx),
            ClientFrame::Room {
                room,
                body,
                client_id,
            } => self.send(Target::Room(room), body, client_id, ctx),
            // A successful join, leave or create is answered by the ChatServer, with the
            // change itself (chat::Origin), so the answer comes before any later change.
            ClientFrame::Join { room } => self.run(
                ctx,
                async move { chat.join(&uid, &room, Some(sid)).await },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Leave { room } => self.run(
                ctx,
                async move { chat.leave(&uid, &room, Some(sid)).await },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Create { room, private } => self.run(
                ctx,
                async move {
                    let new = NewRoom {
                        room,
                        private,
                        owners: Vec::new(),
                        members: Vec::new(),
                    };
                    chat.create(&By::User(uid), new, Some(sid)).await
                },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Add {
                room,
                uid: who,
                role,
            } => {
                let role = match role.as_deref() {
                    None | Some("member") => Role::Member,
                    Some("owner") => Role::Owner,
                    Some(other) => {
                        self.error(
                            ErrorCode::Invalid,
                            &format!("role {other:?} must be member or owner"),
                            None,
                        );
                        self.busy = false;
                        return self.pump(ctx);
                    }
                };
                self.run(
                    ctx,
                    async move {
                        let r = chat.add(&By::User(uid), &room, &who, role).await;
                        (r, room, who)
                    },
                    move |act, (r, room, who)| match r {
                        Ok(()) => act.write(ServerFrame::Added {
                            room: &room,
                            uid: &who,
                            role: role.as_str(),
                        }),
                        Err(e) => act.chat_error(&e, None),
                    },
                )
            }
            ClientFrame::Remove {
                room,
                uid: who,
                ban,
            } => self.run(
                ctx,
                async move {
                    let r = chat.remove(&By::User(uid), &room, &who, ban).await;
                    (r, room, who)
                },
                move |act, (r, room, who)| match r {
                    Ok(()) => act.write(ServerFrame::Removed {
                        room: &room,
                        uid: &who,
                        ban,
                    }),
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::RoomInfo { room } => self.run(
                ctx,
                async move { chat.room_info(&By::User(uid), &room).await },
                |act, r| match r {
                    Ok(info) => act.write(ServerFrame::RoomInfo(&info)),
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::Sync { cursors } => self.run(
                ctx,
                async move { chat.sync(&uid, &cursors).await },
                |act, r| match r {
                    Ok(synced) => {
                        let mut n = 0;
                        for page in &synced.pages {
                            for m in &page.messages {
                                act.outbox.control(ServerFrame::Message(m).to_text());
                                n += 1;
                            }
                        }
                        act.chat.metrics.deliveries.inc_by(n);
                        act.write(ServerFrame::Synced { more: &synced.more });
                    }
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::History {
                conv,
                before,
                limit,
            } => self.run(
                ctx,
                async move { chat.history(&By::User(uid), &conv, before, limit).await },
                |act, r| match r {
                    Ok(page) => {
                        act.chat
                            .metrics
                            .deliveries
                            .inc_by(page.messages.len() as u64);
                        act.write(ServerFrame::History {
                            conv: &page.conv,
                            messages: &page.messages,
                            more: page.more,
                        });
                    }
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::Presence { uids, subscribe } => self.run(
                ctx,
                async move {
                    // Subscribed first: a change between the answer and the
                    // subscription would otherwise be missed.
                    if subscribe {
                        chat.subscribe(sid, &uids).await?;
                    }
                    chat.online(uids).await
                },
                |act, r| match r {
                    Ok(answers) => {
                        for (uid, online) in &answers {
                            act.write(ServerFrame::Presence {
                                room: None,
                                uid,
                                online: *online,
                            });
                        }
                    }
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::Inbox {
                limit,
                before,
                before_conv,
            } => self.run(
                ctx,
                async move { chat.inbox(&uid, limit, before, before_conv).await },
                |act, r| match r {
                    Ok((conversations, more)) => act.write(ServerFrame::Inbox {
                        conversations: &conversations,
                        more,
                    }),
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::Read { conv, seq } => self.run(
                ctx,
                async move { chat.mark(&uid, &conv, MarkKind::Read, seq, Some(sid)).await },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Delivered { conv, seq } => self.run(
                ctx,
                async move {
                    chat.mark(&uid, &conv, MarkKind::Delivered, seq, Some(sid))
                        .await
                },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Receipts { conv } => self.run(
                ctx,
                async move {
                    let r = chat.receipts(&By::User(uid), &conv).await;
                    (r, conv)
                },
                |act, (r, conv)| match r {
                    Ok((read, delivered)) => act.write(ServerFrame::Receipts {
                        conv: &conv,
                        read: &read,
                        delivered: &delivered,
                    }),
                    Err(e) => act.chat_error(&e, None),
                },
            ),
            ClientFrame::Typing { conv } => self.run(
                ctx,
                async move { chat.typing(&uid, &conv, Some(sid)).await },
                |act, r| {
                    if let Err(e) = r {
                        act.chat_error(&e, None);
                    }
                },
            ),
            ClientFrame::Edit {
                conv,
                seq,
                body,
                client_id,
            } => self.change(ctx, conv, Change::Edit(seq), Some(body), client_id),
            ClientFrame::Delete {
                conv,
                seq,
                client_id,
            } => self.change(ctx, conv, Change::Delete(seq), None, client_id),
        }
    }

    /// An `edit` or `delete` of one of the user's messages (or, for a room owner, of
    /// any message of the room).
    fn change(
        &mut self,
        ctx: &mut Context<Self>,
        conv: String,
        change: Change,
        body: Option<String>,
        client_id: String,
    ) {
        let (chat, uid, sid) = (self.chat.clone(), self.uid.clone(), self.sid);
        let cid = client_id.clone();
        self.run(
            ctx,
            async move {
                chat.change(ChangeRequest {
                    by: By::User(uid.clone()),
                    from: uid,
                    conv,
                    change,
                    body,
                    client_id: Some(client_id),
                    origin: Some(sid),
                })
                .await
            },
            move |act, r| match r {
                Ok(sent) => act.write(ServerFrame::Sent(&sent)),
                Err(e) => act.chat_error(&e, Some(&cid)),
            },
        )
    }

    fn send(&mut self, target: Target, body: String, client_id: String, ctx: &mut Context<Self>) {
        let out = Outgoing {
            from: self.uid.clone(),
            target,
            body,
            client_id: Some(client_id),
            origin: Some(self.sid),
            by: By::User(self.uid.clone()),
        };
        if let Err(e) = self.chat.validate(&out) {
            self.chat_error(&e, out.client_id.as_deref());
            self.busy = false;
            return self.pump(ctx);
        }
        let chat = self.chat.clone();
        let client_id = out.client_id.clone();
        self.run(
            ctx,
            async move { chat.send(out).await },
            move |act, r| match r {
                Ok(sent) => act.write(ServerFrame::Sent(&sent)),
                Err(e) => act.chat_error(&e, client_id.as_deref()),
            },
        );
    }

    fn admit(&mut self) -> bool {
        match self.limiter.check(Instant::now()) {
            Verdict::Allow => true,
            Verdict::Limited => {
                self.error(ErrorCode::RateLimited, "too many frames; slow down", None);
                false
            }
            Verdict::Flood => {
                log::info!(
                    "session {} ({}): flooding after rate_limited, closing",
                    self.sid,
                    self.uid
                );
                self.chat.metrics.flooders.inc();
                self.stop_reading();
                self.close_when_done = Some((CloseCode::Policy, "flooding"));
                false
            }
        }
    }

    /// One complete text message from the client.
    fn on_text(&mut self, text: &str) {
        match parse_client_frame(text) {
            Ok(frame) => self.requests.push_back(frame),
            Err(e) => self.error(e.code, &e.message, e.client_id.as_deref()),
        }
    }

    fn on_frame(&mut self, frame: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        let frame = match frame {
            Ok(f) => f,
            Err(ProtocolError::Overflow) => {
                log::info!(
                    "session {} ({}): frame over the size limit, closing with 1009",
                    self.sid,
                    self.uid
                );
                return self.close(ctx, CloseCode::Size, "frame too large", false);
            }
            Err(ProtocolError::Io(e)) => {
                log::debug!("session {} ({}): read failed: {e}", self.sid, self.uid);
                return self.close(ctx, CloseCode::Abnormal, "read failed", true);
            }
            Err(e) => {
                log::info!(
                    "session {} ({}): protocol error ({e}), closing with 1002",
                    self.sid,
                    self.uid
                );
                return self.close(ctx, CloseCode::Protocol, "protocol error", false);
            }
        };
        self.last_heard = Instant::now();
        match frame {
            Frame::Ping(p) => {
                self.outbox.raw(OutFrame::Pong(p));
            }
            Frame::Pong(_) => {}
            Frame::Text(bytes) => {
                if self.admit() {
                    self.text_bytes(&bytes, ctx);
                }
            }
            Frame::Binary(_) => {
                if self.admit() {
                    self.binary();
                }
            }
            Frame::Continuation(item) => self.on_fragment(item, ctx),
            Frame::Close(reason) => {
                let code = reason.map_or(CloseCode::Normal, |r| r.code);
                self.close(ctx, code, "", false);
            }
        }
        self.pump(ctx);
    }

    fn text_bytes(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.on_text(text),
            Err(_) => {
                log::info!(
                    "session {} ({}): text frame is not UTF-8, closing with 1007",
                    self.sid,
                    self.uid
                );
                self.close(ctx, CloseCode::Invalid, "text is not UTF-8", false);
            }
        }
    }

    fn binary(&self) {
        self.error(
            ErrorCode::Unsupported,
            "binary frames are not supported; send JSON text",
            None,
        );
    }

    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        let max = self.chat.limits.max_frame_bytes;
        let (first, data, last) = match item {
            Item::FirstText(d) => (Some(true), d, false),
            Item::FirstBinary(d) => (Some(false), d, false),
            Item::Continue(d) => (None, d, false),
            Item::Last(d) => (None, d, true),
        };
        if let Some(is_text) = first {
            self.fragments = Some((is_text, BytesMut::new()));
        }
        let Some((_, buf)) = &mut self.fragments else {
            return self.close(
                ctx,
                CloseCode::Protocol,
                "continuation without a start",
                false,
            );
        };
        if buf.len() + data.len() > max {
            self.fragments = None;
            return self.close(ctx, CloseCode::Size, "message too large", false);
        }
        buf.extend_from_slice(&data);
        if !last {
            return;
        }
        if let Some((is_text, buf)) = self.fragments.take() {
            if self.admit() {
                if is_text {
                    self.text_bytes(&buf, ctx);
                } else {
                    self.binary();
                }
            }
        }
    }
}

/// Makes this node follow memberships that changed between two reads of a user's rooms.
async fn follow_changes(chat: &Chat, uid: &str, before: &[UserRoom], now: &[UserRoom]) {
    let had = |room: &str| before.iter().any(|r| r.room == room);
    let has = |room: &str| now.iter().any(|r| r.room == room);
    let mut changes: Vec<(String, bool, Option<u64>)> = now
        .iter()
        .filter(|r| !had(&r.room))
        .map(|r| (r.room.clone(), true, Some(r.members)))
        .collect();
    changes.extend(
        before
            .iter()
            .filter(|r| !has(&r.room))
            .map(|r| (r.room.clone(), false, None)),
    );
    for (room, joined, members) in changes {
        let change = Membership {
            uid: uid.to_owned(),
            room,
            joined,
            members,
            by: None,
            origin: None,
        };
        if let Ok(Some(recorded)) = chat.server.send(change).await {
            let _ = tokio::time::timeout(chat.timeout, recorded).await;
        }
    }
}

/// Reads frames while the session can take requests.
struct Reading;

impl ActorFuture<WsSession> for Reading {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut WsSession,
        ctx: &mut Context<WsSession>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        loop {
            if act.requests.len() >= MAX_PENDING {
                act.read_waker = Some(task.waker().clone());
                return Poll::Pending;
            }
            let Some(reader) = act.reader.as_mut() else {
                return Poll::Ready(());
            };
            match Pin::new(reader).poll_next(task) {
                Poll::Ready(Some(frame)) => act.on_frame(frame, ctx),
                Poll::Ready(None) => {
                    // The client went away without a close frame.
                    act.reader = None;
                    ctx.stop();
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Actor for WsSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.chat.metrics.connections.inc();
        ctx.spawn(Reading);
        let outbox = self.outbox.clone();
        // Someone else (shutdown, a resync that chose to close) ended the connection.
        ctx.spawn(
            async move { outbox.closed().await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    act.stop_reading();
                    ctx.stop();
                }),
        );
        ctx.run_interval(self.timings.check_every(), |act, ctx| act.tick(ctx));
        self.register(ctx);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.chat.metrics.connections.dec();
        self.chat.metrics.connections_closed.inc();
        // Sent even if registration never finished: the ChatServer ignores a session it
        // does not know, and one whose Connect is still queued is removed right after.
        let disconnect = Disconnect { sid: self.sid };
        if let Err(SendError::Full(d)) = self.chat.server.try_send(disconnect) {
            self.chat.metrics.mailbox_full.inc();
            let server = self.chat.server.clone();
            actix_web::rt::spawn(async move {
                let _ = server.send(d).await;
            });
        }
        if !self.outbox.is_closing() {
            self.outbox.close(u16::from(CloseCode::Normal), "");
        }
        // A client that does not read never takes the close frame; then drop it.
        if let Some(kill) = self.kill.clone() {
            let outbox = self.outbox.clone();
            let grace = self.timings.close_grace();
            actix_web::rt::spawn(async move {
                if tokio::time::timeout(grace, outbox.ended()).await.is_err() {
                    kill.kill();
                }
            });
        }
        Running::Stop
    }
}
