//! Contract section 2 and 5: pages, the websocket handshake (auth, Origin), health,
//! metrics and the server HTTP API.

mod common;

use common::{http, settings, Client, TestNode};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn pages_render_and_old_urls_work() {
    let node = TestNode::start(settings());
    let base = node.base.clone();
    let get = move |path: &str| {
        let url = format!("{base}{path}");
        async move { http("GET", &url, &[], None).await }
    };
    let start = get("/").await.unwrap();
    assert_eq!(start.status, 200);
    assert!(start
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(start.body.contains("<form"));
    assert!(start.body.contains(&node.node_id));

    let dm = get("/chat?uid=alice&to=bob").await.unwrap();
    assert_eq!(dm.status, 200);
    assert!(
        dm.body.contains(r#"data-conv="dm:alice:bob""#),
        "{}",
        dm.body
    );
    assert!(dm.body.contains(r#"data-uid="alice""#));
    assert!(dm.body.contains("/static/chat.js"));
    let room = get("/chat?uid=alice&room=lobby").await.unwrap();
    assert_eq!(room.status, 200);
    assert!(room.body.contains(r#"data-conv="room:lobby""#));

    let old_dm = get("/home/index?uid=alice&to_uid=bob").await.unwrap();
    assert_eq!(old_dm.status, 200);
    assert_eq!(old_dm.body, dm.body, "same page as /chat?uid=alice&to=bob");
    let old_room = get("/home/room?uid=alice&groups_id=lobby").await.unwrap();
    assert_eq!(old_room.status, 200);
    assert_eq!(old_room.body, room.body);

    for bad in [
        "/chat?uid=alice",
        "/chat?uid=alice&to=bob&room=x",
        "/chat?to=bob",
        "/chat?uid=a%20b&to=bob",
        "/chat?uid=alice&to=alice",
    ] {
        let r = get(bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}");
        assert!(
            r.body.contains("start page"),
            "{bad}: explains and links back"
        );
    }
    for f in ["chat.js", "style.css"] {
        let r = get(&format!("/static/{f}")).await.unwrap();
        assert_eq!(r.status, 200, "{f}");
        assert!(r.body.len() > 100);
    }
    assert_eq!(get("/static/nope.js").await.unwrap().status, 404);
}

#[tokio::test]
async fn query_parameters_come_back_escaped() {
    let node = TestNode::start(settings());
    let evil = "%3Cscript%3Ealert(1)%3C%2Fscript%3E";
    for path in [
        format!("/chat?uid={evil}&to=bob"),
        format!("/chat?uid=alice&to={evil}"),
        format!("/chat?uid=alice&room={evil}"),
        format!("/home/index?uid=alice&to_uid={evil}"),
        format!("/?uid={evil}&to={evil}&room={evil}"),
    ] {
        let r = http("GET", &format!("{}{path}", node.base), &[], None)
            .await
            .unwrap();
        assert!(
            !r.body.contains("<script>alert(1)"),
            "{path} reflected raw: {}",
            r.body
        );
        assert!(
            r.body.contains("&lt;script&gt;alert(1)")
                || r.body.contains("&#60;script&#62;alert(1)"),
            "{path} shows the value escaped: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let node = TestNode::start(settings());
    let h = http("GET", &format!("{}/healthz", node.base), &[], None)
        .await
        .unwrap();
    assert_eq!(h.status, 200);
    let r = http("GET", &format!("{}/readyz", node.base), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
    let mut a = Client::connect(&node, "alice").await;
    let mut b = Client::connect(&node, "bob").await;
    a.direct("bob", "hi", "k1").await;
    b.recv_type("message").await;
    a.send_text("nope").await;
    a.recv_type("error").await;
    let m = http("GET", &format!("{}/metrics", node.base), &[], None)
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let v = |name: &str| common::metric_value(&m.body, name);
    assert_eq!(v("chatmesh_connections"), 2.0);
    assert_eq!(v("chatmesh_messages_stored_total"), 1.0);
    assert_eq!(v("chatmesh_deliveries_total"), 1.0);
    assert_eq!(v("chatmesh_peer_posts_total"), 0.0);
    assert_eq!(v("chatmesh_peer_messages_total"), 0.0);
    assert_eq!(v(r#"chatmesh_errors_total{code="bad_json"}"#), 1.0);
    assert_eq!(v(r#"chatmesh_errors_total{code="not_member"}"#), 0.0);
    // the internal listener serves no public routes
    let i = http("GET", &format!("{}/metrics", node.internal), &[], None)
        .await
        .unwrap();
    assert_eq!(i.status, 404);
    let i = http("GET", &format!("{}/internal/deliver", node.base), &[], None)
        .await
        .unwrap();
    assert_eq!(
        i.status, 404,
        "the peer API is never on the public listener"
    );
}

async fn ws_status(url: &str, origin: Option<&str>) -> (u16, String) {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn development_mode_auth_and_origin_checks() {
    let node = TestNode::start(settings());
    let (status, body) = ws_status(&node.ws, None).await;
    assert_eq!(status, 401);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "unauthorized");
    assert!(v["message"].as_str().unwrap().contains("uid"));
    assert_eq!(
        ws_status(&format!("{}?uid=bad%20id", node.ws), None)
            .await
            .0,
        401
    );
    let host = node.base.trim_start_matches("http://");
    assert_eq!(
        ws_status(&node.ws_url("alice"), Some(&format!("http://{host}")))
            .await
            .0,
        101,
        "same host"
    );
    let (status, _) = ws_status(&node.ws_url("alice"), Some("http://evil.example")).await;
    assert_eq!(status, 403);
    assert_eq!(
        ws_status(&node.ws_url("alice"), None).await.0,
        101,
        "no Origin: not a browser"
    );

    let mut s = settings();
    s.allowed_origins = vec!["https://chat.example.com".into()];
    let node = TestNode::start(s);
    assert_eq!(
        ws_status(&node.ws_url("alice"), Some("https://chat.example.com"))
            .await
            .0,
        101
    );
    assert_eq!(
        ws_status(&node.ws_url("alice"), Some("https://other.example.com"))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn jwt_mode() {
    let mut s = settings();
    s.jwt_secret = Some("top-secret".into());
    let node = TestNode::start(s);
    let token = chatmesh::auth::make_token("top-secret", "alice", now() + 600).unwrap();
    let mut a = Client::connect_url(&format!("{}?token={token}", node.ws), "alice").await;
    assert_eq!(a.welcome["uid"], "alice");
    a.direct("bob", "authenticated", "k").await;

    let expired = chatmesh::auth::make_token("top-secret", "alice", now() - 600).unwrap();
    let forged = chatmesh::auth::make_token("guessed", "alice", now() + 600).unwrap();
    let cases = [
        (format!("{}?token={expired}", node.ws), "expired"),
        (format!("{}?token={forged}", node.ws), "invalid token"),
        (format!("{}?token=not.a.jwt", node.ws), "invalid token"),
        (format!("{}?uid=alice", node.ws), "uid"),
        (format!("{}?uid=alice&token={token}", node.ws), "uid"),
        (node.ws.clone(), "token"),
    ];
    for (url, words) in cases {
        let (status, body) = ws_status(&url, None).await;
        assert_eq!(status, 401, "{url}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "unauthorized");
        assert!(v["message"].as_str().unwrap().contains(words), "{url}: {v}");
    }
}

#[tokio::test]
async fn server_api() {
    let node = TestNode::start(settings());
    let r = http(
        "GET",
        &format!("{}/api/online?uids=a", node.base),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "disabled without --api-key");
    drop(node);

    let mut s = settings();
    s.api_key = Some("k3y".into());
    let node = TestNode::start(s);
    let auth = [("Authorization", "Bearer k3y")];
    let url = |p: &str| format!("{}{p}", node.base);
    for bad in [
        &[][..],
        &[("Authorization", "Bearer nope")][..],
        &[("Authorization", "k3y")][..],
    ] {
        let r = http("GET", &url("/api/online?uids=a"), bad, None)
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "unauthorized");
    }
    let mut bob = Client::connect(&node, "bob").await;
    bob.join("lobby").await;
    let r = http(
        "POST",
        &url("/api/messages"),
        &auth,
        Some(r#"{"from":"system","to":"bob","body":"welcome!"}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = r.json();
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["conv"], "dm:bob:system");
    assert_eq!(sent["seq"], 1);
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str(), m["id"].clone()),
        (Some("system"), Some("welcome!"), sent["id"].clone())
    );

    let r = http(
        "POST",
        &url("/api/messages"),
        &auth,
        Some(r#"{"from":"system","room":"lobby","body":"maintenance at 5"}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["conv"], "room:lobby");
    assert_eq!(bob.recv_type("message").await["room"], "lobby");

    let r = http(
        "POST",
        &url("/api/messages"),
        &auth,
        Some(r#"{"from":"system","to":"bob","room":"lobby","body":"x"}"#),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid"))
    );
    let r = http("POST", &url("/api/messages"), &auth, Some("{not json"))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_json"))
    );
    let big = json!({"from":"system","to":"bob","body":"x".repeat(5000)}).to_string();
    let r = http("POST", &url("/api/messages"), &auth, Some(&big))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("too_large"))
    );

    let r = http("GET", &url("/api/online?uids=bob,alice"), &auth, None)
        .await
        .unwrap();
    assert_eq!(r.json(), json!({"bob":true,"alice":false}));
    let r = http(
        "GET",
        &url("/api/history?conv=room:lobby&limit=50"),
        &auth,
        None,
    )
    .await
    .unwrap();
    let h = r.json();
    assert_eq!(h["type"], "history");
    assert_eq!(h["conv"], "room:lobby");
    assert_eq!(h["messages"][0]["body"], "maintenance at 5");
    assert_eq!(h["more"], false);
    let r = http("GET", &url("/api/history?conv=nope"), &auth, None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
}

/// A refused upgrade is logged at info level with the reason the client was given.
#[test]
fn refused_upgrades_are_logged_with_their_reason() {
    let mut node = common::LoggedProcess::spawn(
        common::chatmesh_on_port_0()
            .args(["--database-url", "memory:", "--jwt-secret", "s3cret"])
            .env("RUST_LOG", "info"),
    );
    let addr = node.public_address();
    let r = common::http_blocking(
        "GET",
        &format!("http://{addr}/ws?token=not.a.jwt"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let reason = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = node.wait_for("refused a websocket upgrade");
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains(&reason), "{line} does not say {reason:?}");
    let r = common::http_blocking(
        "GET",
        &format!("http://{addr}/ws?uid=alice"),
        &[("Origin", "http://evil.example")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 403);
    let line = node.wait_for("refused websocket from origin");
    assert!(
        line.contains("INFO") && line.contains("evil.example"),
        "{line}"
    );
    let _ = node.child.kill();
    let _ = node.child.wait();
}

#[test]
fn binary_logs_listening_on_and_exits_0_on_sigterm() {
    let mut node = common::LoggedProcess::spawn(
        common::chatmesh_on_port_0()
            .args(["--database-url", "memory:"])
            .env("RUST_LOG", "info"),
    );
    // the address it logs is the one it bound (port 0 asked for any), and it answers
    let addr = node.public_address();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let r = common::http_blocking("GET", &format!("http://{addr}/healthz"), &[], None).unwrap();
    assert_eq!(r.status, 200);
    std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(node.child.wait().unwrap().code(), Some(0));
}
