//! Which nodes are alive, as this node's heartbeats see them. Plain data, so the rules
//! are unit-tested; the ClusterBridge actor does the I/O.
//!
//! Besides the table of live peers, it tells the bridge when this node cannot vouch for
//! its connections any more: when Redis had lost this node's registry entry (Redis lost
//! its data, or the others declared this node dead and removed its directory entries),
//! when heartbeats failed for a while (the node was cut off: peers could not look it
//! up, and it could not record its own changes), and when two answered heartbeats are
//! further apart than the TTL (the process was stopped, or starved of CPU: the others
//! may have declared it dead and dropped what they had queued for it, even if none of
//! them has removed its entries yet). Either way the node writes its directory entries
//! again and tells every connection to sync.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::directory::Heartbeat;
use crate::server::ResyncScope;

/// Most conversations a dead node's users may name before every connection is told to
/// resync instead (as many as a peer batch names).
pub const MAX_DEAD_CONVS: usize = super::queue::MAX_NAMED_RESYNC;

/// Whom to tell to resync after a node died. Its users' conversations (every DM and
/// room they take part in): a message one of them sent may have been stored and never
/// delivered. Everyone when that does not bound it: the node stored messages for the
/// server API lately (they may be to any conversation), or some user's conversations
/// could not be read (`convs` is None), or they are more than [`MAX_DEAD_CONVS`].
pub fn resync_after_death(api_sends: bool, convs: Option<BTreeSet<String>>) -> ResyncScope {
    match convs {
        Some(convs) if !api_sends && convs.len() <= MAX_DEAD_CONVS => {
            ResyncScope::Convs(convs.into_iter().collect())
        }
        _ => ResyncScope::All,
    }
}

/// The live table, shared with the [`super::Cluster`] handle: node id -> peer API URL.
pub type LiveTable = Arc<RwLock<HashMap<String, String>>>;

/// What a heartbeat changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BeatOutcome {
    /// Write this node's directory entries again and tell every connection to sync.
    pub rejoin: bool,
    /// Peers that were live and are not any more: their queues are given up.
    pub gone: Vec<String>,
    /// Peers that are live and were not: what was announced to the others lately is
    /// announced to them too.
    pub joined: Vec<String>,
    /// Nodes past the TTL, whose entries someone must remove.
    pub dead: Vec<String>,
}

pub struct Liveness {
    me: String,
    live: LiveTable,
    /// When heartbeats started failing, if they are failing.
    failing_since: Option<Instant>,
    /// Failures shorter than this are forgiven (one slow beat).
    tolerance: Duration,
    /// How long the others wait for a heartbeat before they declare a node dead.
    ttl: Duration,
    /// When the last answered heartbeat was sent.
    last_sent: Option<Instant>,
}

impl Liveness {
    pub fn new(me: String, live: LiveTable, heartbeat: Duration, ttl: Duration) -> Self {
        Liveness {
            me,
            live,
            failing_since: None,
            tolerance: heartbeat,
            ttl,
            last_sent: None,
        }
    }

    /// A heartbeat sent at `sent` answered at `now`.
    pub fn beat(&mut self, hb: Heartbeat, sent: Instant, now: Instant) -> BeatOutcome {
        let cut_off = self
            .failing_since
            .take()
            .is_some_and(|since| now.duration_since(since) > self.tolerance);
        // The previous beat was written at or after it was sent, this one at or before
        // now: if those are more than the TTL apart, the others may have seen this node
        // dead in between, though no heartbeat failed (SIGSTOP, a starved process).
        let silent = self
            .last_sent
            .replace(sent)
            .is_some_and(|prev| now.saturating_duration_since(prev) > self.ttl);
        let new: HashMap<String, String> = hb.live.into_iter().collect();
        let mut gone = Vec::new();
        let mut joined = Vec::new();
        if let Ok(mut live) = self.live.write() {
            gone = live
                .keys()
                .filter(|id| !new.contains_key(*id) && **id != self.me)
                .cloned()
                .collect();
            joined = new
                .keys()
                .filter(|id| !live.contains_key(*id) && **id != self.me)
                .cloned()
                .collect();
            *live = new;
        }
        let rejoin = hb.was_missing || cut_off || silent;
        if rejoin {
            // The rejoin (entries written again, then every connection told to sync)
            // comes after now: it covers whatever the others dropped until now, also if
            // this beat itself was the one in flight while the node was stopped.
            self.last_sent = Some(now);
        }
        BeatOutcome {
            rejoin,
            gone,
            joined,
            dead: hb.dead.into_iter().filter(|d| *d != self.me).collect(),
        }
    }

