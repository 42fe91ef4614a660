//! Inbox, receipts, typing, edits and deletes (contract section 8) and presence
//! subscriptions (section 3), on one node and across two cluster nodes.

mod common;

use std::time::{Duration, Instant};

use common::{http, settings, Client, ClusterEnv, TestNode};
use serde_json::{json, Value};

async fn ask(c: &mut Client, frame: Value, types: &[&str]) -> Value {
    c.send(frame).await;
    c.recv_type_of(types).await
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

/// Frames of `types` among everything queued for `c`.
async fn pending(c: &mut Client, types: &[&str]) -> Vec<Value> {
    c.drain()
        .await
        .into_iter()
        .filter(|f| types.iter().any(|t| f["type"] == *t))
        .collect()
}

/// Marks: stored, never back, pushed to the other participant and the reader's other
/// devices (not the connection that sent it); receipts for participants.
async fn marks(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut bob_phone = Client::connect(alice_node, "bob").await;
    for i in 1..=3 {
        alice
            .direct("bob", &format!("m{i}"), &format!("k{i}"))
            .await;
    }
    for c in [&mut bob, &mut bob_phone] {
        while c.recv_type("message").await["seq"] != 3 {}
    }
    bob.send(json!({"type":"read","conv":"dm:alice:bob","seq":2}))
        .await;
    let event = json!({"type":"read","conv":"dm:alice:bob","uid":"bob","seq":2});
    assert_eq!(alice.recv_type("read").await, event);
    assert_eq!(bob_phone.recv_type("read").await, event);
    assert!(pending(&mut bob, &["read"]).await.is_empty(), "not echoed");
    // never back: a lower mark is ignored; one above the newest message is invalid
    bob.send(json!({"type":"read","conv":"dm:alice:bob","seq":1}))
        .await;
    let e = ask(
        &mut bob,
        json!({"type":"read","conv":"dm:alice:bob","seq":9}),
        &["error"],
    )
    .await;
    assert_eq!(code(&e), "invalid", "{e}");
    assert!(
        pending(&mut alice, &["read"]).await.is_empty(),
        "no event for a lower mark"
    );
    bob.send(json!({"type":"delivered","conv":"dm:alice:bob","seq":3}))
        .await;
    assert_eq!(
        alice.recv_type("delivered").await,
        json!({"type":"delivered","conv":"dm:alice:bob","uid":"bob","seq":3})
    );
    let r = ask(
        &mut alice,
        json!({"type":"receipts","conv":"dm:alice:bob"}),
        &["receipts"],
    )
    .await;
    assert_eq!(
        r,
        json!({"type":"receipts","conv":"dm:alice:bob","read":{"alice":3,"bob":2},"delivered":{"alice":3,"bob":3}})
    );
    let mut carol = Client::connect(alice_node, "carol").await;
    let e = ask(
        &mut carol,
        json!({"type":"receipts","conv":"dm:alice:bob"}),
        &["receipts", "error"],
    )
    .await;
    assert_eq!(code(&e), "not_member", "{e}");
    let e = ask(
        &mut carol,
        json!({"type":"read","conv":"dm:alice:bob","seq":1}),
        &["error"],
    )
    .await;
    assert_eq!(code(&e), "not_member", "{e}");
}

/// A new member starts with the room's history read (section 8), and that mark is
/// pushed like an explicit `read`: the sender's connection sees bob (who joined) and
/// carol (added by an owner) at its message live, as `receipts` has them.
async fn joining_marks(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    alice.join("team").await;
    let seq = alice.room("team", "hello", "j1").await["seq"].clone();
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut bob_phone = Client::connect(alice_node, "bob").await;
    bob.join("team").await;
    let bob_read = json!({"type":"read","conv":"room:team","uid":"bob","seq":seq});
    assert_eq!(alice.recv_type("read").await, bob_read);
    assert_eq!(bob_phone.recv_type("read").await, bob_read, "other device");
    assert!(
        pending(&mut bob, &["read"]).await.is_empty(),
        "not echoed to the joining connection"
    );
    let mut carol = Client::connect(bob_node, "carol").await;
    alice
        .send(json!({"type":"add","room":"team","uid":"carol"}))
        .await;
    // the mark is pushed before the owner's `added` answer is written
    let mut answers = Vec::new();
    while answers.len() < 2 {
        answers.push(alice.recv_type_of(&["added", "read"]).await);
    }
    assert_eq!(carol.recv_type("joined").await["by"], "alice");
    let carol_read = json!({"type":"read","conv":"room:team","uid":"carol","seq":seq});
    assert!(answers.contains(&carol_read), "{answers:?}");
    assert!(answers.iter().any(|a| a["type"] == "added"), "{answers:?}");
    assert_eq!(bob.recv_type("read").await, carol_read);
    assert_eq!(carol.recv_type("read").await, carol_read, "her own device");
    let r = ask(
        &mut alice,
        json!({"type":"receipts","conv":"room:team"}),
        &["receipts"],
    )
    .await;
    assert_eq!(r["read"], json!({"alice":seq,"bob":seq,"carol":seq}), "{r}");
    // joining again sets nothing, so nothing is pushed
    bob.join("team").await;
    assert!(pending(&mut alice, &["read"]).await.is_empty());
}

/// Typing: forwarded to the other participants only, at most once a second per user
/// and conversation, also in small rooms.
async fn typing(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut bob_phone = Client::connect(alice_node, "bob").await;
    let start = Instant::now();
    for _ in 0..20 {
        bob.send(json!({"type":"typing","conv":"dm:alice:bob"}))
            .await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a burst within a second"
    );
    assert_eq!(
        alice.recv_type("typing").await,
        json!({"type":"typing","conv":"dm:alice:bob","uid":"bob"})
    );
    let more = pending(&mut alice, &["typing"]).await.len();
    assert!(
        more <= 1,
        "20 typing frames in a second forwarded {} times",
        more + 1
    );
    assert!(
        pending(&mut bob_phone, &["typing"]).await.is_empty(),
        "not to the typer"
    );
    ask(
        &mut alice,
        json!({"type":"join","room":"small"}),
        &["joined"],
    )
    .await;
    ask(&mut bob, json!({"type":"join","room":"small"}), &["joined"]).await;
    alice
        .send(json!({"type":"typing","conv":"room:small"}))
        .await;
    assert_eq!(bob.recv_type("typing").await["conv"], "room:small");
    let mut carol = Client::connect(alice_node, "carol").await;
    let e = ask(
        &mut carol,
        json!({"type":"typing","conv":"dm:alice:bob"}),
        &["error"],
    )
    .await;
    assert_eq!(code(&e), "not_member", "{e}");
}

/// Edits by the author, deletes by the author or a room owner; others refused;
/// history shows the latest body, and no body for a deleted message.
async fn edits_and_deletes(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut carol = Client::connect(alice_node, "carol").await;
    ask(&mut alice, json!({"type":"join","room":"ed"}), &["joined"]).await;
    for c in [&mut bob, &mut carol] {
        ask(c, json!({"type":"join","room":"ed"}), &["joined"]).await;
    }
    let m1 = bob.room("ed", "helo", "b1").await;
    let seq = m1["seq"].as_u64().unwrap();
    let sent = ask(
        &mut bob,
        json!({"type":"edit","conv":"room:ed","seq":seq,"body":"hello","client_id":"e1"}),
        &["sent", "error"],
    )
    .await;
    assert_eq!(sent["client_id"], "e1");
    let m = loop {
        let m = alice.recv_type("message").await;
        if m.get("edit").is_some() {
            break m;
        }
    };
    assert_eq!(
        (m["edit"].as_u64(), m["body"].as_str()),
        (Some(seq), Some("hello"))
    );
    let e = ask(
        &mut carol,
        json!({"type":"edit","conv":"room:ed","seq":seq,"body":"mine","client_id":"c1"}),
        &["sent", "error"],
    )
    .await;
    assert_eq!(
        (code(&e), e["client_id"].as_str()),
        ("forbidden", Some("c1"))
    );
    let e = ask(
        &mut carol,
        json!({"type":"delete","conv":"room:ed","seq":seq,"client_id":"c2"}),
        &["sent", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    // the owner (alice made the room) deletes bob's message
    let d = ask(
        &mut alice,
        json!({"type":"delete","conv":"room:ed","seq":seq,"client_id":"a1"}),
        &["sent", "error"],
    )
    .await;
    assert_eq!(d["type"], "sent", "{d}");
    let m = loop {
        let m = bob.recv_type("message").await;
        if m.get("delete").is_some() {
            break m;
        }
    };
    assert_eq!(m["delete"].as_u64(), Some(seq));
    assert!(m.get("body").is_none());
    let e = ask(
        &mut alice,
        json!({"type":"delete","conv":"room:ed","seq":seq,"client_id":"a2"}),
        &["sent", "error"],
    )
    .await;
    assert_eq!(code(&e), "not_found", "already deleted: {e}");
    let h = ask(
        &mut carol,
        json!({"type":"history","conv":"room:ed"}),
        &["history"],
    )
    .await;
    let first = &h["messages"][0];
    assert_eq!(
        (first["seq"].as_u64(), first["deleted"].as_bool()),
        (Some(seq), Some(true)),
        "{h}"
    );
    assert!(first.get("body").is_none(), "a deleted body is gone: {h}");
    assert!(
        h["messages"][1].get("body").is_none(),
        "and its edit's copy: {h}"
    );
    // an edit that stands
    let m2 = carol.room("ed", "typo", "c3").await["seq"]
        .as_u64()
        .unwrap();
    ask(
        &mut carol,
        json!({"type":"edit","conv":"room:ed","seq":m2,"body":"fixed","client_id":"c4"}),
        &["sent"],
    )
    .await;
    let h = ask(
        &mut bob,
        json!({"type":"history","conv":"room:ed","limit":100}),
        &["history"],
    )
    .await;
    let edited = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["seq"].as_u64() == Some(m2))
        .cloned()
        .unwrap();
    assert_eq!(
        (edited["body"].as_str(), edited["edited"].as_bool()),
        (Some("fixed"), Some(true))
    );
}

/// Inbox: newest first, unread counts that edits and deletes do not inflate, paging.
async fn inbox(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut carol = Client::connect(alice_node, "carol").await;
    ask(
        &mut alice,
        json!({"type":"join","room":"quiet"}),
        &["joined"],
    )
    .await;
    bob.direct("alice", "b1", "b1").await;
    let b2 = bob.direct("alice", "b2", "b2").await;
    tokio::time::sleep(Duration::from_millis(5)).await; // distinct timestamps
    carol.direct("alice", "c1", "c1").await;
    ask(
        &mut bob,
        json!({"type":"edit","conv":"dm:alice:bob","seq":b2["seq"],"body":"b2!","client_id":"e"}),
        &["sent"],
    )
    .await;
    let inbox = ask(&mut alice, json!({"type":"inbox"}), &["inbox"]).await;
    let rows: Vec<(String, u64)> = inbox["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conv"].as_str().unwrap().to_owned(),
                c["unread"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("dm:alice:bob".to_owned(), 2),
            ("dm:alice:carol".to_owned(), 1),
            ("room:quiet".to_owned(), 0)
        ],
        "{inbox}"
    );
    assert_eq!(inbox["conversations"][0]["with"], "bob");
    assert_eq!(inbox["conversations"][0]["last"]["edit"], b2["seq"]);
    assert_eq!(inbox["conversations"][2]["room"], "quiet");
    assert!(inbox["conversations"][2].get("last").is_none());
    assert_eq!(inbox["more"], false);
    alice
        .send(json!({"type":"read","conv":"dm:alice:bob","seq":3}))
        .await;
    let page = ask(&mut alice, json!({"type":"inbox","limit":1}), &["inbox"]).await;
    assert_eq!(page["conversations"][0]["unread"], 0);
    assert_eq!(page["conversations"][0]["read"], 3);
    assert_eq!(page["more"], true);
    let ts = page["conversations"][0]["last"]["ts"].clone();
    let conv = page["conversations"][0]["conv"].clone();
    let rest = ask(
        &mut alice,
        json!({"type":"inbox","limit":5,"before":ts,"before_conv":conv}),
        &["inbox"],
    )
    .await;
    let convs: Vec<&str> = rest["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conv"].as_str().unwrap())
        .collect();
    assert_eq!(convs, vec!["dm:alice:carol", "room:quiet"]);
}

