//! Rooms with owners (contract section 7 and the room routes of section 5): private
//! rooms, add, remove and ban, room_info, the creation policy, the rooms-per-user
//! bound; on one node and across two cluster nodes.

mod common;

use chatmesh::config::Settings;
use common::{http, post_to_peer_api, settings, Client, ClusterEnv, TestNode};
use serde_json::{json, Value};

/// Runs a scenario of two nodes' users on one node (both roles on the same node), with
/// the settings `tune` makes.
async fn on_one_node(
    tune: fn(Settings) -> Settings,
    scenario: impl AsyncFnOnce(&TestNode, &TestNode),
) {
    let node = TestNode::start(tune(settings()));
    scenario(&node, &node).await;
}

/// Runs the same scenario across two nodes of a cluster.
async fn across_two_nodes(
    tune: fn(Settings) -> Settings,
    scenario: impl AsyncFnOnce(&TestNode, &TestNode),
) {
    let env = ClusterEnv::start();
    let a = TestNode::start(tune(env.settings("node-a")));
    let b = TestNode::start(tune(env.settings("node-b")));
    scenario(&a, &b).await;
}

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
    let later = bob.drain_messages().await;
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
    on_one_node(|s| s, section_7_rules).await;
}

#[tokio::test]
async fn section_7_across_two_cluster_nodes() {
    across_two_nodes(|s| s, section_7_rules).await;
}

/// `--room-creation api` and `--rooms-per-user 2`.
fn api_only(mut s: Settings) -> Settings {
    s.store.room_creation = chatmesh::store::RoomCreation::Api;
    s.store.rooms_per_user = 2;
    with_api_key(s)
}

#[tokio::test]
async fn creation_by_api_only_and_the_rooms_per_user_bound() {
    on_one_node(api_only, api_creation_rules).await;
}

#[tokio::test]
async fn creation_by_api_only_and_the_rooms_per_user_bound_across_two_nodes() {
    across_two_nodes(api_only, api_creation_rules).await;
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
/// member, and gets no live message of the room afterwards. When the join wins, the
/// user's connection hears `left` after its `joined`. The rounds alternate which frame
/// goes first, until both orders have happened a few times.
#[tokio::test]
async fn a_ban_racing_a_join_on_another_node_never_lets_the_user_in() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut owner = Client::connect(&a, "owner").await;
    let mut eve = Client::connect(&b, "eve").await;
    let (mut join_won, mut ban_won) = (0, 0);
    let mut round = 0;
    while (join_won < 3 || ban_won < 3) && round < 300 {
        let room = format!("race{round}");
        ask(&mut owner, json!({"type":"join","room":room}), &["joined"]).await;
        let remove = json!({"type":"remove","room":room,"uid":"eve","ban":true});
        let join = json!({"type":"join","room":room});
        if round % 2 == 0 {
            owner.send(remove).await;
            eve.send(join).await;
        } else {
            eve.send(join).await;
            owner.send(remove).await;
        }
        assert_eq!(
            owner.recv_type_of(&["removed", "error"]).await["type"],
            "removed"
        );
        let j = eve.recv_type_of(&["joined", "error"]).await;
        if j["type"] == "joined" {
            join_won += 1;
            let l = eve.recv_type_of(&["left", "message"]).await;
            assert_eq!(l["type"], "left", "round {round}: {l}");
            assert_eq!(l["room"], room.as_str(), "round {round}: {l}");
        } else {
            assert_eq!(code(&j), "forbidden", "round {round}: {j}");
            ban_won += 1;
        }
        let info = ask(
            &mut owner,
            json!({"type":"room_info","room":room}),
            &["room_info"],
        )
        .await;
        assert_eq!(info["members"], json!(["owner"]), "round {round}: {info}");
        owner
            .room(&room, "members only", &format!("m{round}"))
            .await;
        round += 1;
    }
    assert!(
        join_won >= 3 && ban_won >= 3,
        "both orders should happen: the join won {join_won} and the ban {ban_won} of {round} rounds"
    );
    let leaked = eve.drain_messages().await;
    assert!(leaked.is_empty(), "eve got {leaked:?}");
}

