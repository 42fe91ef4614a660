//! The behaviour every [`Store`] must have, written once against the interface.
//!
//! `tests/store.rs` runs this suite against the embedded store and against the Redis
//! store on a real redis-server. Each check gets a fresh, empty store from the factory.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{NewMessage, Range, ReadRequest, Store, StoreError, StoreLimits};

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
    idempotency_expires(
        make(StoreLimits {
            idempotency_ttl: Duration::from_millis(300),
            ..limits
        })
        .await,
    )
    .await;
    membership(make(limits).await).await;
    room_append_requires_membership(make(limits).await).await;
    conversations_of_a_user(make(limits).await).await;
    reads(make(limits).await).await;
    history_is_bounded(
        make(StoreLimits {
            history_per_conv: 5,
            ..limits
        })
        .await,
    )
    .await;
    make(limits).await.ping().await.expect("ping");
}

/// A DM from `from` to `to` with an optional client id.
pub fn dm(from: &str, to: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        conv: crate::protocol::dm_conv(from, to),
        from: from.into(),
        to: Some(to.into()),
        room: None,
        body: body.into(),
        client_id: client_id.map(Into::into),
        id: uuid::Uuid::new_v4().to_string(),
        ts: 1_700_000_000_000,
        require_member: false,
    }
}

/// A room message from `from`, checked for membership.
pub fn room(from: &str, room: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        conv: crate::protocol::room_conv(room),
        from: from.into(),
        to: None,
        room: Some(room.into()),
        body: body.into(),
        client_id: client_id.map(Into::into),
        id: uuid::Uuid::new_v4().to_string(),
        ts: 1_700_000_000_000,
        require_member: true,
    }
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
    let a = store.append(dm("alice", "carol", "z", None)).await.unwrap();
    assert_eq!(a.message.seq, 1, "each conversation has its own seq");
    assert_eq!(a.message.body, "z");
    assert_eq!(a.message.to.as_deref(), Some("carol"));
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
    let page = read_one(
        &store,
        "room:busy",
        Range::After {
            after: 0,
            limit: 1000,
        },
    )
    .await;
    let seqs: Vec<u64> = page.0.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=320).collect::<Vec<u64>>());
}

async fn idempotent_append(store: Arc<dyn Store>) {
    let first = store
        .append(dm("alice", "bob", "hello", Some("k1")))
        .await
        .unwrap();
    let again = store
        .append(dm("alice", "bob", "hello", Some("k1")))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        again.message, first.message,
        "a resend answers with the first message"
    );
    // same client id from another user is another message
    let other = store
        .append(dm("bob", "alice", "hey", Some("k1")))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 2);
    let (msgs, _) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 0,
            limit: 10,
        },
    )
    .await;
    assert_eq!(msgs.len(), 2, "the resend was stored once");
}

