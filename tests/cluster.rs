//! Cluster mode: several nodes on one real redis-server and one PostgreSQL database
//! (both started by the harness, private to the test).

mod common;

use std::collections::BTreeSet;

use common::{http, post_to_peer_api, Client, ClusterEnv, TestNode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// node-a, node-b and node-c on one cluster.
fn three_nodes(env: &ClusterEnv) -> (TestNode, TestNode, TestNode) {
    (env.node("node-a"), env.node("node-b"), env.node("node-c"))
}

/// Whether `node` is in the set at `key`.
fn in_set(env: &ClusterEnv, key: &str, node: &str) -> bool {
    ::redis::cmd("SISMEMBER")
        .arg(key)
        .arg(node)
        .query(&mut env.redis.connection())
        .unwrap_or(false)
}

#[tokio::test]
async fn cross_node_direct_and_multi_device_cost_one_peer_message_per_node() {
    let env = ClusterEnv::start();
    let (a, b, c) = three_nodes(&env);
    let mut alice = Client::connect(&a, "alice").await;
    assert_eq!(alice.welcome["node"], "node-a");
    let mut alice_phone = Client::connect(&b, "alice").await;
    let mut bob = Client::connect(&b, "bob").await;
    let mut bob_laptop = Client::connect(&b, "bob").await;

    let sent = alice.direct("bob", "across nodes", "k1").await;
    for c in [&mut bob, &mut bob_laptop, &mut alice_phone] {
        let m = c.recv_type("message").await;
        assert_eq!(m["body"], "across nodes");
        assert_eq!(m["seq"], sent["seq"]);
        assert_eq!(m["id"], sent["id"]);
    }
    assert!(alice.drain().await.is_empty(), "no echo");
    // one message to node-b, which holds three recipients; nothing to node-c (the
    // number of posts is not asserted: alice's and bob's presence go to the peers too,
    // in the same post as the message or in one of their own, as timing has it)
    assert_eq!(a.metric("chatmesh_peer_messages_total"), 1.0);
    assert_eq!(c.metric("chatmesh_peer_received_total"), 0.0);
    assert_eq!(b.metric("chatmesh_peer_received_total"), 1.0);

    // and back
    bob.direct("alice", "reply", "b1").await;
    assert_eq!(alice.recv_type("message").await["body"], "reply");
    assert_eq!(alice_phone.recv_type("message").await["body"], "reply");
    assert_eq!(b.metric("chatmesh_peer_messages_total"), 1.0);
}

#[tokio::test]
async fn dm_to_a_user_on_one_node_costs_exactly_one_peer_message() {
    let env = ClusterEnv::start();
    let (a, b, c) = three_nodes(&env);
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect(&b, "bob").await;
    let _carol = Client::connect(&c, "carol").await;
    alice.direct("bob", "just you", "k").await;
    assert_eq!(bob.recv_type("message").await["body"], "just you");
    assert_eq!(a.metric("chatmesh_peer_messages_total"), 1.0);
    assert_eq!(c.metric("chatmesh_peer_received_total"), 0.0);
    // to an offline user: stored, no peer message at all
    alice.direct("dave", "later", "k2").await;
    assert_eq!(a.metric("chatmesh_peer_messages_total"), 1.0);
}

#[tokio::test]
async fn room_message_to_30_members_on_two_other_nodes_costs_two() {
    let env = ClusterEnv::start();
    let (a, b, c) = three_nodes(&env);
    let mut sender = Client::connect(&a, "sender").await;
    sender.join("big").await;
    let mut members = Vec::new();
    for i in 0..30 {
        let n = if i % 2 == 0 { &b } else { &c };
        let mut m = Client::connect(n, &format!("m{i}")).await;
        m.join("big").await;
        members.push(m);
    }
    let sent = sender.room("big", "hello all", "k").await;
    for m in &mut members {
        let got = m.recv_type("message").await;
        assert_eq!(
            (got["body"].as_str(), got["seq"].clone()),
            (Some("hello all"), sent["seq"].clone())
        );
    }
    assert_eq!(
        a.metric("chatmesh_peer_messages_total"),
        2.0,
        "once per node, whatever the member count"
    );
    assert_eq!(b.metric("chatmesh_peer_received_total"), 1.0);
    assert_eq!(c.metric("chatmesh_peer_received_total"), 1.0);
}

#[tokio::test]
async fn resend_to_another_node_is_deduplicated() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut on_a = Client::connect(&a, "alice").await;
    let first = on_a.direct("bob", "once", "same-id").await;
    drop(on_a);
    let mut on_b = Client::connect(&b, "alice").await;
    let again = on_b.direct("bob", "once", "same-id").await;
    assert_eq!(first, again);
    let mut bob = Client::connect(&b, "bob").await;
    bob.send(json!({"type":"history","conv":"dm:alice:bob"}))
        .await;
    assert_eq!(
        bob.recv_type("history").await["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn three_nodes_fifty_each_into_one_room() {
    let env = ClusterEnv::start();
    let nodes = [env.node("n1"), env.node("n2"), env.node("n3")];
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c = Client::connect(n, &format!("u{i}")).await;
        c.join("race").await;
        clients.push(c);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for k in 0..50 {
                c.send(json!({"type":"room","room":"race","body":format!("{i}-{k}"),"client_id":format!("k{k}")}))
                    .await;
            }
            let (mut mine, mut others) = (Vec::new(), Vec::new());
            while mine.len() < 50 || others.len() < 100 {
                let f = c.recv().await;
                match f["type"].as_str() {
                    Some("sent") => mine.push(f["seq"].as_u64().unwrap()),
                    Some("message") => others.push((f["from"].as_str().unwrap().to_owned(), f["seq"].as_u64().unwrap())),
                    _ => {}
                }
            }
            // and nothing more: exactly the others' 100
            let extra: Vec<_> = c.drain().await.into_iter().filter(|f| f["type"] == "message").collect();
            assert!(extra.is_empty(), "duplicates: {extra:?}");
            (i, mine, others)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (i, mine, others) = t.await.unwrap();
        assert!(others.iter().all(|(from, _)| *from != format!("u{i}")));
        let distinct: BTreeSet<u64> = others.iter().map(|(_, s)| *s).collect();
        assert_eq!(distinct.len(), 100);
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=150).collect::<Vec<u64>>());
}

