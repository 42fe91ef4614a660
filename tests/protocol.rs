//! Contract section 3, frame by frame, against a single node on the embedded store.

mod common;

use common::{settings, Client, TestNode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn node() -> TestNode {
    TestNode::start(settings())
}

fn types(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn welcome_names_user_node_and_rooms() {
    let node = node();
    let mut a = Client::connect(&node, "alice").await;
    assert_eq!(a.welcome["node"], node.node_id);
    assert_eq!(a.welcome["rooms"], json!([]));
    a.join("lobby").await;
    a.join("attic").await;
    let b = Client::connect(&node, "alice").await;
    assert_eq!(
        b.welcome["rooms"],
        json!(["attic", "lobby"]),
        "membership persists"
    );
}

#[tokio::test]
async fn direct_message_reaches_recipient_and_other_devices_not_the_sender() {
    let node = node();
    let mut alice = Client::connect(&node, "alice").await;
    let mut alice_phone = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    let mut carol = Client::connect(&node, "carol").await;

    let sent = alice.direct("bob", "hi bob", "k1").await;
    assert_eq!(sent["conv"], "dm:alice:bob");
    assert_eq!(sent["seq"], 1);
    assert!(sent["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(sent["ts"].as_u64().unwrap() > 1_600_000_000_000);

    let m = bob.recv_type("message").await;
    assert_eq!(
        m,
        json!({"type":"message","conv":"dm:alice:bob","seq":1,"id":sent["id"],"from":"alice",
               "to":"bob","body":"hi bob","ts":sent["ts"]})
    );
    let copy = alice_phone.recv_type("message").await;
    assert_eq!(copy, m, "the sender's other device gets the message");
    assert_eq!(
        types(&alice.drain().await),
        Vec::<String>::new(),
        "no echo to the sending connection"
    );
    assert_eq!(
        types(&carol.drain().await),
        Vec::<String>::new(),
        "nobody else gets it"
    );

    // the reply continues the same conversation
    let sent = bob.direct("alice", "hi alice", "b1").await;
    assert_eq!(
        (sent["conv"].clone(), sent["seq"].clone()),
        (json!("dm:alice:bob"), json!(2))
    );
    assert_eq!(alice.recv_type("message").await["body"], "hi alice");
}

#[tokio::test]
async fn room_messages_need_membership_and_reach_every_member_connection() {
    let node = node();
    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    let mut bob2 = Client::connect(&node, "bob").await;
    let mut mallory = Client::connect(&node, "mallory").await;

    alice.join("lobby").await;
    bob.join("lobby").await;
    let sent = alice.room("lobby", "hello room", "r1").await;
    assert_eq!(sent["conv"], "room:lobby");
    assert_eq!(sent["seq"], 1);
    for c in [&mut bob, &mut bob2] {
        let m = c.recv_type("message").await;
        assert_eq!(m["room"], "lobby");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["body"], "hello room");
        assert!(m.get("to").is_none());
    }
    assert!(
        types(&mallory.drain().await).is_empty(),
        "non-members get nothing"
    );

    mallory
        .send(json!({"type":"room","room":"lobby","body":"let me in","client_id":"m1"}))
        .await;
    let e = mallory.recv().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "not_member");
    assert_eq!(e["client_id"], "m1");

    bob.send(json!({"type":"leave","room":"lobby"})).await;
    assert_eq!(bob.recv_type("left").await["room"], "lobby");
    let sent = alice.room("lobby", "bob left", "r2").await;
    assert_eq!(sent["seq"], 2, "the refused message took no seq");
    assert!(
        !types(&bob2.drain().await).contains(&"message".to_string()),
        "a former member gets nothing"
    );
    bob.send(json!({"type":"room","room":"lobby","body":"x","client_id":"b9"}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "not_member");
}

#[tokio::test]
async fn resend_with_the_same_client_id_is_stored_once() {
    let node = node();
    let mut alice = Client::connect(&node, "alice").await;
    let mut bob = Client::connect(&node, "bob").await;
    let first = alice.direct("bob", "once", "same").await;
    let again = alice.direct("bob", "once", "same").await;
    assert_eq!(first, again, "same sent: conv, seq, id");
    // from another connection of the same user too
    let mut alice2 = Client::connect(&node, "alice").await;
    assert_eq!(alice2.direct("bob", "once", "same").await, first);
    let next = alice.direct("bob", "twice", "other").await;
    assert_eq!(next["seq"], 2);
    bob.send(json!({"type":"history","conv":"dm:alice:bob"}))
        .await;
    let h = bob.recv_type("history").await;
    let bodies: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["once", "twice"]);
}

#[tokio::test]
async fn concurrent_senders_get_gap_free_seqs_and_every_member_gets_the_others() {
    let node = node();
    const SENDERS: usize = 5;
    const EACH: usize = 40;
    let mut clients = Vec::new();
    for i in 0..SENDERS {
        let mut c = Client::connect(&node, &format!("u{i}")).await;
        c.join("race").await;
        clients.push(c);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut got = Vec::new();
            for k in 0..EACH {
                c.send(json!({"type":"room","room":"race","body":format!("{i}-{k}"),"client_id":format!("c{k}")}))
                    .await;
            }
            while mine.len() < EACH || got.len() < (SENDERS - 1) * EACH {
                let f = c.recv().await;
                match f["type"].as_str() {
                    Some("sent") => mine.push(f["seq"].as_u64().unwrap()),
                    Some("message") => {
                        assert_ne!(f["from"], c.uid.as_str(), "no echo");
                        got.push(f["seq"].as_u64().unwrap())
                    }
                    _ => {}
                }
            }
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "one sender's seqs increase");
            (mine, got)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (mine, mut got) = t.await.unwrap();
        got.sort_unstable();
        got.dedup();
        assert_eq!(
            got.len(),
            (SENDERS - 1) * EACH,
            "every member got every other message once"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=(SENDERS * EACH) as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn sync_with_and_without_cursors_pages_by_100() {
    let mut s = settings();
    s.limits.rate_burst = 1000.0;
    let node = TestNode::start(s);
    let mut alice = Client::connect(&node, "alice").await;
    alice.join("lobby").await;
    for i in 1..=130 {
        alice
            .room("lobby", &format!("r{i}"), &format!("r{i}"))
            .await;
    }
    for i in 1..=30 {
        alice
            .direct("bob", &format!("d{i}"), &format!("d{i}"))
            .await;
    }
    alice.direct("carol", "c1", "c1").await;

    let mut bob = Client::connect(&node, "bob").await;
    // no cursors: the latest 20 of each of bob's conversations (only the DM: not in lobby)
    bob.send(json!({"type":"sync"})).await;
    let mut msgs = Vec::new();
    let synced = loop {
        let f = bob.recv().await;
        if f["type"] == "synced" {
            break f;
        }
        msgs.push(f);
    };
    assert_eq!(synced["more"], json!([]));
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (11..=30).collect::<Vec<_>>());
    assert!(msgs
        .iter()
        .all(|m| m["conv"] == "dm:alice:bob" && m["type"] == "message"));

    // a cursor: everything after it, oldest first, at most 100 per conversation
    let mut alice2 = Client::connect(&node, "alice").await;
    alice2.send(json!({"type":"sync","cursors":{"room:lobby":5,"dm:alice:bob":28,"dm:alice:carol":1,"dm:bob:carol":0}})).await;
    let mut by_conv: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let synced = loop {
        let f = alice2.recv().await;
        if f["type"] == "synced" {
            break f;
        }
        by_conv
            .entry(f["conv"].as_str().unwrap().to_owned())
            .or_default()
            .push(f["seq"].as_u64().unwrap());
    };
    assert_eq!(by_conv["room:lobby"], (6..=105).collect::<Vec<_>>());
    assert_eq!(by_conv["dm:alice:bob"], vec![29, 30]);
    assert!(
        !by_conv.contains_key("dm:alice:carol"),
        "nothing after the cursor"
    );
    assert!(
        !by_conv.contains_key("dm:bob:carol"),
        "someone else's conversation is never synced"
    );
    assert_eq!(synced["more"], json!(["room:lobby"]));
    // next page
    alice2.send(json!({"type":"sync","cursors":{"room:lobby":105,"dm:alice:bob":30,"dm:alice:carol":1}})).await;
    let mut seqs = Vec::new();
    let synced = loop {
        let f = alice2.recv().await;
        if f["type"] == "synced" {
            break f;
        }
        seqs.push(f["seq"].as_u64().unwrap());
    };
    assert_eq!(seqs, (106..=130).collect::<Vec<_>>());
    assert_eq!(synced["more"], json!([]));
}

/// A sync answer is bounded: it reads at most a page of conversations, and `more`
/// lists every conversation not yet complete, reached or not.
#[tokio::test]
async fn sync_is_paged_over_conversations_and_starts_after_the_delivered_mark() {
    let mut s = settings();
    s.limits.rate_burst = 1000.0;
    let node = TestNode::start(s);
    let mut alice = Client::connect(&node, "alice").await;
    let page = chatmesh::chat::SYNC_CONVS;
    let total = page + 5;
    for i in 0..total {
        alice
            .direct(&format!("p{i:02}"), "hi", &format!("k{i}"))
            .await;
    }
    let mut bob_view = Client::connect(&node, "p00").await;
    bob_view.send(json!({"type":"sync","cursors":{}})).await;
    let synced = bob_view.recv_type("synced").await;
    assert_eq!(synced["more"], json!([]), "one conversation: complete");
    // alice has `total` conversations: one page of them, and the rest in `more`
    let cursors: serde_json::Map<String, Value> = (0..total)
        .map(|i| {
            (
                chatmesh::protocol::dm_conv("alice", &format!("p{i:02}")),
                json!(0),
            )
        })
        .collect();
    alice
        .send(json!({"type":"sync","cursors":cursors.clone()}))
        .await;
    let mut convs = std::collections::BTreeSet::new();
    let synced = loop {
        let f = alice.recv().await;
        if f["type"] == "synced" {
            break f;
        }
        convs.insert(f["conv"].as_str().unwrap().to_owned());
    };
    assert_eq!(convs.len(), page, "one page of conversations");
    let more: std::collections::BTreeSet<String> = synced["more"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(more.len(), total - page, "{synced}");
    assert!(more.is_disjoint(&convs));
    // Sending marks the sender's own messages delivered: without a cursor, sync starts
    // after that mark, so alice gets nothing she sent herself.
    alice.send(json!({"type":"sync"})).await;
    let first = alice.recv().await;
    assert_eq!(first, json!({"type":"synced","more":[]}));
    // bob marks seq 1 of a longer conversation delivered: sync then starts after it
    for i in 0..3 {
        alice
            .direct("p00", &format!("more{i}"), &format!("m{i}"))
            .await;
    }
    for _ in 0..3 {
        bob_view.recv_type("message").await; // live
    }
    bob_view
        .send(json!({"type":"delivered","conv":"dm:alice:p00","seq":2}))
        .await;
    bob_view.send(json!({"type":"sync"})).await;
    let mut seqs = Vec::new();
    loop {
        let f = bob_view.recv().await;
        match f["type"].as_str() {
            Some("synced") => break,
            Some("message") => seqs.push(f["seq"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert_eq!(seqs, vec![3, 4], "after the stored delivered mark");
}

/// Room presence events go only to rooms up to the live bound.
#[tokio::test]
async fn room_presence_only_for_rooms_within_the_live_bound() {
    let mut s = settings();
    s.limits.live_room_size = 2;
    let node = TestNode::start(s);
    let mut alice = Client::connect(&node, "alice").await;
    alice.join("pair").await;
    alice.join("crowd").await;
    for u in ["bob", "carol"] {
        let mut c = Client::connect(&node, u).await;
        c.join("crowd").await;
        if u == "bob" {
            c.join("pair").await;
        }
        c.close().await;
    }
    let _setup = alice.drain().await;
    // bob's first connection: pair (2 members) hears it, crowd (3) does not
    let _bob = Client::connect(&node, "bob").await;
    let events: Vec<Value> = alice
        .drain()
        .await
        .into_iter()
        .filter(|f| f["type"] == "presence" && f.get("room").is_some())
        .collect();
    assert_eq!(
        events,
        vec![json!({"type":"presence","room":"pair","uid":"bob","online":true})]
    );
}

#[tokio::test]
async fn history_pages_backwards_and_is_private() {
    let mut s = settings();
    s.limits.rate_burst = 1000.0;
    let node = TestNode::start(s);
    let mut alice = Client::connect(&node, "alice").await;
    alice.join("lobby").await;
    for i in 1..=120 {
        alice
            .room("lobby", &format!("m{i}"), &format!("k{i}"))
            .await;
    }
    let seqs = |h: &Value| {
        h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    alice
        .send(json!({"type":"history","conv":"room:lobby","limit":50}))
        .await;
    let h = alice.recv_type("history").await;
    assert_eq!(h["conv"], "room:lobby");
    assert_eq!(seqs(&h), (71..=120).collect::<Vec<_>>());
    assert_eq!(h["more"], true);
    alice
        .send(json!({"type":"history","conv":"room:lobby","before":71,"limit":500}))
        .await;
    let h = alice.recv_type("history").await;
    assert_eq!(
        seqs(&h),
        (1..=70).collect::<Vec<_>>(),
        "limit is capped at 100 and before is exclusive"
    );
    assert_eq!(h["more"], false);
    alice
        .send(json!({"type":"history","conv":"room:lobby","before":31,"limit":10}))
        .await;
    let h = alice.recv_type("history").await;
    assert_eq!(seqs(&h), (21..=30).collect::<Vec<_>>());
    assert_eq!(h["more"], true);
    assert_eq!(h["messages"][0]["body"], "m21");

    let mut mallory = Client::connect(&node, "mallory").await;
    mallory
        .send(json!({"type":"history","conv":"room:lobby"}))
        .await;
    assert_eq!(mallory.recv().await["code"], "not_member");
    alice.direct("bob", "secret", "s1").await;
    mallory
        .send(json!({"type":"history","conv":"dm:alice:bob"}))
        .await;
    assert_eq!(mallory.recv().await["code"], "not_member");
    mallory
        .send(json!({"type":"history","conv":"dm:bob:alice"}))
        .await;
    assert_eq!(mallory.recv().await["code"], "invalid");
}

#[tokio::test]
async fn presence_answers_and_room_events() {
    let node = node();
    let mut alice = Client::connect(&node, "alice").await;
    alice.join("lobby").await;
    assert_eq!(
        alice.presence(&["bob", "alice"]).await,
        vec![
            json!({"type":"presence","uid":"bob","online":false}),
            json!({"type":"presence","uid":"alice","online":true})
        ]
    );

    // bob is a member: his last disconnect and his first connection are announced.
    // (Each is awaited before the next change: an event not yet written is replaced by
    // a newer one for the same room and user, so offline-then-online could arrive as
    // online alone.)
    let mut bob = Client::connect(&node, "bob").await;
    bob.join("lobby").await;
    drop(bob);
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","room":"lobby","uid":"bob","online":false})
    );
    let mut bob = Client::connect(&node, "bob").await;
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","room":"lobby","uid":"bob","online":true})
    );
    // a second device is not a new arrival
    let bob2 = Client::connect(&node, "bob").await;
    assert_eq!(
        alice.presence(&["bob"]).await,
        vec![json!({"type":"presence","uid":"bob","online":true})]
    );
    drop(bob2);
    assert_eq!(bob.presence(&["alice"]).await[0]["online"], true);
    drop(bob);
    assert_eq!(
        alice.recv_type("presence").await,
        json!({"type":"presence","room":"lobby","uid":"bob","online":false})
    );
}

#[tokio::test]
async fn bad_frames_get_their_error_code_and_the_connection_stays_open() {
    let mut s = settings();
    s.limits.max_body_bytes = 100;
    let node = TestNode::start(s);
    let mut a = Client::connect(&node, "alice").await;
    let cases: Vec<(&str, &str)> = vec![
        ("not json", "bad_json"),
        ("[1,2,3]", "bad_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"body":"no type"}"#, "unknown_type"),
        (r#"{"type":"direct","to":"bob","body":"x"}"#, "invalid"),
        (
            r#"{"type":"direct","to":"b b","body":"x","client_id":"k"}"#,
            "invalid",
        ),
        (
            r#"{"type":"direct","to":"alice","body":"x","client_id":"k"}"#,
            "invalid",
        ),
        (
            r#"{"type":"direct","to":"bob","body":"","client_id":"k"}"#,
            "invalid",
        ),
        (
            r#"{"type":"room","room":"","body":"x","client_id":"k"}"#,
            "invalid",
        ),
        (r#"{"type":"join","room":"no/slash"}"#, "invalid"),
        (r#"{"type":"history","conv":"lobby"}"#, "invalid"),
        (
            r#"{"type":"history","conv":"room:lobby","limit":"ten"}"#,
            "invalid",
        ),
        (r#"{"type":"sync","cursors":{"room:lobby":-1}}"#, "invalid"),
        (r#"{"type":"presence","uids":["ok","not ok"]}"#, "invalid"),
    ];
    for (frame, code) in cases {
        a.send_text(frame).await;
        let e = a.recv().await;
        assert_eq!(e["type"], "error", "{frame}");
        assert_eq!(e["code"], code, "{frame} -> {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    a.send(json!({"type":"direct","to":"bob","body":"x".repeat(101),"client_id":"big"}))
        .await;
    let e = a.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["client_id"].as_str()),
        (Some("too_large"), Some("big"))
    );
    a.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(a.recv().await["code"], "unsupported");
    // still serving
    let sent = a.direct("bob", "x".repeat(100).as_str(), "ok").await;
    assert_eq!(sent["seq"], 1);
    let metrics = common::http("GET", &format!("{}/metrics", node.base), &[], None)
        .await
        .unwrap()
        .body;
    assert_eq!(
        common::metric_value(&metrics, r#"chatmesh_errors_total{code="invalid"}"#),
        10.0
    );
}
