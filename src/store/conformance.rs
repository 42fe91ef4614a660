//! The behaviour every [`Store`] must have, written once against the interface.
//!
//! `tests/store.rs` runs this suite against the memory store, SQLite (a file in a temp
//! dir) and PostgreSQL (a private server, a fresh database per check). Each check gets
//! a fresh, empty store from the factory.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{
    By, Change, InboxCursor, MarkKind, NewMessage, NewRoom, Range, ReadRequest, Refusal, Role,
    RoomCreation, Store, StoreError, StoreLimits,
};
use crate::protocol::{now_ms, Message};

/// Runs every check; panics (like an assertion) on the first failure.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(StoreLimits) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let limits = StoreLimits::default();
    seq_is_per_conversation_and_gap_free(make(limits).await).await;
    concurrent_appends_get_distinct_contiguous_seqs(make(limits).await).await;
    idempotent_append(make(limits).await).await;
    idempotency_expires_and_is_purged(
        make(StoreLimits {
            idempotency_ttl: Duration::from_millis(300),
            ..limits
        })
        .await,
    )
    .await;
    rooms_join_leave_and_owners(make(limits).await).await;
    private_rooms_and_bans(make(limits).await).await;
    room_creation_by_api_only(
        make(StoreLimits {
            room_creation: RoomCreation::Api,
            ..limits
        })
        .await,
    )
    .await;
    rooms_per_user_bound(
        make(StoreLimits {
            rooms_per_user: 2,
            ..limits
        })
        .await,
    )
    .await;
    room_messages_need_membership(make(limits).await).await;
    conversations_of_a_user(make(limits).await).await;
    reads_page_both_ways(make(limits).await).await;
    nothing_is_trimmed(make(limits).await).await;
    edits_and_deletes(make(limits).await).await;
    marks_move_forward_only(make(limits).await).await;
    new_members_start_with_history_read(make(limits).await).await;
    inbox_newest_first_with_unread_counts(make(limits).await).await;
    retention_purges_old_messages(
        make(StoreLimits {
            retention: Some(Duration::from_secs(3600)),
            ..limits
        })
        .await,
    )
    .await;
    let store = make(limits).await;
    store.ping().await.expect("ping");
    assert!(!store.epoch().is_empty(), "a store has an epoch");
    assert_eq!(store.epoch(), store.epoch());
}

fn new_message(
    conv: String,
    from: &str,
    body: Option<&str>,
    cid: Option<&str>,
    by: By,
) -> NewMessage {
    NewMessage {
        conv,
        from: from.into(),
        body: body.map(Into::into),
        change: None,
        client_id: cid.map(Into::into),
        id: uuid::Uuid::new_v4().to_string(),
        ts: now_ms(),
        by,
    }
}

/// A DM from `from` to `to` with an optional client id.
pub fn dm(from: &str, to: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    new_message(
        crate::protocol::dm_conv(from, to),
        from,
        Some(body),
        client_id,
        By::User(from.into()),
    )
}

/// A room message from user `from`, checked for membership.
pub fn room(from: &str, room: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    new_message(
        crate::protocol::room_conv(room),
        from,
        Some(body),
        client_id,
        By::User(from.into()),
    )
}

/// An edit of `seq` in `conv` by user `from`.
pub fn edit(from: &str, conv: &str, seq: u64, body: &str) -> NewMessage {
    NewMessage {
        change: Some(Change::Edit(seq)),
        ..new_message(conv.into(), from, Some(body), None, By::User(from.into()))
    }
}

/// A delete of `seq` in `conv` by `by` (a user, or the server as moderator).
pub fn delete(by: By, conv: &str, seq: u64) -> NewMessage {
    let from = by.user().unwrap_or("system").to_owned();
    NewMessage {
        change: Some(Change::Delete(seq)),
        ..new_message(conv.into(), &from, None, None, by)
    }
}

fn user(u: &str) -> By {
    By::User(u.into())
}