#[tokio::test]
async fn peer_api_needs_the_cluster_secret() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut bob = Client::connect(&a, "bob").await;
    let batch = json!({"from":"intruder","messages":[{"conv":"dm:bob:eve","seq":1,"id":"x","from":"eve","to":"bob","body":"forged","ts":1}]}).to_string();
    let url = format!("{}/internal/deliver", a.internal);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "test-cluster-secret")],
    ] {
        let r = http("POST", &url, &headers, Some(&batch)).await.unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "unauthorized");
    }
    assert!(bob.drain().await.is_empty(), "nothing delivered");
    let r = post_to_peer_api(&a.internal, &batch).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        bob.recv_type("message").await["body"],
        "forged",
        "the right secret is accepted"
    );
    let r = post_to_peer_api(&a.internal, "{nope").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn presence_across_nodes() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("lobby").await;
    {
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("lobby").await;
    }
    // bob's first connection anywhere is announced to members on other nodes
    let bob = Client::connect(&b, "bob").await;
    let mut seen = Vec::new();
    while seen.last() != Some(&json!({"type":"presence","room":"lobby","uid":"bob","online":true}))
    {
        seen.push(alice.recv_type("presence").await);
    }
    assert_eq!(
        alice.presence(&["bob", "nobody"]).await,
        vec![
            json!({"type":"presence","uid":"bob","online":true}),
            json!({"type":"presence","uid":"nobody","online":false})
        ]
    );
    // a second device on another node is not a new arrival; the last one leaving is
    let bob_a = Client::connect(&a, "bob").await;
    drop(bob);
    drop(bob_a);
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","room":"lobby","uid":"bob","online":false})
    );
}

