//! The scenarios: who connects where, who sends what to whom, and the timed run that
//! drives every connection, checks every delivery and sums it all up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Conn, Event, System};
use crate::stats::{self, Latency, Proc, Shared, Tracker};
use crate::{BoxError, Common};

/// Where a sender's messages go.
#[derive(Debug, Clone)]
pub enum Dest {
    User(String),
    Room(String),
}

/// One simulated user with one connection.
#[derive(Debug, Clone)]
pub struct UserPlan {
    pub uid: String,
    /// Index into the targets.
    pub target: usize,
    pub join: Option<String>,
    /// Sender index and destination, for users that send.
    pub send: Option<(u32, Dest)>,
    /// Sender indices whose every message this connection must get exactly once.
    pub expect_from: Vec<u32>,
}

/// A whole load: the users, and per sender how many connections get each message.
pub struct Plan {
    pub users: Vec<UserPlan>,
    pub fanout: Vec<u64>,
    pub describe: String,
    pub params: serde_json::Value,
}

/// `users` users (rounded up to even) in pairs; each pair's two users on different
/// targets when there is more than one; both send to each other.
pub fn direct_plan(run: &str, users: usize, targets: usize) -> Plan {
    let pairs = users.div_ceil(2).max(1);
    let mut out = Vec::with_capacity(pairs * 2);
    for p in 0..pairs {
        let (a, b) = (2 * p, 2 * p + 1);
        let ua = format!("{run}-u{a}");
        let ub = format!("{run}-u{b}");
        out.push(UserPlan {
            uid: ua.clone(),
            target: p % targets,
            join: None,
            send: Some((a as u32, Dest::User(ub.clone()))),
            expect_from: vec![b as u32],
        });
        out.push(UserPlan {
            uid: ub,
            target: (p + 1) % targets,
            join: None,
            send: Some((b as u32, Dest::User(ua))),
            expect_from: vec![a as u32],
        });
    }
    Plan {
        fanout: vec![1; pairs * 2],
        describe: format!(
            "{} users in {pairs} pairs{}",
            pairs * 2,
            if targets > 1 {
                ", every pair across two nodes"
            } else {
                ""
            }
        ),
        params: serde_json::json!({ "users": pairs * 2, "pairs": pairs }),
        users: out,
    }
}

/// `rooms` rooms of `members` members spread round-robin over the targets; the first
/// `senders` members of each room send to it.
pub fn room_plan(run: &str, rooms: usize, members: usize, senders: usize, targets: usize) -> Plan {
    let members = members.max(2);
    let senders = senders.clamp(1, members);
    let mut users = Vec::with_capacity(rooms * members);
    for r in 0..rooms {
        let room = format!("{run}-room{r}");
        let room_senders: Vec<u32> = (0..senders).map(|j| (r * senders + j) as u32).collect();
        for j in 0..members {
            let me = (j < senders).then(|| room_senders[j]);
            users.push(UserPlan {
                uid: format!("{run}-r{r}m{j}"),
                target: (r * members + j) % targets,
                join: Some(room.clone()),
                send: me.map(|s| (s, Dest::Room(room.clone()))),
                expect_from: room_senders
                    .iter()
                    .copied()
                    .filter(|&s| Some(s) != me)
                    .collect(),
            });
        }
    }
    Plan {
        fanout: vec![(members - 1) as u64; rooms * senders],
        describe: format!("{rooms} room(s) of {members} members, {senders} sender(s) per room"),
        params: serde_json::json!({ "rooms": rooms, "members": members, "senders_per_room": senders }),
        users,
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Hooked {
    pub sent: u64,
    pub delivered: u64,
}

/// Runs a window hook with `sh -c` and waits for it.
async fn hook(cmd: &str) -> Result<(), BoxError> {
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("window hook `{cmd}` failed: {s}").into()),
        Ok(Err(e)) => Err(format!("window hook `{cmd}`: {e}").into()),
        Err(_) => Err(format!("window hook `{cmd}` took over 60 s").into()),
    }
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub scenario: String,
    pub system: System,
    pub label: String,
    pub describe: String,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub rate_per_sender: f64,
    pub senders: usize,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub offered_msgs_per_sec: f64,
    pub offered_deliveries_per_sec: f64,
    pub sent: u64,
    pub sent_per_sec: f64,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    pub expected: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub closed_early: u64,
    pub drain_s: f64,
    pub latency_ms: Latency,
    pub send_lag_ms: Latency,
    pub cpu_percent: BTreeMap<String, f64>,
    pub rss_kib: BTreeMap<String, u64>,
    pub setup_s: f64,
    /// Sent and delivered between --at-window-start and --at-window-end.
    pub between_hooks: Option<Hooked>,
    pub max_p99_ms: Option<f64>,
    /// Loss, duplicates, unexpected deliveries, refused sends, dropped connections.
    pub failures: Vec<String>,
    /// Reasons the offered load was not sustained (p99 over the bound, sends behind schedule).
    pub slo_misses: Vec<String>,
    pub pass: bool,
}