/// A removal is in force on every node before `removed` is answered: the removed user
/// has connections on both nodes, and so do other members, so every message stored
/// after the removal reaches both nodes (the other members get it) and is withheld from
/// the removed user there. Repeated, with the user added back each time.
#[tokio::test]
async fn a_removal_stops_live_delivery_on_every_node_before_it_is_answered() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut alice = Client::connect(&a, "alice").await;
    let mut erin = Client::connect(&a, "erin").await;
    let mut dave = Client::connect(&b, "dave").await;
    let mut carol_a = Client::connect(&a, "carol").await;
    let mut carol_b = Client::connect(&b, "carol").await;
    ask(
        &mut alice,
        json!({"type":"create","room":"crew"}),
        &["joined"],
    )
    .await;
    for uid in ["erin", "dave"] {
        ask(
            &mut alice,
            json!({"type":"add","room":"crew","uid":uid}),
            &["added"],
        )
        .await;
    }
    erin.recv_type("joined").await;
    dave.recv_type("joined").await;
    for round in 0..10 {
        ask(
            &mut alice,
            json!({"type":"add","room":"crew","uid":"carol"}),
            &["added"],
        )
        .await;
        for c in [&mut carol_a, &mut carol_b] {
            assert_eq!(c.recv_type("joined").await["by"], "alice");
        }
        let before = format!("before {round}");
        alice.room("crew", &before, &format!("b{round}")).await;
        for c in [&mut carol_a, &mut carol_b, &mut erin, &mut dave] {
            assert_eq!(c.recv_type("message").await["body"], before.as_str());
        }
        let r = ask(
            &mut alice,
            json!({"type":"remove","room":"crew","uid":"carol"}),
            &["removed", "error"],
        )
        .await;
        assert_eq!(r["type"], "removed", "round {round}: {r}");
        // at once after the answer, from both nodes
        let after_a = format!("after {round} from a");
        let after_b = format!("after {round} from b");
        alice.room("crew", &after_a, &format!("a{round}")).await;
        assert_eq!(dave.recv_type("message").await["body"], after_a.as_str());
        dave.room("crew", &after_b, &format!("d{round}")).await;
        for body in [&after_a, &after_b] {
            assert_eq!(erin.recv_type("message").await["body"], body.as_str());
        }
        for c in [&mut carol_a, &mut carol_b] {
            let l = c.recv_type_of(&["left", "message"]).await;
            assert_eq!(l, json!({"type":"left","room":"crew","by":"alice"}));
            let leaked = c.drain_messages().await;
            assert!(leaked.is_empty(), "round {round}: carol got {leaked:?}");
        }
    }
}

