//! The web pages in a real headless Chromium against real nodes: the start page, the
//! messenger (inbox and conversation, on top of `static/chatmesh.js`), rooms and their
//! owners' controls, JWT mode, restarts of the node, and that message text is never
//! interpreted as HTML.
//!
//! Every test saves screenshots of the states it reaches under
//! `target/screenshots/` (or `$CARGO_TARGET_DIR/screenshots/`).
//!
//! Needs Debian's `chromium` (`/usr/bin/chromium`, or `$CHROMIUM`); `.ci/test` installs it.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::browser::{Browser, Page};
use common::nginx::Nginx;
use common::{http_blocking, settings, ClusterEnv, LoggedProcess, TestNode};
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

/// Opens `url` in a new window with a desktop-sized viewport.
async fn open(browser: &Browser, url: &str) -> Page {
    let page = browser.blank_page().await;
    page.set_viewport(1280, 800, false).await;
    page.goto(url).await;
    page
}

/// Saves a screenshot of `page` as `target/screenshots/<name>.png`.
async fn shot(page: &Page, name: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    page.screenshot(&target.join("screenshots").join(format!("{name}.png")))
        .await;
}

/// JS: the rendered message element whose body text is exactly `body` (or undefined).
fn msg(body: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#messages .msg'))\
         .find(m => m.querySelector('.body').textContent === {})",
        json!(body)
    )
}

/// JS: the inbox entry of conversation `conv` (or null).
fn inbox_item(conv: &str) -> String {
    format!(
        "document.querySelector('#inbox .conv-item[data-conv={}]')",
        json!(conv)
    )
}

/// JS: the bodies of the rendered messages, in page order.
const BODIES: &str =
    "Array.from(document.querySelectorAll('#messages .msg .body')).map(b => b.textContent)";

/// JS: the seqs of the rendered messages, in page order.
const SEQS: &str =
    "Array.from(document.querySelectorAll('#messages .msg')).map(m => Number(m.dataset.seq))";

/// Waits until the page's client is welcomed.
async fn wait_online(page: &Page) {
    page.wait_for(
        "window.chatmesh && window.chatmesh.client.state === 'open' \
         && document.getElementById('chat').dataset.conn === 'online'",
        T,
    )
    .await;
}

/// Waits until the page is connected and synced, the open conversation's newest page
/// is loaded, and nothing it sends is unconfirmed.
async fn settled(page: &Page) {
    page.wait_for("window.chatmesh && window.chatmesh.settled()", T)
        .await;
}

/// Waits until the open conversation can be written to.
async fn ready_to_write(page: &Page) {
    page.wait_for(
        "(i => !i.disabled && i.value === '')(document.getElementById('send-input'))",
        T,
    )
    .await;
}

/// Types `text` into the message box and presses the send button, like a user.
async fn send(page: &Page, text: &str) {
    ready_to_write(page).await;
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

/// Clicks the `action` button (edit, delete, ...) of the message whose body is `body`,
/// with a real mouse event (the buttons show on hover; they are there and clickable).
async fn click_action(page: &Page, body: &str, action: &str) {
    let rect = page
        .eval(&format!(
            "(() => {{ const b = {}.querySelector('[data-action={action}]'); \
               b.scrollIntoView({{block: 'center'}}); const r = b.getBoundingClientRect(); \
               return [r.left + r.width / 2, r.top + r.height / 2]; }})()",
            msg(body)
        ))
        .await;
    let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
    for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
        page.cmd(
            "Input.dispatchMouseEvent",
            json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
        )
        .await
        .unwrap();
    }
}

/// Shift+Enter in the focused element.
async fn press_shift_enter(page: &Page) {
    for kind in ["keyDown", "keyUp"] {
        let mut params = json!({
            "type": kind, "key": "Enter", "code": "Enter", "modifiers": 8,
            "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
        });
        if kind == "keyDown" {
            params["text"] = json!("\r");
        }
        page.cmd("Input.dispatchKeyEvent", params).await.unwrap();
    }
}

/// The node whose websocket the page is on.
async fn node_of(page: &Page) -> Value {
    page.eval("window.chatmesh.client.node").await
}

/// No uncaught exception on any of these pages.
fn no_exceptions(pages: &[&Page]) {
    for page in pages {
        let errors: Vec<String> = page
            .console()
            .into_iter()
            .filter(|l| l.starts_with("uncaught"))
            .collect();
        assert!(errors.is_empty(), "uncaught exceptions: {errors:?}");
    }
}

