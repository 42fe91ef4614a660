//! The web front end in a real headless Chromium against a real node: the pages, the
//! websocket client in `static/chat.js`, one-to-one and room chat, reloads (history and
//! sync), and that message text is never interpreted as HTML.
//!
//! Needs Debian's `chromium` (`/usr/bin/chromium`, or `$CHROMIUM`); `.ci/run` installs it.

mod common;

use std::time::Duration;

use common::browser::{Browser, Page};
use common::nginx::Nginx;
use common::{settings, ClusterEnv, TestNode};
use serde_json::{json, Value};

/// How long one thing the page should do may take.
const T: Duration = Duration::from_secs(15);

/// Runs an async test body on its own runtime. The node is started outside it:
/// `TestNode` runs its own actix system and blocks while starting and stopping.
fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// JS: the rendered message element whose body text is exactly `body` (or undefined).
fn msg(body: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#messages .msg'))\
         .find(m => m.querySelector('.body').textContent === {})",
        json!(body)
    )
}

/// JS: the bodies of the rendered messages, in page order.
const BODIES: &str =
    "Array.from(document.querySelectorAll('#messages .msg .body')).map(b => b.textContent)";

/// Waits until the page's websocket is welcomed (and, on a room page, joined).
async fn wait_online(page: &Page) {
    page.wait_for(
        "document.getElementById('chat')?.dataset.conn === 'online' \
         && window.chatmesh && window.chatmesh.state.ready",
        T,
    )
    .await;
}

/// The node whose websocket the page is on.
async fn node_of(page: &Page) -> Value {
    page.eval("window.chatmesh.state.node").await
}

/// Waits until the page's history request and sync (with all its pages) are answered
/// and every send it still had (kept across the reload) is confirmed.
async fn settled(page: &Page) {
    page.wait_for(
        "(s => s.ready && !s.syncing && s.historyLoaded && !s.historyInFlight \
           && s.pending.size === 0)(window.chatmesh.state)",
        T,
    )
    .await;
}

/// Types `text` into the message box and presses the send button, like a user.
async fn send(page: &Page, text: &str) {
    page.wait_for("document.getElementById('send-input').value === ''", T)
        .await;
    page.type_text("#send-input", text).await;
    page.click("#send-button").await;
}

/// Waits for the message with this body to reach `state` on `page`; returns its element's
/// `data-` attributes.
async fn wait_msg(page: &Page, body: &str, state: &str) -> Value {
    let m = msg(body);
    page.wait_for(&format!("{m}?.dataset.state === {}", json!(state)), T)
        .await;
    page.eval(&format!(
        "(() => {{ const m = {m}; return {{conv: m.dataset.conv, seq: m.dataset.seq, \
           state: m.dataset.state, own: m.classList.contains('own')}}; }})()"
    ))
    .await
}

