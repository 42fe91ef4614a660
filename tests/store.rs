//! The store interface: the conformance suite against the embedded store and against
//! the Redis store on a real redis-server of its own, plus Redis-specific checks.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmesh::keys;
use chatmesh::protocol::Message;
use chatmesh::store::conformance::{self, dm, room};
use chatmesh::store::redis::{RedisConfig, RedisStore};
use chatmesh::store::{Range, ReadRequest, Store, StoreError, StoreLimits};
use common::redis::RedisServer;

async fn flushed_store(url: &str, limits: StoreLimits) -> RedisStore {
    let store = RedisStore::connect(url, limits).await.expect("connect");
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut store.connection())
        .await
        .expect("FLUSHALL");
    store
}

async fn read_all(store: &dyn Store, conv: &str) -> (Vec<Message>, bool) {
    let page = store
        .read(vec![ReadRequest {
            conv: conv.into(),
            range: Range::After {
                after: 0,
                limit: 10_000,
            },
        }])
        .await
        .expect("read")
        .remove(0);
    (page.messages, page.more)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passes_the_conformance_suite() {
    let server = RedisServer::start();
    let url = server.url.clone();
    conformance::run_all(|limits| {
        let url = url.clone();
        async move { Arc::new(flushed_store(&url, limits).await) as Arc<dyn Store> }
    })
    .await;
}

/// Three nodes, each with its own store and connection, appending to one room at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_gap_free_seq() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(
            RedisStore::connect(&server.url, StoreLimits::default())
                .await
                .expect("connect"),
        ));
    }
    nodes[0].join("alice", "busy").await.unwrap();
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            for i in 0..50 {
                let body = format!("node{n}-{i}");
                // half with a client id, to take both paths through the script
                let client_id = (i % 2 == 0).then_some(body.as_str());
                let a = node
                    .append(room("alice", "busy", &body, client_id))
                    .await
                    .unwrap();
                assert!(!a.duplicate);
                stored.push(a.message);
            }
            stored
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let stored = t.await.unwrap();
        assert!(
            stored.windows(2).all(|w| w[0].seq < w[1].seq),
            "one node's seqs increase"
        );
        all.extend(stored);
    }
    all.sort_by_key(|m| m.seq);
    let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=150).collect::<Vec<u64>>());
    // every node reads the same log, equal to what the appends returned
    for node in &nodes {
        let (log, more) = read_all(node.as_ref(), "room:busy").await;
        assert_eq!(log, all);
        assert!(!more);
    }
}

#[tokio::test]
async fn messages_round_trip_exactly() {
    let server = RedisServer::start();
    let store = flushed_store(&server.url, StoreLimits::default()).await;
    let bodies = [
        "",
        "plain",
        "\"seq\":0,",
        "quotes \" and \\ backslashes \\\"",
        "unicode: ünïcødé ✓ 🦀 \u{0} \u{1f}",
        "line\nbreaks\r\tand tabs",
        "{\"type\":\"message\",\"seq\":99}",
    ];
    let mut stored = Vec::new();
    for body in bodies {
        let mut m = dm("alice", "bob", body, Some(body));
        m.ts = u64::MAX;
        let a = store.append(m.clone()).await.unwrap();
        assert_eq!(a.message.body, body);
        assert_eq!(a.message.ts, u64::MAX);
        assert_eq!(a.message.id, m.id);
        assert_eq!(a.message.to.as_deref(), Some("bob"));
        assert_eq!(a.message.room, None);
        // the duplicate comes back from the stored JSON: it must be the same message
        let again = store.append(m).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message, a.message);
        stored.push(a.message);
    }
    let (log, _) = read_all(&store, "dm:alice:bob").await;
    assert_eq!(log, stored);
    // and the stored text is exactly serde's, so other readers of the log agree
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(keys::conv_log("dm:alice:bob"))
        .arg(0)
        .arg(-1)
        .query_async(&mut store.connection())
        .await
        .unwrap();
    let expected: Vec<String> = stored
        .iter()
        .map(|m| serde_json::to_string(m).unwrap())
        .collect();
    assert_eq!(raw, expected);
}