#[test]
fn chat_in_the_browser() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    let node_id = node.node_id.clone();
    run(async {
        let browser = Browser::launch().await;

        // --- The start page: the id box is not red before anything is typed.
        let fresh = open(&browser, &format!("{base}/")).await;
        let border = "getComputedStyle(document.getElementById('start-uid')).borderColor";
        assert_eq!(fresh.eval(border).await, "rgb(227, 230, 238)");
        shot(&fresh, "start-page").await;
        fresh.type_text("#start-uid", "not an id!").await;
        fresh.type_text("#start-to", "bob").await; // the id box loses focus
        fresh
            .wait_for(&format!("{border} === 'rgb(194, 54, 43)'"), T)
            .await;
        fresh.click("button[data-kind=to]").await;
        fresh
            .wait_for(
                "document.getElementById('start-error').textContent.includes('letters')",
                T,
            )
            .await;
        assert_eq!(fresh.eval("location.pathname").await, "/");
        shot(&fresh, "start-page-invalid-id").await;
        fresh.close().await;

        // --- It leads to the messenger with exactly one of to / room.
        let start = open(&browser, &format!("{base}/?uid=alice")).await;
        assert_eq!(
            start
                .eval("document.getElementById('start-uid').value")
                .await,
            "alice"
        );
        assert_eq!(
            start.eval("document.body.dataset.node").await,
            json!(node_id)
        );
        // No node id is shown to users (only in the debug view).
        assert_eq!(
            start
                .eval(&format!(
                    "document.body.innerText.includes({})",
                    json!(node_id)
                ))
                .await,
            false
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
        let b = open(&browser, &format!("{base}/chat?uid=bob&to=alice")).await;
        wait_online(&b).await;
        let a = open(&browser, &format!("{base}/chat?uid=alice&to=bob")).await;
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
        // Nor is the seq shown (only in the debug view).
        assert_eq!(
            a.eval(&format!(
                "{}.querySelector('.seq').offsetParent === null",
                msg("hello bob")
            ))
            .await,
            true
        );

        // The debug toggle shows them, and the node.
        a.click("#debug-toggle").await;
        a.wait_for(
            &format!(
                "{}.querySelector('.seq').offsetParent !== null \
                 && document.getElementById('debug-info').textContent.includes({})",
                msg("hello bob"),
                json!(node_id)
            ),
            T,
        )
        .await;
        shot(&a, "dm-debug-view").await;
        a.click("#debug-toggle").await;
        a.wait_for("document.getElementById('debug-info').hidden", T)
            .await;

        // No duplicates, in seq order, on both sides.
        let dm_bodies = json!(["hello bob", "hi alice", evil]);
        assert_eq!(a.eval(BODIES).await, dm_bodies);
        assert_eq!(b.eval(BODIES).await, dm_bodies);
        shot(&a, "dm-alice").await;

        // --- A room: both pages join it by themselves and talk both ways.
        let ar = open(&browser, &format!("{base}/chat?uid=alice&room=lobby")).await;
        let br = open(&browser, &format!("{base}/chat?uid=bob&room=lobby")).await;
        settled(&ar).await;
        settled(&br).await;
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

        // The members of the room, from room_info.
        ar.click("#members-toggle").await;
        ar.wait_for(
            "document.querySelector('#member-list li[data-uid=bob]') !== null",
            T,
        )
        .await;
        shot(&ar, "room-with-members").await;

        // A direct message from someone else while alice looks at the room: her inbox
        // shows it on top, unread; the room does not.
        let mut carol = common::Client::connect(&node, "carol").await;
        carol.direct("alice", "psst, alice", "c1").await;
        let dm = inbox_item("dm:alice:carol");
        ar.wait_for(
            &format!(
                "{dm}?.querySelector('.badge').textContent === '1' \
                 && {dm}.querySelector('.conv-preview').textContent === 'psst, alice' \
                 && document.querySelector('#inbox .conv-item').dataset.conv === 'dm:alice:carol'"
            ),
            T,
        )
        .await;
        assert_eq!(
            ar.eval(&format!("{} === undefined", msg("psst, alice")))
                .await,
            true
        );
        send(&b, "psst, alice").await;
        wait_msg(&a, "psst, alice", "received").await;

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
            settled(page).await;
            assert_eq!(&page.eval(BODIES).await, bodies);
            let seqs: Vec<u64> = serde_json::from_value(page.eval(SEQS).await).unwrap();
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

        // The older URLs open the same messenger on the same conversation.
        let old = open(&browser, &format!("{base}/home/index?uid=bob&to_uid=alice")).await;
        settled(&old).await;
        assert_eq!(
            old.eval("window.chatmesh.conv").await,
            "dm:alice:bob",
            "{}",
            old.debug_dump().await
        );
        old.wait_for(&format!("{} !== undefined", msg("psst, alice")), T)
            .await;
        old.goto(&format!("{base}/home/room?uid=bob&groups_id=lobby"))
            .await;
        settled(&old).await;
        assert_eq!(old.eval("window.chatmesh.conv").await, "room:lobby");
        old.wait_for(&format!("{} !== undefined", msg("after reload")), T)
            .await;

        // A bad chat URL gets the explanatory error page; an unknown one the 404 page.
        let bad = open(
            &browser,
            &format!("{base}/chat?uid=alice&to=bob&room=lobby"),
        )
        .await;
        assert_eq!(
            bad.eval("document.getElementById('error-message') !== null")
                .await,
            true,
            "{}",
            bad.debug_dump().await
        );
        shot(&bad, "bad-request").await;
        bad.goto(&format!("{base}/no/such/page")).await;
        assert_eq!(
            bad.eval("document.getElementById('not-found') !== null && document.title")
                .await,
            "Page not found · chatmesh"
        );
        shot(&bad, "not-found").await;

        no_exceptions(&[&a, &b, &ar, &br, &old]);
    });
    drop(node);
}

/// Two users on one node: the inbox (newest first, previews, unread badges), typing,
/// "seen", edits and deletes on both pages, the presence dot, multi-line messages.
#[test]
fn messenger_inbox_typing_seen_edit_delete_presence() {
    let node = TestNode::start(settings());
    run(two_users_in_the_messenger(&node, &node, ""));
    drop(node);
}

/// The same across two cluster nodes, one page on each (and carol's websocket on bob's
/// node): unread badges, typing, "seen", edits, deletes and the presence dot all cross
/// the peer API.
#[test]
fn messenger_inbox_typing_seen_edit_delete_presence_across_two_nodes() {
    let env = ClusterEnv::start();
    let n1 = env.node("node-1");
    let n2 = env.node("node-2");
    run(two_users_in_the_messenger(&n1, &n2, "cluster-"));
    drop((n1, n2));
}

