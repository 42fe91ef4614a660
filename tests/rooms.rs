//! Rooms with owners (contract section 7 and the room routes of section 5): private
//! rooms, add, remove and ban, room_info, the creation policy, the rooms-per-user
//! bound; on one node and across two cluster nodes.

mod common;

use common::{http, settings, Client, ClusterEnv, TestNode};
use serde_json::{json, Value};

/// Sends `frame` and answers the next answer of one of `types`.
async fn ask(c: &mut Client, frame: Value, types: &[&str]) -> Value {
    c.send(frame).await;
    c.recv_type_of(types).await
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

/// The section 7 rules, whoever's node each user is on.
async fn section_7_rules(alice_node: &TestNode, bob_node: &TestNode) {
    let mut alice = Client::connect(alice_node, "alice").await;
    let mut bob = Client::connect(bob_node, "bob").await;
    let mut carol = Client::connect(alice_node, "carol").await;

    // create: the creator owns it; a private room is joined only by being added
    let j = ask(
        &mut alice,
        json!({"type":"create","room":"team","private":true}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(
        j,
        json!({"type":"joined","room":"team","role":"owner","private":true})
    );
    let e = ask(
        &mut bob,
        json!({"type":"join","room":"team"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    let e = ask(
        &mut carol,
        json!({"type":"create","room":"team"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "conflict", "{e}");

    // an owner adds: the added user's connection hears it, with who did it
    let a = ask(
        &mut alice,
        json!({"type":"add","room":"team","uid":"bob"}),
        &["added", "error"],
    )
    .await;
    assert_eq!(
        a,
        json!({"type":"added","room":"team","uid":"bob","role":"member"})
    );
    assert_eq!(
        bob.recv_type("joined").await,
        json!({"type":"joined","room":"team","by":"alice"})
    );
    // and gets the room's messages live from then on
    alice.room("team", "hello bob", "a1").await;
    assert_eq!(bob.recv_type("message").await["body"], "hello bob");

    // only owners add and remove
    let e = ask(
        &mut bob,
        json!({"type":"add","room":"team","uid":"carol"}),
        &["added", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    let e = ask(
        &mut bob,
        json!({"type":"remove","room":"team","uid":"alice"}),
        &["removed", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");

    // room_info is for members
    let info = ask(
        &mut bob,
        json!({"type":"room_info","room":"team"}),
        &["room_info", "error"],
    )
    .await;
    assert_eq!(
        info,
        json!({"type":"room_info","room":"team","private":true,"owners":["alice"],"members":["alice","bob"],"count":2})
    );
    let e = ask(
        &mut carol,
        json!({"type":"room_info","room":"team"}),
        &["room_info", "error"],
    )
    .await;
    assert_eq!(code(&e), "not_member", "{e}");

    // remove with ban: in force everywhere before `removed` is answered
    let r = ask(
        &mut alice,
        json!({"type":"remove","room":"team","uid":"bob","ban":true}),
        &["removed", "error"],
    )
    .await;
    assert_eq!(
        r,
        json!({"type":"removed","room":"team","uid":"bob","ban":true})
    );
    alice.room("team", "after the ban", "a2").await;
    assert_eq!(
        bob.recv_type_of(&["left", "message"]).await,
        json!({"type":"left","room":"team","by":"alice"})
    );
    let later: Vec<Value> = bob
        .drain()
        .await
        .into_iter()
        .filter(|f| f["type"] == "message")
        .collect();
    assert!(later.is_empty(), "a removed member got {later:?}");
    for frame in [
        json!({"type":"room","room":"team","body":"x","client_id":"b1"}),
        json!({"type":"history","conv":"room:team"}),
        json!({"type":"room_info","room":"team"}),
    ] {
        let e = ask(
            &mut bob,
            frame.clone(),
            &["sent", "history", "room_info", "error"],
        )
        .await;
        assert_eq!(code(&e), "not_member", "{frame}: {e}");
    }
    let e = ask(
        &mut bob,
        json!({"type":"join","room":"team"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "banned: {e}");

    // a ban keeps a user out of a public room too, until an owner adds them again
    ask(
        &mut carol,
        json!({"type":"join","room":"plaza"}),
        &["joined"],
    )
    .await;
    ask(&mut bob, json!({"type":"join","room":"plaza"}), &["joined"]).await;
    ask(
        &mut carol,
        json!({"type":"remove","room":"plaza","uid":"bob","ban":true}),
        &["removed"],
    )
    .await;
    let e = ask(
        &mut bob,
        json!({"type":"join","room":"plaza"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    ask(
        &mut carol,
        json!({"type":"add","room":"plaza","uid":"bob"}),
        &["added"],
    )
    .await;
    assert_eq!(bob.recv_type("joined").await["by"], "carol");
    let l = ask(&mut bob, json!({"type":"leave","room":"plaza"}), &["left"]).await;
    assert_eq!(
        l,
        json!({"type":"left","room":"plaza"}),
        "any member may leave"
    );
    let j = ask(
        &mut bob,
        json!({"type":"join","room":"plaza"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(
        j,
        json!({"type":"joined","room":"plaza"}),
        "the ban was lifted"
    );
}

#[tokio::test]
async fn section_7_on_one_node() {
    let node = TestNode::start(settings());
    section_7_rules(&node, &node).await;
}

#[tokio::test]
async fn section_7_across_two_cluster_nodes() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    section_7_rules(&a, &b).await;
}

/// `--room-creation api` and `--rooms-per-user 2`.
fn api_only(mut s: chatmesh::config::Settings) -> chatmesh::config::Settings {
    s.store.room_creation = chatmesh::store::RoomCreation::Api;
    s.store.rooms_per_user = 2;
    s.api_key = Some("k".into());
    s
}

#[tokio::test]
async fn creation_by_api_only_and_the_rooms_per_user_bound() {
    let node = TestNode::start(api_only(settings()));
    api_creation_rules(&node, &node).await;
}

#[tokio::test]
async fn creation_by_api_only_and_the_rooms_per_user_bound_across_two_nodes() {
    let env = ClusterEnv::start();
    let a = TestNode::start(api_only(env.settings("node-a")));
    let b = TestNode::start(api_only(env.settings("node-b")));
    api_creation_rules(&a, &b).await;
}

/// Alice's websocket is on `a`, the server API calls go to `b`.
async fn api_creation_rules(a: &TestNode, b: &TestNode) {
    let mut alice = Client::connect(a, "alice").await;
    let e = ask(
        &mut alice,
        json!({"type":"join","room":"new"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "not_found", "{e}");
    let e = ask(
        &mut alice,
        json!({"type":"create","room":"new"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    let auth = [("Authorization", "Bearer k")];
    for room in ["r1", "r2", "r3"] {
        let r = http(
            "POST",
            &format!("{}/api/rooms", b.base),
            &auth,
            Some(&json!({"room":room}).to_string()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for room in ["r1", "r2"] {
        ask(&mut alice, json!({"type":"join","room":room}), &["joined"]).await;
    }
    let e = ask(
        &mut alice,
        json!({"type":"join","room":"r3"}),
        &["joined", "error"],
    )
    .await;
    assert_eq!(code(&e), "limit", "{e}");
    let r = http(
        "PUT",
        &format!("{}/api/rooms/r3/members/alice", b.base),
        &auth,
        Some("{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "limit");
}

/// One node removes a user with a ban while another handles the same user's join:
/// the checks and the change are one step in the database, so the user never ends up a
/// member, and gets no live message of the room afterwards.
#[tokio::test]
async fn a_ban_racing_a_join_on_another_node_never_lets_the_user_in() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut owner = Client::connect(&a, "owner").await;
    let mut eve = Client::connect(&b, "eve").await;
    for i in 0..25 {
        let room = format!("race{i}");
        ask(&mut owner, json!({"type":"join","room":room}), &["joined"]).await;
        owner
            .send(json!({"type":"remove","room":room,"uid":"eve","ban":true}))
            .await;
        eve.send(json!({"type":"join","room":room})).await;
        assert_eq!(
            owner.recv_type_of(&["removed", "error"]).await["type"],
            "removed"
        );
        let j = eve.recv_type_of(&["joined", "error"]).await;
        assert!(
            j["type"] == "joined" || code(&j) == "forbidden",
            "round {i}: {j}"
        );
        let info = ask(
            &mut owner,
            json!({"type":"room_info","room":room}),
            &["room_info"],
        )
        .await;
        assert_eq!(info["members"], json!(["owner"]), "round {i}: {info}");
        owner.room(&room, "members only", &format!("m{i}")).await;
    }
    let leaked: Vec<Value> = eve
        .drain()
        .await
        .into_iter()
        .filter(|f| f["type"] == "message")
        .collect();
    assert!(leaked.is_empty(), "eve got {leaked:?}");
}

#[tokio::test]
async fn the_room_routes_of_the_server_api() {
    let mut s = settings();
    s.api_key = Some("k".into());
    let node = TestNode::start(s);
    let base = node.base.clone();
    let auth = [("Authorization", "Bearer k")];
    let call = |method: &'static str, path: String, body: Option<Value>| {
        let url = format!("{base}{path}");
        async move {
            let body = body.map(|b| b.to_string());
            http(method, &url, &auth, body.as_deref()).await.unwrap()
        }
    };
    let mut carol = Client::connect(&node, "carol").await;
    let r = call(
        "POST",
        "/api/rooms".into(),
        Some(json!({"room":"team","private":true,"owners":["alice"],"members":["bob"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"type":"room_info","room":"team","private":true,"owners":["alice"],"members":["alice","bob"],"count":2})
    );
    let r = call("POST", "/api/rooms".into(), Some(json!({"room":"team"}))).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (409, json!("conflict"))
    );
    let r = call("GET", "/api/rooms/team".into(), None).await;
    assert_eq!((r.status, r.json()["count"].clone()), (200, json!(2)));
    let r = call("GET", "/api/rooms/nowhere".into(), None).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("not_found"))
    );
    // add carol as an owner: her open connection hears it
    let r = call(
        "PUT",
        "/api/rooms/team/members/carol".into(),
        Some(json!({"role":"owner"})),
    )
    .await;
    assert_eq!(
        (r.status, r.json()),
        (
            200,
            json!({"type":"added","room":"team","uid":"carol","role":"owner"})
        )
    );
    assert_eq!(carol.recv_type("joined").await["room"], "team");
    let r = call("GET", "/api/users/carol/rooms".into(), None).await;
    assert_eq!(r.json(), json!({"rooms":["team"]}));
    // a moderation delete by the server
    let sent = carol.room("team", "oops", "c1").await;
    let r = call(
        "DELETE",
        format!("/api/messages/room:team/{}", sent["seq"]),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call("GET", "/api/history?conv=room:team".into(), None).await;
    let h = r.json();
    assert_eq!(h["messages"][0]["deleted"], true, "{h}");
    assert!(h["messages"][0].get("body").is_none(), "{h}");
    let r = call("DELETE", "/api/messages/room:team/99".into(), None).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("not_found"))
    );
    // remove with a ban: her connection hears it
    let r = call(
        "DELETE",
        "/api/rooms/team/members/carol?ban=true".into(),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.json()),
        (
            200,
            json!({"type":"removed","room":"team","uid":"carol","ban":true})
        )
    );
    assert_eq!(carol.recv_type("left").await["room"], "team");
    let r = call(
        "PUT",
        "/api/rooms/nowhere/members/carol".into(),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = call(
        "PUT",
        "/api/rooms/team/members/carol".into(),
        Some(json!({"role":"king"})),
    )
    .await;
    assert_eq!(r.status, 400);
}

/// Many users on three nodes join the same new room at the same moment: the first
/// creates it, everyone else joins it, and nobody gets an error.
#[tokio::test]
async fn simultaneous_first_joins_of_a_new_room_all_succeed() {
    let env = ClusterEnv::start();
    let nodes = [env.node("n1"), env.node("n2"), env.node("n3")];
    for round in 0..5 {
        let room = format!("fresh{round}");
        let mut clients = Vec::new();
        for i in 0..12 {
            clients.push(Client::connect(&nodes[i % 3], &format!("u{i}")).await);
        }
        for c in &mut clients {
            c.send(json!({"type":"join","room":room})).await;
        }
        let mut owners = 0;
        for c in &mut clients {
            let j = c.recv_type_of(&["joined", "error"]).await;
            assert_eq!(j["type"], "joined", "round {round}: {j}");
            owners += usize::from(j["role"] == "owner");
        }
        assert_eq!(owners, 1, "round {round}: one creator");
        let e = ask(
            &mut clients[0],
            json!({"type":"create","room":room}),
            &["joined", "error"],
        )
        .await;
        assert_eq!(code(&e), "conflict", "{e}");
    }
}