async fn idempotency_expires(store: Arc<dyn Store>) {
    let first = store
        .append(dm("alice", "bob", "hello", Some("k1")))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = store
            .append(dm("alice", "bob", "hello", Some("k1")))
            .await
            .unwrap();
        if !a.duplicate {
            assert_eq!(a.message.seq, 2);
            break;
        }
        assert_eq!(a.message, first.message);
        assert!(Instant::now() < deadline, "idempotency key never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn membership(store: Arc<dyn Store>) {
    assert!(store.rooms_of("alice").await.unwrap().is_empty());
    assert!(store.join("alice", "lobby").await.unwrap());
    assert!(
        !store.join("alice", "lobby").await.unwrap(),
        "second join is a no-op"
    );
    assert!(store.join("alice", "attic").await.unwrap());
    assert!(store.is_member("alice", "lobby").await.unwrap());
    assert!(!store.is_member("bob", "lobby").await.unwrap());
    assert_eq!(
        store.rooms_of("alice").await.unwrap(),
        vec!["attic", "lobby"]
    );
    assert!(store.leave("alice", "lobby").await.unwrap());
    assert!(!store.leave("alice", "lobby").await.unwrap());
    assert!(!store.is_member("alice", "lobby").await.unwrap());
    assert_eq!(store.rooms_of("alice").await.unwrap(), vec!["attic"]);
}

async fn room_append_requires_membership(store: Arc<dyn Store>) {
    match store
        .append(room("mallory", "lobby", "hi", Some("m1")))
        .await
    {
        Err(StoreError::NotMember { uid, room }) => {
            assert_eq!((uid.as_str(), room.as_str()), ("mallory", "lobby"))
        }
        other => panic!("expected NotMember, got {other:?}"),
    }
    store.join("alice", "lobby").await.unwrap();
    let a = store
        .append(room("alice", "lobby", "hi", Some("a1")))
        .await
        .unwrap();
    assert_eq!(a.message.seq, 1, "the refused message took no seq");
    assert_eq!(a.message.room.as_deref(), Some("lobby"));
    // a system message (no membership check) is fine
    let mut sys = room("system", "lobby", "maintenance", None);
    sys.require_member = false;
    assert_eq!(store.append(sys).await.unwrap().message.seq, 2);
    // the refused client id was not remembered: after joining, it stores
    store.join("mallory", "lobby").await.unwrap();
    let m = store
        .append(room("mallory", "lobby", "hi", Some("m1")))
        .await
        .unwrap();
    assert!(!m.duplicate);
    assert_eq!(m.message.seq, 3);
}

async fn conversations_of_a_user(store: Arc<dyn Store>) {
    assert!(store.conversations_of("alice").await.unwrap().is_empty());
    store.append(dm("alice", "bob", "1", None)).await.unwrap();
    store.append(dm("carol", "alice", "2", None)).await.unwrap();
    store.join("alice", "lobby").await.unwrap();
    let mut convs = store.conversations_of("alice").await.unwrap();
    convs.sort();
    assert_eq!(convs, vec!["dm:alice:bob", "dm:alice:carol", "room:lobby"]);
    assert_eq!(
        store.conversations_of("bob").await.unwrap(),
        vec!["dm:alice:bob"]
    );
    store.leave("alice", "lobby").await.unwrap();
    let mut convs = store.conversations_of("alice").await.unwrap();
    convs.sort();
    assert_eq!(convs, vec!["dm:alice:bob", "dm:alice:carol"]);
}

async fn read_one(
    store: &Arc<dyn Store>,
    conv: &str,
    range: Range,
) -> (Vec<crate::protocol::Message>, bool) {
    let mut pages = store
        .read(vec![ReadRequest {
            conv: conv.into(),
            range,
        }])
        .await
        .unwrap();
    assert_eq!(pages.len(), 1);
    let page = pages.remove(0);
    assert_eq!(page.conv, conv);
    (page.messages, page.more)
}

fn seqs(msgs: &[crate::protocol::Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

async fn reads(store: Arc<dyn Store>) {
    for i in 1..=30 {
        store
            .append(dm("alice", "bob", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 0,
            limit: 10,
        },
    )
    .await;
    assert_eq!(seqs(&m), (1..=10).collect::<Vec<_>>());
    assert!(more);
    assert_eq!(m[0].body, "m1");
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 20,
            limit: 10,
        },
    )
    .await;
    assert_eq!(seqs(&m), (21..=30).collect::<Vec<_>>());
    assert!(!more, "exactly limit left is not more");
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 30,
            limit: 10,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 99,
            limit: 10,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: None,
            limit: 5,
        },
    )
    .await;
    assert_eq!(seqs(&m), (26..=30).collect::<Vec<_>>());
    assert!(more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: Some(11),
            limit: 50,
        },
    )
    .await;
    assert_eq!(seqs(&m), (1..=10).collect::<Vec<_>>());
    assert!(!more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: Some(11),
            limit: 10,
        },
    )
    .await;
    assert_eq!(seqs(&m), (1..=10).collect::<Vec<_>>());
    assert!(!more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: Some(1),
            limit: 10,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: Some(500),
            limit: 3,
        },
    )
    .await;
    assert_eq!(seqs(&m), vec![28, 29, 30]);
    assert!(more);
    let (m, more) = read_one(
        &store,
        "room:nowhere",
        Range::Before {
            before: None,
            limit: 20,
        },
    )
    .await;
    assert!(m.is_empty() && !more);
    // several conversations in one call, answered in request order
    let pages = store
        .read(vec![
            ReadRequest {
                conv: "room:nowhere".into(),
                range: Range::After { after: 0, limit: 5 },
            },
            ReadRequest {
                conv: "dm:alice:bob".into(),
                range: Range::After {
                    after: 28,
                    limit: 5,
                },
            },
        ])
        .await
        .unwrap();
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[0].conv, "room:nowhere");
    assert_eq!(seqs(&pages[1].messages), vec![29, 30]);
}

async fn history_is_bounded(store: Arc<dyn Store>) {
    for i in 1..=12 {
        store
            .append(dm("alice", "bob", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::Before {
            before: None,
            limit: 100,
        },
    )
    .await;
    assert_eq!(
        seqs(&m),
        (8..=12).collect::<Vec<_>>(),
        "only the newest 5 are kept"
    );
    assert!(!more, "nothing older is kept");
    let (m, more) = read_one(
        &store,
        "dm:alice:bob",
        Range::After {
            after: 2,
            limit: 100,
        },
    )
    .await;
    assert_eq!(seqs(&m), (8..=12).collect::<Vec<_>>());
    assert!(!more);
    let (m, more) = read_one(&store, "dm:alice:bob", Range::After { after: 2, limit: 2 }).await;
    assert_eq!(seqs(&m), vec![8, 9]);
    assert!(more);
    // seq keeps counting after trimming
    let a = store.append(dm("alice", "bob", "m13", None)).await.unwrap();
    assert_eq!(a.message.seq, 13);
}
