//! Counting and checking: the shared counters every connection updates, the per-receiver
//! delivery check (lost, duplicated, unexpected), latency histograms, and the server
//! process readings from /proc.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Highest latency the histograms hold, in microseconds (60 s).
const MAX_LATENCY_US: u64 = 60_000_000;

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Counters shared by every connection of one run.
pub struct Shared {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Deliveries the senders have asked for so far (sends times fan-out).
    pub expected: AtomicU64,
    /// First deliveries of a message to a connection.
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    /// Deliveries of messages this connection should not get, or with a body that is not ours.
    pub unexpected: AtomicU64,
    /// Connections that ended before the run told them to.
    pub closed_early: AtomicU64,
    /// Senders that have stopped sending.
    pub senders_done: AtomicUsize,
    /// Messages sent so far by each sender (its next sequence number).
    pub sent_by: Vec<AtomicU64>,
    /// Latency of messages sent after the warm-up: (whole run, current second).
    latency: Mutex<(Histogram<u64>, Histogram<u64>)>,
    /// Send lag: how late each send was against its schedule, microseconds.
    lag: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Messages sent before this time (unix nanos) are checked but not timed.
    pub record_from: AtomicU64,
}

impl Shared {
    pub fn new(senders: usize) -> Shared {
        Shared {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            senders_done: AtomicUsize::new(0),
            sent_by: (0..senders).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new((new_histogram(), new_histogram())),
            lag: Mutex::new(new_histogram()),
            errors: Mutex::new(BTreeMap::new()),
            record_from: AtomicU64::new(u64::MAX),
        }
    }

    pub fn error(&self, code: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(code.chars().take(80).collect()).or_insert(0) += 1;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn record_lag(&self, lag_us: u64) {
        let mut h = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(lag_us.clamp(1, MAX_LATENCY_US));
    }

    pub fn lag(&self) -> Histogram<u64> {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record_latency(&self, us: u64) {
        let us = us.clamp(1, MAX_LATENCY_US);
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        h.0.saturating_record(us);
        h.1.saturating_record(us);
    }

    /// The latency of the whole run so far.
    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The latency since the last call, which starts a new interval.
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let out = h.1.clone();
        h.1.reset();
        out
    }
}

/// The body of a benchmark message: `<sender>|<seq>|<unix nanos>|<padding>`. Only
/// digits, `|` and `x`, so it needs no JSON escaping.
pub fn make_body(sender: u32, seq: u64, nanos: u64, pad_to: usize) -> String {
    use std::fmt::Write;
    let mut body = String::with_capacity(pad_to.max(48));
    let _ = write!(body, "{sender}|{seq}|{nanos}|");
    while body.len() < pad_to {
        body.push('x');
    }
    body
}

pub fn parse_body(body: &str) -> Option<(u32, u64, u64)> {
    let mut parts = body.split('|');
    let sender = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let nanos = parts.next()?.parse().ok()?;
    Some((sender, seq, nanos))
}

/// What one receiving connection got from each sender it expects, as bit sets of
/// sequence numbers.
pub struct Tracker {
    /// (sender, bit set); a short list (one entry per expected sender), so a linear
    /// search beats hashing.
    seen: Vec<(u32, Vec<u64>)>,
}

impl Tracker {
    pub fn new(expect_from: &[u32]) -> Tracker {
        Tracker {
            seen: expect_from.iter().map(|&s| (s, Vec::new())).collect(),
        }
    }

