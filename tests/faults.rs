//! Faults made for real: SIGKILL, SIGSTOP, FLUSHALL, a paused Redis, a restarted
//! PostgreSQL, racing joins, a presence storm with a peer burst, and a churn of
//! reconnecting users. What they show is the promise of contract sections 3 and 9:
//! every `sent` message reaches every connection of every recipient, live or through
//! the sync that follows a `resync` or a reconnect, and nothing sent is lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Client, ClusterEnv, ProcessNode, Seen, TestNode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Sends `count` DMs from `c` to `to`; answers their seqs.
async fn dms(c: &mut Client, to: &str, count: usize, tag: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..count {
        let s = c
            .direct(to, &format!("{tag}{i}"), &format!("{tag}{i}"))
            .await;
        seqs.push(s["seq"].as_u64().unwrap());
    }
    seqs
}

/// A single node on SQLite, SIGKILLed right after the last `sent`, restarted on the
/// same file: every message, every membership, the same epoch, and the next message
/// takes the next seq.
#[tokio::test]
async fn a_sqlite_node_killed_after_sent_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let mut node = ProcessNode::single(&url, &[]);
    let mut alice = Client::connect_url(&node.ws_url("alice"), "alice").await;
    let epoch = alice.welcome["epoch"].clone();
    alice.join("lobby").await;
    let mut bob = Client::connect_url(&node.ws_url("bob"), "bob").await;
    bob.join("lobby").await;
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(
            alice
                .room("lobby", &format!("r{i}"), &format!("r{i}"))
                .await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    let dm = dms(&mut alice, "bob", 10, "d").await;
    node.kill();
    let node = ProcessNode::single(&url, &[]);
    let mut alice = Client::connect_url(&node.ws_url("alice"), "alice").await;
    assert_eq!(
        alice.welcome["epoch"], epoch,
        "the same database, the same epoch"
    );
    assert_eq!(alice.welcome["rooms"], json!(["lobby"]), "memberships kept");
    let mut seen = Seen::default();
    alice
        .sync_into(&mut seen, &["room:lobby".into(), "dm:alice:bob".into()])
        .await;
    assert_eq!(
        seen.convs["room:lobby"].iter().copied().collect::<Vec<_>>(),
        sent
    );
    assert_eq!(
        seen.convs["dm:alice:bob"]
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        dm
    );
    let next = alice.room("lobby", "after the crash", "after").await;
    assert_eq!(next["seq"], 31);
    let again = alice.room("lobby", "r29", "r29").await;
    assert_eq!(again["seq"], 30, "client ids survive the crash");
    let mut bob = Client::connect_url(&node.ws_url("bob"), "bob").await;
    bob.send(json!({"type":"history","conv":"room:lobby","limit":100}))
        .await;
    let h = bob.recv_type("history").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 31);
}

/// Every node of a cluster SIGKILLed right after their last `sent`, restarted on the
/// same database: everything is there, and seqs go on.
#[tokio::test]
async fn a_whole_cluster_killed_after_sent_loses_nothing() {
    let env = ClusterEnv::start();
    let mut nodes: Vec<ProcessNode> = ["n1", "n2", "n3"].iter().map(|n| env.process(n)).collect();
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let uid = format!("u{i}");
        let mut c = Client::connect_url(&node.ws_url(&uid), &uid).await;
        c.join("all").await;
        for k in 0..15 {
            let s = c
                .room("all", &format!("{uid}-{k}"), &format!("{uid}-{k}"))
                .await;
            expected
                .entry("room:all".into())
                .or_default()
                .push(s["seq"].as_u64().unwrap());
        }
        let to = format!("u{}", (i + 1) % 3);
        let conv = chatmesh::protocol::dm_conv(&uid, &to);
        expected
            .entry(conv)
            .or_default()
            .extend(dms(&mut c, &to, 5, &uid).await);
    }
    for n in &mut nodes {
        n.kill();
    }
    let nodes: Vec<ProcessNode> = ["n1", "n2", "n3"].iter().map(|n| env.process(n)).collect();
    let mut seen = Seen::default();
    let convs: Vec<String> = expected.keys().cloned().collect();
    for (i, node) in nodes.iter().enumerate() {
        let uid = format!("u{i}");
        let mut c = Client::connect_url(&node.ws_url(&uid), &uid).await;
        c.sync_into(&mut seen, &convs).await;
    }
    for (conv, mut seqs) in expected {
        seqs.sort_unstable();
        assert_eq!(
            seen.convs[&conv].iter().copied().collect::<Vec<_>>(),
            seqs,
            "{conv}"
        );
    }
    let mut c = Client::connect_url(&nodes[0].ws_url("u0"), "u0").await;
    assert_eq!(c.room("all", "after", "after").await["seq"], 46);
}