async fn connect_all(
    system: System,
    targets: &[String],
    users: &[UserPlan],
    opts: &Common,
) -> Result<Vec<Conn>, BoxError> {
    let limit = Duration::from_secs_f64(opts.timeout);
    let done = Arc::new(AtomicU64::new(0));
    let total = users.len();
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "  setup: {}/{total} connected and joined",
                    done.load(Ordering::Relaxed)
                );
            }
        })
    };
    // Each room is created once, by its first member's join, before the others join:
    // the load starts from rooms that exist, as in real use (and the benchmark does not
    // measure what concurrent first joins of one new room cost).
    let mut rooms_seen = std::collections::HashSet::new();
    let (first, rest): (Vec<usize>, Vec<usize>) = (0..total).partition(|&i| {
        users[i]
            .join
            .as_ref()
            .is_some_and(|room| rooms_seen.insert(room.clone()))
    });
    let mut results: Vec<(usize, Result<Conn, BoxError>)> = Vec::with_capacity(total);
    for batch in [first, rest] {
        let part: Vec<(usize, Result<Conn, BoxError>)> = stream::iter(batch.into_iter().map(|i| {
            let u = &users[i];
            let base = targets[u.target].clone();
            let done = done.clone();
            let source = client::source_addr(i, opts.source_addrs);
            async move {
                let result = async {
                    let mut conn = Conn::connect(system, &base, &u.uid, source, limit).await?;
                    if let Some(room) = &u.join {
                        conn.join(room, limit).await?;
                    }
                    Ok(conn)
                }
                .await;
                done.fetch_add(1, Ordering::Relaxed);
                (i, result)
            }
        }))
        .buffer_unordered(opts.connect_concurrency.max(1))
        .collect()
        .await;
        results.extend(part);
    }
    progress.abort();
    let mut slots: Vec<Option<Conn>> = (0..total).map(|_| None).collect();
    let mut first_error = None;
    let mut failed = 0;
    for (i, r) in results {
        match r {
            Ok(c) => slots[i] = Some(c),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        for c in slots.into_iter().flatten() {
            c.close(Duration::from_secs(1)).await;
        }
        return Err(format!("{failed} of {total} connections failed; first: {e}").into());
    }
    Ok(slots.into_iter().flatten().collect())
}

struct Clock {
    start: Instant,
    send_end: Instant,
    interval: Duration,
}