/// Presence announced while a node is not yet in a peer's live table. node-a beats every
/// 10 s, so node-b, started after node-a's first beat, stays out of node-a's table for
/// seconds. alice (in lobby) leaves node-a in that time; carol on node-b, subscribed to
/// alice and in lobby, is not told then. Returns node-a, node-b and carol.
async fn alice_leaves_node_a_before_it_sees_node_b(
    env: &ClusterEnv,
) -> (TestNode, TestNode, Client) {
    let mut slow = env.settings("node-a");
    slow.heartbeat = PRESENCE_SLOW_BEAT;
    slow.node_ttl = PRESENCE_SLOW_BEAT * 3;
    let a = TestNode::start(slow);
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("lobby").await;
    let mut dave = Client::connect(&a, "dave").await;
    dave.send(json!({"type":"presence","uids":["alice"],"subscribe":true}))
        .await;
    assert_eq!(dave.recv_type("presence").await["online"], true);

    let b = TestNode::start(fast_with_slow_ttl(env, "node-b"));
    let mut carol = Client::connect(&b, "carol").await;
    carol.join("lobby").await;
    carol
        .send(json!({"type":"presence","uids":["alice"],"subscribe":true}))
        .await;
    assert_eq!(
        carol.recv_type("presence").await,
        json!({"type":"presence","uid":"alice","online":true})
    );

    alice.close().await;
    while dave.recv_type("presence").await
        != json!({"type":"presence","uid":"alice","online":false})
    {}
    assert_no_beat_yet(&a);
    (a, b, carol)
}

const PRESENCE_SLOW_BEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// A node that beats fast (it sees the others at once), with node-a's TTL (so node-a is
/// not dead to it between node-a's slow beats).
fn fast_with_slow_ttl(env: &ClusterEnv, id: &str) -> chatmesh::config::Settings {
    let mut s = env.settings(id);
    s.node_ttl = PRESENCE_SLOW_BEAT * 3;
    s
}

fn assert_no_beat_yet(a: &TestNode) {
    assert_eq!(
        a.metric("chatmesh_live_peers"),
        0.0,
        "node-a already had its next heartbeat: this test needs a slower one"
    );
}

/// The next presence frame of the subscription to alice.
async fn next_about_alice(c: &mut Client) -> Value {
    loop {
        let f = c.recv_type("presence").await;
        if f["uid"] == "alice" && f.get("room").is_none() {
            return f;
        }
    }
}

/// At its next heartbeat node-a sees node-b and replays what it announced: carol learns
/// that alice went offline, on the subscription and in the room.
#[tokio::test]
async fn a_new_node_gets_the_presence_changes_announced_before_the_others_saw_it() {
    let env = ClusterEnv::start();
    let (a, _b, mut carol) = alice_leaves_node_a_before_it_sees_node_b(&env).await;
    let mut wanted = vec![
        json!({"type":"presence","uid":"alice","online":false}),
        json!({"type":"presence","room":"lobby","uid":"alice","online":false}),
    ];
    while !wanted.is_empty() {
        let f = carol.recv_type("presence").await;
        wanted.retain(|w| *w != f);
    }
    assert_eq!(a.metric("chatmesh_live_peers"), 1.0);
}

/// A replay is a recheck: by the time node-a replays alice's going offline, alice came
/// back on node-c (which announced it to node-b at once), and carol must be left with
/// alice online, not with the replay's stale offline.
#[tokio::test]
async fn a_replayed_presence_change_does_not_undo_a_newer_one() {
    let env = ClusterEnv::start();
    let (a, _b, mut carol) = alice_leaves_node_a_before_it_sees_node_b(&env).await;
    let c = TestNode::start(fast_with_slow_ttl(&env, "node-c"));
    let _alice = Client::connect(&c, "alice").await;
    assert_eq!(next_about_alice(&mut carol).await["online"], true);
    assert_no_beat_yet(&a);
    common::eventually_within("node-a sees node-b", PRESENCE_SLOW_BEAT * 2, || {
        a.metric("chatmesh_live_peers") == 2.0
    })
    .await;
    // the replay, rechecked by node-b: alice is online
    assert_eq!(
        next_about_alice(&mut carol).await,
        json!({"type":"presence","uid":"alice","online":true})
    );
}

