//! One connection's outbound queue: everything the server writes to a websocket goes
//! through it, and the socket takes from it only as fast as the client reads.
//!
//! The ChatServer, the session and the peer API push frames in from any thread; the
//! connection's response body pulls them out when actix-http has room to write (see
//! [`crate::session::wire::OutboxBody`]). So what is queued here is exactly what the
//! socket has not taken yet, and the rules can tell a burst from a client that stopped
//! reading:
//!
//! - **A reading client is never closed.** Live messages beyond the bound are dropped
//!   (they are stored) and the connection is sent `resync` once it has caught up, so it
//!   syncs what it missed. Answers to its own requests are never dropped (there is one
//!   request in flight per connection, so they are bounded by a page).
//! - **The bound counts time, not a momentary pile-up.** Messages over the bound are
//!   dropped only while the oldest frame waiting has waited longer than a grace
//!   ([`OutboxLimits::drop_grace`]): a burst the socket is taking is kept whole. A hard
//!   cap far above the bound ([`HARD_CAP_FACTOR`] times it) holds whatever the age, so
//!   memory stays bounded.
//! - **Presence never counts against a client.** Presence events are kept as the latest
//!   state per (room, uid): a crowd coming online costs one entry per member, however
//!   often they flap.
//! - **A client that does not read is found by time**, not by size: something has been
//!   waiting and the socket has taken nothing for the grace period ([`Outbox::stalled`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// A frame to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    Text(ByteString),
    Ping(Bytes),
    Pong(Bytes),
}

impl OutFrame {
    fn len(&self) -> usize {
        match self {
            OutFrame::Text(t) => t.len(),
            OutFrame::Ping(b) | OutFrame::Pong(b) => b.len(),
        }
    }
}

/// How the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    pub reason: String,
}

/// What one pull took.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub frames: Vec<OutFrame>,
    /// Live message frames among them (for the deliveries metric).
    pub messages: u64,
    /// A `resync` is among them (the connection overflowed its bound and caught up).
    pub resync: bool,
    /// Send this close frame after the frames; the connection then ends.
    pub close: Option<Closing>,
}

/// What pushing a live message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Over the bound: dropped, and the connection will be told to resync.
    Dropped,
    /// The connection is closing or closed: nothing queued.
    Closed,
}

#[derive(Debug)]
struct Entry {
    frame: OutFrame,
    message: bool,
    /// When it was queued.
    at: Instant,
}

#[derive(Debug)]
struct State {
    /// The `welcome`, which goes before everything queued. Kept apart from the queue so
    /// that an idle connection holds no queue buffer (measured: 0.2 KiB of the RSS of
    /// an idle websocket).
    welcome: Option<ByteString>,
    queue: VecDeque<Entry>,
    /// Live message frames in `queue`.
    messages: usize,
    /// Bytes of those live message frames (a frame shared with other connections
    /// counts in full here: an upper bound on what this connection holds).
    message_bytes: usize,
    /// Latest presence per (room, uid) not yet written: the frame's JSON.
    presence: BTreeMap<(Option<String>, String), ByteString>,
    /// Messages were dropped: send `resync` once the queue is down to half the bound.
    resync_due: bool,
    /// Before `welcome`: nothing is taken yet (but everything is kept).
    held: bool,
    /// Send this after what is queued, then end.
    close: Option<Closing>,
    /// The close frame was taken: the body has ended.
    finished: bool,
    /// When the socket last took something, or the queue last became non-empty.
    last_progress: Instant,
}

/// Live message frames one outbox holds at most, whatever their age, as a multiple
/// of [`OutboxLimits::max_messages`].
pub const HARD_CAP_FACTOR: usize = 8;
/// Bytes of live message frames one outbox holds at most, whatever their age: a slow
/// reader of large bodies holds at most this much (the count cap alone would allow
/// 8 x 1,024 frames of up to the max frame size).
pub const HARD_CAP_BYTES: usize = 4 * 1024 * 1024;

/// Bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Live message frames kept waiting before new ones may be dropped (and resync
    /// sent)...
    pub max_messages: usize,
    /// ...once the oldest frame waiting has waited longer than this.
    pub drop_grace: Duration,
    /// A client that takes nothing for this long while something waits is not reading.
    pub grace: Duration,
}

impl OutboxLimits {
    /// Live message frames held at most, however young.
    pub fn hard_cap(&self) -> usize {
        self.max_messages.saturating_mul(HARD_CAP_FACTOR)
    }
}