/// Drives one connection: sends on schedule (if a sender), reads and checks every frame,
/// until told to stop.
async fn drive(
    mut conn: Conn,
    user: UserPlan,
    fanout: u64,
    body_bytes: usize,
    shared: Arc<Shared>,
    clock: Arc<Clock>,
    mut stop: watch::Receiver<bool>,
) -> Tracker {
    let system = conn.system;
    let mut tracker = Tracker::new(&user.expect_from);
    let mut sending = user.send.is_some();
    let (sender, dest) = match &user.send {
        Some((s, d)) => (*s, Some(d.clone())),
        None => (0, None),
    };
    // Spread the senders' first sends over one interval (golden-ratio sequence).
    let phase = (sender as f64 * 0.618_033_988_7).fract();
    let mut next = clock.start + clock.interval.mul_f64(phase);
    // Both made once and reused: creating them for every frame costs the bench CPU that
    // the servers should have.
    let mut stopped = std::pin::pin!(stop.changed());
    let mut timer = std::pin::pin!(sleep_until(next));
    let mut seq: u64 = 0;
    let mut closed = false;
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = &mut timer, if sending => {
                let now = Instant::now();
                if now >= clock.send_end {
                    sending = false;
                    shared.senders_done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                shared.record_lag((now - next).as_micros() as u64);
                let body = stats::make_body(sender, seq, stats::unix_nanos(), body_bytes);
                let text = match dest.as_ref() {
                    Some(Dest::User(to)) => client::direct_frame(system, to, &body, seq),
                    Some(Dest::Room(room)) => client::room_frame(system, room, &body, seq),
                    None => unreachable!("only senders send"),
                };
                // Count before sending so the drain can never finish early.
                shared.expected.fetch_add(fanout, Ordering::Relaxed);
                shared.sent_by[sender as usize].store(seq + 1, Ordering::Relaxed);
                shared.sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                next += clock.interval;
                timer.as_mut().reset(next);
                if conn.send_text(text).await.is_err() {
                    closed = true;
                    break;
                }
            }
            frame = conn.ws.next() => match frame {
                Some(Ok(Message::Text(t))) => match client::parse(system, t.as_str()) {
                    Event::Delivery(body) => tracker.deliver(&body, &shared),
                    Event::Ack(_) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Refused { code } => shared.error(&code),
                    Event::Ping => {
                        if conn.send_text("3".into()).await.is_err() {
                            closed = true;
                            break;
                        }
                    }
                    Event::Closed => {
                        closed = true;
                        break;
                    }
                    Event::Joined | Event::Other => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    closed = true;
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    if sending {
        shared.senders_done.fetch_add(1, Ordering::Relaxed);
    }
    if closed {
        shared.closed_early.fetch_add(1, Ordering::Relaxed);
    } else {
        conn.close(Duration::from_secs(2)).await;
    }
    tracker
}

fn cpu_snapshot(procs: &[Proc]) -> Vec<Option<u64>> {
    let mut v: Vec<Option<u64>> = procs
        .iter()
        .map(|p| stats::cpu_ticks(Some(p.pid)))
        .collect();
    v.push(stats::cpu_ticks(None));
    v.push(stats::machine_busy_ticks());
    v
}

fn ms(l: f64) -> String {
    format!("{l:.2}")
}

pub async fn run_load(
    scenario: &str,
    system: System,
    targets: &[String],
    plan: Plan,
    rate: f64,
    opts: &Common,
) -> Result<LoadReport, BoxError> {
    if !(rate > 0.0 && rate <= 10_000.0) {
        return Err("--rate must be in (0, 10000] messages per second per sender".into());
    }
    if system == System::Chatmesh && rate > 100.0 {
        eprintln!(
            "note: {rate} frames/s per connection is over chatmesh's default rate limit (100/s): \
             start the servers with a higher --rate-per-sec/--rate-burst"
        );
    }
    let need = plan.users.len() as u64 + 64;
    if let Some(limit) = stats::open_files_limit() {
        if limit < need {
            return Err(format!(
                "open files limit {limit} < {need} needed: raise it (ulimit -n) or use fewer connections"
            )
            .into());
        }
    }
    let senders = plan.fanout.len();
    let offered_msgs = rate * senders as f64;
    let offered_deliveries = rate * plan.fanout.iter().sum::<u64>() as f64;
    eprintln!(
        "{scenario} on {} ({} target(s)): {}; {rate} msg/s per sender = {offered_msgs:.0} msg/s, \
         {offered_deliveries:.0} deliveries/s offered",
        system.name(),
        targets.len(),
        plan.describe
    );

    let setup_started = Instant::now();
    let conns = connect_all(system, targets, &plan.users, opts).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "  setup: {} connections ready in {setup_s:.1} s",
        conns.len()
    );

    let shared = Arc::new(Shared::new(senders));
    let warmup = Duration::from_secs_f64(opts.warmup);
    let duration = Duration::from_secs_f64(opts.duration);
    let start = Instant::now() + Duration::from_millis(300);
    let warm_end = start + warmup;
    let send_end = warm_end + duration;
    let clock = Arc::new(Clock {
        start,
        send_end,
        interval: Duration::from_secs_f64(1.0 / rate),
    });
    let until_warm = warm_end - Instant::now();
    shared.record_from.store(
        stats::unix_nanos() + until_warm.as_nanos() as u64,
        Ordering::Relaxed,
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = conns.len();
    let mut tasks = Vec::with_capacity(connections);
    for (conn, user) in conns.into_iter().zip(plan.users.iter().cloned()) {
        let fanout = user
            .send
            .as_ref()
            .map(|(s, _)| plan.fanout[*s as usize])
            .unwrap_or(0);
        tasks.push(tokio::spawn(drive(
            conn,
            user,
            fanout,
            opts.body_bytes,
            shared.clone(),
            clock.clone(),
            stop_rx.clone(),
        )));
    }

    // Progress every second; snapshots at the window's edges; then the drain.
    let mut cpu_at_warm = None;
    let mut delivered_at_warm = 0;
    let mut cpu_at_end = None;
    let mut delivered_at_end = None;
    let mut last = (0u64, 0u64);
    let drain_limit = send_end + Duration::from_secs_f64(opts.drain_timeout);
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut sleep_to_warm = std::pin::pin!(sleep_until(warm_end));
    let mut warm_done = false;
    let mut sleep_to_end = std::pin::pin!(sleep_until(send_end));
    let mut drained_at = None;
    let mut hooked_from = None;
    let mut hooked = None;
    // Bounded: the run ends at the drain limit at the latest.
    loop {
        tokio::select! {
            _ = &mut sleep_to_warm, if !warm_done => {
                warm_done = true;
                if let Some(cmd) = &opts.at_window_start {
                    hook(cmd).await?;
                    hooked_from = Some((
                        shared.sent.load(Ordering::Relaxed),
                        shared.delivered.load(Ordering::Relaxed),
                    ));
                }
                cpu_at_warm = Some(cpu_snapshot(&opts.pids));
                delivered_at_warm = shared.delivered.load(Ordering::Relaxed);
                shared.take_interval();
            }
            _ = &mut sleep_to_end, if delivered_at_end.is_none() => {
                cpu_at_end = Some(cpu_snapshot(&opts.pids));
                delivered_at_end = Some(shared.delivered.load(Ordering::Relaxed));
                if let Some((sent0, delivered0)) = hooked_from {
                    hooked = Some(Hooked {
                        sent: shared.sent.load(Ordering::Relaxed) - sent0,
                        delivered: shared.delivered.load(Ordering::Relaxed) - delivered0,
                    });
                }
                if let Some(cmd) = &opts.at_window_end {
                    hook(cmd).await?;
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let sent = shared.sent.load(Ordering::Relaxed);
                let delivered = shared.delivered.load(Ordering::Relaxed);
                let expected = shared.expected.load(Ordering::Relaxed);
                let h = shared.take_interval();
                let phase = if now < warm_end { "warm-up" } else if now < send_end { "measure" } else { "drain" };
                eprintln!(
                    "  [{} {scenario}] t={:>3.0}s {phase:<7} sent {:>7}/s delivered {:>8}/s in flight {:>7} p50 {:>6} ms p99 {:>7} ms max {:>7} ms errors {} dup {}",
                    system.name(),
                    (now - start).as_secs_f64(),
                    sent - last.0,
                    delivered - last.1,
                    expected.saturating_sub(delivered),
                    ms(h.value_at_quantile(0.5) as f64 / 1000.0),
                    ms(h.value_at_quantile(0.99) as f64 / 1000.0),
                    ms(h.max() as f64 / 1000.0),
                    shared.errors().values().sum::<u64>(),
                    shared.duplicated.load(Ordering::Relaxed),
                );
                last = (sent, delivered);
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if delivered_at_end.is_some() => {}
        }
        if delivered_at_end.is_some() {
            let all_stopped = shared.senders_done.load(Ordering::Relaxed) >= senders;
            let delivered = shared.delivered.load(Ordering::Relaxed);
            let expected = shared.expected.load(Ordering::Relaxed);
            if all_stopped && delivered >= expected {
                drained_at = Some(Instant::now());
                break;
            }
            if Instant::now() >= drain_limit {
                eprintln!(
                    "  drain timeout: {} of {expected} deliveries after {:.1} s",
                    delivered, opts.drain_timeout
                );
                break;
            }
        }
    }
    let drain_s = drained_at
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(send_end)
        .as_secs_f64();
    let _ = stop_tx.send(true);
    let mut lost = 0;
    let mut beyond = 0;
    let mut unfinished = 0;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(tracker)) => {
                let (l, b) = tracker.lost(&shared);
                lost += l;
                beyond += b;
            }
            _ => unfinished += 1,
        }
    }

    let window = duration.as_secs_f64();
    let cpu_percent = match (cpu_at_warm, cpu_at_end) {
        (Some(a), Some(b)) => {
            let mut names: Vec<String> = opts.pids.iter().map(|p| p.name.clone()).collect();
            names.push("bench".into());
            names.push("machine".into());
            let mut cpu: BTreeMap<String, f64> = names
                .into_iter()
                .zip(a.into_iter().zip(b))
                .filter_map(|(n, (a, b))| {
                    let ticks = b?.saturating_sub(a?);
                    Some((n, ticks as f64 / stats::TICKS_PER_SEC / window * 100.0))
                })
                .collect();
            // What the machine spent beyond the watched processes and the bench: other
            // programs running at the same time disturb the measurement.
            if let Some(machine) = cpu.get("machine").copied() {
                let ours: f64 = cpu
                    .iter()
                    .filter(|(k, _)| k.as_str() != "machine")
                    .map(|(_, v)| v)
                    .sum();
                cpu.insert("other".into(), (machine - ours).max(0.0));
            }
            cpu
        }
        _ => BTreeMap::new(),
    };
    let rss_kib = opts
        .pids
        .iter()
        .filter_map(|p| Some((p.name.clone(), stats::rss_kib(p.pid)?)))
        .collect();

    let errors = shared.errors();
    let sent = shared.sent.load(Ordering::Relaxed);
    let duplicated = shared.duplicated.load(Ordering::Relaxed);
    let unexpected = shared.unexpected.load(Ordering::Relaxed) + beyond;
    let closed_early = shared.closed_early.load(Ordering::Relaxed);
    let latency = Latency::of(&shared.latency());
    let lag = Latency::of(&shared.lag());
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let delivered_per_sec =
        (delivered_at_end.unwrap_or(delivered) - delivered_at_warm) as f64 / window;
    let total_s = (warmup + duration).as_secs_f64();

    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} lost"));
    }
    if duplicated > 0 {
        failures.push(format!("{duplicated} duplicated"));
    }
    if unexpected > 0 {
        failures.push(format!("{unexpected} unexpected deliveries"));
    }
    if !errors.is_empty() {
        failures.push(format!("refused: {errors:?}"));
    }
    if closed_early > 0 {
        failures.push(format!("{closed_early} connections closed early"));
    }
    if unfinished > 0 {
        failures.push(format!("{unfinished} connection tasks did not finish"));
    }
    let mut slo_misses = Vec::new();
    if let Some(bound) = opts.max_p99_ms {
        if latency.p99 > bound {
            slo_misses.push(format!("p99 {:.2} ms over {bound} ms", latency.p99));
        }
    }
    let offered_total = offered_msgs * total_s;
    if (sent as f64) < 0.95 * offered_total {
        slo_misses.push(format!(
            "sent {sent} of {offered_total:.0} offered: the senders fell behind"
        ));
    }
    let pass = failures.is_empty() && slo_misses.is_empty();

    Ok(LoadReport {
        scenario: scenario.into(),
        system,
        label: opts.label.clone().unwrap_or_else(|| scenario.into()),
        describe: plan.describe,
        targets: targets.to_vec(),
        params: plan.params,
        rate_per_sender: rate,
        senders,
        connections,
        duration_s: window,
        warmup_s: warmup.as_secs_f64(),
        offered_msgs_per_sec: offered_msgs,
        offered_deliveries_per_sec: offered_deliveries,
        sent,
        sent_per_sec: sent as f64 / total_s,
        acked: shared.acked.load(Ordering::Relaxed),
        errors,
        expected: shared.expected.load(Ordering::Relaxed),
        delivered,
        delivered_per_sec,
        lost,
        duplicated,
        unexpected,
        closed_early,
        drain_s,
        latency_ms: latency,
        send_lag_ms: lag,
        cpu_percent,
        rss_kib,
        setup_s,
        between_hooks: hooked,
        max_p99_ms: opts.max_p99_ms,
        failures,
        slo_misses,
        pass,
    })
}