#[tokio::test]
async fn membership_made_on_one_node_reaches_the_users_other_nodes() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut carol = Client::connect(&a, "carol").await;
    carol.join("lobby").await;
    let mut alice_a = Client::connect(&a, "alice").await;
    let mut alice_b = Client::connect(&b, "alice").await;
    alice_a.join("lobby").await;
    // `joined` came only after node-b, which holds alice's other connection, routes
    // the room there too.
    assert!(in_set(&env, "chatmesh:room_nodes:lobby", "node-b"));
    carol.room("lobby", "welcome alice", "c1").await;
    assert_eq!(alice_a.recv_type("message").await["body"], "welcome alice");
    assert_eq!(alice_b.recv_type("message").await["body"], "welcome alice");
}

#[tokio::test]
async fn a_killed_node_loses_nothing_that_was_sent() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut doomed = env.process("node-doomed");
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect_url(&doomed.ws_url("bob"), "bob").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            alice
                .direct("bob", &format!("m{i}"), &format!("k{i}"))
                .await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    // bob read some of them, then his node dies without a goodbye
    let first = bob.recv_type("message").await["seq"].as_u64().unwrap();
    doomed.kill();
    // more messages while the node is dead (before and after it is noticed)
    for i in 20..30 {
        sent.push(
            alice
                .direct("bob", &format!("m{i}"), &format!("k{i}"))
                .await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    common::eventually("node-a to notice the dead node", || {
        common::http_blocking("GET", &format!("{}/readyz", a.base), &[], None).is_ok()
            && a.metric("chatmesh_peer_queue_depth") == 0.0
    })
    .await;
    alice.wait_online("bob", false).await;
    // bob reconnects to the surviving node and catches up from his cursor
    let mut bob = Client::connect(&a, "bob").await;
    bob.send(json!({"type":"sync","cursors":{"dm:alice:bob": first}}))
        .await;
    let mut got = Vec::new();
    loop {
        let f = bob.recv().await;
        match f["type"].as_str() {
            Some("synced") => break,
            Some("message") => got.push(f["seq"].as_u64().unwrap()),
            // node-a's cleanup of the dead node tells the connections of its users'
            // conversations to resync, and bob's new one may already be among them
            Some("resync") => {}
            _ => panic!("unexpected frame before synced: {f}"),
        }
    }
    let expected: Vec<u64> = sent.iter().copied().filter(|s| *s > first).collect();
    assert_eq!(got, expected);
}

/// PostgreSQL frozen (SIGSTOP): a send answers `unavailable` within the store timeout,
/// /readyz answers 503, and after SIGCONT the retry with the same client id lands once.
#[tokio::test]
async fn paused_postgres_gives_unavailable_and_the_retry_lands_once() {
    let pg = common::postgres::PgServer::start();
    let redis = common::redis::RedisServer::start();
    let mut s = common::cluster_settings(&redis.url, &pg.fresh_database(), "node-a");
    s.store_timeout = std::time::Duration::from_millis(500);
    let a = TestNode::start(s);
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect(&a, "bob").await;
    alice.direct("bob", "before", "k0").await;
    bob.recv_type("message").await;
    pg.pause();
    let asked = std::time::Instant::now();
    alice
        .send(json!({"type":"direct","to":"bob","body":"during","client_id":"k1"}))
        .await;
    // While her send waits on the database, her connection still gets what needs none.
    bob.send(json!({"type":"typing","conv":"dm:alice:bob"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"typing","conv":"dm:alice:bob","uid":"bob"}),
        "a connection waiting on the store keeps receiving"
    );
    let e = alice.recv().await;
    // Answered at the store deadline (500 ms), not whenever the database comes back.
    let waited = asked.elapsed();
    assert!(
        waited < std::time::Duration::from_millis(2500),
        "unavailable took {waited:?} with a 500 ms store timeout"
    );
    assert_eq!(
        (
            e["type"].as_str(),
            e["code"].as_str(),
            e["client_id"].as_str()
        ),
        (Some("error"), Some("unavailable"), Some("k1"))
    );
    let r = http("GET", &format!("{}/readyz", a.base), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    pg.resume();
    common::eventually("readyz again", || {
        common::http_blocking("GET", &format!("{}/readyz", a.base), &[], None)
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let sent = alice.direct("bob", "during", "k1").await;
    assert_eq!(sent["seq"], 2);
    assert_eq!(bob.recv_message_of(&sent).await["body"], "during");
    bob.send(json!({"type":"history","conv":"dm:alice:bob"}))
        .await;
    let h = bob.recv_type("history").await;
    let bodies: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["before", "during"], "stored exactly once");
}

/// A connection whose directory record timed out leaves no count behind: the record
/// lands late (Redis was only slow), and the removal sent when the connection closed
/// follows it on the same Redis connection and undoes it.
#[tokio::test]
async fn a_directory_record_that_timed_out_leaves_no_count_behind() {
    let env = ClusterEnv::start();
    let mut s = env.settings("node-a");
    s.store_timeout = std::time::Duration::from_millis(300);
    // No heartbeat during the test: its write would queue ahead of carol's reads.
    s.heartbeat = std::time::Duration::from_secs(60);
    s.node_ttl = std::time::Duration::from_secs(180);
    let a = TestNode::start(s);
    let mut dave = Client::connect(&a, "dave").await;
    let mut con = env.redis.connection();
    let count = |con: &mut redis::Connection, key: String| -> i64 {
        redis::cmd("SCARD").arg(key).query(con).unwrap()
    };

    // Writes wait, reads go on: carol's rooms are read, then her directory record
    // waits past the node's deadline and she is refused with 1013.
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query(&mut con)
        .unwrap();
    let (code, frames) = Client::connect_refused(&a, "carol").await;
    assert_eq!(code, Some(CloseCode::Again), "frames: {frames:?}");
    let () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut con).unwrap();

    // Now the late record has landed, or will, with its removal behind it.
    let carol = Client::connect(&a, "carol").await;
    assert_eq!(dave.presence(&["carol"]).await[0]["online"], true);
    carol.close().await;
    common::eventually("carol's directory entry removed", || {
        count(&mut con, chatmesh::keys::user_nodes("carol")) == 0
    })
    .await;
    assert_eq!(dave.presence(&["carol"]).await[0]["online"], false);
    assert_eq!(count(&mut con, chatmesh::keys::user_nodes("dave")), 1);
}

#[tokio::test]
async fn graceful_stop_deregisters_and_closes_with_1012() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut p = env.process("node-p");
    let mut bob = Client::connect_url(&p.ws_url("bob"), "bob").await;
    let mut conn = env.redis.connection();
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("chatmesh:nodes")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert!(members.contains(&"node-p".to_string()));
    let code = p.terminate();
    let (close, _) = bob.expect_close().await;
    assert_eq!(close, Some(CloseCode::Restart));
    assert_eq!(code, Some(0), "exit 0");
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("chatmesh:nodes")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        members,
        vec!["node-a".to_string()],
        "deregistered at once, not after the TTL"
    );
    let bob_nodes: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg("chatmesh:user_nodes:bob")
        .query(&mut conn)
        .unwrap();
    assert!(bob_nodes.is_empty());
    drop(a);
}

