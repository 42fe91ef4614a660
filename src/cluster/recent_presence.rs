//! This node's presence announcements of the last node TTL, replayed to a peer that
//! appears in its live table. Plain data, unit-tested; the ClusterBridge records and
//! replays.
//!
//! Why: a node announces presence to the peers in its live table, and learns of a new
//! peer only at its own next heartbeat. A node that just started (or came back) takes
//! connections as soon as it registered, so its clients may subscribe to, or share a
//! room with, a user whose presence changes before every other node has it in their
//! table. Those announcements never reached it, and its clients would show the user as
//! they were until the user's next change, which may be hours away. A node sees a new
//! peer at most one heartbeat (plus the time a heartbeat may take) after it
//! registered, and the node TTL is at least three heartbeats, so the announcements of
//! the last TTL cover every one the new peer may have missed. They go as rechecks: by
//! the time one arrives, another node may have announced a newer change of the same
//! user, so the receiver reads the user's presence from the directory and gives its
//! connections that. Rechecking a few it did get is harmless: presence frames carry a
//! state, not a change to apply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::PresenceEvent;

/// The latest announcement per user, kept for `window`. At most one entry per user
/// this node announced within the window, so it is bounded by the users that
/// connected to or left this node in one TTL.
pub struct RecentPresence {
    window: Duration,
    latest: HashMap<String, (Instant, u64, Arc<PresenceEvent>)>,
    /// Order of recording, so a replay keeps the order the announcements had.
    next: u64,
}

impl RecentPresence {
    pub fn new(window: Duration) -> Self {
        RecentPresence {
            window,
            latest: HashMap::new(),
            next: 0,
        }
    }

    /// An announcement made at `now`; it replaces the user's earlier one.
    pub fn record(&mut self, event: Arc<PresenceEvent>, now: Instant) {
        self.next += 1;
        self.latest
            .insert(event.uid.clone(), (now, self.next, event));
    }

    /// Forgets announcements older than the window.
    pub fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.latest
            .retain(|_, (at, _, _)| now.saturating_duration_since(*at) <= window);
    }

    /// The announcements of the window, oldest first, marked `recheck`: by now another
    /// node may have announced a newer change of the same user to the receiver.
    pub fn replay(&mut self, now: Instant) -> Vec<Arc<PresenceEvent>> {
        self.prune(now);
        let mut events: Vec<_> = self.latest.values().collect();
        events.sort_unstable_by_key(|(_, n, _)| *n);
        events
            .into_iter()
            .map(|(_, _, e)| {
                Arc::new(PresenceEvent {
                    recheck: true,
                    ..PresenceEvent::clone(e)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(uid: &str, online: bool) -> Arc<PresenceEvent> {
        Arc::new(PresenceEvent {
            uid: uid.into(),
            online,
            rooms: vec!["lobby".into()],
            recheck: false,
        })
    }

    fn summary(events: &[Arc<PresenceEvent>]) -> Vec<(String, bool)> {
        assert!(events.iter().all(|e| e.recheck), "replays are rechecks");
        events.iter().map(|e| (e.uid.clone(), e.online)).collect()
    }

    #[test]
    fn replays_each_users_latest_announcement_in_the_order_made() {
        let mut r = RecentPresence::new(Duration::from_secs(3));
        let t0 = Instant::now();
        r.record(event("alice", true), t0);
        r.record(event("bob", true), t0);
        r.record(event("alice", false), t0 + Duration::from_secs(1));
        r.record(event("carol", true), t0 + Duration::from_secs(1));
        assert_eq!(
            summary(&r.replay(t0 + Duration::from_secs(2))),
            vec![
                ("bob".into(), true),
                ("alice".into(), false),
                ("carol".into(), true)
            ]
        );
    }

    #[test]
    fn forgets_what_is_older_than_the_window() {
        let mut r = RecentPresence::new(Duration::from_secs(3));
        let t0 = Instant::now();
        r.record(event("alice", true), t0);
        r.record(event("bob", false), t0 + Duration::from_secs(2));
        assert_eq!(
            summary(&r.replay(t0 + Duration::from_secs(4))),
            vec![("bob".into(), false)]
        );
        r.prune(t0 + Duration::from_secs(6));
        assert!(r.latest.is_empty(), "pruned without a replay");
    }
}