/// alice's page on `alice_node`, bob's on `bob_node` (the same node or two of a
/// cluster); the screenshots' names start with `prefix`.
async fn two_users_in_the_messenger(alice_node: &TestNode, bob_node: &TestNode, prefix: &str) {
    let browser = Browser::launch().await;
    // alice opens her inbox; nobody has written yet.
    let a = open(&browser, &format!("{}/inbox?uid=alice", alice_node.base)).await;
    wait_online(&a).await;
    assert_eq!(node_of(&a).await, json!(alice_node.node_id));
    a.wait_for(
        "!document.getElementById('inbox-empty').hidden \
             && !document.getElementById('conv-placeholder').hidden",
        T,
    )
    .await;
    shot(&a, &format!("{prefix}inbox-empty")).await;

    // bob writes to her (two lines in one message: Shift+Enter), carol too.
    let b = open(
        &browser,
        &format!("{}/chat?uid=bob&to=alice", bob_node.base),
    )
    .await;
    settled(&b).await;
    assert_eq!(node_of(&b).await, json!(bob_node.node_id));
    ready_to_write(&b).await;
    b.type_text("#send-input", "Lunch tomorrow?").await;
    press_shift_enter(&b).await;
    b.type_text("#send-input", "The usual place").await;
    b.click("#send-button").await;
    wait_msg(&b, "Lunch tomorrow?\nThe usual place", "stored").await;
    send(&b, "12:30?").await;
    wait_msg(&b, "12:30?", "stored").await;
    let bob_dm = inbox_item("dm:alice:bob");
    a.wait_for(
        &format!(
            "{bob_dm}?.querySelector('.badge').textContent === '2' \
                 && {bob_dm}.querySelector('.conv-preview').textContent === '12:30?'"
        ),
        T,
    )
    .await;
    let mut carol = common::Client::connect(bob_node, "carol").await;
    carol.direct("alice", "Did you see the report?", "c1").await;
    let carol_dm = inbox_item("dm:alice:carol");
    a.wait_for(
        &format!("{carol_dm}?.querySelector('.badge').textContent === '1'"),
        T,
    )
    .await;
    // Newest first.
    assert_eq!(
        a.eval(
            "Array.from(document.querySelectorAll('#inbox .conv-item')).map(i => i.dataset.conv)"
        )
        .await,
        json!(["dm:alice:carol", "dm:alice:bob"])
    );
    shot(&a, &format!("{prefix}inbox-unread")).await;

    // alice opens bob's conversation (her tab in front): it is read, the badge goes,
    // and bob's page shows "Seen" under his last message.
    a.bring_to_front().await;
    a.click("#inbox .conv-item[data-conv=\"dm:alice:bob\"] a")
        .await;
    settled(&a).await;
    assert_eq!(
        a.eval("location.search").await,
        "?uid=alice&to=bob",
        "the URL follows the open conversation"
    );
    assert_eq!(
        a.eval(BODIES).await,
        json!(["Lunch tomorrow?\nThe usual place", "12:30?"])
    );
    a.wait_for(&format!("{bob_dm}.querySelector('.badge').hidden"), T)
        .await;
    b.wait_for(
        &format!(
            "{}.querySelector('.mark').dataset.mark === 'seen'",
            msg("12:30?")
        ),
        T,
    )
    .await;
    assert_eq!(
        b.eval(&format!(
            "{}.querySelector('.mark').textContent",
            msg("12:30?")
        ))
        .await,
        "Seen"
    );
    shot(&b, &format!("{prefix}dm-seen")).await;

    // Typing shows on the other page, and goes away after a few seconds of quiet.
    b.bring_to_front().await;
    ready_to_write(&a).await;
    a.type_text("#send-input", "Sure, see").await;
    b.wait_for(
        "document.getElementById('typing').textContent === 'alice is typing…'",
        T,
    )
    .await;
    shot(&b, &format!("{prefix}dm-typing")).await;
    b.wait_for(
        "document.getElementById('typing').textContent === ''",
        Duration::from_secs(10),
    )
    .await;
    // Enter sends (what was typed so far, and the rest).
    a.type_text("#send-input", " you there").await;
    a.press_enter().await;
    wait_msg(&b, "Sure, see you there", "received").await;
    wait_msg(&a, "Sure, see you there", "stored").await;

    // alice edits her message; both pages show the new text, marked edited.
    click_action(&a, "Sure, see you there", "edit").await;
    a.wait_for(
        "document.getElementById('send-input').value === 'Sure, see you there' \
             && !document.getElementById('edit-bar').hidden",
        T,
    )
    .await;
    shot(&a, &format!("{prefix}dm-editing")).await;
    a.eval("document.getElementById('send-input').select()")
        .await;
    a.type_text("#send-input", "Sure, see you at 12:30").await;
    a.press_enter().await;
    for page in [&a, &b] {
        page.wait_for(
            &format!(
                "(m => m && !m.querySelector('.edited').hidden)({})",
                msg("Sure, see you at 12:30")
            ),
            T,
        )
        .await;
        assert_eq!(
            page.eval(&format!("{} === undefined", msg("Sure, see you there")))
                .await,
            true
        );
    }

    // bob deletes his first message; both pages show it deleted, in place.
    click_action(&b, "Lunch tomorrow?\nThe usual place", "delete").await;
    b.click("#messages [data-action=confirm-delete]").await;
    for page in [&a, &b] {
        page.wait_for(
            "(m => m && m.classList.contains('deleted') \
                   && m.querySelector('.body').textContent === 'This message was deleted')\
                 (document.querySelector('#messages .msg'))",
            T,
        )
        .await;
    }
    // The inbox says who deleted a message (the newest event of the conversation).
    a.wait_for(
        &format!("{bob_dm}.querySelector('.conv-preview').textContent === 'bob deleted a message'"),
        T,
    )
    .await;
    assert_eq!(
        a.eval(BODIES).await,
        json!([
            "This message was deleted",
            "12:30?",
            "Sure, see you at 12:30"
        ])
    );
    // Others' messages cannot be edited or deleted in a DM.
    assert_eq!(
        a.eval("document.querySelectorAll('#messages .msg.other [data-action]').length")
            .await,
        0
    );
    shot(&a, &format!("{prefix}dm-edited-deleted")).await;

    // The presence dot of bob on alice's page flips within a second of his page
    // closing.
    a.wait_for(
        "document.getElementById('presence').dataset.online === 'true'",
        T,
    )
    .await;
    let closed = Instant::now();
    b.close().await;
    a.wait_for(
        "document.getElementById('presence').dataset.online === 'false'",
        Duration::from_secs(1),
    )
    .await;
    let took = closed.elapsed();
    eprintln!("{prefix}presence: offline on alice's page {took:?} after bob's page closed");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        a.eval(&format!("{bob_dm}.querySelector('.dot').dataset.online"))
            .await,
        "false"
    );
    shot(&a, &format!("{prefix}dm-peer-offline")).await;

    // Phone-sized: the conversation alone, with a way back to the inbox.
    a.set_viewport(390, 800, true).await;
    a.wait_for(
        "getComputedStyle(document.querySelector('.sidebar')).display === 'none'",
        T,
    )
    .await;
    shot(&a, &format!("{prefix}phone-conversation")).await;
    a.click("#back").await;
    a.wait_for(
        "getComputedStyle(document.querySelector('.sidebar')).display !== 'none'",
        T,
    )
    .await;
    shot(&a, &format!("{prefix}phone-inbox")).await;
    no_exceptions(&[&a]);
}

