//! One websocket connection: the WsSession actor.
//!
//! It parses frames, enforces the per-connection limits, runs each request through
//! [`Chat`] and writes the answers. Requests are handled one at a time (`ctx.wait`), so a
//! client's sends are stored in the order it sent them and a slow store slows only the
//! connections that use it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::{self, CloseCode, CloseReason, ProtocolError};
use bytes::{Bytes, BytesMut};

use crate::chat::{Chat, ChatError, Send, Target};
use crate::protocol::{parse_client_frame, ClientFrame, ErrorCode, ServerFrame};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::registry::SessionId;
use crate::server::{Close, Connect, Deliver, Disconnect, SessionHandle};

/// Timings of one session.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How often we ping the client.
    pub ping_interval: Duration,
    /// A client silent for this long (no frame, no pong) is dropped.
    pub client_timeout: Duration,
}

pub struct WsSession {
    sid: SessionId,
    uid: String,
    chat: Arc<Chat>,
    timings: Timings,
    last_heard: Instant,
    limiter: RateLimiter,
    overflowed: Arc<AtomicBool>,
    /// A fragmented message being reassembled (text only), bounded by the frame limit.
    fragments: Option<(bool, BytesMut)>,
}

impl WsSession {
    pub fn new(uid: String, chat: Arc<Chat>, timings: Timings) -> Self {
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
            chat,
            timings,
            last_heard: now,
            overflowed: Arc::new(AtomicBool::new(false)),
            fragments: None,
        }
    }

    fn write(&self, ctx: &mut ws::WebsocketContext<Self>, frame: ServerFrame<'_>) {
        if let ServerFrame::Error { code, .. } = &frame {
            self.chat.metrics.error(*code);
        }
        ctx.text(frame.to_text());
    }

    fn error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: ErrorCode,
        message: &str,
        client_id: Option<&str>,
    ) {
        log::debug!(
            "session {} ({}): {} {}",
            self.sid,
            self.uid,
            code.as_str(),
            message
        );
        self.write(
            ctx,
            ServerFrame::Error {
                code,
                message,
                client_id,
            },
        );
    }

    fn chat_error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        e: &ChatError,
        client_id: Option<&str>,
    ) {
        if let ChatError::Unavailable(reason) = e {
            log::warn!(
                "store unavailable for {} (session {}): {reason}",
                self.uid,
                self.sid
            );
        }
        self.error(ctx, e.code(), &e.to_string(), client_id);
    }

    fn close(&self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        ctx.close(Some(CloseReason {
            code,
            description: Some(reason.to_owned()),
        }));
        ctx.stop();
    }

    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        ctx.run_interval(self.timings.ping_interval, |act, ctx| {
            if act.last_heard.elapsed() > act.timings.client_timeout {
                log::info!(
                    "session {} ({}): no pong for {:?}, dropping",
                    act.sid,
                    act.uid,
                    act.timings.client_timeout
                );
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
    }

    /// One complete text frame from the client.
    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let frame = match parse_client_frame(text) {
            Ok(f) => f,
            Err(e) => {
                self.error(ctx, e.code, &e.message, e.client_id.as_deref());
                return;
            }
        };
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
            ClientFrame::Join { room } => self.membership(room, true, ctx),
            ClientFrame::Leave { room } => self.membership(room, false, ctx),
            ClientFrame::Sync { cursors } => {
                let chat = self.chat.clone();
                let uid = self.uid.clone();
                ctx.wait(
                    async move { chat.sync(&uid, &cursors).await }
                        .into_actor(self)
                        .map(|r, act, ctx| match r {
                            Ok(synced) => {
                                let mut n = 0;
                                for page in &synced.pages {
                                    for m in &page.messages {
                                        ctx.text(ServerFrame::Message(m).to_text());
                                        n += 1;
                                    }
                                }
                                act.chat.metrics.deliveries.inc_by(n);
                                act.write(ctx, ServerFrame::Synced { more: &synced.more });
                            }
                            Err(e) => act.chat_error(ctx, &e, None),
                        }),
                );
            }
            ClientFrame::History {
                conv,
                before,
                limit,
            } => {
                let chat = self.chat.clone();
                let uid = self.uid.clone();
                ctx.wait(
                    async move { chat.history(Some(&uid), &conv, before, limit).await }
                        .into_actor(self)
                        .map(|r, act, ctx| match r {
                            Ok(page) => {
                                act.chat
                                    .metrics
                                    .deliveries
                                    .inc_by(page.messages.len() as u64);
                                act.write(
                                    ctx,
                                    ServerFrame::History {
                                        conv: &page.conv,
                                        messages: &page.messages,
                                        more: page.more,
                                    },
                                );
                            }
                            Err(e) => act.chat_error(ctx, &e, None),
                        }),
                );
            }
            ClientFrame::Presence { uids } => {
                let chat = self.chat.clone();
                ctx.wait(async move { chat.online(uids).await }.into_actor(self).map(
                    |r, act, ctx| match r {
                        Ok(answers) => {
                            for (uid, online) in &answers {
                                act.write(
                                    ctx,
                                    ServerFrame::Presence {
                                        room: None,
                                        uid,
                                        online: *online,
                                    },
                                );
                            }
                        }
                        Err(e) => act.chat_error(ctx, &e, None),
                    },
                ));
            }
        }
    }

    fn membership(&mut self, room: String, joined: bool, ctx: &mut ws::WebsocketContext<Self>) {
        let chat = self.chat.clone();
        let uid = self.uid.clone();
        ctx.wait(
            async move {
                let r = chat.change_membership(&uid, &room, joined).await;
                (r, room)
            }
            .into_actor(self)
            .map(move |(r, room), act, ctx| match r {
                Ok(()) if joined => act.write(ctx, ServerFrame::Joined { room: &room }),
                Ok(()) => act.write(ctx, ServerFrame::Left { room: &room }),
                Err(e) => act.chat_error(ctx, &e, None),
            }),
        );
    }

    fn send(
        &mut self,
        target: Target,
        body: String,
        client_id: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let send = Send {
            from: self.uid.clone(),
            target,
            body,
            client_id: Some(client_id),
            origin: Some(self.sid),
            require_member: true,
        };
        if let Err(e) = self.chat.validate(&send) {
            self.chat_error(ctx, &e, send.client_id.as_deref());
            return;
        }
        let chat = self.chat.clone();
        let client_id = send.client_id.clone();
        ctx.wait(
            async move { chat.send(send).await }
                .into_actor(self)
                .map(move |r, act, ctx| match r {
                    Ok(sent) => act.write(ctx, ServerFrame::Sent(&sent)),
                    Err(e) => act.chat_error(ctx, &e, client_id.as_deref()),
                }),
        );
    }

    fn admit(&mut self, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        match self.limiter.check(Instant::now()) {
            Verdict::Allow => true,
            Verdict::Limited => {
                self.error(
                    ctx,
                    ErrorCode::RateLimited,
                    "too many frames; slow down",
                    None,
                );
                false
            }
            Verdict::Flood => {
                log::warn!(
                    "session {} ({}): flooding after rate_limited, closing",
                    self.sid,
                    self.uid
                );
                self.chat.metrics.flooders.inc();
                self.close(ctx, CloseCode::Policy, "flooding");
                false
            }
        }
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The mailbox is this connection's outbound queue: the ChatServer uses try_send,
        // so a client that stops reading fills it and is closed instead of growing it.
        ctx.set_mailbox_capacity(self.chat.limits.outbound_queue);
        self.chat.metrics.connections.inc();
        self.heartbeat(ctx);
        let chat = self.chat.clone();
        let uid = self.uid.clone();
        let sid = self.sid;
        let handle = SessionHandle {
            deliver: ctx.address().recipient(),
            close: ctx.address().recipient(),
            overflowed: self.overflowed.clone(),
        };
        // Nothing else is processed until the session is registered and welcomed, so no
        // message frame can overtake the welcome.
        ctx.wait(
            async move {
                let rooms = chat.rooms_of(&uid).await?;
                chat.server
                    .send(Connect {
                        sid,
                        uid: uid.clone(),
                        rooms: rooms.clone(),
                        handle,
                    })
                    .await
                    .map_err(|e| ChatError::Unavailable(e.to_string()))?;
                // Registered here first, then in the directory: from then on every
                // stored message that concerns this user is routed to this node.
                if let Some(cluster) = &chat.cluster {
                    cluster.connected(&uid, sid, &rooms).await?;
                }
                Ok::<_, ChatError>(rooms)
            }
            .into_actor(self)
            .map(|r, act, ctx| match r {
                Ok(rooms) => {
                    log::debug!("session {} ({}) connected", act.sid, act.uid);
                    let node = act.chat.node_id.clone();
                    act.write(
                        ctx,
                        ServerFrame::Welcome {
                            uid: &act.uid,
                            node: &node,
                            rooms: &rooms,
                        },
                    );
                }
                Err(e) => {
                    act.chat_error(ctx, &e, None);
                    act.close(ctx, CloseCode::Again, "store unavailable, try again");
                }
            }),
        );
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.chat.metrics.connections.dec();
        // Sent even if registration never finished: the ChatServer ignores a session it
        // does not know, and one whose Connect is still queued is removed right after.
        self.chat.server.do_send(Disconnect { sid: self.sid });
        Running::Stop
    }
}