/// Presence subscription: the subscribed connection hears every change, on any node.
async fn subscriptions(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let answer = ask(
        &mut alice,
        json!({"type":"presence","uids":["bob"],"subscribe":true}),
        &["presence"],
    )
    .await;
    assert_eq!(
        answer,
        json!({"type":"presence","uid":"bob","online":false})
    );
    let bob = Client::connect(bob_node, "bob").await;
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","uid":"bob","online":true})
    );
    bob.close().await;
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","uid":"bob","online":false})
    );
    // bob and 99 more make the 100 a connection may follow; one more is refused
    let many: Vec<String> = (0..99).map(|i| format!("u{i}")).collect();
    alice
        .send(json!({"type":"presence","uids":many,"subscribe":true}))
        .await;
    for _ in 0..99 {
        assert_eq!(alice.recv().await["type"], "presence");
    }
    let e = ask(
        &mut alice,
        json!({"type":"presence","uids":["u100"],"subscribe":true}),
        &["error"],
    )
    .await;
    assert_eq!(code(&e), "limit", "{e}");
}

#[tokio::test]
async fn section_8_on_one_node() {
    let node = TestNode::start(settings());
    marks(&node, &node).await;
    let node = TestNode::start(settings());
    typing(&node, &node).await;
    let node = TestNode::start(settings());
    edits_and_deletes(&node, &node).await;
    let node = TestNode::start(settings());
    inbox(&node, &node).await;
    let node = TestNode::start(settings());
    subscriptions(&node, &node).await;
    let node = TestNode::start(settings());
    joining_marks(&node, &node).await;
}