    /// Checks and counts one delivery.
    pub fn deliver(&mut self, body: &str, shared: &Shared) {
        let now = unix_nanos();
        let Some((sender, seq, sent_at)) = parse_body(body) else {
            shared.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some((_, bits)) = self.seen.iter_mut().find(|(s, _)| *s == sender) else {
            shared.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        // A bound on the bit set, so a garbage sequence number cannot eat the memory.
        if word > 1 << 24 {
            shared.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            shared.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        bits[word] |= 1 << bit;
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        if sent_at >= shared.record_from.load(Ordering::Relaxed) {
            shared.record_latency(now.saturating_sub(sent_at) / 1000);
        }
    }

    /// Messages this connection should have got and did not, given what each sender sent.
    /// Deliveries of sequence numbers a sender never sent count as unexpected.
    pub fn lost(&self, shared: &Shared) -> (u64, u64) {
        let mut lost = 0;
        let mut beyond = 0;
        for (sender, bits) in &self.seen {
            let sent = shared.sent_by[*sender as usize].load(Ordering::Relaxed);
            let mut got = 0u64;
            for (i, word) in bits.iter().enumerate() {
                let base = i as u64 * 64;
                for b in 0..64 {
                    if word & (1 << b) != 0 {
                        if base + b < sent {
                            got += 1;
                        } else {
                            beyond += 1;
                        }
                    }
                }
            }
            lost += sent - got;
        }
        (lost, beyond)
    }
}

/// A server process to watch: a name for the tables and its pid.
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Proc {
    type Err = String;
    /// `PID` or `NAME=PID`.
    fn from_str(s: &str) -> Result<Proc, String> {
        let (name, pid) = match s.split_once('=') {
            Some((n, p)) => (n.to_owned(), p),
            None => (format!("pid{s}"), s),
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| format!("--pid {s:?}: expected PID or NAME=PID"))?;
        Ok(Proc { name, pid })
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces): index 0 is
/// the state (field 3), 1 the parent pid, 11 and 12 utime and stime, 13 and 14 cutime
/// and cstime.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // The state is a letter; keep the positions by mapping it to 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User plus system CPU time, in clock ticks (USER_HZ, 100 on Linux), of this process
/// (`None`: its own threads only), or of process `pid` and all its descendants: a server
/// that forks workers (PostgreSQL runs a process per connection) counts whole. That is
/// the live descendants' own time plus, through cutime and cstime, the time of those
/// that exited and were waited for, so a worker that ends between two readings moves
/// its time from one term to the other and none is lost.
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let Some(pid) = pid else {
        let f = stat_fields("self")?;
        return Some(f.get(11)? + f.get(12)?);
    };
    let root = stat_fields(&pid.to_string())?;
    let whole = |f: &[u64]| -> u64 { f.iter().skip(11).take(4).sum() };
    let mut total = whole(&root);
    for child in descendants(pid) {
        if let Some(f) = stat_fields(&child.to_string()) {
            total += whole(&f);
        }
    }
    Some(total)
}

/// Every live descendant of `pid` (children, their children, ...), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let p: u32 = name.to_str()?.parse().ok()?;
            let ppid = *stat_fields(name.to_str()?)?.get(1)?;
            Some((p, ppid as u32))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parents {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

pub const TICKS_PER_SEC: f64 = 100.0;

/// Busy CPU time of the whole machine (all cores), in clock ticks, from /proc/stat.
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4).copied().unwrap_or(0))
}

/// The soft limit on open files of this process, from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip() {
        let b = make_body(12, 345, 6789, 64);
        assert_eq!(b.len(), 64);
        assert!(!b.contains('"') && !b.contains('\\'));
        assert_eq!(parse_body(&b), Some((12, 345, 6789)));
        assert_eq!(parse_body("hello"), None);
    }

    #[test]
    fn tracker_counts_lost_duplicated_unexpected() {
        let shared = Shared::new(3);
        shared.record_from.store(0, Ordering::Relaxed);
        shared.sent_by[0].store(3, Ordering::Relaxed);
        shared.sent_by[1].store(2, Ordering::Relaxed);
        let mut t = Tracker::new(&[0, 1]);
        let now = unix_nanos();
        t.deliver(&make_body(0, 0, now, 0), &shared);
        t.deliver(&make_body(0, 2, now, 0), &shared);
        t.deliver(&make_body(0, 2, now, 0), &shared);
        t.deliver(&make_body(1, 1, now, 0), &shared);
        t.deliver(&make_body(2, 0, now, 0), &shared);
        t.deliver(&make_body(1, 5, now, 0), &shared);
        t.deliver("garbage", &shared);
        assert_eq!(shared.delivered.load(Ordering::Relaxed), 4);
        assert_eq!(shared.duplicated.load(Ordering::Relaxed), 1);
        assert_eq!(shared.unexpected.load(Ordering::Relaxed), 2);
        // sender 0: 3 sent, got 0 and 2; sender 1: 2 sent, got 1 (and 5, never sent)
        assert_eq!(t.lost(&shared), (2, 1));
        assert_eq!(shared.latency().len(), 4);
    }

    #[test]
    fn reads_proc() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(Some(me)).is_some());
        assert!(cpu_ticks(None).is_some());
        assert!(machine_busy_ticks().is_some());
        assert!(open_files_limit().unwrap() > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(descendants(me).contains(&child.id()));
        // Own ticks first: both only grow, so the later reading with the child is at
        // least as large (the other way round, another test thread could tick between).
        let own = cpu_ticks(None).unwrap();
        assert!(cpu_ticks(Some(me)).unwrap() >= own);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!descendants(me).contains(&child.id()));
        let p: Proc = "node1=42".parse().unwrap();
        assert_eq!((p.name.as_str(), p.pid), ("node1", 42));
        assert!("x=y".parse::<Proc>().is_err());
    }
}