/// JS: the mark under the message whose body is `body`.
fn mark_of(body: &str) -> String {
    format!("{}.querySelector('.mark')", msg(body))
}

/// JS: true when the newest rendered message is inside the scroller's visible area,
/// on each of the next 20 animation frames (a notice sliding in must not move it).
const NEWEST_STAYS_IN_VIEW: &str = "(async () => { \
    for (let i = 0; i < 20; i++) { \
      const s = document.getElementById('scroller').getBoundingClientRect(); \
      const all = document.querySelectorAll('#messages .msg'); \
      const m = all[all.length - 1].getBoundingClientRect(); \
      if (!(m.height > 0 && m.top >= s.top - 0.5 && m.bottom <= s.bottom + 0.5)) \
        return 'out of view: message ' + m.top + '..' + m.bottom + ', scroller ' + s.top + '..' + s.bottom; \
      await new Promise(r => requestAnimationFrame(r)); \
    } \
    return true; })()";

/// The inbox's search box starts a chat with a person and with a room; your messages
/// show "Delivered" once they reached the other's device and "Seen" once read; in rooms
/// "Seen by N"; and notices (an error toast, the connection banner) do not push the
/// newest message out of view.
#[test]
fn new_chats_delivered_seen_by_and_notices() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    run(async move {
        let browser = Browser::launch().await;
        // bob has only his inbox open: what reaches him is delivered, not read.
        let b = open(&browser, &format!("{base}/inbox?uid=bob")).await;
        wait_online(&b).await;
        let a = open(&browser, &format!("{base}/inbox?uid=alice")).await;
        wait_online(&a).await;

        // A person, from the search box.
        a.type_text("#new-chat-input", "bob").await;
        a.press_enter().await;
        a.wait_for("window.chatmesh.conv === 'dm:alice:bob'", T)
            .await;
        settled(&a).await;
        assert_eq!(a.eval("location.search").await, "?uid=alice&to=bob");
        assert_eq!(
            a.eval("[document.getElementById('chat-title').textContent, document.getElementById('new-chat-input').value]")
                .await,
            json!(["bob", ""])
        );
        send(&a, "are you there?").await;
        wait_msg(&a, "are you there?", "stored").await;
        let mark = mark_of("are you there?");
        a.wait_for(
            &format!("{mark}.dataset.mark === 'delivered' && {mark}.textContent === 'Delivered'"),
            T,
        )
        .await;
        b.wait_for(
            &format!(
                "{}?.querySelector('.badge').textContent === '1'",
                inbox_item("dm:alice:bob")
            ),
            T,
        )
        .await;
        shot(&a, "dm-delivered").await;
        // bob opens it: now it is seen.
        b.bring_to_front().await;
        b.click("#inbox .conv-item[data-conv=\"dm:alice:bob\"] a")
            .await;
        a.wait_for(
            &format!("{mark}.dataset.mark === 'seen' && {mark}.textContent === 'Seen'"),
            T,
        )
        .await;

        // A room, from the search box with `#`: a new public room, alice its owner.
        a.bring_to_front().await;
        a.type_text("#new-chat-input", "#standup").await;
        a.press_enter().await;
        a.wait_for("window.chatmesh.conv === 'room:standup'", T)
            .await;
        settled(&a).await;
        a.wait_for(
            "document.getElementById('room-meta').textContent === 'Public room · 1 member'",
            T,
        )
        .await;
        assert_eq!(a.eval("location.search").await, "?uid=alice&room=standup");
        // bob and carol are in the room too (their windows open on it) when alice
        // writes; they read it: "Seen by 1", then "Seen by 2".
        b.goto(&format!("{base}/chat?uid=bob&room=standup")).await;
        settled(&b).await;
        let c = open(&browser, &format!("{base}/inbox?uid=carol")).await;
        wait_online(&c).await;
        c.eval("window.chatmesh.client.join('standup')").await;
        send(&a, "standup at 10").await;
        wait_msg(&a, "standup at 10", "stored").await;
        let mark = mark_of("standup at 10");
        wait_msg(&b, "standup at 10", "received").await;
        a.wait_for(
            &format!("{mark}.textContent === 'Seen by 1' && {mark}.title === 'Seen by bob'"),
            T,
        )
        .await;
        shot(&a, "room-seen-by-1").await;
        c.wait_for(
            &format!(
                "{}?.querySelector('.badge').textContent === '1'",
                inbox_item("room:standup")
            ),
            T,
        )
        .await;
        c.click("#inbox .conv-item[data-conv=\"room:standup\"] a")
            .await;
        wait_msg(&c, "standup at 10", "received").await;
        a.wait_for(
            &format!(
                "{mark}.textContent === 'Seen by 2' && {mark}.dataset.seenBy === '2' \
                 && {mark}.title.includes('bob') && {mark}.title.includes('carol')"
            ),
            T,
        )
        .await;
        shot(&a, "room-seen-by").await;

        // A long conversation: more than fits, alice at the newest message.
        let mut dave = common::Client::connect(&node, "dave").await;
        dave.join("standup").await;
        for i in 1..=40 {
            dave.room("standup", &format!("update {i}"), &format!("d{i}"))
                .await;
        }
        wait_msg(&a, "update 40", "received").await;
        assert_eq!(
            a.eval(
                "(s => s.scrollHeight > 2 * s.clientHeight)(document.getElementById('scroller'))"
            )
            .await,
            true,
            "the conversation overflows its scroller"
        );
        assert_eq!(a.eval(NEWEST_STAYS_IN_VIEW).await, true);

        // An error notice (a bad id in the search box) floats over the messages.
        a.type_text("#new-chat-input", "not an id!").await;
        a.press_enter().await;
        a.wait_for("document.querySelector('#toasts .toast.error') !== null", T)
            .await;
        assert_eq!(a.eval(NEWEST_STAYS_IN_VIEW).await, true);
        shot(&a, "notice-error-toast").await;
        // An info notice with a button (someone added alice to a room) does too.
        let mut erin = common::Client::connect(&node, "erin").await;
        erin.send(json!({"type":"create","room":"ops","private":true}))
            .await;
        erin.recv_type("joined").await;
        erin.send(json!({"type":"add","room":"ops","uid":"alice"}))
            .await;
        erin.recv_type("added").await;
        a.wait_for(
            "Array.from(document.querySelectorAll('#toasts .toast')).some(t => t.textContent.includes('erin added you to #ops'))",
            T,
        )
        .await;
        assert_eq!(a.eval(NEWEST_STAYS_IN_VIEW).await, true);

        // The connection banner (the node goes away) does not move it either.
        drop((dave, erin));
        tokio::task::spawn_blocking(move || node.stop().unwrap())
            .await
            .unwrap();
        a.wait_for("!document.getElementById('banner').hidden", T)
            .await;
        assert_eq!(a.eval(NEWEST_STAYS_IN_VIEW).await, true);
        // The notices do not cover each other (the banner's "Retry now" stays usable).
        assert_eq!(
            a.eval(
                "(() => { const b = document.getElementById('banner').getBoundingClientRect(); \
                   return Array.from(document.querySelectorAll('#toasts .toast')).every(t => { \
                     const r = t.getBoundingClientRect(); \
                     return r.top >= b.bottom || r.bottom <= b.top || r.left >= b.right || r.right <= b.left; }); })()"
            )
            .await,
            true
        );
        shot(&a, "notice-connection-banner").await;
        no_exceptions(&[&a, &b, &c]);
    });
}

