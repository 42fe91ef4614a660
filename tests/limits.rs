//! Limits and lifecycle: flooding, slow consumers, oversize frames, silent clients,
//! graceful shutdown.

mod common;

use std::time::Duration;

use common::{settings, Client, Event, TestNode};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn flooding_gets_rate_limited_then_closed_with_1008() {
    let mut s = settings();
    s.limits.rate_per_sec = 5.0;
    s.limits.rate_burst = 10.0;
    s.limits.flood_strikes = 20.0;
    let node = TestNode::start(s);
    let mut a = Client::connect(&node, "alice").await;
    let mut b = Client::connect(&node, "bob").await;
    // push frames without reading: 10 allowed, then rate_limited, then closed
    for i in 0..200 {
        let frame = json!({"type":"presence","uids":[format!("u{i}")]}).to_string();
        if a.try_send_text(&frame).await.is_err() {
            break;
        }
    }
    let (code, frames) = a.expect_close().await;
    assert_eq!(code, Some(CloseCode::Policy));
    let answered = frames.iter().filter(|f| f["type"] == "presence").count();
    let limited = frames
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .count();
    assert_eq!(answered, 10, "the burst is served");
    assert!((1..=21).contains(&limited), "{limited} rate_limited errors");
    // everyone else is still served
    let sent = b.direct("carol", "still here", "k").await;
    assert_eq!(sent["seq"], 1);
    assert_eq!(node.metric("chatmesh_flooders_closed_total"), 1.0);
}

#[tokio::test]
async fn a_client_that_backs_off_is_not_closed() {
    let mut s = settings();
    s.limits.rate_per_sec = 50.0;
    s.limits.rate_burst = 5.0;
    s.limits.flood_strikes = 3.0;
    let node = TestNode::start(s);
    let mut a = Client::connect(&node, "alice").await;
    let mut limited = 0;
    let mut sent = 0;
    while sent < 30 {
        a.send(json!({"type":"direct","to":"bob","body":"x","client_id":format!("k{sent}")}))
            .await;
        let f = a.recv().await;
        if f["type"] == "sent" {
            sent += 1;
        } else {
            assert_eq!(f["code"], "rate_limited");
            assert_eq!(f["client_id"], serde_json::Value::Null);
            limited += 1;
            // back off as told, then resend the same client_id
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(limited <= 30);
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let mut s = settings();
    s.limits.max_frame_bytes = 4096;
    let node = TestNode::start(s);
    let mut a = Client::connect(&node, "alice").await;
    let mut b = Client::connect(&node, "bob").await;
    let big =
        json!({"type":"direct","to":"bob","body":"x".repeat(5000),"client_id":"k"}).to_string();
    a.send_text(&big).await;
    let (code, _) = a.expect_close().await;
    assert_eq!(code, Some(CloseCode::Size));
    assert!(b.drain().await.is_empty(), "nothing was delivered");
}

#[tokio::test]
async fn slow_consumer_is_closed_while_others_keep_receiving() {
    let mut s = settings();
    s.limits.outbound_queue = 16;
    s.limits.rate_burst = 10_000.0;
    s.limits.rate_per_sec = 10_000.0;
    let node = TestNode::start(s);
    // The slow client has a tiny receive buffer and never reads.
    Client::connect(&node, "slow").await.join("busy").await;
    // A tiny receive buffer and no reads: the node's writes back up quickly.
    let mut slow = Client::connect_with_rcvbuf(&node, "slow", 4096).await;
    let mut fast = Client::connect(&node, "fast").await;
    let mut sender = Client::connect(&node, "sender").await;
    for c in [&mut fast, &mut sender] {
        c.join("busy").await;
    }
    let body = "y".repeat(4000);
    let total = 2500u64;
    let mut fast_seen = 0u64;
    for i in 0..total {
        sender
            .send(json!({"type":"room","room":"busy","body":body,"client_id":format!("k{i}")}))
            .await;
        // the sender must read its own answers to keep the test about "slow" only
        let _ = sender.recv_type("sent").await;
        while let Some(f) = fast.try_recv().await {
            if f["type"] == "message" {
                fast_seen += 1;
            }
        }
    }
    while fast_seen < total {
        if fast.recv().await["type"] == "message" {
            fast_seen += 1;
        }
    }
    assert_eq!(fast_seen, total, "the reading client got everything");
    common::eventually("the slow consumer to be flagged", || {
        node.metric("chatmesh_slow_consumers_closed_total") == 1.0
    })
    .await;
    // When the slow client finally reads, it finds a prefix of the messages and 1008.
    let (code, frames) = slow.expect_close().await;
    assert_eq!(code, Some(CloseCode::Policy));
    let got = frames.iter().filter(|f| f["type"] == "message").count() as u64;
    assert!(got < total, "it was cut off ({got} of {total})");
    // It reconnects and catches up with everything through sync.
    let mut again = Client::connect(&node, "slow").await;
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        again
            .send(json!({"type":"sync","cursors":{"room:busy":cursor}}))
            .await;
        let more = loop {
            let f = again.recv().await;
            if f["type"] == "synced" {
                break !f["more"].as_array().unwrap().is_empty();
            }
            if f["type"] == "message" {
                let seq = f["seq"].as_u64().unwrap();
                seen.insert(seq);
                cursor = cursor.max(seq);
            }
        };
        if !more {
            break;
        }
    }
    assert_eq!(seen.len() as u64, total);
}

#[tokio::test]
async fn silent_client_is_dropped() {
    let mut s = settings();
    s.ping_interval = Duration::from_millis(50);
    s.client_timeout = Duration::from_millis(300);
    let node = TestNode::start(s);
    let silent = Client::connect(&node, "silent").await;
    let mut other = Client::connect(&node, "other").await;
    // `other` keeps reading (and so answers pings); `silent` is never polled.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return other,
                _ = other.try_recv() => {}
            }
        }
    });
    common::eventually("the silent client to be dropped", || {
        node.metric("chatmesh_connections") == 1.0
    })
    .await;
    stop_tx.send(()).unwrap();
    let mut other = reader.await.unwrap();
    let answers = other.presence(&["silent", "other"]).await;
    assert_eq!(
        answers[0],
        json!({"type":"presence","uid":"silent","online":false})
    );
    assert_eq!(answers[1]["online"], true, "a reading client is kept");
    drop(silent);
}

#[tokio::test]
async fn graceful_shutdown_closes_websockets_with_1012() {
    let node = TestNode::start(settings());
    let mut a = Client::connect(&node, "alice").await;
    let mut b = Client::connect(&node, "bob").await;
    a.direct("bob", "before shutdown", "k").await;
    assert_eq!(b.recv_type("message").await["body"], "before shutdown");
    let stopper = std::thread::spawn(move || node.stop());
    for c in [&mut a, &mut b] {
        let (code, _) = c.expect_close().await;
        assert_eq!(code, Some(CloseCode::Restart));
    }
    let result = tokio::task::spawn_blocking(move || stopper.join().unwrap())
        .await
        .unwrap();
    assert!(result.is_ok(), "run returned {result:?}");
    // a frame after close cannot be sent
    assert!(
        a.try_send_text("{}").await.is_err() || matches!(a.next_event().await, Event::Closed(_))
    );
}