#[tokio::test]
async fn keeps_the_documented_layout() {
    let server = RedisServer::start();
    let store = flushed_store(&server.url, StoreLimits::default()).await;
    store.join("alice", "lobby").await.unwrap();
    store
        .append(dm("alice", "bob", "hi", Some("c1")))
        .await
        .unwrap();
    store
        .append(room("alice", "lobby", "hi", None))
        .await
        .unwrap();
    let mut con = server.connection();
    let mut found: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    found.sort();
    let mut expected = vec![
        keys::conv_seq("dm:alice:bob"),
        keys::conv_log("dm:alice:bob"),
        keys::conv_seq("room:lobby"),
        keys::conv_log("room:lobby"),
        keys::idempotency("alice", "c1"),
        keys::room_members("lobby"),
        keys::user_rooms("alice"),
        keys::user_dms("alice"),
        keys::user_dms("bob"),
    ];
    expected.sort();
    assert_eq!(found, expected);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys::idempotency("alice", "c1"))
        .query(&mut con)
        .unwrap();
    assert!(ttl > 0, "the idempotency key expires");
}

#[tokio::test]
async fn foreign_data_is_corrupt_not_a_panic() {
    let server = RedisServer::start();
    let store = flushed_store(&server.url, StoreLimits::default()).await;
    let mut con = server.connection();
    let put = |con: &mut redis::Connection, cmd: &[&str]| {
        let mut c = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            c.arg(*a);
        }
        c.query::<redis::Value>(con).unwrap();
    };

    // a log entry that is not a message
    store.append(dm("alice", "bob", "1", None)).await.unwrap();
    put(
        &mut con,
        &["RPUSH", &keys::conv_log("dm:alice:bob"), "garbage"],
    );
    put(&mut con, &["INCR", &keys::conv_seq("dm:alice:bob")]);
    assert!(matches!(
        store
            .read(vec![ReadRequest {
                conv: "dm:alice:bob".into(),
                range: Range::After { after: 0, limit: 9 }
            }])
            .await,
        Err(StoreError::Corrupt(_))
    ));

    // a log that fell out of step with its counter
    put(&mut con, &["DEL", &keys::conv_log("dm:alice:bob")]);
    put(&mut con, &["DEL", &keys::conv_seq("dm:alice:bob")]);
    for _ in 0..3 {
        store.append(dm("alice", "bob", "x", None)).await.unwrap();
    }
    put(&mut con, &["SET", &keys::conv_seq("dm:alice:bob"), "7"]);
    assert!(matches!(
        store
            .read(vec![ReadRequest {
                conv: "dm:alice:bob".into(),
                range: Range::Before {
                    before: None,
                    limit: 9
                }
            }])
            .await,
        Err(StoreError::Corrupt(_))
    ));

    // a counter that is not a number
    put(&mut con, &["SET", &keys::conv_seq("dm:alice:carol"), "x"]);
    assert!(matches!(
        store.append(dm("alice", "carol", "1", None)).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        read_one_result(&store, "dm:alice:carol").await,
        Err(StoreError::Corrupt(_))
    ));

    // keys of the wrong type
    put(&mut con, &["SET", &keys::user_rooms("dave"), "x"]);
    assert!(matches!(
        store.rooms_of("dave").await,
        Err(StoreError::Corrupt(_))
    ));
    put(
        &mut con,
        &["SET", &keys::idempotency("erin", "k"), "not json"],
    );
    assert!(matches!(
        store.append(dm("erin", "bob", "1", Some("k"))).await,
        Err(StoreError::Corrupt(_))
    ));
}

async fn read_one_result(store: &dyn Store, conv: &str) -> Result<Vec<Message>, StoreError> {
    store
        .read(vec![ReadRequest {
            conv: conv.into(),
            range: Range::After { after: 0, limit: 9 },
        }])
        .await
        .map(|mut pages| pages.remove(0).messages)
}

fn quick() -> RedisConfig {
    RedisConfig {
        connection_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        reconnect_retries: 1,
        max_reconnect_delay: Duration::from_millis(50),
    }
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("redis+unix://{}", dir.path().join("nobody.sock").display());
    let started = Instant::now();
    match RedisStore::connect_with(&url, StoreLimits::default(), quick()).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        RedisStore::connect("http://example.invalid", StoreLimits::default()).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// A Redis restart: calls fail as Unavailable while it is down, then the same store
/// reconnects by itself and reloads its scripts (the new server has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_redis_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect_with(&server.url, StoreLimits::default(), quick())
        .await
        .unwrap();
    store.ping().await.unwrap();
    store
        .append(dm("alice", "bob", "before", None))
        .await
        .unwrap();

    server.stop();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.append(dm("alice", "bob", "down", None)).await,
        Err(StoreError::Unavailable(_))
    ));

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(Instant::now() < deadline, "never reconnected: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the server lost everything, including the scripts: EVALSHA must reload them
    let a = store
        .append(dm("alice", "bob", "after", None))
        .await
        .unwrap();
    assert_eq!(a.message.seq, 1);
    let (log, _) = read_all(&store, "dm:alice:bob").await;
    assert_eq!(log, vec![a.message]);
}