pub fn print_load(r: &LoadReport) {
    println!("== {} on {} [{}]", r.scenario, r.system.name(), r.label);
    println!("  load           {}", r.describe);
    println!(
        "  targets        {} ({} connections)",
        r.targets.join(" "),
        r.connections
    );
    println!(
        "  offered        {} msg/s per sender x {} senders = {:.0} msg/s, {:.0} deliveries/s",
        r.rate_per_sender, r.senders, r.offered_msgs_per_sec, r.offered_deliveries_per_sec
    );
    println!(
        "  window         {:.0} s after {:.0} s warm-up; drained in {:.2} s",
        r.duration_s, r.warmup_s, r.drain_s
    );
    println!(
        "  sent           {} ({:.0}/s), acknowledged {}",
        r.sent, r.sent_per_sec, r.acked
    );
    println!(
        "  delivered      {} of {} expected, {:.0}/s in the window",
        r.delivered, r.expected, r.delivered_per_sec
    );
    println!(
        "  checked        lost {}  duplicated {}  unexpected {}  refused {}  dropped connections {}",
        r.lost,
        r.duplicated,
        r.unexpected,
        r.errors.values().sum::<u64>(),
        r.closed_early
    );
    let l = &r.latency_ms;
    println!(
        "  latency ms     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max),
        l.count
    );
    println!(
        "  send lag ms    p99 {}  max {}",
        ms(r.send_lag_ms.p99),
        ms(r.send_lag_ms.max)
    );
    if let Some(h) = r.between_hooks {
        println!(
            "  between hooks  sent {}  delivered {}",
            h.sent, h.delivered
        );
    }
    if !r.cpu_percent.is_empty() {
        let cpu: Vec<String> = r
            .cpu_percent
            .iter()
            .map(|(n, c)| format!("{n} {c:.0}%"))
            .collect();
        println!("  cpu            {}", cpu.join("  "));
    }
    if !r.rss_kib.is_empty() {
        let rss: Vec<String> = r
            .rss_kib
            .iter()
            .map(|(n, k)| format!("{n} {:.1} MiB", *k as f64 / 1024.0))
            .collect();
        println!("  rss            {}", rss.join("  "));
    }
    let verdict = if r.pass {
        "PASS".to_owned()
    } else {
        let mut v = r.failures.clone();
        v.extend(r.slo_misses.iter().cloned());
        format!("FAIL: {}", v.join("; "))
    };
    println!("  result         {verdict}");
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: String,
    pub system: System,
    pub label: String,
    pub targets: Vec<String>,
    pub connections: usize,
    pub connected: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub connect_concurrency: usize,
    pub connect_s: f64,
    pub connects_per_sec: f64,
    pub hold_s: f64,
    pub closed_early: u64,
    pub rss_before_kib: BTreeMap<String, u64>,
    pub rss_after_kib: BTreeMap<String, u64>,
    pub rss_per_connection_kib: Option<f64>,
    pub bench_rss_kib: Option<u64>,
    pub pass: bool,
}