    /// A heartbeat failed.
    pub fn failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
    }

    pub fn url(&self, node: &str) -> Option<String> {
        self.live.read().ok()?.get(node).cloned()
    }

    pub fn is_live(&self, node: &str) -> bool {
        self.live.read().is_ok_and(|l| l.contains_key(node))
    }

    /// Every live node but this one.
    pub fn peers(&self) -> Vec<String> {
        self.live
            .read()
            .map(|l| l.keys().filter(|id| **id != self.me).cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(live: &[&str], dead: &[&str], missing: bool) -> Heartbeat {
        Heartbeat {
            was_missing: missing,
            live: live
                .iter()
                .map(|id| (id.to_string(), format!("http://{id}")))
                .collect(),
            dead: dead.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn tracks_peers_and_who_left() {
        let mut l = liveness();
        let now = Instant::now();
        let o = l.beat(hb(&["me", "a", "b"], &[], true), now, now);
        assert!(o.rejoin, "the first beat writes the entries");
        let mut joined = o.joined;
        joined.sort();
        assert_eq!(
            joined,
            vec!["a", "b"],
            "every peer is new at the first beat"
        );
        let mut peers = l.peers();
        peers.sort();
        assert_eq!(peers, vec!["a", "b"]);
        assert_eq!(l.url("a").as_deref(), Some("http://a"));
        let o = l.beat(hb(&["me", "a"], &["b"], false), now, now);
        assert!(!o.rejoin);
        assert_eq!(o.gone, vec!["b"]);
        assert!(o.joined.is_empty());
        assert_eq!(o.dead, vec!["b"]);
        assert!(!l.is_live("b"));
        let o = l.beat(hb(&["me", "a", "c"], &[], false), now, now);
        assert_eq!(o.joined, vec!["c"], "a node that appears later");
        assert!(o.gone.is_empty());
    }

    #[test]
    fn after_a_death_the_users_conversations_or_everyone() {
        let convs: BTreeSet<String> = ["dm:a:b".to_string(), "room:r".to_string()].into();
        assert_eq!(
            resync_after_death(false, Some(convs.clone())),
            ResyncScope::Convs(vec!["dm:a:b".into(), "room:r".into()])
        );
        assert_eq!(
            resync_after_death(false, Some(BTreeSet::new())),
            ResyncScope::Convs(vec![]),
            "no users: nobody"
        );
        assert_eq!(resync_after_death(true, Some(convs)), ResyncScope::All);
        assert_eq!(resync_after_death(false, None), ResyncScope::All);
        let many = (0..=MAX_DEAD_CONVS).map(|i| format!("room:r{i}")).collect();
        assert_eq!(resync_after_death(false, Some(many)), ResyncScope::All);
    }

    fn liveness() -> Liveness {
        Liveness::new(
            "me".into(),
            LiveTable::default(),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn a_long_cut_off_means_rejoin_a_short_one_does_not() {
        let mut l = liveness();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        l.beat(hb(&["me"], &[], true), t0, t0);
        l.failed(t0);
        let o = l.beat(hb(&["me"], &[], false), at(400), at(500));
        assert!(!o.rejoin, "one slow beat is forgiven");
        l.failed(at(1000));
        l.failed(at(2000));
        let o = l.beat(hb(&["me"], &[], false), at(2900), at(3000));
        assert!(o.rejoin);
        let o = l.beat(hb(&["me"], &[], false), at(3900), at(4000));
        assert!(!o.rejoin);
    }

    #[test]
    fn beats_further_apart_than_the_ttl_mean_rejoin() {
        let mut l = liveness();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        l.beat(hb(&["me"], &[], true), t0, t0);
        let o = l.beat(hb(&["me"], &[], false), at(1000), at(1010));
        assert!(!o.rejoin, "a beat a period later");
        // Stopped for 6 s with no failed beat, and the others have not removed this
        // node's entries yet: its registry entry was still there.
        let o = l.beat(hb(&["me"], &[], false), at(2000), at(8000));
        assert!(o.rejoin, "the others may have seen this node dead");
        let o = l.beat(hb(&["me"], &[], false), at(9000), at(9010));
        assert!(!o.rejoin);
        // A beat in flight across a stop: one rejoin, not another at the next beat.
        let o = l.beat(hb(&["me"], &[], false), at(10000), at(17000));
        assert!(o.rejoin);
        let o = l.beat(hb(&["me"], &[], false), at(18000), at(18010));
        assert!(!o.rejoin, "the rejoin covered everything until it");
    }
}