/// The start page creates a private room: its creator lands in it as its owner, with
/// the members panel open to add people; the URL then names the room only. Asked for a
/// room that exists, it says so and opens it if it may.
#[test]
fn private_room_from_the_start_page() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    run(async {
        let browser = Browser::launch().await;
        let p = open(&browser, &format!("{base}/?uid=olga")).await;
        p.type_text("#start-room", "design").await;
        shot(&p, "start-page-create-room").await;
        p.click("button[data-kind=create]").await;
        p.wait_for(
            "location.pathname === '/chat' && document.readyState === 'complete'",
            T,
        )
        .await;
        p.wait_for(
            "window.chatmesh && window.chatmesh.conv === 'room:design'",
            T,
        )
        .await;
        settled(&p).await;
        p.wait_for(
            "document.getElementById('room-meta').textContent === 'Private room · 1 member' \
             && !document.getElementById('room-panel').hidden \
             && !document.getElementById('add-member').hidden \
             && document.querySelector('#member-list li[data-uid=olga] .role')?.textContent === 'owner' \
             && !document.getElementById('send-input').disabled",
            T,
        )
        .await;
        assert_eq!(
            p.eval("location.search").await,
            "?uid=olga&room=design",
            "a reload opens the room and does not create it again"
        );
        shot(&p, "room-created-from-start-page").await;
        send(&p, "first!").await;
        wait_msg(&p, "first!", "stored").await;

        // It is private: others cannot join it.
        let mut xavier = common::Client::connect(&node, "xavier").await;
        xavier.send(json!({"type":"join","room":"design"})).await;
        assert_eq!(xavier.recv_type("error").await["code"], "forbidden");

        // Asked again: it exists; its owner is let in anyway.
        p.goto(&format!("{base}/chat?uid=olga&room=design&create=private"))
            .await;
        p.wait_for(
            "Array.from(document.querySelectorAll('#toasts .toast.error')).some(t => \
               t.textContent.includes('A room named design already exists.'))",
            T,
        )
        .await;
        settled(&p).await;
        wait_msg(&p, "first!", "stored").await;
        // Someone else asking for it is told it is private.
        let x = open(&browser, &format!("{base}/?uid=xavier")).await;
        x.type_text("#start-room", "design").await;
        x.click("button[data-kind=create]").await;
        x.wait_for(
            "document.getElementById('refusal-reason')?.textContent === '#design is private: an owner must add you.'",
            T,
        )
        .await;
        shot(&x, "room-create-exists").await;
        // A room name is needed first; a bad `create` is an explained error.
        let e = open(&browser, &format!("{base}/?uid=olga")).await;
        e.click("button[data-kind=create]").await;
        e.wait_for(
            "document.getElementById('start-error').textContent === 'Name the new room.'",
            T,
        )
        .await;
        assert_eq!(e.eval("location.pathname").await, "/");
        let bad = common::http_blocking(
            "GET",
            &format!("{base}/chat?uid=olga&room=design&create=yes"),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(bad.status, 400);
        no_exceptions(&[&p, &x, &e]);
    });
    drop(node);
}