/// Redis's data flushed while messages flow: nothing is lost (every recipient has
/// every message, live or by the sync after its `resync`) and live delivery resumes.
#[tokio::test]
async fn flushall_mid_traffic_loses_nothing_and_live_delivery_resumes() {
    let env = ClusterEnv::start();
    // The sender sends 400 frames as fast as they are answered: past the default rate
    // limit (a burst of 200, then 100/s) when the store answers quickly.
    let mut fast = env.settings("node-a");
    fast.limits.rate_per_sec = 1e6;
    fast.limits.rate_burst = 1e6;
    let (a, b, c) = (
        TestNode::start(fast),
        env.node("node-b"),
        env.node("node-c"),
    );
    let mut sender = Client::connect(&a, "sender").await;
    sender.join("feed").await;
    let mut readers = Vec::new();
    for (uid, node) in [("rb", &b), ("rc", &c)] {
        let mut r = Client::connect(node, uid).await;
        r.join("feed").await;
        readers.push(r);
    }
    let mut sent = BTreeMap::<String, BTreeSet<u64>>::new();
    let mut seen = vec![Seen::default(), Seen::default()];
    let mut conn = env.redis.connection();
    for i in 0..200 {
        if i == 100 {
            let () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
        }
        let s = sender
            .room("feed", &format!("f{i}"), &format!("f{i}"))
            .await;
        sent.entry("room:feed".into())
            .or_default()
            .insert(s["seq"].as_u64().unwrap());
        let to = if i % 2 == 0 { "rb" } else { "rc" };
        let s = sender.direct(to, &format!("d{i}"), &format!("d{i}")).await;
        record_sent(&mut sent, &s);
        for (r, seen) in readers.iter_mut().zip(&mut seen) {
            while let Some(f) = r.try_recv().await {
                seen.record(&f);
            }
        }
    }
    // Each reader answers its resync with a sync, then has everything.
    for ((r, seen), uid) in readers.iter_mut().zip(&mut seen).zip(["rb", "rc"]) {
        let convs = vec![
            "room:feed".to_string(),
            chatmesh::protocol::dm_conv("sender", uid),
        ];
        let deadline = Instant::now() + common::WAIT;
        while seen.resyncs == 0 {
            assert!(Instant::now() < deadline, "{uid} was never told to resync");
            let f = r.recv().await;
            seen.record(&f);
        }
        r.sync_into(seen, &convs).await;
        for conv in &convs {
            assert_eq!(seen.convs.get(conv), sent.get(conv), "{uid} {conv}");
        }
    }
    // And live delivery works again.
    let s = sender.room("feed", "live again", "live").await;
    for r in &mut readers {
        r.recv_message_of(&s).await;
    }
}

