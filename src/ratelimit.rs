//! Rate limiting. Per connection: a token bucket for frames, and a second one for the
//! frames refused by the first, so that a client that backs off after `rate_limited` is
//! never closed while one that keeps flooding is. Per user and conversation: the
//! [`TypingGate`] that lets one `typing` event a second through.

use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt as _};

/// A classic token bucket; time is passed in so the logic is testable without clocks.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        TokenBucket {
            capacity,
            per_sec,
            tokens: capacity,
            last: now,
        }
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer with `rate_limited`.
    Limited,
    /// Kept flooding after `rate_limited`: close with 1008.
    Flood,
}

#[derive(Debug, Clone)]
pub struct RateLimiter {
    frames: TokenBucket,
    strikes: TokenBucket,
}

/// How fast strikes are forgiven, per second.
const STRIKE_FORGIVENESS_PER_SEC: f64 = 5.0;

impl RateLimiter {
    pub fn new(per_sec: f64, burst: f64, strikes: f64, now: Instant) -> Self {
        RateLimiter {
            frames: TokenBucket::new(burst, per_sec, now),
            strikes: TokenBucket::new(strikes, STRIKE_FORGIVENESS_PER_SEC, now),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.frames.try_take(now) {
            Verdict::Allow
        } else if self.strikes.try_take(now) {
            Verdict::Limited
        } else {
            Verdict::Flood
        }
    }
}

/// At most one typing event per user and conversation per period. A node asks it both
/// for typing from its own connections (before forwarding to peers) and for typing
/// events that peers forwarded (before writing them to its connections), so the limit
/// holds cluster-wide even when a user types on two nodes at once: whatever reaches a
/// node's connections passed that node's gate. Time is passed in for tests.
#[derive(Debug)]
pub struct TypingGate {
    every: Duration,
    last: HashMap<(String, String), Instant>,
    /// Expired entries are dropped when the map grows past this (then it is set to
    /// twice what is left, so a busy node does not scan on every call).
    purge_at: usize,
}

/// The smallest size at which a [`TypingGate`] drops its expired entries.
const TYPING_PURGE_AT: usize = 10_000;

impl TypingGate {
    pub fn new(every: Duration) -> Self {
        TypingGate {
            every,
            last: HashMap::new(),
            purge_at: TYPING_PURGE_AT,
        }
    }

    /// True when this typing event of `uid` in `conv` may go (and then counts it).
    pub fn allow(&mut self, uid: &str, conv: &str, now: Instant) -> bool {
        if self.last.len() >= self.purge_at {
            let every = self.every;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < every);
            self.purge_at = (self.last.len() * 2).max(TYPING_PURGE_AT);
        }
        if let Some(at) = self.last.get_mut(&(uid.to_owned(), conv.to_owned())) {
            if now.saturating_duration_since(*at) < self.every {
                return false;
            }
            *at = now;
            return true;
        }
        self.last.insert((uid.to_owned(), conv.to_owned()), now);
        true
    }

    /// How many (user, conversation) pairs are remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3.0, 10.0, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(160)));
        // never more than capacity after a long pause
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_take(later) && b.try_take(later) && b.try_take(later));
        assert!(!b.try_take(later));
    }

    #[test]
    fn flooding_is_closed_backing_off_is_not() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100.0, 200.0, 50.0, t0);
        for _ in 0..200 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
        for _ in 0..50 {
            assert_eq!(r.check(t0), Verdict::Limited);
        }
        assert_eq!(r.check(t0), Verdict::Flood);

        // a client that waits after rate_limited recovers
        let mut r = RateLimiter::new(100.0, 200.0, 50.0, t0);
        for _ in 0..200 {
            r.check(t0);
        }
        assert_eq!(r.check(t0), Verdict::Limited);
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..200 {
            assert_eq!(r.check(t1), Verdict::Allow);
        }
    }

    #[test]
    fn steady_overload_is_closed() {
        // 200 frames/s against 100/s allowed: about half are refused, and the strikes
        // run out within a couple of seconds.
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100.0, 200.0, 50.0, t0);
        let mut closed_at = None;
        for i in 0..2000u64 {
            let now = t0 + Duration::from_micros(i * 5000);
            if r.check(now) == Verdict::Flood {
                closed_at = Some(i);
                break;
            }
        }
        let i = closed_at.expect("a steady flood must be closed");
        assert!(i < 1000, "closed after {i} frames");
    }

    #[test]
    fn typing_gate_one_a_second_per_user_and_conversation() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut g = TypingGate::new(Duration::from_secs(1));
        assert!(g.allow("bob", "dm:alice:bob", t0));
        // The same user and conversation: dropped until a second has passed, whichever
        // connection or node it came from (the gate does not know or care).
        assert!(!g.allow("bob", "dm:alice:bob", ms(1)));
        assert!(!g.allow("bob", "dm:alice:bob", ms(999)));
        // Others are not held up.
        assert!(g.allow("carol", "dm:alice:bob", ms(2)));
        assert!(g.allow("bob", "room:lobby", ms(3)));
        assert!(g.allow("bob", "dm:alice:bob", ms(1000)));
        // A dropped event does not restart the period.
        assert!(!g.allow("bob", "dm:alice:bob", ms(1500)));
        assert!(g.allow("bob", "dm:alice:bob", ms(2000)));
        // A burst of 20 within a second: one goes.
        let through = (0..20)
            .filter(|i| g.allow("dave", "dm:alice:dave", ms(3000 + i * 40)))
            .count();
        assert_eq!(through, 1);
    }

    #[test]
    fn typing_gate_forgets_old_entries() {
        let t0 = Instant::now();
        let mut g = TypingGate::new(Duration::from_secs(1));
        for i in 0..TYPING_PURGE_AT {
            assert!(g.allow(&format!("u{i}"), "room:big", t0));
        }
        assert_eq!(g.len(), TYPING_PURGE_AT);
        // Past the threshold and a second later, the expired ones go.
        let later = t0 + Duration::from_secs(2);
        assert!(g.allow("new", "room:big", later));
        assert_eq!(g.len(), 1);
        // Still-fresh entries are kept (and still limit): all of them within the period.
        let mut g = TypingGate::new(Duration::from_secs(1));
        for i in 0..TYPING_PURGE_AT {
            g.allow(&format!("u{i}"), "room:big", t0);
        }
        assert!(g.allow("new", "room:big", t0 + Duration::from_millis(10)));
        assert_eq!(g.len(), TYPING_PURGE_AT + 1);
        assert!(!g.allow("u0", "room:big", t0 + Duration::from_millis(20)));
    }
}