/// Rooms from the pages: an owner creates a private room and adds a member whose open
/// page then shows the room; the member posts; the owner deletes it; the owner removes
/// the member, whose page says so; a banned member is told why they cannot join.
#[test]
fn private_rooms_from_the_pages() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    run(async move {
        let browser = Browser::launch().await;
        let owner = open(&browser, &format!("{base}/inbox?uid=olivia")).await;
        wait_online(&owner).await;
        owner.click("#new-room-toggle").await;
        owner.type_text("#new-room-name", "team").await;
        owner.click("#new-room-create").await;
        owner
            .wait_for("window.chatmesh.conv === 'room:team'", T)
            .await;
        settled(&owner).await;
        owner
            .wait_for(
                "document.getElementById('room-meta').textContent === 'Private room · 1 member' \
                 && !document.getElementById('add-member').hidden",
                T,
            )
            .await;

        // Not a member: the page says why (no generic error), and offers nothing to send.
        let member = open(&browser, &format!("{base}/chat?uid=mia&room=team")).await;
        wait_online(&member).await;
        member
            .wait_for(
                "document.getElementById('refusal-reason').textContent \
                 === '#team is private: an owner must add you.'",
                T,
            )
            .await;
        assert_eq!(
            member
                .eval("document.getElementById('send-input').disabled")
                .await,
            true
        );
        shot(&member, "room-private-refused").await;

        // The owner adds her from the members panel; her open page shows the room.
        owner.type_text("#add-member-input", "mia").await;
        owner.click("#add-member-button").await;
        owner
            .wait_for(
                "document.querySelector('#member-list li[data-uid=mia]') !== null",
                T,
            )
            .await;
        member
            .wait_for(
                "document.getElementById('refusal').hidden \
                 && !document.getElementById('send-input').disabled",
                T,
            )
            .await;
        member
            .wait_for(&format!("{} !== null", inbox_item("room:team")), T)
            .await;
        member
            .wait_for(
                "Array.from(document.querySelectorAll('#toasts .toast')).some(t => \
                   t.textContent.includes('olivia added you to #team'))",
                T,
            )
            .await;
        shot(&member, "room-added").await;
        send(&member, "thanks for the invite").await;
        wait_msg(&owner, "thanks for the invite", "received").await;
        send(&owner, "welcome!").await;
        wait_msg(&member, "welcome!", "received").await;
        shot(&owner, "room-owner-panel").await;

        // The owner deletes the member's message (owners may, in their rooms).
        click_action(&owner, "thanks for the invite", "delete").await;
        owner.click("#messages [data-action=confirm-delete]").await;
        member
            .wait_for(
                &format!(
                    "{} === undefined && document.querySelector('#messages .msg.deleted') !== null",
                    msg("thanks for the invite")
                ),
                T,
            )
            .await;

        // Removed: her page says so, and the room leaves her inbox.
        owner
            .click("#member-list li[data-uid=mia] [data-action=remove]")
            .await;
        member
            .wait_for(
                "document.getElementById('refusal-title').textContent === 'olivia removed you from #team' \
                 && !document.getElementById('refusal').hidden",
                T,
            )
            .await;
        member
            .wait_for(&format!("{} === null", inbox_item("room:team")), T)
            .await;
        assert_eq!(
            member
                .eval("document.getElementById('send-input').disabled")
                .await,
            true
        );
        shot(&member, "room-removed").await;

        // Added again, then banned: after a reload the page says she is banned.
        owner.type_text("#add-member-input", "mia").await;
        owner.click("#add-member-button").await;
        member
            .wait_for("!document.getElementById('send-input').disabled", T)
            .await;
        owner
            .wait_for(
                "document.querySelector('#member-list li[data-uid=mia] [data-action=ban]') !== null",
                T,
            )
            .await;
        owner
            .click("#member-list li[data-uid=mia] [data-action=ban]")
            .await;
        member
            .wait_for("!document.getElementById('refusal').hidden", T)
            .await;
        member.reload().await;
        member
            .wait_for(
                "document.getElementById('refusal-reason').textContent \
                 === 'You are banned from #team. An owner can add you again.'",
                T,
            )
            .await;
        shot(&member, "room-banned").await;
        no_exceptions(&[&owner, &member]);
    });
    drop(node);
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// JWT mode: the token comes from the URL or the start page, stays in the tab's
/// sessionStorage (not in the URL); a refused token shows the server's reason.
#[test]
fn jwt_mode_pages() {
    let secret = "browser-test-secret";
    let mut s = settings();
    s.jwt_secret = Some(secret.into());
    let node = TestNode::start(s);
    let base = node.base.clone();
    let token = |sub: &str, exp: u64| chatmesh::auth::make_token(secret, sub, exp).unwrap();
    let alice = token("alice", now_secs() + 3600);
    let bob = token("bob", now_secs() + 3600);
    let expired = token("alice", now_secs() - 3600);
    run(async move {
        let browser = Browser::launch().await;
        // A token in the URL: taken into sessionStorage and out of the address bar.
        let a = open(&browser, &format!("{base}/chat?token={alice}&to=bob")).await;
        wait_online(&a).await;
        assert_eq!(a.eval("location.search").await, "?to=bob");
        assert_eq!(
            a.eval("document.getElementById('me-name').textContent")
                .await,
            "alice"
        );
        assert_eq!(a.eval("window.chatmesh.conv").await, "dm:alice:bob");

        // The start page in JWT mode asks for a token, and keeps it out of the URL.
        let b = open(&browser, &format!("{base}/")).await;
        assert_eq!(
            b.eval("document.getElementById('start-uid') === null && document.getElementById('start-token') !== null")
                .await,
            true
        );
        // ... in a field that does not show it or offer it again
        assert_eq!(
            b.eval("(t => t.type + ' ' + t.autocomplete)(document.getElementById('start-token'))")
                .await,
            "password off"
        );
        b.type_text("#start-token", &bob).await;
        b.type_text("#start-to", "alice").await;
        shot(&b, "jwt-start-page").await;
        b.click("button[data-kind=to]").await;
        b.wait_for(
            "location.pathname === '/chat' && document.readyState === 'complete'",
            T,
        )
        .await;
        assert_eq!(b.eval("location.search").await, "?to=alice");
        wait_online(&b).await;
        send(&b, "hi from a token").await;
        wait_msg(&a, "hi from a token", "received").await;
        // A reload keeps the tab signed in.
        a.reload().await;
        wait_online(&a).await;
        a.wait_for(&format!("{} !== undefined", msg("hi from a token")), T)
            .await;

        // The start page creates a private room with a token too (kept out of the URL).
        let r = open(&browser, &format!("{base}/")).await;
        r.type_text("#start-token", &bob).await;
        r.type_text("#start-room", "jwt-team").await;
        r.click("button[data-kind=create]").await;
        r.wait_for(
            "location.pathname === '/chat' && window.chatmesh?.conv === 'room:jwt-team' \
             && document.getElementById('room-meta').textContent === 'Private room · 1 member' \
             && !document.getElementById('add-member').hidden",
            T,
        )
        .await;
        assert_eq!(r.eval("location.search").await, "?room=jwt-team");
        r.close().await;

        // Refused tokens: the reason the server gives.
        let refused = open(&browser, &format!("{base}/chat?token={expired}&to=bob")).await;
        refused
            .wait_for(
                "!document.getElementById('auth-error').hidden \
                 && document.getElementById('auth-reason').textContent === 'Token expired'",
                T,
            )
            .await;
        shot(&refused, "jwt-refused-expired").await;
        refused
            .goto(&format!("{base}/chat?token=not-a-token&to=bob"))
            .await;
        refused
            .wait_for(
                "document.getElementById('auth-reason').textContent.startsWith('Invalid token')",
                T,
            )
            .await;
        // Without a token at all.
        let none = open(&browser, &format!("{base}/inbox")).await;
        none.wait_for("!document.getElementById('auth-error').hidden", T)
            .await;
        no_exceptions(&[&a, &b]);
    });
    drop(node);
}