pub struct Outbox {
    state: Mutex<State>,
    limits: OutboxLimits,
    /// The response body's task, woken when there is something to take.
    waker: AtomicWaker,
    /// Wakes the session when someone else asked to close the connection.
    closing: Notify,
    /// Wakes whoever waits for the close frame to be taken.
    ended: Notify,
}

/// The frame a connection gets when it may have missed live messages.
pub const RESYNC_FRAME: &str = r#"{"type":"resync"}"#;

impl Outbox {
    pub fn new(limits: OutboxLimits) -> Self {
        Outbox {
            state: Mutex::new(State {
                welcome: None,
                queue: VecDeque::new(),
                messages: 0,
                message_bytes: 0,
                presence: BTreeMap::new(),
                resync_due: false,
                held: true,
                close: None,
                finished: false,
                last_progress: Instant::now(),
            }),
            limits,
            waker: AtomicWaker::new(),
            closing: Notify::new(),
            ended: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can panic while the lock is held; if something did, the queue
        // is still a queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a live message pushed at `now` is dropped: over the hard cap, or over
    /// the bound while the socket has left the oldest frame waiting past the grace.
    fn over_bound(&self, s: &State, len: usize, now: Instant) -> bool {
        if s.messages >= self.limits.hard_cap() || s.message_bytes + len > HARD_CAP_BYTES {
            return true;
        }
        s.messages >= self.limits.max_messages
            && s.queue
                .front()
                .is_some_and(|e| now.saturating_duration_since(e.at) > self.limits.drop_grace)
    }

    fn push(&self, frame: OutFrame, message: bool, now: Instant) -> Pushed {
        let mut s = self.lock();
        if s.close.is_some() {
            return Pushed::Closed;
        }
        let len = frame.len();
        if message && self.over_bound(&s, len, now) {
            s.resync_due = true;
            return Pushed::Dropped;
        }
        if s.queue.is_empty() && s.presence.is_empty() {
            s.last_progress = now;
        }
        s.queue.push_back(Entry {
            frame,
            message,
            at: now,
        });
        if message {
            s.messages += 1;
            s.message_bytes += len;
        }
        drop(s);
        self.waker.wake();
        Pushed::Queued
    }

    /// A live message (droppable: it is stored and the client will resync).
    pub fn message(&self, text: ByteString) -> Pushed {
        self.message_at(text, Instant::now())
    }

    fn message_at(&self, text: ByteString, now: Instant) -> Pushed {
        self.push(OutFrame::Text(text), true, now)
    }

    /// An answer or event that must not be dropped.
    pub fn control(&self, text: ByteString) -> bool {
        self.push(OutFrame::Text(text), false, Instant::now()) == Pushed::Queued
    }

    /// A websocket ping or pong.
    pub fn raw(&self, frame: OutFrame) -> bool {
        self.push(frame, false, Instant::now()) == Pushed::Queued
    }

    /// A presence event: replaces any not yet written for the same (room, uid).
    pub fn presence(&self, room: Option<&str>, uid: &str, frame: ByteString) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        if s.queue.is_empty() && s.presence.is_empty() {
            s.last_progress = Instant::now();
        }
        s.presence
            .insert((room.map(str::to_owned), uid.to_owned()), frame);
        drop(s);
        self.waker.wake();
    }

    /// Tells the connection to sync (it may have missed live messages): once now,
    /// however often it is asked before the client has taken it.
    pub fn resync(&self) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.resync_due = true;
        }
        drop(s);
        self.waker.wake();
    }

    /// Queues `welcome` ahead of everything pushed so far and lets frames out: until
    /// then the outbox only collects, so no message overtakes the welcome.
    pub fn welcome(&self, text: ByteString) {
        let mut s = self.lock();
        s.welcome = Some(text);
        s.held = false;
        s.last_progress = Instant::now();
        drop(s);
        self.waker.wake();
    }

    /// Ends the connection with this close frame, after what is queued. The first
    /// close asked for wins.
    pub fn close(&self, code: u16, reason: &str) {
        self.close_inner(code, reason, false);
    }

    /// Ends the connection with this close frame before anything still queued (the
    /// client is not reading it anyway).
    pub fn close_now(&self, code: u16, reason: &str) {
        self.close_inner(code, reason, true);
    }

    fn close_inner(&self, code: u16, reason: &str, drop_queue: bool) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(Closing {
                code,
                reason: reason.to_owned(),
            });
        }
        if drop_queue {
            s.welcome = None;
            s.queue.clear();
            s.messages = 0;
            s.message_bytes = 0;
            s.presence.clear();
        }
        s.held = false;
        drop(s);
        self.waker.wake();
        self.closing.notify_waiters();
    }

    /// Resolves once someone asked to close the connection.
    pub async fn closed(&self) {
        loop {
            let notified = self.closing.notified();
            if self.lock().close.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once the close frame was taken (the response body has ended).
    pub async fn ended(&self) {
        loop {
            let notified = self.ended.notified();
            if self.lock().finished {
                return;
            }
            notified.await;
        }
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// The close frame has gone out (the response body has ended).
    pub fn finished(&self) -> bool {
        self.lock().finished
    }

    /// Something waits and the socket has taken nothing for the grace period.
    pub fn stalled(&self, now: Instant) -> bool {
        let s = self.lock();
        let waiting = s.welcome.is_some()
            || !s.queue.is_empty()
            || !s.presence.is_empty()
            || s.close.is_some();
        waiting && !s.held && !s.finished && now.duration_since(s.last_progress) > self.limits.grace
    }

    /// Live message frames waiting.
    pub fn queued_messages(&self) -> usize {
        self.lock().messages
    }

    /// Registers the body's task to be woken when there is something to take.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Takes up to about `budget` bytes of frames, for the socket.
    pub fn take(&self, budget: usize) -> Taken {
        let mut s = self.lock();
        let mut taken = Taken::default();
        if s.held || s.finished {
            return taken;
        }
        let mut used = 0;
        if let Some(welcome) = s.welcome.take() {
            used += welcome.len();
            taken.frames.push(OutFrame::Text(welcome));
        }
        while used < budget {
            let Some(entry) = s.queue.pop_front() else {
                break;
            };
            used += entry.frame.len();
            if entry.message {
                s.messages -= 1;
                s.message_bytes -= entry.frame.len();
                taken.messages += 1;
            }
            taken.frames.push(entry.frame);
        }
        while used < budget {
            let Some((_, frame)) = s.presence.pop_first() else {
                break;
            };
            used += frame.len();
            taken.frames.push(OutFrame::Text(frame));
        }
        if s.resync_due && s.messages <= self.limits.max_messages / 2 && s.close.is_none() {
            s.resync_due = false;
            taken.resync = true;
            taken
                .frames
                .push(OutFrame::Text(ByteString::from_static(RESYNC_FRAME)));
        }
        if s.queue.is_empty() && s.presence.is_empty() {
            if let Some(close) = s.close.clone() {
                s.finished = true;
                taken.close = Some(close);
                self.ended.notify_waiters();
            }
        }
        if !taken.frames.is_empty() || taken.close.is_some() {
            s.last_progress = Instant::now();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROP_GRACE: Duration = Duration::from_millis(1000);

    fn outbox(max: usize) -> Outbox {
        Outbox::new(OutboxLimits {
            max_messages: max,
            drop_grace: DROP_GRACE,
            grace: Duration::from_millis(50),
        })
    }

    fn texts(t: &Taken) -> Vec<String> {
        t.frames
            .iter()
            .map(|f| match f {
                OutFrame::Text(t) => t.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn nothing_before_welcome_and_welcome_first() {
        let o = outbox(10);
        assert_eq!(o.message("m1".into()), Pushed::Queued);
        assert!(o.take(1000).frames.is_empty(), "held until welcome");
        o.welcome("welcome".into());
        assert_eq!(texts(&o.take(1000)), vec!["welcome", "m1"]);
    }

    #[test]
    fn a_burst_over_the_bound_drops_messages_and_resyncs_once_caught_up() {
        let o = outbox(4);
        o.welcome("w".into());
        o.take(1000);
        let t0 = Instant::now();
        let late = t0 + DROP_GRACE + Duration::from_millis(1);
        for i in 0..10 {
            let at = if i < 4 { t0 } else { late };
            o.message_at(format!("m{i}").into(), at);
        }
        assert!(o.control("answer".into()), "answers are never dropped");
        let first = o.take(4);
        assert_eq!(
            texts(&first),
            vec!["m0", "m1", RESYNC_FRAME],
            "a budget bounds one pull; resync comes once the queue is down to half"
        );
        let rest = o.take(1000);
        assert_eq!(texts(&rest), vec!["m2", "m3", "answer"]);
        assert_eq!(first.messages + rest.messages, 4);
        assert!(o.take(1000).frames.is_empty(), "resync is sent once");
    }

    #[test]
    fn a_pile_up_the_socket_is_taking_is_kept_whole() {
        let o = outbox(4);
        o.welcome("w".into());
        o.take(1000);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // twice the bound at once: nothing has waited yet
        for i in 0..8 {
            assert_eq!(o.message_at(format!("a{i}").into(), t0), Pushed::Queued);
        }
        // more while the oldest has waited 900 ms: kept
        for i in 0..4 {
            assert_eq!(
                o.message_at(format!("b{i}").into(), t0 + ms(900)),
                Pushed::Queued
            );
        }
        // the socket takes the a's
        let t = o.take(16);
        assert_eq!(t.messages, 8);
        assert!(!t.resync, "nothing was dropped");
        assert_eq!(
            o.message_at("c".into(), t0 + ms(1500)),
            Pushed::Queued,
            "at the bound, but the oldest waiting (b0) waited 600 ms"
        );
        // nobody takes anything: past the grace, over the bound is dropped
        assert_eq!(
            o.message_at("d".into(), t0 + ms(1901)),
            Pushed::Dropped,
            "b0 has waited 1001 ms"
        );
        let t = o.take(1000);
        assert_eq!(texts(&t), vec!["b0", "b1", "b2", "b3", "c", RESYNC_FRAME]);
    }

    #[test]
    fn the_hard_cap_holds_however_young_the_queue() {
        let o = outbox(4);
        o.welcome("w".into());
        o.take(1000);
        let t0 = Instant::now();
        for i in 0..4 * HARD_CAP_FACTOR {
            assert_eq!(o.message_at(format!("m{i}").into(), t0), Pushed::Queued);
        }
        assert_eq!(o.message_at("over".into(), t0), Pushed::Dropped);
        assert_eq!(o.queued_messages(), 4 * HARD_CAP_FACTOR);
        let t = o.take(usize::MAX);
        assert!(t.resync, "told to sync what the cap dropped");
    }

    #[test]
    fn the_byte_cap_holds_however_young_the_queue() {
        let o = outbox(1_000_000);
        o.welcome("w".into());
        o.take(1000);
        let t0 = Instant::now();
        let big: ByteString = "x".repeat(64 * 1024).into();
        let fit = HARD_CAP_BYTES / big.len();
        for _ in 0..fit {
            assert_eq!(o.message_at(big.clone(), t0), Pushed::Queued);
        }
        assert_eq!(o.message_at(big.clone(), t0), Pushed::Dropped);
        // control frames are never dropped, whatever the bytes
        assert!(o.control(big.clone()));
        let t = o.take(usize::MAX);
        assert_eq!(t.messages, fit as u64);
        assert!(t.resync, "told to sync what the cap dropped");
        // once taken, there is room again
        assert_eq!(o.message_at(big, t0), Pushed::Queued);
    }

    #[test]
    fn presence_is_coalesced_and_never_dropped() {
        let o = outbox(1);
        o.welcome("w".into());
        o.take(1000);
        for i in 0..100 {
            o.presence(Some("r"), &format!("u{}", i % 3), format!("p{i}").into());
        }
        o.presence(None, "u0", "direct".into());
        let t = o.take(1000);
        assert_eq!(texts(&t), vec!["direct", "p99", "p97", "p98"]);
    }

    #[test]
    fn stalled_means_waiting_and_nothing_taken_for_the_grace() {
        let o = outbox(10);
        o.welcome("w".into());
        let t0 = Instant::now();
        o.take(1000);
        assert!(!o.stalled(t0 + Duration::from_secs(5)), "nothing waiting");
        o.message("m".into());
        assert!(!o.stalled(Instant::now()));
        assert!(o.stalled(Instant::now() + Duration::from_millis(100)));
        o.take(1000);
        assert!(!o.stalled(Instant::now() + Duration::from_millis(40)));
    }

    #[test]
    fn close_goes_after_the_queue_or_now() {
        let o = outbox(10);
        o.welcome("w".into());
        o.message("m".into());
        o.close(1012, "restart");
        assert_eq!(o.message("late".into()), Pushed::Closed);
        let t = o.take(1000);
        assert_eq!(texts(&t), vec!["w", "m"]);
        assert_eq!(t.close.map(|c| c.code), Some(1012));
        assert!(o.finished());
        let o = outbox(10);
        o.welcome("w".into());
        o.message("m".into());
        o.close_now(1008, "not reading");
        let t = o.take(1000);
        assert!(t.frames.is_empty());
        assert_eq!(t.close.map(|c| c.code), Some(1008));
    }
}