/// 10,050 messages in one conversation of a cluster: all of them reachable through
/// `history`, page by page back to the first.
#[tokio::test]
async fn ten_thousand_and_fifty_messages_are_all_in_history() {
    let env = ClusterEnv::start();
    let mut settings = env.settings("node-a");
    settings.limits.rate_per_sec = 1e6;
    settings.limits.rate_burst = 1e6;
    let a = TestNode::start(settings);
    let total = 10_050usize;
    let writers = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = Client::connect(&a, &format!("w{w}")).await;
        c.join("long").await;
        tasks.push(tokio::spawn(async move {
            let mine = total / writers;
            for k in 0..mine {
                c.send(json!({"type":"room","room":"long","body":format!("{w}-{k}"),"client_id":format!("{k}")}))
                    .await;
            }
            let mut n = 0;
            while n < mine {
                if c.recv().await["type"] == "sent" {
                    n += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut reader = Client::connect(&a, "w0").await;
    let mut seqs = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut q = json!({"type":"history","conv":"room:long","limit":100});
        if let Some(b) = before {
            q["before"] = json!(b);
        }
        reader.send(q).await;
        let h = reader.recv_type("history").await;
        let page: Vec<u64> = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        before = page.first().copied();
        seqs.extend(page.into_iter().rev());
        if h["more"] != true {
            break;
        }
    }
    seqs.reverse();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
}

/// Notes the conversation and seq of a `sent` frame.
fn record_sent(sent: &mut BTreeMap<String, BTreeSet<u64>>, s: &Value) {
    sent.entry(s["conv"].as_str().unwrap().to_owned())
        .or_default()
        .insert(s["seq"].as_u64().unwrap());
}

/// `from` sends `n` direct messages to alice; answers their seqs by conversation.
async fn directs_to_alice(from: &mut Client, n: usize) -> BTreeMap<String, BTreeSet<u64>> {
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let s = from
            .direct("alice", &format!("b{i}"), &format!("b{i}"))
            .await;
        record_sent(&mut sent, &s);
    }
    sent
}

/// Reads `c` until it is told to `resync`, then syncs: afterwards it has seen exactly
/// the `sent` seqs of every conversation.
async fn resync_then_sync_has_everything(
    c: &mut Client,
    seen: &mut Seen,
    sent: &BTreeMap<String, BTreeSet<u64>>,
) {
    let deadline = Instant::now() + common::WAIT;
    while seen.resyncs == 0 {
        assert!(
            Instant::now() < deadline,
            "{} was never told to resync",
            c.uid
        );
        let f = c.recv().await;
        seen.record(&f);
    }
    let convs: Vec<String> = sent.keys().cloned().collect();
    c.sync_into(seen, &convs).await;
    for conv in &convs {
        assert_eq!(seen.convs.get(conv), sent.get(conv), "{conv}");
    }
}

/// A node SIGKILLed and restarted with the same id before its TTL runs out is never
/// seen dead by the others, so nobody cleans up after the killed process, which may
/// have stored messages it never delivered. The new process does: a connection on
/// another node in a conversation with one of the killed process's users is told to
/// resync, and after a sync it has every message.
#[tokio::test]
async fn a_node_restarted_within_its_ttl_resyncs_its_predecessors_conversations() {
    let env = ClusterEnv::start();
    // A TTL far longer than the test: only the restarted process can tell.
    let slow = ["--heartbeat-ms", "100", "--node-ttl-ms", "60000"];
    let mut settings = env.settings("node-a");
    settings.node_ttl = Duration::from_secs(60);
    let a = TestNode::start(settings);
    let start_b = || ProcessNode::start_with(&env.redis.url, &env.db, "node-b", &slow);
    let mut b = start_b();
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect_url(&b.ws_url("bob"), "bob").await;
    let sent = directs_to_alice(&mut bob, 3).await;
    b.kill();
    let _b = start_b();
    let mut seen = Seen::default();
    resync_then_sync_has_everything(&mut alice, &mut seen, &sent).await;
}

/// A user whose last connection closed just before their node died is no longer on the
/// node's list, but a message they sent just before may be undelivered: the cleaner
/// resyncs the conversations of the users who left the node lately as well.
#[tokio::test]
async fn a_node_that_dies_soon_after_a_user_left_resyncs_that_users_conversations() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut b = env.process("node-b");
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect_url(&b.ws_url("bob"), "bob").await;
    let sent = directs_to_alice(&mut bob, 3).await;
    drop(bob);
    // bob's only connection is gone from node-b's list
    alice.wait_online("bob", false).await;
    b.kill();
    let mut seen = Seen::default();
    resync_then_sync_has_everything(&mut alice, &mut seen, &sent).await;
}

/// A node frozen past the TTL while others send to its users: it is declared dead and
/// its queue given up; after SIGCONT it finds itself expelled, writes its directory
/// entries again and tells its connections to resync, after which they have every
/// `sent` message.
#[tokio::test]
async fn a_node_frozen_past_the_ttl_resyncs_its_connections() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let frozen = env.process("node-frozen");
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("hall").await;
    let mut bob = Client::connect_url(&frozen.ws_url("bob"), "bob").await;
    bob.join("hall").await;
    let mut seen = Seen::default();
    let mut sent = BTreeMap::<String, BTreeSet<u64>>::new();
    record_sent(&mut sent, &alice.direct("bob", "before", "b0").await);
    frozen.pause();
    // declared dead: its users go offline for the others
    alice.wait_online("bob", false).await;
    for i in 0..20 {
        record_sent(
            &mut sent,
            &alice
                .direct("bob", &format!("d{i}"), &format!("d{i}"))
                .await,
        );
        record_sent(
            &mut sent,
            &alice.room("hall", &format!("h{i}"), &format!("h{i}")).await,
        );
    }
    frozen.resume();
    resync_then_sync_has_everything(&mut bob, &mut seen, &sent).await;
    // and the node is back in the cluster: live delivery to bob works
    alice.wait_online("bob", true).await;
    let s = alice.direct("bob", "live", "live").await;
    bob.recv_message_of(&s).await;
}

/// A peer queue that really gives up: node-p is frozen (SIGSTOP) right after node-a
/// queued messages for it, and stays frozen until it is declared dead. node-a drops
/// the queue (counted in `chatmesh_peer_dropped_total`); after SIGCONT node-p finds
/// itself expelled and tells its connections to resync, after which bob has every
/// `sent` message.
#[tokio::test]
async fn a_peer_queue_that_gives_up_resyncs_the_peers_connections() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let p = env.process("node-p");
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("hall").await;
    let mut bob = Client::connect_url(&p.ws_url("bob"), "bob").await;
    bob.join("hall").await;
    let mut seen = Seen::default();
    let mut sent = BTreeMap::<String, BTreeSet<u64>>::new();
    // the peer path works: one message reaches bob live
    let s = alice.direct("bob", "before", "b0").await;
    record_sent(&mut sent, &s);
    loop {
        let f = bob.recv().await;
        seen.record(&f);
        if f["type"] == "message" && f["seq"] == s["seq"] {
            break;
        }
    }
    let dropped = a.metric("chatmesh_peer_dropped_total");
    p.pause();
    // Within the TTL: routed to node-p, whose first POST hangs while the rest queue up.
    for i in 0..20 {
        record_sent(
            &mut sent,
            &alice
                .direct("bob", &format!("d{i}"), &format!("d{i}"))
                .await,
        );
        record_sent(
            &mut sent,
            &alice.room("hall", &format!("h{i}"), &format!("h{i}")).await,
        );
    }
    common::eventually("node-a gives up node-p's queue", || {
        a.metric("chatmesh_peer_dropped_total") > dropped
    })
    .await;
    p.resume();
    resync_then_sync_has_everything(&mut bob, &mut seen, &sent).await;
}