/// A node process that can be restarted on the same port and database.
struct RestartableNode {
    process: Option<LoggedProcess>,
    port: u16,
    database: String,
    base: String,
}

impl RestartableNode {
    fn start(database: &str) -> RestartableNode {
        let mut node = RestartableNode {
            process: None,
            port: 0,
            database: database.to_owned(),
            base: String::new(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut proc = LoggedProcess::spawn(
            Command::new(env!("CARGO_BIN_EXE_chatmesh"))
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--internal-listen", "127.0.0.1:0"])
                .args(["--database-url", &self.database, "--workers", "1"])
                .env("RUST_LOG", "warn,chatmesh=info"),
        );
        let addr = proc.public_address();
        self.port = addr.rsplit_once(':').unwrap().1.parse().unwrap();
        self.base = format!("http://{addr}");
        let deadline = Instant::now() + T;
        while !http_blocking("GET", &format!("{}/readyz", self.base), &[], None)
            .is_ok_and(|r| r.status == 200)
        {
            assert!(Instant::now() < deadline, "node never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(proc);
    }

    /// SIGTERM (pages get 1012) and wait for the exit.
    fn stop(&mut self) {
        let mut proc = self.process.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &proc.child.id().to_string()])
            .status();
        assert_eq!(proc.child.wait().unwrap().code(), Some(0));
    }
}

impl Drop for RestartableNode {
    fn drop(&mut self) {
        if let Some(mut proc) = self.process.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

/// Two pages open while the node restarts: on memory (a new, empty database: a new
/// epoch, seqs from 1 again) and on a SQLite file (the same database). While the node
/// is down the pages say so and keep what is typed; afterwards it is sent, and messages
/// typed later show on both pages, without a reload.
#[test]
fn pages_live_through_node_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("chat.db").display());
    for (database, name) in [("memory:", "memory"), (sqlite.as_str(), "sqlite")] {
        let mut node = RestartableNode::start(database);
        let base = node.base.clone();
        // The node is stopped and started from a thread of its own (it blocks).
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let operator = std::thread::spawn(move || {
            for start in rx {
                if start {
                    node.spawn();
                } else {
                    node.stop();
                }
                done_tx.send(()).unwrap();
            }
            node
        });
        let done = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
        let step = |start: bool| {
            tx.send(start).unwrap();
            let done = done.clone();
            tokio::task::spawn_blocking(move || done.lock().unwrap().recv().unwrap())
        };
        run(async {
            let browser = Browser::launch().await;
            let a = open(&browser, &format!("{base}/chat?uid=alice&to=bob")).await;
            let b = open(&browser, &format!("{base}/chat?uid=bob&to=alice")).await;
            settled(&a).await;
            settled(&b).await;
            send(&a, "before the restart").await;
            wait_msg(&b, "before the restart", "received").await;
            let epoch = a.eval("window.chatmesh.client.epoch").await;
            let count = "window.__welcomes = 0; \
                         window.chatmesh.client.on('welcome', () => window.__welcomes++)";
            a.eval(count).await;
            b.eval(count).await;

            // Down: the page says so (over the messages), and keeps what is typed.
            step(false).await.unwrap();
            a.wait_for(
                "!document.getElementById('banner').hidden \
                 && document.getElementById('chat').dataset.conn === 'reconnecting'",
                T,
            )
            .await;
            send(&a, "typed while offline").await;
            wait_msg(&a, "typed while offline", "pending").await;
            shot(&a, &format!("restart-{name}-offline")).await;

            // Up again: the pages connect by themselves (attempts with backoff).
            step(true).await.unwrap();
            for page in [&a, &b] {
                page.wait_for("window.__welcomes >= 1", Duration::from_secs(40))
                    .await;
                settled(page).await;
            }
            let same = a.eval("window.chatmesh.client.epoch").await == epoch;
            assert_eq!(
                same,
                name == "sqlite",
                "the epoch changes only with the database"
            );
            wait_msg(&b, "typed while offline", "received").await;
            wait_msg(&a, "typed while offline", "stored").await;

            send(&a, "after the restart").await;
            wait_msg(&b, "after the restart", "received").await;
            wait_msg(&a, "after the restart", "stored").await;
            send(&b, "and back").await;
            wait_msg(&a, "and back", "received").await;
            let expected = if name == "memory" {
                // The old database is gone; so are its messages on the pages.
                json!(["typed while offline", "after the restart", "and back"])
            } else {
                json!([
                    "before the restart",
                    "typed while offline",
                    "after the restart",
                    "and back"
                ])
            };
            assert_eq!(a.eval(BODIES).await, expected);
            assert_eq!(b.eval(BODIES).await, expected);
            if name == "memory" {
                assert_eq!(a.eval(SEQS).await, json!([1, 2, 3]), "seqs from 1 again");
            }
            shot(&a, &format!("restart-{name}")).await;
            no_exceptions(&[&a, &b]);
        });
        drop(tx);
        drop(operator.join().unwrap());
    }
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
        let page = open(&browser, &format!("{base}/chat?uid=dave&room=big")).await;
        settled(&page).await;
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
        page.eval("document.getElementById('scroller').scrollTop = 0")
            .await;
        shot(&page, "room-load-older").await;
        page.click("#load-older").await;
        page.wait_for(&format!("{COUNT} === 60"), T).await;
        page.wait_for("document.getElementById('load-older').hidden", T)
            .await;
        assert_eq!(page.eval(SEQS).await, json!((1..=60).collect::<Vec<u64>>()));
        let bodies = page.eval(BODIES).await;
        assert_eq!(
            bodies,
            json!((1..=60).map(|i| format!("m{i}")).collect::<Vec<_>>())
        );
        // The cursor kept for the next visit is the newest seq seen.
        page.wait_for(
            "JSON.parse(localStorage.getItem('chatmesh:dave:sync')).cursors['room:big'] === 60",
            T,
        )
        .await;

        // Live messages still arrive after paging, at the end.
        carol.room("big", "m61", "k61").await;
        wait_msg(&page, "m61", "received").await;
        assert_eq!(
            page.eval("document.querySelector('#messages .msg:last-of-type .body').textContent")
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
        let a = open(&browser, &format!("{base}/chat?uid=alice&to=bob")).await;
        wait_online(&a).await;
        let b = open(&browser, &format!("{base}/chat?uid=bob&to=alice")).await;
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

        let ar = open(&browser, &format!("{base}/chat?uid=alice&room=lobby")).await;
        settled(&ar).await;
        let br = open(&browser, &format!("{base}/chat?uid=bob&room=lobby")).await;
        settled(&br).await;
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