#[tokio::test]
async fn section_8_across_two_cluster_nodes() {
    for round in 0..6 {
        let env = ClusterEnv::start();
        let a = env.node("node-a");
        let b = env.node("node-b");
        match round {
            0 => marks(&a, &b).await,
            1 => typing(&a, &b).await,
            2 => edits_and_deletes(&a, &b).await,
            3 => inbox(&a, &b).await,
            4 => subscriptions(&a, &b).await,
            _ => joining_marks(&a, &b).await,
        }
    }
}

/// Rooms larger than the live bound get no live typing or read events from others
/// (a reader's own devices still hear their marks); `receipts` answers for them.
#[tokio::test]
async fn large_rooms_answer_receipts_queries_only() {
    let mut s = settings();
    s.limits.live_room_size = 2;
    let node = TestNode::start(s);
    let mut clients = Vec::new();
    for u in ["alice", "bob", "carol"] {
        let mut c = Client::connect(&node, u).await;
        ask(&mut c, json!({"type":"join","room":"big"}), &["joined"]).await;
        clients.push(c);
    }
    let mut alice_phone = Client::connect(&node, "alice").await;
    let seq = clients[1].room("big", "hi", "b1").await["seq"].clone();
    clients[0]
        .send(json!({"type":"typing","conv":"room:big"}))
        .await;
    clients[0]
        .send(json!({"type":"read","conv":"room:big","seq":seq}))
        .await;
    // the reader's own other device hears the mark (so it is stored) ...
    assert_eq!(alice_phone.recv_type("read").await["seq"], seq);
    // ... the others do not, and ask for it instead
    for c in &mut clients[1..] {
        assert!(pending(c, &["typing", "read"]).await.is_empty());
    }
    let r = ask(
        &mut clients[2],
        json!({"type":"receipts","conv":"room:big"}),
        &["receipts"],
    )
    .await;
    assert_eq!(r["read"]["alice"], seq, "{r}");
}