/// While Redis is frozen, a connection whose own requests wait on it (a join must be
/// recorded in the directory) keeps receiving room messages, and afterwards gets its
/// answers in the order it asked.
#[tokio::test]
async fn a_connection_waiting_on_a_paused_redis_keeps_receiving() {
    let env = ClusterEnv::start();
    // x's node waits long for Redis; y's node gives up on its look-ups quickly and
    // sends to every peer instead.
    let mut sa = env.settings("node-a");
    sa.store_timeout = Duration::from_secs(8);
    let a = TestNode::start(sa);
    let mut sb = env.settings("node-b");
    sb.store_timeout = Duration::from_millis(300);
    let b = TestNode::start(sb);
    let mut x = Client::connect(&a, "x").await;
    x.join("busy").await;
    let mut y = Client::connect(&b, "y").await;
    y.join("busy").await;
    env.redis.pause();
    x.send(json!({"type":"join","room":"other"})).await;
    x.send(json!({"type":"history","conv":"room:busy"})).await;
    // y's messages are stored (PostgreSQL is fine) and reach x's node without the
    // directory (every peer gets them when a look-up fails)
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(
            y.room("busy", &format!("p{i}"), &format!("p{i}")).await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let f = x.recv().await;
        assert_eq!(
            f["type"], "message",
            "only messages until Redis is back: {f}"
        );
        got.push(f["seq"].as_u64().unwrap());
    }
    assert_eq!(got, sent);
    env.redis.resume();
    // Answers come in the order asked. Events may come between them: node-a was cut
    // off from Redis for longer than a heartbeat, so it tells its connections to
    // resync once it is back.
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let f = x.recv().await;
        match f["type"].as_str() {
            Some("message" | "resync") => {}
            Some(t) => answers.push(t.to_owned()),
            None => panic!("{f}"),
        }
    }
    assert_eq!(answers, vec!["joined", "history"], "in the order asked");
}

