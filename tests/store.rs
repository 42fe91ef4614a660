//! The store interface: the one conformance suite against the memory store, SQLite and
//! PostgreSQL (a private server, a fresh database per check), plus what only a real
//! database shows: several writers on one database, and a file that outlives its store.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatmesh::store::conformance::{self, dm, room};
use chatmesh::store::{self as store, Range, ReadRequest, Store, StoreLimits};
use common::postgres::PgServer;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn open(url: &str, limits: StoreLimits) -> Arc<dyn Store> {
    store::open(url, limits, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_passes_the_conformance_suite() {
    conformance::run_all(|limits| async move { open("memory:", limits).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU64::new(0);
    let dir_path = dir.path().to_owned();
    conformance::run_all(|limits| {
        let file = dir_path.join(format!("s{}.db", n.fetch_add(1, Ordering::Relaxed)));
        async move { open(&format!("sqlite://{}", file.display()), limits).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_passes_the_conformance_suite() {
    let pg = PgServer::shared();
    conformance::run_all(|limits| {
        let url = pg.fresh_database();
        async move { open(&url, limits).await }
    })
    .await;
}

/// The indexes of the two tables the append writes most: (name, access method, oid).
async fn indexes(c: &mut sqlx::PgConnection) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT c.relname::text, am.amname::text, c.oid::bigint FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam \
         WHERE i.indrelid IN ('messages'::regclass, 'idempotency'::regclass) \
         ORDER BY 1",
    )
    .fetch_all(c)
    .await
    .expect("list indexes")
}

/// A database made by the first version (migration 0001) upgrades to the BRIN indexes
/// of 0002: the B-trees that only the purge read go, and an index the operator built
/// beforehand, without locking the table (README, "Database schema"), is kept as
/// built, not built again; then the store appends and purges as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_postgres_upgrades_keeping_an_index_built_beforehand() {
    use sqlx::Connection as _;
    let url = PgServer::shared().fresh_database();
    let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"));
    let mut first = sqlx::migrate::Migrator::new(dir)
        .await
        .expect("read migrations");
    first.migrations = first
        .migrations
        .iter()
        .filter(|m| m.version == 1)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    first.run(&mut c).await.expect("migration 0001");
    let old: Vec<String> = indexes(&mut c).await.into_iter().map(|i| i.0).collect();
    assert!(
        old.contains(&"messages_ts".to_owned()) && old.contains(&"idempotency_expires".to_owned()),
        "{old:?}"
    );
    sqlx::query(
        "CREATE INDEX CONCURRENTLY messages_ts_brin ON messages USING brin (ts) \
         WITH (autosummarize = on)",
    )
    .execute(&mut c)
    .await
    .expect("build the index beforehand");
    let built = indexes(&mut c).await;

    let s = open(&url, StoreLimits::default()).await;
    let now = indexes(&mut c).await;
    let names: Vec<&str> = now.iter().map(|i| i.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "idempotency_expires_brin",
            "idempotency_pkey",
            "messages_edits",
            "messages_pkey",
            "messages_ts_brin"
        ]
    );
    for (name, method, _) in &now {
        if name.ends_with("_brin") {
            assert_eq!(method, "brin", "{name}");
        }
    }
    let oid = |list: &[(String, String, i64)]| {
        list.iter().find(|i| i.0 == "messages_ts_brin").map(|i| i.2)
    };
    assert!(oid(&built).is_some(), "{built:?}");
    assert_eq!(oid(&now), oid(&built), "the index built beforehand is kept");

    // The upgraded database serves: an append, and the purge of its client id once
    // expired (a day later), which reads the new index.
    s.append(dm("a", "b", "hi", Some("c1")))
        .await
        .expect("append");
    assert_eq!(read_all(&*s, "dm:a:b").await, vec![1]);
    let day_later = chatmesh::protocol::now_ms() + 25 * 3600 * 1000;
    let purged = s.purge(day_later).await.expect("purge");
    assert_eq!(purged.idempotency, 1);
}

async fn read_all(store: &dyn Store, conv: &str) -> Vec<u64> {
    store
        .read(vec![ReadRequest {
            conv: conv.into(),
            range: Range::After {
                after: 0,
                limit: 100_000,
            },
        }])
        .await
        .expect("read")
        .remove(0)
        .messages
        .iter()
        .map(|m| m.seq)
        .collect()
}

/// Three nodes, each with its own store (own writer, own connections), appending to
/// one room and to DMs at once: one gap-free seq per conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_writers_on_one_postgres_share_gap_free_seqs() {
    let url = PgServer::shared().fresh_database();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(open(&url, StoreLimits::default()).await);
    }
    nodes[0].join("w0", "busy").await.unwrap();
    assert_eq!(
        nodes[1].epoch(),
        nodes[0].epoch(),
        "one database, one epoch"
    );
    let mut tasks = Vec::new();
    for (n, store) in nodes.iter().enumerate() {
        for t in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let id = format!("n{n}t{t}i{i}");
                    store
                        .append(room("w0", "busy", &id, Some(&id)))
                        .await
                        .unwrap();
                    store
                        .append(dm(&format!("u{t}"), "hub", &id, None))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        read_all(&*nodes[2], "room:busy").await,
        (1..=600).collect::<Vec<u64>>()
    );
    for t in 0..4 {
        assert_eq!(
            read_all(&*nodes[1], &format!("dm:hub:u{t}")).await,
            (1..=150).collect::<Vec<u64>>()
        );
    }
}

/// Group commit: appends that wait for the writer at the same time go to the database
/// in one transaction (one fsync), each with its own seq. One at a time, 200 appends
/// would take 200 commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_waiting_together_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("g.db").display());
    let s = open(&url, StoreLimits::default()).await;
    let before = s.write_stats().expect("a SQL store counts its commits");
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let from = format!("u{}", i % 10);
                s.append(dm(&from, "hub", "x", Some(&format!("c{i}"))))
                    .await
                    .expect("append")
            })
        })
        .collect();
    let mut seqs: Vec<u64> = Vec::new();
    for t in sends {
        let appended = t.await.unwrap();
        assert!(!appended.duplicate);
        if appended.message.conv == "dm:hub:u0" {
            seqs.push(appended.message.seq);
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    for u in 0..10 {
        let conv = chatmesh::protocol::dm_conv(&format!("u{u}"), "hub");
        assert_eq!(read_all(&*s, &conv).await, (1..=20).collect::<Vec<u64>>());
    }
    let after = s.write_stats().unwrap();
    let (commits, writes) = (after.commits - before.commits, after.writes - before.writes);
    assert_eq!(writes, 200, "every append committed once");
    assert!(
        commits <= 40,
        "200 appends waiting together took {commits} commits (groups of {:.1})",
        writes as f64 / commits as f64
    );
}

/// A busy writer (its last pass carried several writes) starts its next pass no sooner
/// than `--writer-pause-ms` after it started that one, and the pass takes everything
/// that arrived meanwhile.
#[tokio::test]
async fn a_busy_writer_pauses_between_passes_as_set() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let pause = Duration::from_millis(400);
    let limits = StoreLimits {
        writer_pause: pause,
        ..StoreLimits::default()
    };
    let s = open(&url, limits).await;
    let wave = |n: usize, tag: &'static str| {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.append(dm(&format!("u{i}"), "hub", "x", Some(&format!("{tag}{i}"))))
                        .await
                        .expect("append")
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    let start = std::time::Instant::now();
    // Ten appends at once: the writer takes them in passes, the last of several.
    wave(10, "a").await;
    let before = s.write_stats().expect("a SQL store counts its commits");
    wave(10, "b").await;
    let took = start.elapsed();
    let after = s.write_stats().unwrap();
    println!("two waves of 10 appends with a {pause:?} pause: {took:?}");
    assert!(
        took >= pause,
        "the second wave was written {took:?} after the first began, within the pause"
    );
    assert_eq!(after.writes - before.writes, 10);
    assert_eq!(
        after.commits - before.commits,
        1,
        "the second wave waited out the pause together and took one pass"
    );
}

