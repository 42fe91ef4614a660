//! Limits and lifecycle: flooding, slow consumers, oversize frames, silent clients,
//! graceful shutdown.

mod common;

use std::time::Duration;

use common::{eventually_within, settings, Client, Event, ProcessNode, TestNode};
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

/// A fragmented message is limited as a whole: fragments each under the limit, whose
/// sum is over it, close with 1009 when the fragment that crosses it arrives.
#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    let mut s = settings();
    s.limits.max_frame_bytes = 4096;
    let node = TestNode::start(s);
    let mut a = Client::connect(&node, "alice").await;
    // Masked (with a zero mask) frames of 3000 bytes: text without FIN, then a
    // continuation without FIN.
    let fragment = |opcode: u8| {
        let mut f = vec![opcode, 0x80 | 126];
        f.extend_from_slice(&3000u16.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(b'x', 3000));
        f
    };
    a.write_raw(&fragment(0x01)).await.unwrap();
    a.write_raw(&fragment(0x00)).await.unwrap();
    let (code, _) = a.expect_close().await;
    assert_eq!(code, Some(CloseCode::Size));
    // a fragmented message under the limit is fine
    let mut b = Client::connect(&node, "bob").await;
    let text = json!({"type":"direct","to":"carol","body":"hi","client_id":"f"}).to_string();
    let (head, tail) = text.as_bytes().split_at(10);
    for (opcode, part) in [(0x01u8, head), (0x80, tail)] {
        let mut f = vec![opcode, 0x80 | part.len() as u8, 0, 0, 0, 0];
        f.extend_from_slice(part);
        b.write_raw(&f).await.unwrap();
    }
    assert_eq!(b.recv_type("sent").await["client_id"], "f");
}

/// Syncs `conv` from `cursor` until `synced` lists nothing more; answers the seqs seen.
async fn sync_all(c: &mut Client, conv: &str) -> std::collections::BTreeSet<u64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        c.send(json!({"type":"sync","cursors":{conv:cursor}})).await;
        let more = loop {
            let f = c.recv().await;
            if f["type"] == "synced" {
                break !f["more"].as_array().unwrap().is_empty();
            }
            if f["type"] == "message" && f["conv"] == conv {
                let seq = f["seq"].as_u64().unwrap();
                seen.insert(seq);
                cursor = cursor.max(seq);
            }
        };
        if !more {
            return seen;
        }
    }
}

/// A client that stops reading (a tiny receive buffer, never a recv) is closed with
/// 1008 within the client timeout and its TCP connection is dropped, though it never
/// reads again; a reading client in the same room gets every message meanwhile, and
/// the dropped one catches up by sync. The slow client keeps sending pings, so it is
/// not silent: only the outbound stall can catch it.
#[tokio::test]
async fn a_client_that_never_reads_is_dropped_within_the_client_timeout() {
    let mut s = settings();
    s.client_timeout = Duration::from_secs(2);
    s.ping_interval = Duration::from_millis(100);
    s.limits.rate_burst = 10_000.0;
    s.limits.rate_per_sec = 10_000.0;
    let timeout = s.client_timeout;
    let node = TestNode::start(s);
    Client::connect(&node, "slow").await.join("busy").await;
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
        let _ = sender.recv_type("sent").await;
        while let Some(f) = fast.try_recv().await {
            if f["type"] == "message" {
                fast_seen += 1;
            }
        }
        if i % 50 == 0 {
            let _ = slow
                .try_send_raw(tokio_tungstenite::tungstenite::Message::Ping(
                    vec![1].into(),
                ))
                .await;
        }
    }
    // The burst is over: whatever the slow client still holds up, it is gone within
    // the client timeout (the stall began before this point).
    eventually_within(
        "the slow client to be disconnected within the client timeout of the burst",
        timeout + Duration::from_millis(500),
        || node.metric("chatmesh_connections") <= 2.0,
    )
    .await;
    assert_eq!(node.metric("chatmesh_slow_consumers_closed_total"), 1.0);
    assert_ne!(
        slow.tcp_state(),
        1,
        "the TCP connection is not ESTABLISHED any more"
    );
    while fast_seen < total {
        if fast.recv().await["type"] == "message" {
            fast_seen += 1;
        }
    }
    assert_eq!(fast_seen, total, "the reading client got everything");
    let answers = fast.presence(&["slow"]).await;
    assert_eq!(answers[0]["online"], false, "its presence went with it");
    drop(slow);
    let mut again = Client::connect(&node, "slow").await;
    assert_eq!(sync_all(&mut again, "room:busy").await.len() as u64, total);
}

/// A reading client that falls behind a burst is never closed: the live messages over
/// its bound are dropped, it is sent `resync`, and sync brings what it missed.
#[tokio::test]
async fn a_reading_client_survives_a_burst_over_its_bound_by_resync() {
    let mut s = settings();
    s.limits.outbound_queue = 16;
    s.limits.rate_burst = 10_000.0;
    s.limits.rate_per_sec = 10_000.0;
    let node = TestNode::start(s);
    Client::connect(&node, "reader").await.join("burst").await;
    let mut reader = Client::connect_with_rcvbuf(&node, "reader", 4096).await;
    let mut sender = Client::connect(&node, "sender").await;
    sender.join("burst").await;
    // The reader reads nothing while 1500 messages are stored and pushed to it: far
    // more than its bound of 16 and than its socket buffers hold.
    let body = "z".repeat(4000);
    let total = 1500u64;
    for i in 0..total {
        sender
            .send(json!({"type":"room","room":"burst","body":body,"client_id":format!("b{i}")}))
            .await;
        let _ = sender.recv_type("sent").await;
    }
    // Now it reads: messages, then resync, and never a close.
    let mut live = std::collections::BTreeSet::new();
    loop {
        let f = reader.recv().await;
        match f["type"].as_str() {
            Some("message") => {
                live.insert(f["seq"].as_u64().unwrap());
            }
            Some("resync") => break,
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
    assert!(
        (live.len() as u64) < total,
        "some were dropped: {}",
        live.len()
    );
    assert!(node.metric("chatmesh_outbox_dropped_total") >= 1.0);
    assert_eq!(node.metric("chatmesh_resyncs_total"), 1.0);
    assert_eq!(node.metric("chatmesh_slow_consumers_closed_total"), 0.0);
    let synced = sync_all(&mut reader, "room:burst").await;
    assert_eq!(synced.len() as u64, total, "sync brings everything");
}

/// A masked client frame header announcing `len` bytes of text.
fn header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81, 0xFF];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    h
}

