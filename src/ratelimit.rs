//! Per-connection rate limiting: a token bucket for frames, and a second one for the
//! frames refused by the first, so that a client that backs off after `rate_limited` is
//! never closed while one that keeps flooding is.

use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