#[test]
fn chat_in_the_browser() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    let node_id = node.node_id.clone();
    run(async move {
        let browser = Browser::launch().await;

        // --- The start page leads to a chat page with exactly one of to / room.
        let start = browser.new_page(&format!("{base}/?uid=alice")).await;
        assert_eq!(
            start
                .eval("document.getElementById('start-uid').value")
                .await,
            "alice"
        );
        assert_eq!(
            start
                .eval("document.querySelector('.node code')?.textContent")
                .await,
            json!(node_id)
        );
        start.type_text("#start-room", "lobby").await;
        start.click("button[data-kind=room]").await;
        start
            .wait_for(
                "location.pathname === '/chat' && document.readyState === 'complete'",
                T,
            )
            .await;
        assert_eq!(start.eval("location.search").await, "?uid=alice&room=lobby");
        start.close().await;

        // --- One-to-one: B first, so A's first presence question finds bob online.
        let b = browser
            .new_page(&format!("{base}/chat?uid=bob&to=alice"))
            .await;
        wait_online(&b).await;
        let a = browser
            .new_page(&format!("{base}/chat?uid=alice&to=bob"))
            .await;
        wait_online(&a).await;
        assert_eq!(
            a.eval("document.getElementById('chat').dataset.conv").await,
            "dm:alice:bob"
        );
        a.wait_for(
            "document.getElementById('presence').dataset.online === 'true'",
            T,
        )
        .await;

        send(&a, "hello bob").await;
        let got = wait_msg(&b, "hello bob", "received").await;
        assert_eq!(got["conv"], "dm:alice:bob");
        let mine = wait_msg(&a, "hello bob", "stored").await;
        assert_eq!(mine["own"], true);
        assert_eq!(mine["seq"], got["seq"], "same message, same seq");
        assert_ne!(mine["seq"], "");

        send(&b, "hi alice").await;
        wait_msg(&a, "hi alice", "received").await;
        wait_msg(&b, "hi alice", "stored").await;

        // Message text is text: no element is created, no script runs.
        let evil = "<b>x</b><script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">";
        send(&a, evil).await;
        wait_msg(&b, evil, "received").await;
        wait_msg(&a, evil, "stored").await;
        for page in [&a, &b] {
            assert_eq!(
                page.eval(&format!("{}.querySelector('.body').textContent", msg(evil)))
                    .await,
                evil
            );
            assert_eq!(
                page.eval("document.querySelectorAll('#messages b, #messages script, #messages img').length")
                    .await,
                0
            );
            assert_eq!(page.eval("typeof window.pwned").await, "undefined");
        }

        // No duplicates, in seq order, on both sides.
        let dm_bodies = json!(["hello bob", "hi alice", evil]);
        assert_eq!(a.eval(BODIES).await, dm_bodies);
        assert_eq!(b.eval(BODIES).await, dm_bodies);

        // --- A room: both pages join it by themselves and talk both ways.
        let ar = browser
            .new_page(&format!("{base}/chat?uid=alice&room=lobby"))
            .await;
        let br = browser
            .new_page(&format!("{base}/chat?uid=bob&room=lobby"))
            .await;
        wait_online(&ar).await;
        wait_online(&br).await;
        assert_eq!(
            br.eval("document.getElementById('chat').dataset.conv")
                .await,
            "room:lobby"
        );

        send(&ar, "room hello from alice").await;
        let got = wait_msg(&br, "room hello from alice", "received").await;
        assert_eq!(got["conv"], "room:lobby");
        wait_msg(&ar, "room hello from alice", "stored").await;

        send(&br, "room hello from bob").await;
        wait_msg(&ar, "room hello from bob", "received").await;
        wait_msg(&br, "room hello from bob", "stored").await;

        // alice's room page has learned that bob is around.
        ar.wait_for(
            "document.querySelector('#members li[data-uid=bob]') !== null",
            T,
        )
        .await;

        // A direct message while alice looks at the room: a notice, not a list entry.
        send(&b, "psst, alice").await;
        wait_msg(&a, "psst, alice", "received").await;
        ar.wait_for(
            "document.querySelector('#notices .notice a')?.textContent === 'new message from bob'",
            T,
        )
        .await;
        assert_eq!(
            ar.eval(&format!("{} === undefined", msg("psst, alice")))
                .await,
            true
        );

        // --- Reloads: everything comes back from history / sync, once, in order.
        let dm_bodies = json!(["hello bob", "hi alice", evil, "psst, alice"]);
        let room_bodies = json!(["room hello from alice", "room hello from bob"]);
        for (page, bodies) in [
            (&b, &dm_bodies),
            (&br, &room_bodies),
            (&a, &dm_bodies),
            (&ar, &room_bodies),
        ] {
            page.reload().await;
            wait_online(page).await;
            let last = bodies.as_array().unwrap().last().unwrap().as_str().unwrap();
            page.wait_for(&format!("{} !== undefined", msg(last)), T)
                .await;
            // Both catch-up paths (history and sync) have answered: nothing more is due.
            settled(page).await;
            assert_eq!(&page.eval(BODIES).await, bodies);
            let seqs = page
                .eval("Array.from(document.querySelectorAll('#messages .msg')).map(m => Number(m.dataset.seq))")
                .await;
            let seqs: Vec<u64> = serde_json::from_value(seqs).unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq order: {seqs:?}");
        }
        assert_eq!(b.eval("typeof window.pwned").await, "undefined");
        assert_eq!(
            b.eval(&format!("{}.dataset.state", msg("hello bob"))).await,
            "received"
        );
        assert_eq!(
            a.eval(&format!("{}.classList.contains('own')", msg("hello bob")))
                .await,
            true
        );

        // Still live after the reloads.
        send(&br, "after reload").await;
        wait_msg(&ar, "after reload", "received").await;
        wait_msg(&br, "after reload", "stored").await;

        // A bad chat URL gets the explanatory error page.
        let bad = browser
            .new_page(&format!("{base}/chat?uid=alice&to=bob&room=lobby"))
            .await;
        assert_eq!(
            bad.eval("document.getElementById('error-message') !== null")
                .await,
            true,
            "{}",
            bad.debug_dump().await
        );

        for page in [&a, &b, &ar, &br] {
            let errors: Vec<String> = page
                .console()
                .into_iter()
                .filter(|l| l.starts_with("uncaught"))
                .collect();
            assert!(errors.is_empty(), "uncaught exceptions: {errors:?}");
        }
    });
    drop(node);
}