#[tokio::test]
async fn reads_many_conversations_in_request_order() {
    let server = RedisServer::start();
    let store = flushed_store(&server.url, StoreLimits::default()).await;
    for i in 0..5 {
        store
            .append(dm("alice", &format!("u{i}"), "x", None))
            .await
            .unwrap();
        store
            .append(dm("alice", &format!("u{i}"), "y", None))
            .await
            .unwrap();
    }
    assert!(store.read(Vec::new()).await.unwrap().is_empty());
    let requests: Vec<ReadRequest> = (0..5)
        .rev()
        .map(|i| ReadRequest {
            conv: format!("dm:alice:u{i}"),
            range: if i % 2 == 0 {
                Range::After { after: 0, limit: 1 }
            } else {
                Range::Before {
                    before: None,
                    limit: 0,
                }
            },
        })
        .collect();
    let pages = store.read(requests.clone()).await.unwrap();
    let convs: Vec<&str> = pages.iter().map(|p| p.conv.as_str()).collect();
    assert_eq!(
        convs,
        requests.iter().map(|r| r.conv.as_str()).collect::<Vec<_>>()
    );
    for (page, req) in pages.iter().zip(&requests) {
        assert!(page.more, "{req:?}");
        match req.range {
            Range::After { .. } => assert_eq!(page.messages[0].body, "x"),
            Range::Before { .. } => assert!(page.messages.is_empty(), "limit 0 reads nothing"),
        }
    }
    let convs: BTreeSet<String> = store
        .conversations_of("alice")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(convs.len(), 5);
}

#[tokio::test]
async fn memory_passes_the_conformance_suite() {
    conformance::run_all(|limits| async move {
        Arc::new(chatmesh::store::memory::MemoryStore::new(limits)) as Arc<dyn Store>
    })
    .await;
}

/// How many EVALSHA calls Redis has run since its stats were reset.
fn evalsha_calls(con: &mut redis::Connection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Appends that are waiting together go to Redis in one script call, and each is
/// answered as if it had been alone: its own seq, its duplicate, its refusal, its
/// error.
#[tokio::test]
async fn concurrent_appends_share_script_calls() {
    let server = RedisServer::start();
    let store = flushed_store(&server.url, StoreLimits::default()).await;
    let mut con = server.connection();
    store.join("alice", "lobby").await.unwrap();
    store
        .append(dm("alice", "bob", "first", Some("c0")))
        .await
        .unwrap();
    // a conversation whose counter is not a number: its appends fail, alone
    let () = redis::cmd("SET")
        .arg(keys::conv_seq("dm:alice:zed"))
        .arg("x")
        .query(&mut con)
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .unwrap();

    let mut appends = Vec::new();
    for i in 0..200 {
        appends.push(room("alice", "lobby", &format!("m{i}"), None));
    }
    appends.push(dm("alice", "bob", "first again", Some("c0")));
    appends.push(room("mallory", "lobby", "not a member", None));
    appends.push(dm("alice", "zed", "to a corrupt conversation", None));
    let results =
        futures_util::future::join_all(appends.into_iter().map(|m| store.append(m))).await;

    let calls = evalsha_calls(&mut con);
    assert!(calls <= 5, "203 appends took {calls} script calls");
    let mut stored: Vec<Message> = results[..200]
        .iter()
        .map(|r| r.as_ref().unwrap().message.clone())
        .collect();
    stored.sort_by_key(|m| m.seq);
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    let dup = results[200].as_ref().unwrap();
    assert!(dup.duplicate);
    assert_eq!((dup.message.seq, dup.message.body.as_str()), (1, "first"));
    assert!(matches!(results[201], Err(StoreError::NotMember { .. })));
    assert!(matches!(results[202], Err(StoreError::Corrupt(_))));
    let (log, _) = read_all(&store, "room:lobby").await;
    assert_eq!(log, stored);
}