fn refused(r: Result<impl std::fmt::Debug, StoreError>) -> Refusal {
    match r {
        Err(StoreError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn read_one(store: &dyn Store, conv: &str, range: Range) -> (Vec<Message>, bool) {
    let page = store
        .read(vec![ReadRequest {
            conv: conv.into(),
            range,
        }])
        .await
        .expect("read")
        .remove(0);
    assert_eq!(page.conv, conv);
    (page.messages, page.more)
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

async fn seq_is_per_conversation_and_gap_free(store: Arc<dyn Store>) {
    for i in 1..=5u64 {
        let a = store.append(dm("alice", "bob", "x", None)).await.unwrap();
        assert_eq!(a.message.seq, i);
        assert!(!a.duplicate);
        assert_eq!(a.message.conv, "dm:alice:bob");
    }
    // the other direction is the same conversation
    let a = store.append(dm("bob", "alice", "y", None)).await.unwrap();
    assert_eq!(a.message.seq, 6);
    assert_eq!(a.message.to.as_deref(), Some("alice"));
    let a = store.append(dm("alice", "carol", "z", None)).await.unwrap();
    assert_eq!(a.message.seq, 1, "each conversation has its own seq");
    assert_eq!(a.message.body.as_deref(), Some("z"));
    assert_eq!(a.message.to.as_deref(), Some("carol"));
    let (all, more) = read_one(
        &*store,
        "dm:alice:bob",
        Range::After {
            after: 0,
            limit: 100,
        },
    )
    .await;
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5, 6]);
    assert!(!more);
    assert_eq!(all[5].from, "bob");
}

async fn concurrent_appends_get_distinct_contiguous_seqs(store: Arc<dyn Store>) {
    store.join("s0", "busy").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..40 {
                let id = format!("t{t}-{i}");
                let a = store
                    .append(room("s0", "busy", &id, Some(&id)))
                    .await
                    .unwrap();
                seqs.push(a.message.seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one writer's seqs increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=320).collect::<Vec<u64>>());
    let (page, more) = read_one(
        &*store,
        "room:busy",
        Range::After {
            after: 0,
            limit: 1000,
        },
    )
    .await;
    assert_eq!(seqs(&page), (1..=320).collect::<Vec<u64>>());
    assert!(!more);
}

async fn idempotent_append(store: Arc<dyn Store>) {
    let first = store
        .append(dm("alice", "bob", "hello", Some("k1")))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = store
        .append(dm("alice", "bob", "hello (resent)", Some("k1")))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        again.message, first.message,
        "the first message is answered"
    );
    // another user's k1 is another message
    let other = store
        .append(dm("bob", "alice", "hi", Some("k1")))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 2);
    // the same client id sent many times at once is stored once
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(dm("alice", "bob", "burst", Some("k2")))
                .await
                .unwrap()
        }));
    }
    let mut stored = HashSet::new();
    let mut fresh = 0;
    for t in tasks {
        let a = t.await.unwrap();
        stored.insert(a.message.seq);
        fresh += usize::from(!a.duplicate);
    }
    assert_eq!(stored.len(), 1, "one seq for one client id");
    assert_eq!(fresh, 1, "exactly one of them was stored");
    let (all, _) = read_one(
        &*store,
        "dm:alice:bob",
        Range::After {
            after: 0,
            limit: 100,
        },
    )
    .await;
    assert_eq!(seqs(&all), vec![1, 2, 3]);
}