#[test]
fn load_older_pages_through_history() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    run(async {
        // carol fills a room with 60 messages over a plain websocket.
        let mut carol = common::Client::connect(&node, "carol").await;
        carol.join("big").await;
        for i in 1..=60 {
            let sent = carol.room("big", &format!("m{i}"), &format!("k{i}")).await;
            assert_eq!(sent["seq"], i, "{sent}");
        }

        let browser = Browser::launch().await;
        let page = browser
            .new_page(&format!("{base}/chat?uid=dave&room=big"))
            .await;
        wait_online(&page).await;
        const COUNT: &str = "document.querySelectorAll('#messages .msg').length";
        // The latest page of history (50), then the rest on "load older".
        page.wait_for(&format!("{COUNT} === 50"), T).await;
        page.wait_for("!document.getElementById('load-older').hidden", T)
            .await;
        assert_eq!(
            page.eval("document.querySelector('#messages .msg').dataset.seq")
                .await,
            "11"
        );
        page.click("#load-older").await;
        page.wait_for(&format!("{COUNT} === 60"), T).await;
        page.wait_for("document.getElementById('load-older').hidden", T)
            .await;
        let seqs = page
            .eval("Array.from(document.querySelectorAll('#messages .msg')).map(m => Number(m.dataset.seq))")
            .await;
        assert_eq!(seqs, json!((1..=60).collect::<Vec<u64>>()));
        let bodies = page.eval(BODIES).await;
        assert_eq!(
            bodies,
            json!((1..=60).map(|i| format!("m{i}")).collect::<Vec<_>>())
        );
        // The cursor kept for the next visit is the newest seq seen.
        assert_eq!(
            page.eval("JSON.parse(localStorage.getItem('chatmesh:cursors:dave'))['room:big']")
                .await,
            60
        );

        // Live messages still arrive after paging, at the end.
        carol.room("big", "m61", "k61").await;
        wait_msg(&page, "m61", "received").await;
        assert_eq!(
            page.eval("document.querySelector('#messages .msg:last-child .body').textContent")
                .await,
            "m61"
        );
    });
    drop(node);
}

/// The same pages through real nginx in front of two cluster nodes: the two users'
/// pages are served by different nodes and still talk, one-to-one and in a room.
#[test]
fn chat_in_the_browser_across_two_nodes_behind_nginx() {
    let env = ClusterEnv::start();
    let n1 = env.node("node-1");
    let n2 = env.node("node-2");
    let addr = |n: &TestNode| n.base.trim_start_matches("http://").parse().unwrap();
    let nginx = Nginx::start(&[addr(&n1), addr(&n2)]);
    let base = nginx.base.clone();
    run(async move {
        let browser = Browser::launch().await;
        let a = browser
            .new_page(&format!("{base}/chat?uid=alice&to=bob"))
            .await;
        wait_online(&a).await;
        let b = browser
            .new_page(&format!("{base}/chat?uid=bob&to=alice"))
            .await;
        wait_online(&b).await;
        let (node_a, node_b) = (node_of(&a).await, node_of(&b).await);
        assert_ne!(
            node_a, node_b,
            "nginx spread the two websockets over both nodes"
        );

        send(&a, "hello across nodes").await;
        wait_msg(&b, "hello across nodes", "received").await;
        wait_msg(&a, "hello across nodes", "stored").await;
        send(&b, "and back").await;
        wait_msg(&a, "and back", "received").await;
        a.wait_for(
            "document.getElementById('presence').dataset.online === 'true'",
            T,
        )
        .await;

        let ar = browser
            .new_page(&format!("{base}/chat?uid=alice&room=lobby"))
            .await;
        wait_online(&ar).await;
        let br = browser
            .new_page(&format!("{base}/chat?uid=bob&room=lobby"))
            .await;
        wait_online(&br).await;
        assert_ne!(node_of(&ar).await, node_of(&br).await);
        send(&ar, "room across nodes").await;
        wait_msg(&br, "room across nodes", "received").await;
        send(&br, "room reply").await;
        wait_msg(&ar, "room reply", "received").await;
        wait_msg(&br, "room reply", "stored").await;

        // A reload may land on the other node; the conversation comes back whole.
        b.reload().await;
        wait_online(&b).await;
        settled(&b).await;
        assert_eq!(
            b.eval(BODIES).await,
            json!(["hello across nodes", "and back"])
        );
    });
    drop(nginx);
}
