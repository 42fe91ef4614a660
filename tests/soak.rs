//! The churn soak: users connect to random nodes of a three-node cluster, sync, send
//! DMs and room messages, read, and disconnect again, over and over, for 30 s (or
//! `SOAK_SECS`). Afterwards every user syncs once more, and every `sent` message must
//! have reached every recipient user exactly once (live, or by sync), counted exactly,
//! and no reading client may have been closed by the server.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, ClusterEnv, Event, Seen, TestNode};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const USERS: usize = 18;
const ROOMS: [&str; 2] = ["soak-a", "soak-b"];

fn uid(i: usize) -> String {
    format!("s{i:02}")
}

/// Every conversation user `i` takes part in.
fn convs_of(i: usize) -> Vec<String> {
    let mut convs: Vec<String> = (0..USERS)
        .filter(|j| *j != i)
        .map(|j| chatmesh::protocol::dm_conv(&uid(i), &uid(j)))
        .collect();
    convs.extend(ROOMS.iter().map(|r| format!("room:{r}")));
    convs
}

type Sent = Arc<Mutex<BTreeMap<String, BTreeSet<u64>>>>;

#[derive(Debug, Default)]
struct Tally {
    sessions: usize,
    sent: usize,
    live: usize,
    server_closes: Vec<String>,
    /// Messages one connection was sent live twice (sync may repeat a live one; the
    /// live path must not).
    live_twice: Vec<String>,
}

/// Records a live frame of one connection; a message it already had live is a duplicate.
fn live(f: &Value, this_session: &mut BTreeSet<(String, u64)>, tally: &mut Tally, me: &str) {
    if f["type"] != "message" {
        return;
    }
    if let (Some(conv), Some(seq)) = (f["conv"].as_str(), f["seq"].as_u64()) {
        if !this_session.insert((conv.to_owned(), seq)) {
            tally.live_twice.push(format!("{me}: {conv} {seq}"));
        }
    }
}

/// One user for `secs` seconds: sessions on random nodes, each a sync, a few sends
/// with reads in between, and a clean close.
async fn churn(
    i: usize,
    nodes: Vec<String>,
    sent: Sent,
    until: Instant,
    seed: u64,
) -> (Seen, Tally) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = Seen::default();
    let mut tally = Tally::default();
    let me = uid(i);
    let convs = convs_of(i);
    while Instant::now() < until {
        let url = format!("{}?uid={me}", nodes[rng.random_range(0..nodes.len())]);
        let mut c = Client::connect_url(&url, &me).await;
        let mut this_session = BTreeSet::new();
        tally.sessions += 1;
        c.sync_into(&mut seen, &convs).await;
        let actions = rng.random_range(1..12);
        'session: for k in 0..actions {
            let cid = format!("{me}-{}-{k}", tally.sessions);
            let frame = if rng.random_bool(0.5) {
                let mut j = rng.random_range(0..USERS - 1);
                if j >= i {
                    j += 1;
                }
                json!({"type":"direct","to":uid(j),"body":cid,"client_id":cid})
            } else {
                let room = ROOMS[rng.random_range(0..ROOMS.len())];
                json!({"type":"room","room":room,"body":cid,"client_id":cid})
            };
            c.send(frame).await;
            loop {
                match c.next_event().await {
                    Event::Frame(f) => {
                        live(&f, &mut this_session, &mut tally, &me);
                        if seen.record(&f) {
                            tally.live += 1;
                        }
                        match f["type"].as_str() {
                            Some("sent") if f["client_id"] == cid.as_str() => {
                                sent.lock()
                                    .unwrap()
                                    .entry(f["conv"].as_str().unwrap().to_owned())
                                    .or_default()
                                    .insert(f["seq"].as_u64().unwrap());
                                tally.sent += 1;
                                break;
                            }
                            Some("resync") => c.sync_into(&mut seen, &convs).await,
                            Some("error") => panic!("{me}: {f}"),
                            _ => {}
                        }
                    }
                    Event::Closed(code) => {
                        tally.server_closes.push(format!("{me}: {code:?}"));
                        break 'session;
                    }
                }
            }
            // read for a while before the next send
            let read_for = Duration::from_millis(rng.random_range(0..80));
            let stop = Instant::now() + read_for;
            while Instant::now() < stop {
                match tokio::time::timeout(
                    stop.saturating_duration_since(Instant::now()),
                    c.next_event(),
                )
                .await
                {
                    Ok(Event::Frame(f)) => {
                        live(&f, &mut this_session, &mut tally, &me);
                        if seen.record(&f) {
                            tally.live += 1;
                        }
                        if f["type"] == "resync" {
                            c.sync_into(&mut seen, &convs).await;
                        }
                    }
                    Ok(Event::Closed(code)) => {
                        tally.server_closes.push(format!("{me}: {code:?}"));
                        break 'session;
                    }
                    Err(_) => break,
                }
            }
        }
        if tally.server_closes.is_empty() {
            c.close().await;
        }
    }
    (seen, tally)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_soak_delivers_every_message_exactly_once() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let env = ClusterEnv::start();
    let nodes: Vec<TestNode> = ["n1", "n2", "n3"].iter().map(|n| env.node(n)).collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.ws.clone()).collect();
    for i in 0..USERS {
        let mut c = Client::connect(&nodes[i % 3], &uid(i)).await;
        for r in ROOMS {
            c.join(r).await;
        }
        c.close().await;
    }
    let sent: Sent = Arc::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..USERS {
        tasks.push(tokio::spawn(churn(
            i,
            urls.clone(),
            sent.clone(),
            until,
            i as u64,
        )));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let sent = sent.lock().unwrap().clone();
    let mut total = Tally::default();
    let mut synced_after = 0usize;
    for (i, (mut seen, tally)) in results.into_iter().enumerate() {
        let before: usize = seen.convs.values().map(BTreeSet::len).sum();
        let mut c = Client::connect(&nodes[i % 3], &uid(i)).await;
        c.sync_into(&mut seen, &convs_of(i)).await;
        let after: usize = seen.convs.values().map(BTreeSet::len).sum();
        synced_after += after - before;
        for conv in convs_of(i) {
            let expected = sent.get(&conv).cloned().unwrap_or_default();
            let got = seen.convs.get(&conv).cloned().unwrap_or_default();
            assert_eq!(got, expected, "{} in {conv}", uid(i));
        }
        total.sessions += tally.sessions;
        total.sent += tally.sent;
        total.live += tally.live;
        total.server_closes.extend(tally.server_closes);
        total.live_twice.extend(tally.live_twice);
    }
    let seqs_taken: usize = sent.values().map(BTreeSet::len).sum();
    assert_eq!(seqs_taken, total.sent, "two sends were given one seq");
    let expected_deliveries: usize = (0..USERS)
        .map(|i| {
            convs_of(i)
                .iter()
                .map(|c| sent.get(c).map_or(0, BTreeSet::len))
                .sum::<usize>()
        })
        .sum();
    println!(
        "soak {secs}s: {} sessions, {} messages sent, {} deliveries owed to recipient users, \
         {} message frames received live or by sync during the churn, {} found by the final sync, \
         {} closed by the server",
        total.sessions,
        total.sent,
        expected_deliveries,
        total.live,
        synced_after,
        total.server_closes.len()
    );
    assert!(
        total.sent > 100,
        "the soak sent only {} messages",
        total.sent
    );
    assert!(
        total.live_twice.is_empty(),
        "messages delivered live twice to one connection: {:?}",
        total.live_twice
    );
    assert!(
        total.server_closes.is_empty(),
        "reading clients were closed: {:?}",
        total.server_closes
    );
}