pub async fn run_idle(
    system: System,
    targets: &[String],
    connections: usize,
    hold: f64,
    run: &str,
    opts: &Common,
) -> Result<IdleReport, BoxError> {
    let need = connections as u64 + 64;
    if let Some(limit) = stats::open_files_limit() {
        if limit < need {
            return Err(format!(
                "open files limit {limit} < {need} needed: raise it (ulimit -n) or use fewer connections"
            )
            .into());
        }
    }
    eprintln!(
        "idle on {}: {connections} connections over {} target(s), {} at a time",
        system.name(),
        targets.len(),
        opts.connect_concurrency
    );
    let rss = |procs: &[Proc]| -> BTreeMap<String, u64> {
        procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), stats::rss_kib(p.pid)?)))
            .collect()
    };
    let rss_before = rss(&opts.pids);
    let limit = Duration::from_secs_f64(opts.timeout);
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let closed_early = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = {
        let connected = connected.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let c = connected.load(Ordering::Relaxed);
                eprintln!(
                    "  [{} idle] {c}/{connections} connected ({}/s), {} failed",
                    system.name(),
                    c - last,
                    failed.load(Ordering::Relaxed)
                );
                last = c;
            }
        })
    };
    let started = Instant::now();
    let results: Vec<Result<tokio::task::JoinHandle<()>, BoxError>> =
        stream::iter((0..connections).map(|i| {
            let base = targets[i % targets.len()].clone();
            let uid = format!("{run}-i{i}");
            let connected = connected.clone();
            let failed = failed.clone();
            let closed_early = closed_early.clone();
            let mut stop = stop_rx.clone();
            let source = client::source_addr(i, opts.source_addrs);
            async move {
                match Conn::connect(system, &base, &uid, source, limit).await {
                    Ok(mut conn) => {
                        connected.fetch_add(1, Ordering::Relaxed);
                        Ok(tokio::spawn(async move {
                            loop {
                                tokio::select! {
                                    _ = stop.changed() => break,
                                    frame = conn.ws.next() => match frame {
                                        Some(Ok(Message::Text(t))) => {
                                            if client::parse(system, t.as_str()) == Event::Ping
                                                && conn.send_text("3".into()).await.is_err()
                                            {
                                                closed_early.fetch_add(1, Ordering::Relaxed);
                                                return;
                                            }
                                        }
                                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                                            closed_early.fetch_add(1, Ordering::Relaxed);
                                            return;
                                        }
                                        Some(Ok(_)) => {}
                                    },
                                }
                            }
                            conn.close(Duration::from_secs(5)).await;
                        }))
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            }
        }))
        .buffer_unordered(opts.connect_concurrency.max(1))
        .collect()
        .await;
    let connect_s = started.elapsed().as_secs_f64();
    progress.abort();
    let mut holders = Vec::new();
    let mut first_error = None;
    for r in results {
        match r {
            Ok(h) => holders.push(h),
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let ok = connected.load(Ordering::Relaxed);
    eprintln!(
        "  {ok} connected in {connect_s:.1} s ({:.0}/s); holding {hold} s",
        ok as f64 / connect_s
    );
    // Let the servers settle, then read their memory, then hold (bounded by `hold`).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(&opts.pids);
    let hold_end = Instant::now() + Duration::from_secs_f64(hold);
    while Instant::now() < hold_end {
        tokio::time::sleep_until(hold_end.min(Instant::now() + Duration::from_secs(5))).await;
        eprintln!(
            "  [{} idle] holding {} connections, {} dropped",
            system.name(),
            ok - closed_early.load(Ordering::Relaxed),
            closed_early.load(Ordering::Relaxed)
        );
    }
    let _ = stop_tx.send(true);
    for h in holders {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    let delta: i64 = rss_after
        .iter()
        .filter_map(|(n, a)| Some(*a as i64 - *rss_before.get(n)? as i64))
        .sum();
    let rss_per_connection_kib =
        (!rss_after.is_empty() && ok > 0).then(|| delta as f64 / ok as f64);
    let failed = failed.load(Ordering::Relaxed);
    let closed_early = closed_early.load(Ordering::Relaxed);
    Ok(IdleReport {
        scenario: "idle".into(),
        system,
        label: opts.label.clone().unwrap_or_else(|| "idle".into()),
        targets: targets.to_vec(),
        connections,
        connected: ok,
        failed,
        first_error,
        connect_concurrency: opts.connect_concurrency,
        connect_s,
        connects_per_sec: ok as f64 / connect_s,
        hold_s: hold,
        closed_early,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib,
        bench_rss_kib: stats::rss_kib(std::process::id()),
        pass: failed == 0 && closed_early == 0,
    })
}

pub fn print_idle(r: &IdleReport) {
    println!("== idle on {} [{}]", r.system.name(), r.label);
    println!("  targets        {}", r.targets.join(" "));
    println!(
        "  connections    {} of {} open ({} failed), {} dropped while held {:.0} s",
        r.connected, r.connections, r.failed, r.closed_early, r.hold_s
    );
    println!(
        "  connect rate   {:.0}/s ({:.1} s, {} at a time)",
        r.connects_per_sec, r.connect_s, r.connect_concurrency
    );
    for (name, after) in &r.rss_after_kib {
        let before = r.rss_before_kib.get(name).copied().unwrap_or(0);
        println!(
            "  server rss     {name}: {:.1} MiB -> {:.1} MiB",
            before as f64 / 1024.0,
            *after as f64 / 1024.0
        );
    }
    if let Some(per) = r.rss_per_connection_kib {
        println!("  rss/connection {per:.2} KiB");
    }
    if let Some(e) = &r.first_error {
        println!("  first error    {e}");
    }
    println!("  result         {}", if r.pass { "PASS" } else { "FAIL" });
}
