//! Cluster mode on a Redis Cluster (three primaries): every directory command touches
//! one key, and pipelines go per hash slot, so the same code runs. Two chatmesh nodes on
//! it deliver across nodes, forward memberships, announce presence, and write their
//! directory again when the Redis Cluster loses its data.

mod common;

use common::postgres::PgServer;
use common::redis::RedisCluster;
use common::{cluster_settings, Client, TestNode};
use serde_json::json;

#[tokio::test]
async fn two_nodes_on_a_redis_cluster_deliver_and_recover() {
    let redis = RedisCluster::start();
    let db = PgServer::shared().fresh_database();
    let a = TestNode::start(cluster_settings(&redis.url, &db, "node-a"));
    let b = TestNode::start(cluster_settings(&redis.url, &db, "node-b"));
    let mut alice = Client::connect(&a, "alice").await;
    alice.join("lobby").await;
    let mut bob = Client::connect(&b, "bob").await;
    let mut bob_phone = Client::connect(&a, "bob").await;
    bob.join("lobby").await;
    assert_eq!(bob_phone.recv_type("joined").await["room"], "lobby");
    // direct and room messages cross nodes
    alice.direct("bob", "hi bob", "k1").await;
    assert_eq!(bob.recv_type("message").await["body"], "hi bob");
    assert_eq!(bob_phone.recv_type("message").await["body"], "hi bob");
    bob.room("lobby", "hi lobby", "k2").await;
    assert_eq!(alice.recv_type("message").await["body"], "hi lobby");
    // presence across nodes, from the directory
    alice.wait_online("bob", true).await;
    assert!(!alice.is_online("nobody").await);
    // the cluster loses its data: entries are written again, connections resync,
    // delivery goes on
    redis.flush();
    assert_eq!(bob.recv_type("resync").await, json!({"type":"resync"}));
    let s = alice.direct("bob", "after the flush", "k3").await;
    bob.recv_message_of(&s).await;
    alice.wait_online("bob", true).await;
    // the last connection closes: offline everywhere
    bob.close().await;
    bob_phone.close().await;
    alice.wait_online("bob", false).await;
}