/// The same client id sent to two nodes at once is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_to_another_writer_is_stored_once() {
    let url = PgServer::shared().fresh_database();
    let a = open(&url, StoreLimits::default()).await;
    let b = open(&url, StoreLimits::default()).await;
    for i in 0..30 {
        let cid = format!("k{i}");
        let (x, y) = tokio::join!(
            a.append(dm("alice", "bob", "x", Some(&cid))),
            b.append(dm("alice", "bob", "x", Some(&cid)))
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.message.seq, y.message.seq);
        assert_eq!(x.message.id, y.message.id);
        assert!(x.duplicate != y.duplicate, "exactly one stored it");
    }
    assert_eq!(
        read_all(&*a, "dm:alice:bob").await,
        (1..=30).collect::<Vec<u64>>()
    );
}

/// A SQLite file outlives its store: the same epoch, every message, every membership,
/// and the next message takes the next seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let epoch = {
        let s = open(&url, StoreLimits::default()).await;
        s.join("alice", "lobby").await.unwrap();
        for i in 0..5 {
            s.append(room(
                "alice",
                "lobby",
                &format!("{i}"),
                Some(&format!("c{i}")),
            ))
            .await
            .unwrap();
        }
        s.epoch().to_owned()
    };
    let s = open(&url, StoreLimits::default()).await;
    assert_eq!(s.epoch(), epoch);
    assert_eq!(read_all(&*s, "room:lobby").await, vec![1, 2, 3, 4, 5]);
    let again = s
        .append(room("alice", "lobby", "resent", Some("c4")))
        .await
        .unwrap();
    assert!(again.duplicate, "client ids are remembered across restarts");
    let next = s
        .append(room("alice", "lobby", "next", None))
        .await
        .unwrap();
    assert_eq!(next.message.seq, 6);
    assert_eq!(s.rooms_of("alice").await.unwrap()[0].room, "lobby");
    // A new file is a new database, with a new epoch.
    let other = open(
        &format!("sqlite://{}", dir.path().join("other.db").display()),
        StoreLimits::default(),
    )
    .await;
    assert_ne!(other.epoch(), epoch);
}

#[tokio::test]
async fn a_bad_database_url_is_refused_clearly() {
    let err = store::open("mysql://x", StoreLimits::default(), TIMEOUT)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("sqlite://"), "{err}");
}