async fn idempotency_expires_and_is_purged(store: Arc<dyn Store>) {
    let a = store
        .append(dm("alice", "bob", "x", Some("k")))
        .await
        .unwrap();
    assert!(
        store
            .append(dm("alice", "bob", "x", Some("k")))
            .await
            .unwrap()
            .duplicate
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = store
        .append(dm("alice", "bob", "x", Some("k")))
        .await
        .unwrap();
    assert!(!b.duplicate, "an expired client id is new again");
    assert_eq!(b.message.seq, a.message.seq + 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let purged = store.purge(now_ms()).await.unwrap();
    assert!(purged.idempotency >= 1, "{purged:?}");
    assert_eq!(purged.messages, 0, "no retention: no message is purged");
}

async fn rooms_join_leave_and_owners(store: Arc<dyn Store>) {
    let j = store.join("alice", "lobby").await.unwrap();
    assert!(j.changed && j.created);
    assert_eq!(
        j.role,
        Role::Owner,
        "the first joiner of a new room owns it"
    );
    let j = store.join("bob", "lobby").await.unwrap();
    assert!(j.changed && !j.created);
    assert_eq!(j.role, Role::Member);
    assert_eq!(j.members, 2);
    let again = store.join("bob", "lobby").await.unwrap();
    assert!(!again.changed, "joining twice changes nothing");
    assert_eq!(
        store.role("bob", "lobby").await.unwrap(),
        Some(Role::Member)
    );
    let info = store.room_info(&user("bob"), "lobby", 1000).await.unwrap();
    assert_eq!(info.owners, vec!["alice"]);
    assert_eq!(info.members, vec!["alice", "bob"]);
    assert_eq!(info.count, 2);
    assert!(!info.private);
    // room_info is for members; the server reads any room; a missing one is not found
    assert!(matches!(
        refused(store.room_info(&user("carol"), "lobby", 1000).await),
        Refusal::NotMember(_)
    ));
    assert!(store.room_info(&By::Server, "lobby", 1000).await.is_ok());
    assert!(matches!(
        refused(store.room_info(&By::Server, "nowhere", 1000).await),
        Refusal::NotFound(_)
    ));
    // the member list is bounded, the count exact
    for i in 0..5 {
        store.join(&format!("m{i}"), "lobby").await.unwrap();
    }
    let info = store.room_info(&By::Server, "lobby", 3).await.unwrap();
    assert_eq!(info.members.len(), 3);
    assert_eq!(info.count, 7);
    // only owners add and remove
    assert!(matches!(
        refused(
            store
                .add_member(&user("bob"), "lobby", "carol", Role::Member)
                .await
        ),
        Refusal::Forbidden(_)
    ));
    assert!(matches!(
        refused(
            store
                .remove_member(&user("bob"), "lobby", "m0", false)
                .await
        ),
        Refusal::Forbidden(_)
    ));
    // ... and so does anyone else (section 7: "others: forbidden"), members or not
    assert!(matches!(
        refused(
            store
                .add_member(&user("zoe"), "lobby", "zoe", Role::Member)
                .await
        ),
        Refusal::Forbidden(_)
    ));
    assert!(matches!(
        refused(store.remove_member(&user("zoe"), "lobby", "m0", true).await),
        Refusal::Forbidden(_)
    ));
    let added = store
        .add_member(&user("alice"), "lobby", "bob", Role::Owner)
        .await
        .unwrap();
    assert!(added.changed, "a member promoted to owner");
    assert_eq!(added.members, 7);
    let removed = store
        .remove_member(&user("bob"), "lobby", "m0", false)
        .await
        .unwrap();
    assert!(removed.changed);
    assert_eq!(removed.members, 6);
    // leaving
    assert!(store.leave("m1", "lobby").await.unwrap());
    assert!(
        !store.leave("m1", "lobby").await.unwrap(),
        "not a member any more"
    );
    assert_eq!(store.role("m1", "lobby").await.unwrap(), None);
    let rooms = store.rooms_of("alice").await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].room, "lobby");
    assert_eq!(rooms[0].members, 5);
    // a room that exists cannot be created again
    assert!(matches!(
        refused(
            store
                .create_room(
                    &user("carol"),
                    NewRoom {
                        room: "lobby".into(),
                        ..NewRoom::default()
                    }
                )
                .await
        ),
        Refusal::Conflict(_)
    ));
}