impl Handler<Deliver> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        if self.overflowed.load(Ordering::Relaxed) {
            return;
        }
        if msg.is_message {
            self.chat.metrics.deliveries.inc();
        }
        ctx.text(msg.frame);
    }
}

impl Handler<Close> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        self.close(ctx, msg.code, msg.reason);
    }
}

impl StreamHandler<Result<ws::Message, ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<ws::Message, ProtocolError>, ctx: &mut Self::Context) {
        let msg = match msg {
            Ok(m) => m,
            Err(ProtocolError::Overflow) => {
                log::info!(
                    "session {} ({}): frame over the size limit, closing",
                    self.sid,
                    self.uid
                );
                self.close(ctx, CloseCode::Size, "frame too large");
                return;
            }
            Err(e) => {
                log::info!(
                    "session {} ({}): protocol error {e}, closing",
                    self.sid,
                    self.uid
                );
                self.close(ctx, CloseCode::Protocol, "protocol error");
                return;
            }
        };
        self.last_heard = Instant::now();
        match msg {
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) => {}
            ws::Message::Text(text) => {
                if self.admit(ctx) {
                    self.on_text(&text, ctx);
                }
            }
            ws::Message::Binary(_) => {
                if self.admit(ctx) {
                    self.error(
                        ctx,
                        ErrorCode::Unsupported,
                        "binary frames are not supported; send JSON text",
                        None,
                    );
                }
            }
            ws::Message::Continuation(item) => self.on_fragment(item, ctx),
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl WsSession {
    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let max = self.chat.limits.max_frame_bytes;
        let append = |act: &mut Self, data: &Bytes| -> bool {
            if let Some((_, buf)) = &mut act.fragments {
                if buf.len() + data.len() > max {
                    return false;
                }
                buf.extend_from_slice(data);
            }
            true
        };
        let ok = match item {
            actix_http::ws::Item::FirstText(data) => {
                self.fragments = Some((true, BytesMut::new()));
                append(self, &data)
            }
            actix_http::ws::Item::FirstBinary(data) => {
                self.fragments = Some((false, BytesMut::new()));
                append(self, &data)
            }
            actix_http::ws::Item::Continue(data) => append(self, &data),
            actix_http::ws::Item::Last(data) => {
                if !append(self, &data) {
                    false
                } else {
                    if let Some((is_text, buf)) = self.fragments.take() {
                        if self.admit(ctx) {
                            if is_text {
                                match std::str::from_utf8(&buf) {
                                    Ok(text) => self.on_text(text, ctx),
                                    Err(_) => {
                                        self.close(ctx, CloseCode::Invalid, "text is not UTF-8")
                                    }
                                }
                            } else {
                                self.error(
                                    ctx,
                                    ErrorCode::Unsupported,
                                    "binary frames are not supported; send JSON text",
                                    None,
                                );
                            }
                        }
                    }
                    true
                }
            }
        };
        if !ok {
            self.fragments = None;
            self.close(ctx, CloseCode::Size, "message too large");
        }
    }
}