/// A join on one node racing a connect of the same user on another: the new
/// connection gets the room's messages live.
#[tokio::test]
async fn a_join_racing_a_connect_elsewhere_reaches_the_new_connection() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut owner = Client::connect(&a, "owner").await;
    let mut dave_a = Client::connect(&a, "dave").await;
    for i in 0..15 {
        let room = format!("r{i}");
        owner.join(&room).await;
        let join = async {
            dave_a.join(&room).await;
        };
        let connect = Client::connect(&b, "dave");
        let ((), mut dave_b) = tokio::join!(join, connect);
        let s = owner.room(&room, "live?", &format!("m{i}")).await;
        loop {
            let f = dave_b.recv().await;
            if f["type"] == "message" {
                assert_eq!(f["seq"], s["seq"], "round {i}");
                break;
            }
        }
        dave_b.close().await;
        let _ = dave_a.drain().await;
    }
}

/// SIGTERM: the node closes its sessions, and the members of its users' rooms on
/// other nodes see them go offline.
#[tokio::test]
async fn sigterm_announces_the_nodes_users_offline() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut p = env.process("node-p");
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("lobby").await;
    let mut bob = Client::connect_url(&p.ws_url("bob"), "bob").await;
    bob.join("lobby").await;
    alice.wait_online("bob", true).await;
    assert_eq!(p.terminate(), Some(0));
    assert_eq!(bob.expect_close().await.0, Some(CloseCode::Restart));
    loop {
        let f = alice.recv_type("presence").await;
        if f["uid"] == "bob" {
            assert_eq!(
                f,
                json!({"type":"presence","room":"lobby","uid":"bob","online":false})
            );
            break;
        }
    }
}