/// The typing rate holds cluster-wide: bob typing on two nodes at once (a burst on
/// each) gets one event through to each of alice's connections, not one per node.
#[tokio::test]
async fn typing_rate_holds_when_typing_on_two_nodes_at_once() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut alice_a = Client::connect(&a, "alice").await;
    let mut alice_b = Client::connect(&b, "alice").await;
    let mut bob_a = Client::connect(&a, "bob").await;
    let mut bob_b = Client::connect(&b, "bob").await;
    // Two rooms for the markers below, with both users, known to both nodes (the
    // user's connection on the other node is told).
    for room in ["mark-a", "mark-b"] {
        for (here, there) in [(&mut alice_a, &mut alice_b), (&mut bob_a, &mut bob_b)] {
            ask(here, json!({"type":"join","room":room}), &["joined"]).await;
            while there.recv_type("joined").await["room"] != room {}
        }
    }

    let typing = json!({"type":"typing","conv":"dm:alice:bob"});
    let start = Instant::now();
    for _ in 0..10 {
        bob_a.send(typing.clone()).await;
        bob_b.send(typing.clone()).await;
    }
    // Each connection's frames are handled in order, and each peer queue delivers in
    // order: once alice has bob's typing in the marker rooms from both nodes, every
    // typing event of the burst that passed a node's rules has reached her.
    bob_a
        .send(json!({"type":"typing","conv":"room:mark-a"}))
        .await;
    bob_b
        .send(json!({"type":"typing","conv":"room:mark-b"}))
        .await;
    for (name, alice) in [("node-a", &mut alice_a), ("node-b", &mut alice_b)] {
        let mut typing = 0;
        let (mut from_a, mut from_b) = (false, false);
        while !(from_a && from_b) {
            let f = alice.recv().await;
            if f["type"] != "typing" {
                continue;
            }
            match f["conv"].as_str() {
                Some("dm:alice:bob") => typing += 1,
                Some("room:mark-a") => from_a = true,
                Some("room:mark-b") => from_b = true,
                _ => {}
            }
        }
        let took = start.elapsed();
        eprintln!("alice on {name}: {typing} typing event(s), burst and markers in {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "the burst and its forwarding took {took:?}: not within one second"
        );
        // With a rate per node only, each node would let one of its own through and
        // pass on the other node's: 2.
        assert_eq!(
            typing, 1,
            "alice on {name} got {typing} typing events from a burst within a second"
        );
    }
}

/// A room the server API creates with members after it posted there: the members start
/// at that message and their connections hear each other's marks.
#[tokio::test]
async fn a_room_created_by_the_api_pushes_its_members_marks() {
    let mut s = settings();
    s.api_key = Some("k".into());
    let node = TestNode::start(s);
    let auth = [("Authorization", "Bearer k")];
    let mut alice = Client::connect(&node, "alice").await;
    let post = json!({"from":"system","room":"later","body":"welcome"}).to_string();
    let r = http(
        "POST",
        &format!("{}/api/messages", node.base),
        &auth,
        Some(&post),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].clone();
    let room = json!({"room":"later","private":true,"members":["alice","bob"]}).to_string();
    let r = http(
        "POST",
        &format!("{}/api/rooms", node.base),
        &auth,
        Some(&room),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(alice.recv_type("joined").await["room"], "later");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let f = alice.recv_type("read").await;
        assert_eq!((&f["conv"], &f["seq"]), (&json!("room:later"), &seq), "{f}");
        seen.push(f["uid"].as_str().unwrap_or("").to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["alice", "bob"]);
}