/// A header announcing 1 GiB is refused with 1009 as soon as it arrives: the node does
/// not buffer the payload (its RSS does not grow by more than a few MiB while the
/// client streams 64 MiB after the header). So is one announcing 2^63-1 bytes.
#[tokio::test]
async fn frame_limits_are_enforced_at_the_header() {
    let node = ProcessNode::single("memory:", &[]);
    let mut warm = Client::connect_url(&node.ws_url("warm"), "warm").await;
    warm.direct("other", "warming up", "w").await;
    let before = node.rss_kib();
    let mut big = Client::connect_url(&node.ws_url("big"), "big").await;
    big.write_raw(&header(1 << 30)).await.unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..64 {
        if big.write_raw(&chunk).await.is_err() {
            break;
        }
    }
    let grown = node.rss_kib().saturating_sub(before);
    eprintln!("1 GiB header, then 64 MiB streamed: RSS {before} KiB before, grew by {grown} KiB");
    let (code, _) = big.expect_close().await;
    assert_eq!(code, Some(CloseCode::Size));
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB");
    let mut huge = Client::connect_url(&node.ws_url("huge"), "huge").await;
    huge.write_raw(&header(i64::MAX as u64)).await.unwrap();
    let (code, _) = huge.expect_close().await;
    assert_eq!(code, Some(CloseCode::Size));
    // the node serves everyone else
    assert_eq!(warm.direct("other", "still here", "w2").await["seq"], 2);
}

/// `count` connections to `node` (users `{tag}{i}`), opened 100 at a time.
async fn connections(node: &ProcessNode, tag: &str, count: usize) -> Vec<Client> {
    let mut all = Vec::with_capacity(count);
    for start in (0..count).step_by(100) {
        let uids: Vec<String> = (start..count.min(start + 100))
            .map(|i| format!("{tag}{i}"))
            .collect();
        let urls: Vec<String> = uids.iter().map(|u| node.ws_url(u)).collect();
        let opened = futures_util::future::join_all(
            urls.iter()
                .zip(&uids)
                .map(|(url, uid)| Client::connect_url(url, uid)),
        )
        .await;
        all.extend(opened);
    }
    all
}

/// Memory comes back after a connection storm: 2,000 websockets open and close, and
/// within 30 s the node's RSS is back within 20 % of what it was before them.
#[tokio::test]
async fn memory_returns_after_a_connection_storm() {
    let node = ProcessNode::single("memory:", &[]);
    // What the first connections allocate for good (thread locals, pools) is not the
    // storm's.
    drop(connections(&node, "warm", 100).await);
    common::eventually("the warm-up connections closed", || {
        node.metric("chatmesh_connections") == 0.0
    })
    .await;
    let before = node.rss_kib();
    let storm = connections(&node, "storm", 2000).await;
    let peak = node.rss_kib();
    drop(storm);
    let closed = std::time::Instant::now();
    eventually_within(
        "the node's RSS back within 20 % of before the storm",
        Duration::from_secs(30),
        || node.rss_kib() * 5 <= before * 6,
    )
    .await;
    eprintln!(
        "RSS before the storm {before} KiB, with 2,000 connections {peak} KiB, {} KiB {:.1} s after they closed",
        node.rss_kib(),
        closed.elapsed().as_secs_f64()
    );
    assert!(
        peak > before + 10 * 1024,
        "the storm cost memory: {before} -> {peak} KiB"
    );
}

/// A text frame that is not UTF-8 closes with 1007; a bad opcode with 1002.
#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_protocol_errors_with_1002() {
    let node = TestNode::start(settings());
    let mut c = Client::connect(&node, "alice").await;
    // FIN + text, masked, 2 bytes: 0xC3 0x28 is not UTF-8 (the mask is zero).
    c.write_raw(&[0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28])
        .await
        .unwrap();
    let (code, _) = c.expect_close().await;
    assert_eq!(code, Some(CloseCode::Invalid));
    let mut c = Client::connect(&node, "bob").await;
    // opcode 0x3 is reserved
    c.write_raw(&[0x83, 0x80, 0, 0, 0, 0]).await.unwrap();
    let (code, _) = c.expect_close().await;
    assert_eq!(code, Some(CloseCode::Protocol));
}

/// After a clean close handshake the server closes the TCP connection at once.
#[tokio::test]
async fn tcp_closes_promptly_after_the_close_handshake() {
    let node = TestNode::start(settings());
    let mut c = Client::connect(&node, "alice").await;
    c.send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;
    let (code, _) = c.expect_close().await;
    assert_eq!(code, Some(CloseCode::Normal));
    eventually_within(
        "TCP to leave ESTABLISHED within 300 ms of the close handshake",
        Duration::from_millis(300),
        || c.tcp_state() != 1,
    )
    .await;
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