#[tokio::test]
async fn end_to_end_through_nginx_in_front_of_two_nodes() {
    let env = ClusterEnv::start();
    let n1 = env.node("node-1");
    let n2 = env.node("node-2");
    let addr = |n: &TestNode| n.base.trim_start_matches("http://").parse().unwrap();
    let nginx = common::nginx::Nginx::start(&[addr(&n1), addr(&n2)]);

    // Pages and health go through nginx; the peer API never does.
    let page = http("GET", &nginx.url("/chat?uid=alice&to=bob"), &[], None)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains(r#"data-conv="dm:alice:bob""#));
    let r = http(
        "POST",
        &nginx.url("/internal/deliver"),
        &[("Authorization", "Bearer test-cluster-secret")],
        Some("{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);

    // Websockets through nginx land on both nodes (least_conn) and talk across them.
    let mut alice = Client::connect_url(&nginx.ws_url("alice"), "alice").await;
    let mut bob = Client::connect_url(&nginx.ws_url("bob"), "bob").await;
    assert_ne!(
        alice.welcome["node"], bob.welcome["node"],
        "one user per node"
    );
    let sent = alice.direct("bob", "through nginx", "k1").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["body"].as_str(), m["seq"].clone()),
        (Some("through nginx"), sent["seq"].clone())
    );
    alice.join("lobby").await;
    bob.join("lobby").await;
    bob.room("lobby", "room through nginx", "k2").await;
    assert_eq!(
        alice.recv_type("message").await["body"],
        "room through nginx"
    );
    assert_eq!(
        n1.metric("chatmesh_peer_messages_total") + n2.metric("chatmesh_peer_messages_total"),
        2.0,
        "one peer message per cross-node send"
    );
}

/// Heartbeats slower than the harness's, so that a busy machine does not make a node
/// look cut off (which would rightly resync all its connections).
const SLOW_BEAT: std::time::Duration = std::time::Duration::from_millis(300);
const SLOW_TTL: std::time::Duration = std::time::Duration::from_millis(3000);

/// node-d as a process, with the slow heartbeats and `args`.
fn slow_process(env: &ClusterEnv, args: &[&str]) -> common::ProcessNode {
    let (beat, ttl) = (
        SLOW_BEAT.as_millis().to_string(),
        SLOW_TTL.as_millis().to_string(),
    );
    let mut all = vec!["--heartbeat-ms", &beat, "--node-ttl-ms", &ttl];
    all.extend_from_slice(args);
    common::ProcessNode::start_with(&env.redis.url, &env.db, "node-d", &all)
}

/// Three nodes, one of them (node-d) to be killed, with dora on it; on the survivors,
/// carol shares a room with dora and erin a DM, while frank and gina share a room and a
/// DM with each other only. dora's connection is returned too: it must stay open until
/// node-d dies.
async fn dora_and_friends(
    env: &ClusterEnv,
    d: &common::ProcessNode,
) -> (TestNode, TestNode, [Client; 5]) {
    let node = |id| {
        let mut s = env.settings(id);
        (s.heartbeat, s.node_ttl) = (SLOW_BEAT, SLOW_TTL);
        TestNode::start(s)
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let mut dora = Client::connect_url(&d.ws_url("dora"), "dora").await;
    dora.join("shared").await;
    let mut carol = Client::connect(&a, "carol").await;
    carol.join("shared").await;
    let erin = Client::connect(&b, "erin").await;
    dora.direct("erin", "hi", "h1").await;
    let mut frank = Client::connect(&a, "frank").await;
    frank.join("elsewhere").await;
    let mut gina = Client::connect(&b, "gina").await;
    gina.join("elsewhere").await;
    frank.direct("gina", "hello", "g1").await;
    // every survivor knows where dora is
    carol.wait_online("dora", true).await;
    gina.wait_online("dora", true).await;
    (a, b, [dora, carol, erin, frank, gina])
}

/// Reads until a `resync` comes.
async fn until_resync(c: &mut Client) {
    while c.recv().await["type"] != "resync" {}
}

/// After a node dies, the survivors resync only the connections that may have missed
/// something (those in a conversation with one of its users: a room, a DM), whichever
/// survivor they are on; a connection sharing nothing with them gets no `resync`.
#[tokio::test]
async fn a_dead_node_resyncs_only_the_conversations_of_its_users() {
    let env = ClusterEnv::start();
    let mut d = slow_process(&env, &[]);
    let (_a, _b, [_dora, mut carol, mut erin, mut frank, mut gina]) =
        dora_and_friends(&env, &d).await;
    d.kill();
    until_resync(&mut carol).await;
    until_resync(&mut erin).await;
    // Each node resyncs in one go: had frank or gina been told, it would be queued
    // already.
    for c in [&mut frank, &mut gina] {
        let frames = c.drain().await;
        assert!(
            frames.iter().all(|f| f["type"] != "resync"),
            "{} shares nothing with dora: {frames:?}",
            c.uid
        );
    }
}

/// A node that stored a message for the server API (which may be to any conversation)
/// and died: every connection on the survivors is told to resync.
#[tokio::test]
async fn a_dead_node_that_stored_api_messages_resyncs_everyone() {
    let env = ClusterEnv::start();
    let mut d = slow_process(&env, &["--api-key", "k"]);
    let (_a, _b, [_dora, _, _, mut frank, mut gina]) = dora_and_friends(&env, &d).await;
    let r = http(
        "POST",
        &format!("{}/api/messages", d.base),
        &[("Authorization", "Bearer k")],
        Some(&json!({"from":"system","to":"zed","body":"notice"}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    d.kill();
    until_resync(&mut frank).await;
    until_resync(&mut gina).await;
}

#[tokio::test]
async fn a_dead_nodes_users_are_announced_offline() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let mut doomed = env.process("node-doomed");
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("lobby").await;
    let mut bob = Client::connect_url(&doomed.ws_url("bob"), "bob").await;
    bob.join("lobby").await;
    // wait for node-a to know bob is there
    alice.wait_online("bob", true).await;
    doomed.kill();
    let event = loop {
        let f = alice.recv_type("presence").await;
        if f.get("room").is_some() {
            break f;
        }
    };
    assert_eq!(
        event,
        json!({"type":"presence","room":"lobby","uid":"bob","online":false})
    );
}

/// Redis restarted empty (no persistence): nothing is lost (it held no message), the
/// nodes write their directory entries again within a heartbeat, their connections are
/// told to resync, seqs go on from the database, and live delivery resumes.
#[tokio::test]
async fn redis_losing_its_data_loses_nothing_and_delivery_resumes() {
    let mut env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect(&b, "bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    alice.direct("bob", "before", "k1").await;
    bob.recv_type("message").await;
    env.redis.restart(); // no AOF: everything is gone, including the directory
    assert_eq!(bob.recv_type("resync").await, json!({"type":"resync"}));
    common::eventually("node-b to write bob's directory entry again", || {
        in_set(&env, "chatmesh:user_nodes:bob", "node-b")
            && in_set(&env, "chatmesh:room_nodes:lobby", "node-b")
    })
    .await;
    let sent = alice.direct("bob", "after", "k2").await;
    assert_eq!(sent["seq"], 2, "the seq counter lives in the database");
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["body"].as_str(), m["seq"].as_u64()),
        (Some("after"), Some(2))
    );
    alice.room("lobby", "room after", "k3").await;
    assert_eq!(bob.recv_type("message").await["body"], "room after");
}

#[test]
fn cluster_mode_refuses_to_start_without_a_secret() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatmesh"))
        .args([
            "--redis-url",
            "redis://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .env_remove("CHATMESH_CLUSTER_SECRET")
        .output()
        .expect("run chatmesh");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cluster-secret"), "{stderr}");
}

/// A stand-in peer: registered in Redis like a node (kept alive by heartbeats from the
/// test), its peer API a plain TCP listener that records each POST.
struct FakePeer {
    posts: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakePeer {
    /// Registers node `id` at `port` and keeps its heartbeat fresh until dropped.
    fn register(redis: &common::redis::RedisServer, id: &'static str, port: u16) -> FakePeer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut conn = redis.connection();
        let keep = stop.clone();
        std::thread::spawn(move || {
            while !keep.load(std::sync::atomic::Ordering::Relaxed) {
                let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query(&mut conn).unwrap();
                let now = secs * 1000 + micros / 1000;
                let _: () = ::redis::pipe()
                    .hset(
                        "chatmesh:node_addrs",
                        id,
                        format!("http://127.0.0.1:{port}"),
                    )
                    .zadd("chatmesh:nodes", id, now)
                    .query(&mut conn)
                    .unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        FakePeer {
            posts: Default::default(),
            connections: Default::default(),
            stop,
        }
    }

    /// Starts answering POSTs on `port` with 200.
    async fn listen(&self, port: u16) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let posts = self.posts.clone();
        let connections = self.connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let posts = posts.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // one request at a time on a kept-alive connection
                        let mut chunk = [0u8; 65536];
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() < len {
                            continue;
                        }
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("authorization: ")
                                    .or_else(|| l.strip_prefix("Authorization: "))
                            })
                            .unwrap_or("")
                            .to_owned();
                        posts
                            .lock()
                            .unwrap()
                            .push((auth, serde_json::from_str(&body[..len]).unwrap()));
                        buf.clear();
                        let reply =
                            "HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"delivered\":0}";
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test]
async fn failed_peer_posts_are_retried_and_coalesced() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let port = common::free_port();
    let peer = FakePeer::register(&env.redis, "node-fake", port);
    // bob is connected to the fake node, as far as the directory knows
    let mut conn = env.redis.connection();
    let _: () = ::redis::cmd("SADD")
        .arg("chatmesh:user_nodes:bob")
        .arg("node-fake")
        .query(&mut conn)
        .unwrap();
    let mut alice = Client::connect(&a, "alice").await;
    // the peer is down: every send is stored and confirmed all the same
    for i in 0..30 {
        alice
            .direct("bob", &format!("m{i}"), &format!("k{i}"))
            .await;
    }
    common::eventually("a failed POST", || {
        a.metric("chatmesh_peer_failures_total") >= 1.0
    })
    .await;
    // the peer comes up: the queue drains, in order, in few POSTs
    peer.listen(port).await;
    common::eventually("all 30 messages to reach the peer", || {
        peer.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b["messages"].as_array().unwrap().len())
            .sum::<usize>()
            == 30
    })
    .await;
    let posts = peer.posts.lock().unwrap().clone();
    assert!(
        posts.len() <= 3,
        "coalesced: {} POSTs for 30 messages",
        posts.len()
    );
    let seqs: Vec<u64> = posts
        .iter()
        .flat_map(|(_, b)| {
            b["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    for (auth, body) in &posts {
        assert_eq!(auth, "Bearer test-cluster-secret");
        assert_eq!(body["from"], "node-a");
    }
    assert_eq!(a.metric("chatmesh_peer_queue_depth"), 0.0);
}

#[tokio::test]
async fn peer_connections_are_kept_alive() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let port = common::free_port();
    let peer = FakePeer::register(&env.redis, "node-fake", port);
    peer.listen(port).await;
    let mut conn = env.redis.connection();
    let _: () = ::redis::cmd("SADD")
        .arg("chatmesh:user_nodes:bob")
        .arg("node-fake")
        .query(&mut conn)
        .unwrap();
    let mut alice = Client::connect(&a, "alice").await;
    for i in 1..=10usize {
        alice
            .direct("bob", &format!("m{i}"), &format!("k{i}"))
            .await;
        // one POST at a time, each after the previous one was answered
        common::eventually("the POST", || peer.posts.lock().unwrap().len() == i).await;
    }
    assert_eq!(
        peer.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "ten POSTs over one kept-alive connection"
    );
}