async fn private_rooms_and_bans(store: Arc<dyn Store>) {
    let created = store
        .create_room(
            &user("alice"),
            NewRoom {
                room: "team".into(),
                private: true,
                owners: vec![],
                members: vec!["bob".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(created.marked, None, "a new room has no message to mark");
    let info = created.info;
    assert!(info.private);
    assert_eq!(info.owners, vec!["alice"]);
    assert_eq!(info.members, vec!["alice", "bob"]);
    assert!(matches!(
        refused(store.join("carol", "team").await),
        Refusal::Forbidden(_)
    ));
    let added = store
        .add_member(&user("alice"), "team", "carol", Role::Member)
        .await
        .unwrap();
    assert!(added.changed);
    assert_eq!(
        store.role("carol", "team").await.unwrap(),
        Some(Role::Member)
    );
    // a ban removes and keeps out, of a public room too
    store.join("dave", "plaza").await.unwrap();
    store.join("erin", "plaza").await.unwrap();
    let r = store
        .remove_member(&user("dave"), "plaza", "erin", true)
        .await
        .unwrap();
    assert!(r.changed);
    assert!(matches!(
        refused(store.join("erin", "plaza").await),
        Refusal::Forbidden(_)
    ));
    assert!(matches!(
        refused(store.append(room("erin", "plaza", "let me in", None)).await),
        Refusal::NotMember(_)
    ));
    // a ban of someone who is not a member keeps them out too
    store
        .remove_member(&user("dave"), "plaza", "frank", true)
        .await
        .unwrap();
    assert!(matches!(
        refused(store.join("frank", "plaza").await),
        Refusal::Forbidden(_)
    ));
    // an owner's add lifts the ban
    store
        .add_member(&user("dave"), "plaza", "erin", Role::Member)
        .await
        .unwrap();
    assert_eq!(
        store.role("erin", "plaza").await.unwrap(),
        Some(Role::Member)
    );
    store.leave("erin", "plaza").await.unwrap();
    assert!(
        store.join("erin", "plaza").await.unwrap().changed,
        "no ban left"
    );
    // the server moderates any room
    store
        .remove_member(&By::Server, "team", "bob", true)
        .await
        .unwrap();
    assert_eq!(store.role("bob", "team").await.unwrap(), None);
    assert!(matches!(
        refused(
            store
                .add_member(&user("alice"), "nowhere", "bob", Role::Member)
                .await
        ),
        Refusal::NotFound(_)
    ));
}

async fn room_creation_by_api_only(store: Arc<dyn Store>) {
    assert!(matches!(
        refused(store.join("alice", "new").await),
        Refusal::NotFound(_)
    ));
    assert!(matches!(
        refused(
            store
                .create_room(
                    &user("alice"),
                    NewRoom {
                        room: "new".into(),
                        ..NewRoom::default()
                    }
                )
                .await
        ),
        Refusal::Forbidden(_)
    ));
    let info = store
        .create_room(
            &By::Server,
            NewRoom {
                room: "new".into(),
                private: false,
                owners: vec!["alice".into()],
                members: vec![],
            },
        )
        .await
        .unwrap()
        .info;
    assert_eq!(info.owners, vec!["alice"]);
    let j = store.join("bob", "new").await.unwrap();
    assert!(j.changed && !j.created);
}

async fn rooms_per_user_bound(store: Arc<dyn Store>) {
    store.join("alice", "r1").await.unwrap();
    store.join("alice", "r2").await.unwrap();
    assert!(matches!(
        refused(store.join("alice", "r3").await),
        Refusal::Limit(_)
    ));
    store.join("bob", "r3").await.unwrap();
    assert!(matches!(
        refused(
            store
                .add_member(&user("bob"), "r3", "alice", Role::Member)
                .await
        ),
        Refusal::Limit(_)
    ));
    assert!(matches!(
        refused(
            store
                .create_room(
                    &By::Server,
                    NewRoom {
                        room: "r4".into(),
                        members: vec!["alice".into()],
                        ..NewRoom::default()
                    }
                )
                .await
        ),
        Refusal::Limit(_)
    ));
    // DMs do not count, and leaving makes room
    store.append(dm("alice", "bob", "hi", None)).await.unwrap();
    store.leave("alice", "r1").await.unwrap();
    assert!(store.join("alice", "r3").await.unwrap().changed);
}

async fn room_messages_need_membership(store: Arc<dyn Store>) {
    assert!(matches!(
        refused(store.append(room("alice", "lobby", "hi", Some("k"))).await),
        Refusal::NotMember(_)
    ));
    store.join("alice", "lobby").await.unwrap();
    let a = store
        .append(room("alice", "lobby", "hi", Some("k")))
        .await
        .unwrap();
    assert_eq!(a.message.seq, 1, "a refused message takes no seq");
    assert!(
        !a.duplicate,
        "a refused message's client id is not remembered"
    );
    assert_eq!(a.message.room.as_deref(), Some("lobby"));
    assert_eq!(a.message.to, None);
    // the server posts without being a member
    let mut from_server = room("system", "lobby", "notice", None);
    from_server.by = By::Server;
    assert_eq!(store.append(from_server).await.unwrap().message.seq, 2);
    assert_eq!(
        store.role("system", "lobby").await.unwrap(),
        None,
        "posting as the server makes no member"
    );
    store.leave("alice", "lobby").await.unwrap();
    assert!(matches!(
        refused(store.append(room("alice", "lobby", "bye", None)).await),
        Refusal::NotMember(_)
    ));
}

async fn conversations_of_a_user(store: Arc<dyn Store>) {
    assert!(store.conversations("alice").await.unwrap().is_empty());
    store.append(dm("alice", "bob", "1", None)).await.unwrap();
    store.append(dm("carol", "alice", "2", None)).await.unwrap();
    store.append(dm("carol", "alice", "3", None)).await.unwrap();
    store.join("alice", "lobby").await.unwrap();
    let convs = store.conversations("alice").await.unwrap();
    let ids: Vec<&str> = convs.iter().map(|c| c.conv.as_str()).collect();
    assert_eq!(ids, vec!["dm:alice:bob", "dm:alice:carol", "room:lobby"]);
    assert_eq!(convs[1].last_seq, 2);
    assert_eq!(convs[1].read, 0, "alice has read nothing carol sent");
    assert_eq!(convs[2].last_seq, 0, "no message in the room yet");
    let bob = store.conversations("bob").await.unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0].read, 0);
    let c = store.conversations("carol").await.unwrap();
    assert_eq!(c[0].read, 2, "sending marks read by the sender");
    assert_eq!(c[0].delivered, 2);
    store.leave("alice", "lobby").await.unwrap();
    assert_eq!(store.conversations("alice").await.unwrap().len(), 2);
}

async fn reads_page_both_ways(store: Arc<dyn Store>) {
    for i in 1..=10 {
        store
            .append(dm("alice", "bob", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let conv = "dm:alice:bob";
    let (m, more) = read_one(&*store, conv, Range::After { after: 3, limit: 4 }).await;
    assert_eq!(seqs(&m), vec![4, 5, 6, 7]);
    assert!(more);
    let (m, more) = read_one(&*store, conv, Range::After { after: 6, limit: 4 }).await;
    assert_eq!(seqs(&m), vec![7, 8, 9, 10]);
    assert!(!more);
    let (m, more) = read_one(
        &*store,
        conv,
        Range::After {
            after: u64::MAX,
            limit: 4,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    let (m, more) = read_one(
        &*store,
        conv,
        Range::Before {
            before: None,
            limit: 3,
        },
    )
    .await;
    assert_eq!(seqs(&m), vec![8, 9, 10], "latest, oldest first");
    assert!(more);
    let (m, more) = read_one(
        &*store,
        conv,
        Range::Before {
            before: Some(4),
            limit: 5,
        },
    )
    .await;
    assert_eq!(seqs(&m), vec![1, 2, 3]);
    assert!(!more);
    assert_eq!(m[0].body.as_deref(), Some("m1"));
    let (m, more) = read_one(
        &*store,
        "dm:nobody:none",
        Range::Before {
            before: None,
            limit: 5,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    // several conversations in one call, answered in order
    store
        .append(dm("alice", "carol", "c1", None))
        .await
        .unwrap();
    let pages = store
        .read(vec![
            ReadRequest {
                conv: "dm:alice:carol".into(),
                range: Range::After {
                    after: 0,
                    limit: 10,
                },
            },
            ReadRequest {
                conv: conv.into(),
                range: Range::Before {
                    before: Some(3),
                    limit: 10,
                },
            },
            ReadRequest {
                conv: "dm:alice:carol".into(),
                range: Range::Before {
                    before: None,
                    limit: 10,
                },
            },
        ])
        .await
        .unwrap();
    assert_eq!(pages.len(), 3);
    assert_eq!(seqs(&pages[0].messages), vec![1]);
    assert_eq!(seqs(&pages[1].messages), vec![1, 2]);
    assert_eq!(pages[2].conv, "dm:alice:carol");
    assert_eq!(seqs(&pages[2].messages), vec![1]);
}

async fn nothing_is_trimmed(store: Arc<dyn Store>) {
    store.join("alice", "big").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                store
                    .append(room("alice", "big", &format!("{t}-{i}"), None))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (m, more) = read_one(
        &*store,
        "room:big",
        Range::Before {
            before: Some(2),
            limit: 10,
        },
    )
    .await;
    assert_eq!(seqs(&m), vec![1], "the oldest message is still there");
    assert!(!more);
    let (m, _) = read_one(
        &*store,
        "room:big",
        Range::After {
            after: 0,
            limit: 1000,
        },
    )
    .await;
    assert_eq!(seqs(&m), (1..=600).collect::<Vec<u64>>());
}

async fn edits_and_deletes(store: Arc<dyn Store>) {
    store.join("owner", "r").await.unwrap();
    store.join("bob", "r").await.unwrap();
    store.join("carol", "r").await.unwrap();
    let conv = "room:r";
    let m1 = store
        .append(room("bob", "r", "helo", None))
        .await
        .unwrap()
        .message;
    let e = store
        .append(edit("bob", conv, m1.seq, "hello"))
        .await
        .unwrap()
        .message;
    assert_eq!(e.seq, 2);
    assert_eq!(e.edit, Some(1));
    assert_eq!(e.body.as_deref(), Some("hello"));
    assert!(matches!(
        refused(store.append(edit("carol", conv, 1, "mine now")).await),
        Refusal::Forbidden(_)
    ));
    assert!(matches!(
        refused(store.append(delete(user("carol"), conv, 1)).await),
        Refusal::Forbidden(_)
    ));
    assert!(matches!(
        refused(store.append(edit("bob", conv, 99, "x")).await),
        Refusal::NotFound(_)
    ));
    assert!(matches!(
        refused(store.append(edit("bob", conv, 2, "edit of an edit")).await),
        Refusal::NotFound(_)
    ));
    let (m, _) = read_one(
        &*store,
        conv,
        Range::After {
            after: 0,
            limit: 10,
        },
    )
    .await;
    assert_eq!(
        m[0].body.as_deref(),
        Some("hello"),
        "history has the latest body"
    );
    assert!(m[0].edited);
    assert_eq!(m[0].edit, None);
    // the author deletes their own; an owner deletes anyone's
    let m3 = store
        .append(room("carol", "r", "oops", None))
        .await
        .unwrap()
        .message;
    let d = store
        .append(delete(user("carol"), conv, m3.seq))
        .await
        .unwrap()
        .message;
    assert_eq!(d.delete, Some(m3.seq));
    assert_eq!(d.body, None);
    assert!(matches!(
        refused(store.append(delete(user("carol"), conv, m3.seq)).await),
        Refusal::NotFound(_)
    ));
    store.append(delete(user("owner"), conv, 1)).await.unwrap();
    let (m, _) = read_one(
        &*store,
        conv,
        Range::After {
            after: 0,
            limit: 10,
        },
    )
    .await;
    assert!(m[0].deleted && m[0].body.is_none(), "{:?}", m[0]);
    assert_eq!(m[1].body, None, "the edit's copy of the body is gone too");
    assert!(m[2].deleted);
    assert!(matches!(
        refused(store.append(edit("bob", conv, 1, "back")).await),
        Refusal::NotFound(_)
    ));
    // the server moderates; edits in a DM are the author's
    let dm1 = store
        .append(dm("bob", "carol", "x", None))
        .await
        .unwrap()
        .message;
    store
        .append(delete(By::Server, &dm1.conv, dm1.seq))
        .await
        .unwrap();
    let receipts = store.receipts(&dm1.conv).await.unwrap();
    let uids: Vec<&str> = receipts.iter().map(|r| r.uid.as_str()).collect();
    assert_eq!(
        uids,
        vec!["bob", "carol"],
        "the moderator is no participant"
    );
    let dm2 = store
        .append(dm("bob", "carol", "y", None))
        .await
        .unwrap()
        .message;
    let mut e = edit("bob", &dm2.conv, dm2.seq, "y!");
    e.client_id = Some("e1".into());
    let first = store.append(e.clone()).await.unwrap();
    let again = store.append(e).await.unwrap();
    assert!(again.duplicate, "an edit is idempotent by client id");
    assert_eq!(again.message.seq, first.message.seq);
}

async fn marks_move_forward_only(store: Arc<dyn Store>) {
    for i in 0..5 {
        store
            .append(dm("alice", "bob", &format!("{i}"), None))
            .await
            .unwrap();
    }
    let conv = "dm:alice:bob";
    assert_eq!(
        store
            .mark("bob", conv, MarkKind::Delivered, 4)
            .await
            .unwrap(),
        Some(4)
    );
    assert_eq!(
        store.mark("bob", conv, MarkKind::Read, 2).await.unwrap(),
        Some(2)
    );
    assert_eq!(
        store.mark("bob", conv, MarkKind::Read, 1).await.unwrap(),
        None,
        "never back"
    );
    assert_eq!(
        store.mark("bob", conv, MarkKind::Read, 2).await.unwrap(),
        None
    );
    assert!(matches!(
        refused(store.mark("bob", conv, MarkKind::Read, 6).await),
        Refusal::Invalid(_)
    ));
    assert!(matches!(
        refused(store.mark("carol", conv, MarkKind::Read, 1).await),
        Refusal::NotMember(_)
    ));
    assert_eq!(
        store.mark("bob", conv, MarkKind::Read, 5).await.unwrap(),
        Some(5)
    );
    let receipts = store.receipts(conv).await.unwrap();
    let r: Vec<(&str, u64, u64)> = receipts
        .iter()
        .map(|r| (r.uid.as_str(), r.read, r.delivered))
        .collect();
    assert_eq!(
        r,
        vec![("alice", 5, 5), ("bob", 5, 5)],
        "reading moves delivered; sending marks read"
    );
    // many marks at once land, each moving forward only
    let mut tasks = Vec::new();
    for seq in 1..=5 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .mark("alice", "dm:alice:bob", MarkKind::Delivered, seq)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    store.join("alice", "r").await.unwrap();
    store.append(room("alice", "r", "x", None)).await.unwrap();
    store.join("bob", "r").await.unwrap();
    let receipts = store.receipts("room:r").await.unwrap();
    assert_eq!(receipts[1].uid, "bob");
    assert_eq!(
        receipts[1].read, 1,
        "a new member has nothing unread from before"
    );
}

/// A new member's marks start at the room's newest message, whichever way they came in
/// (join, add, a room created with members), and the store says so in `marked`, so the
/// caller can push them like explicit marks; nothing is set (None) for a member already
/// there or a room without messages.
async fn new_members_start_with_history_read(store: Arc<dyn Store>) {
    let j = store.join("alice", "lobby").await.unwrap();
    assert_eq!(j.marked, None, "no message yet: no mark to tell");
    for i in 1..=2 {
        store
            .append(room("alice", "lobby", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let j = store.join("bob", "lobby").await.unwrap();
    assert_eq!(j.marked, Some(2), "{j:?}");
    assert_eq!(
        store.join("bob", "lobby").await.unwrap().marked,
        None,
        "joining twice sets nothing"
    );
    let added = store
        .add_member(&user("alice"), "lobby", "carol", Role::Member)
        .await
        .unwrap();
    assert_eq!(added.marked, Some(2), "{added:?}");
    let promoted = store
        .add_member(&user("alice"), "lobby", "carol", Role::Owner)
        .await
        .unwrap();
    assert!(promoted.changed);
    assert_eq!(promoted.marked, None, "a role change keeps the marks");
    let receipts = store.receipts("room:lobby").await.unwrap();
    for r in &receipts {
        assert_eq!((r.read, r.delivered), (2, 2), "{receipts:?}");
    }
    assert_eq!(receipts.len(), 3);
    // leaving drops the marks; coming back starts again at the newest message
    store.leave("bob", "lobby").await.unwrap();
    store
        .append(room("alice", "lobby", "m3", None))
        .await
        .unwrap();
    assert_eq!(store.join("bob", "lobby").await.unwrap().marked, Some(3));
    // the server API posts to a room before it exists; its initial members start at it
    let mut notice = room("system", "later", "notice", None);
    notice.by = By::Server;
    store.append(notice).await.unwrap();
    let created = store
        .create_room(
            &By::Server,
            NewRoom {
                room: "later".into(),
                private: true,
                owners: vec!["alice".into()],
                members: vec!["bob".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(created.marked, Some(1), "{created:?}");
    let receipts = store.receipts("room:later").await.unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(receipts.iter().all(|r| r.read == 1 && r.delivered == 1));
}

async fn inbox_newest_first_with_unread_counts(store: Arc<dyn Store>) {
    store.join("alice", "quiet").await.unwrap();
    store.append(dm("bob", "alice", "b1", None)).await.unwrap();
    store.append(dm("bob", "alice", "b2", None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .append(dm("carol", "alice", "c1", None))
        .await
        .unwrap();
    store
        .append(dm("alice", "carol", "a1", None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.join("alice", "busy").await.unwrap();
    store.join("dave", "busy").await.unwrap();
    let r1 = store
        .append(room("dave", "busy", "d1", None))
        .await
        .unwrap()
        .message;
    store
        .append(room("dave", "busy", "d2", None))
        .await
        .unwrap();
    store
        .append(edit("dave", "room:busy", r1.seq, "d1!"))
        .await
        .unwrap();
    let inbox = store.inbox("alice", 50, None).await.unwrap();
    let order: Vec<(&str, u64)> = inbox
        .conversations
        .iter()
        .map(|e| (e.conv.as_str(), e.unread))
        .collect();
    assert_eq!(
        order,
        vec![
            ("room:busy", 2),
            ("dm:alice:carol", 0),
            ("dm:alice:bob", 2),
            ("room:quiet", 0)
        ],
        "newest first; an edit is not unread; own messages mark read; no message last"
    );
    assert!(!inbox.more);
    let busy = &inbox.conversations[0];
    assert_eq!(busy.last.as_ref().map(|m| m.seq), Some(3));
    assert_eq!(inbox.conversations[3].last, None);
    // a deleted message is not unread either
    store
        .append(delete(user("dave"), "room:busy", r1.seq))
        .await
        .unwrap();
    let inbox = store.inbox("alice", 50, None).await.unwrap();
    assert_eq!(inbox.conversations[0].unread, 1);
    store
        .mark("alice", "room:busy", MarkKind::Read, 4)
        .await
        .unwrap();
    let inbox = store.inbox("alice", 50, None).await.unwrap();
    assert_eq!(inbox.conversations[0].unread, 0);
    assert_eq!(inbox.conversations[0].read, 4);
    // paging by the ts of the last one shown
    let first = store.inbox("alice", 2, None).await.unwrap();
    assert_eq!(first.conversations.len(), 2);
    assert!(first.more);
    let ts = first.conversations[1]
        .last
        .as_ref()
        .map(|m| m.ts)
        .expect("a last message");
    let cursor = InboxCursor {
        ts,
        conv: Some(first.conversations[1].conv.clone()),
    };
    let rest = store.inbox("alice", 2, Some(cursor)).await.unwrap();
    let convs: Vec<&str> = rest.conversations.iter().map(|e| e.conv.as_str()).collect();
    assert_eq!(convs, vec!["dm:alice:bob", "room:quiet"]);
    assert!(!rest.more);
    // two conversations whose newest messages share a millisecond, across a page
    // boundary: the cursor's conversation tells them apart
    let ts = now_ms() + 60_000;
    for other in ["x1", "x2"] {
        let mut m = dm(other, "zed", "same ms", None);
        m.ts = ts;
        store.append(m).await.unwrap();
    }
    let one = store.inbox("zed", 1, None).await.unwrap();
    assert_eq!(
        one.conversations[0].conv, "dm:x1:zed",
        "ties by conversation id"
    );
    let cursor = InboxCursor {
        ts,
        conv: Some("dm:x1:zed".into()),
    };
    let two = store.inbox("zed", 1, Some(cursor)).await.unwrap();
    assert_eq!(two.conversations[0].conv, "dm:x2:zed");
    assert!(!two.more);
}

async fn retention_purges_old_messages(store: Arc<dyn Store>) {
    store.join("alice", "r").await.unwrap();
    let mut old = room("alice", "r", "old", None);
    old.ts = now_ms() - 2 * 3600 * 1000;
    store.append(old).await.unwrap();
    store.append(room("alice", "r", "new", None)).await.unwrap();
    let purged = store.purge(now_ms()).await.unwrap();
    assert_eq!(purged.messages, 1);
    let (m, more) = read_one(
        &*store,
        "room:r",
        Range::Before {
            before: None,
            limit: 10,
        },
    )
    .await;
    assert_eq!(seqs(&m), vec![2]);
    assert!(!more);
    let next = store
        .append(room("alice", "r", "next", None))
        .await
        .unwrap();
    assert_eq!(next.message.seq, 3, "the seq counter is not purged");
}