/// Membership events of one user can reach a node out of order (a join forwarded by one
/// node, a removal by another). A node applies each as the store has it, so a late,
/// stale event changes nothing: here the stale events are posted to the peer API by
/// hand, as a slow peer would, after the change that overtook them.
#[tokio::test]
async fn a_membership_event_that_arrives_late_cannot_undo_a_newer_change() {
    let env = ClusterEnv::start();
    let a = env.node("node-a");
    let b = env.node("node-b");
    let mut alice = Client::connect(&a, "alice").await;
    let mut eve = Client::connect(&b, "eve").await;
    ask(
        &mut alice,
        json!({"type":"create","room":"late"}),
        &["joined"],
    )
    .await;
    let peer = |joined: bool| {
        let batch = json!({"from":"node-c","membership":[
            {"uid":"eve","room":"late","joined":joined,"by":"alice"}]})
        .to_string();
        let internal = b.internal.clone();
        async move {
            let r = post_to_peer_api(&internal, &batch).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    let live = |frames: &[Value]| -> Vec<String> {
        frames
            .iter()
            .filter(|f| f["type"] != "presence")
            .map(|f| f.to_string())
            .collect()
    };

    // added, then removed: the add's event arriving late does not let eve back in
    ask(
        &mut alice,
        json!({"type":"add","room":"late","uid":"eve"}),
        &["added"],
    )
    .await;
    eve.recv_type("joined").await;
    ask(
        &mut alice,
        json!({"type":"remove","room":"late","uid":"eve","ban":true}),
        &["removed"],
    )
    .await;
    eve.recv_type("left").await;
    peer(true).await;
    alice.room("late", "not for eve", "l1").await;
    let got = eve.drain().await;
    assert!(live(&got).is_empty(), "a stale join reached eve: {got:?}");

    // added again: the removal's event arriving late does not cut her off
    ask(
        &mut alice,
        json!({"type":"add","room":"late","uid":"eve"}),
        &["added"],
    )
    .await;
    eve.recv_type("joined").await;
    peer(false).await;
    alice.room("late", "for eve", "l2").await;
    assert_eq!(
        eve.recv_type_of(&["message", "left"]).await["body"],
        "for eve",
        "a stale removal cut eve off"
    );
}

/// `room_info` lists at most 1,000 members and counts them all, for a member's
/// websocket and for the server API.
#[tokio::test]
async fn room_info_lists_at_most_1000_members_and_counts_all() {
    let node = TestNode::start(with_api_key(settings()));
    let members: Vec<String> = (0..1001).map(|i| format!("m{i:04}")).collect();
    let r = http(
        "POST",
        &format!("{}/api/rooms", node.base),
        &[("Authorization", "Bearer k")],
        Some(&json!({"room":"big","owners":["alice"],"members":members}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_eq!(created["count"], 1002, "{created}");
    assert_eq!(created["members"].as_array().map(Vec::len), Some(1000));
    let mut alice = Client::connect(&node, "alice").await;
    let info = ask(
        &mut alice,
        json!({"type":"room_info","room":"big"}),
        &["room_info"],
    )
    .await;
    assert_eq!(info["count"], 1002);
    let listed = info["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1000);
    let mut unique: Vec<&str> = listed.iter().filter_map(Value::as_str).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 1000, "no member is listed twice");
    assert_eq!(info["owners"], json!(["alice"]));
    let r = http(
        "GET",
        &format!("{}/api/rooms/big", node.base),
        &[("Authorization", "Bearer k")],
        None,
    )
    .await
    .unwrap();
    let api = r.json();
    assert_eq!(
        (
            api["count"].clone(),
            api["members"].as_array().map(Vec::len)
        ),
        (json!(1002), Some(1000))
    );
}

fn with_api_key(mut s: Settings) -> Settings {
    s.api_key = Some("k".into());
    s
}

#[tokio::test]
async fn the_room_routes_of_the_server_api() {
    on_one_node(with_api_key, room_routes).await;
}

#[tokio::test]
async fn the_room_routes_of_the_server_api_across_two_nodes() {
    across_two_nodes(with_api_key, room_routes).await;
}

/// The section 5 room routes, called on `api`; carol's websocket is on `node`.
async fn room_routes(node: &TestNode, api: &TestNode) {
    let base = api.base.clone();
    let auth = [("Authorization", "Bearer k")];
    let call = |method: &'static str, path: String, body: Option<Value>| {
        let url = format!("{base}{path}");
        async move {
            let body = body.map(|b| b.to_string());
            http(method, &url, &auth, body.as_deref()).await.unwrap()
        }
    };
    let mut carol = Client::connect(node, "carol").await;
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
        "POST",
        "/api/messages".into(),
        Some(json!({"from":"system","room":"team","body":"after the ban"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let leaked = carol.drain_messages().await;
    assert!(leaked.is_empty(), "a banned member got {leaked:?}");
    let r = call("GET", "/api/users/carol/rooms".into(), None).await;
    assert_eq!(r.json(), json!({"rooms":[]}));
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