/// Posts `count` room messages to `room` through node `base`'s server API at once.
async fn api_burst(base: &str, room: &str, count: usize, tag: &str) {
    let mut tasks = Vec::new();
    for i in 0..count {
        let url = format!("{base}/api/messages");
        let body = json!({"from":"system","room":room,"body":format!("{tag} {i}"),"client_id":format!("{tag}{i}")});
        tasks.push(tokio::spawn(async move {
            common::http(
                "POST",
                &url,
                &[("Authorization", "Bearer k")],
                Some(&body.to_string()),
            )
            .await
            .unwrap()
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// A reading client is never closed, neither by a presence storm (150 members of its
/// three rooms coming online at once), nor by a `sync` in flight meanwhile (300
/// messages, in pages), nor by a 512-message burst from the other node, which crosses
/// in a few peer batches (not one POST per message).
#[tokio::test]
async fn a_reading_client_survives_a_presence_storm_and_a_peer_burst() {
    let env = ClusterEnv::start();
    let mut sa = env.settings("node-a");
    sa.limits.live_room_size = 1000;
    sa.api_key = Some("k".into());
    let mut sb = env.settings("node-b");
    sb.limits.live_room_size = 1000;
    let (a, b) = (TestNode::start(sa), TestNode::start(sb));
    let rooms = ["s1", "s2", "s3"];
    // 150 members, joined once
    for i in 0..150 {
        let mut c = Client::connect(&a, &format!("m{i}")).await;
        for r in rooms {
            c.join(r).await;
        }
    }
    let mut reader = Client::connect(&b, "reader").await;
    for r in rooms {
        reader.join(r).await;
    }
    reader.close().await;
    // 300 messages for the reader's sync, stored while it is away
    api_burst(&a.base, "s2", 300, "old").await;
    let mut reader = Client::connect(&b, "reader").await;
    let convs: Vec<String> = rooms.iter().map(|r| format!("room:{r}")).collect();
    let mut seen = Seen::default();
    let sync = |seen: &Seen| {
        let cursors: serde_json::Map<String, Value> = convs
            .iter()
            .map(|c| (c.clone(), json!(seen.cursor(c))))
            .collect();
        json!({"type":"sync","cursors":cursors})
    };
    // a sync in flight while all 150 come online at once, on the other node
    reader.send(sync(&seen)).await;
    let names: Vec<String> = (0..150).map(|i| format!("m{i}")).collect();
    let crowd = futures_util::future::join_all(names.iter().map(|n| Client::connect(&a, n))).await;
    // and 512 messages land in one room at once
    let posts = a.metric("chatmesh_peer_posts_total");
    let crossed = a.metric("chatmesh_peer_messages_total");
    api_burst(&a.base, "s1", 512, "burst").await;
    let (mut syncing, mut resync_due) = (true, false);
    let deadline = Instant::now() + common::WAIT;
    while syncing || seen.cursor("room:s1") < 512 {
        assert!(
            Instant::now() < deadline,
            "the burst or the sync did not arrive"
        );
        match reader.next_event().await {
            common::Event::Frame(f) => {
                seen.record(&f);
                resync_due |= f["type"] == "resync";
                if f["type"] == "synced" {
                    let more = !f["more"].as_array().is_none_or(|m| m.is_empty());
                    syncing = more || resync_due;
                    resync_due = false;
                    if syncing {
                        reader.send(sync(&seen)).await;
                    }
                }
            }
            common::Event::Closed(code) => panic!("a reading client was closed: {code:?}"),
        }
    }
    assert_eq!(
        seen.cursor("room:s2"),
        300,
        "the sync brought every message"
    );
    assert_eq!(b.metric("chatmesh_slow_consumers_closed_total"), 0.0);
    // the burst crossed in batches: 512 messages (more if the old ones were still
    // on their way), in a few POSTs
    let posts = a.metric("chatmesh_peer_posts_total") - posts;
    let crossed = a.metric("chatmesh_peer_messages_total") - crossed;
    eprintln!("the burst: {crossed} messages in {posts} peer POSTs");
    assert!(crossed >= 512.0, "{crossed} messages crossed");
    assert!(
        posts * 8.0 <= crossed,
        "{crossed} messages took {posts} POSTs"
    );
    drop(crowd);
}

/// PostgreSQL restarted under a running node (every connection cut): a write that meets
/// the cut fails with `unavailable`, the database writer takes a new connection, the
/// client resends with the same client id, and every message is stored once, in order;
/// the node is not restarted.
#[tokio::test]
async fn a_postgresql_restart_under_a_node_loses_nothing() {
    let mut pg = common::postgres::PgServer::start();
    let mut s = common::settings();
    s.database_url = pg.fresh_database();
    let node = TestNode::start(s);
    let mut alice = Client::connect(&node, "alice").await;
    assert_eq!(
        dms(&mut alice, "bob", 5, "before").await,
        vec![1, 2, 3, 4, 5]
    );

    pg.restart();
    let mut seqs = Vec::new();
    for i in 0..10 {
        let cid = format!("after{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            alice
                .send(json!({"type":"direct","to":"bob","body":cid,"client_id":cid}))
                .await;
            let answer = loop {
                let f = alice.recv().await;
                if f["type"] == "sent" || f["type"] == "error" {
                    break f;
                }
            };
            if answer["type"] == "sent" {
                assert_eq!(answer["client_id"], cid.as_str());
                seqs.push(answer["seq"].as_u64().unwrap());
                break;
            }
            assert_eq!(answer["code"], "unavailable", "{answer}");
            assert!(Instant::now() < deadline, "still unavailable: {answer}");
            // A pause before the resend, as a client backs off.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(seqs, (6..=15).collect::<Vec<u64>>());

    let mut bob = Client::connect(&node, "bob").await;
    let mut seen = Seen::default();
    let conv = chatmesh::protocol::dm_conv("alice", "bob");
    bob.sync_into(&mut seen, std::slice::from_ref(&conv)).await;
    assert_eq!(
        seen.convs[&conv].iter().copied().collect::<Vec<_>>(),
        (1..=15).collect::<Vec<u64>>()
    );
}
