//! Prometheus metrics of one node (contract section 6 and more).
//!
//! Each node has its own registry rather than the process-global one, so several nodes
//! can run in one test process without mixing their numbers.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::protocol::ErrorCode;
use crate::store::WriteStats;

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_closed: IntCounter,
    pub messages_stored: IntCounter,
    pub deliveries: IntCounter,
    pub peer_posts: IntCounter,
    pub peer_messages: IntCounter,
    pub peer_batch_size: Histogram,
    pub peer_failures: IntCounter,
    pub peer_dropped: IntCounter,
    pub peer_queue_depth: IntGauge,
    pub live_peers: IntGauge,
    pub peer_received: IntCounter,
    pub errors: IntCounterVec,
    pub store_latency: Histogram,
    pub slow_consumers: IntCounter,
    pub flooders: IntCounter,
    pub resyncs: IntCounter,
    pub mailbox_full: IntCounter,
    pub outbox_dropped: IntCounter,
    store_commits: IntCounter,
    store_writes: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are constants below and unique, so registration cannot collide; if it ever
    // did, the metric still works, it is only missing from /metrics.
    if let Err(e) = registry.register(Box::new(c.clone())) {
        log::error!("metric registration failed: {e}");
    }
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            register(
                &r,
                IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{e}")),
            )
        };
        let gauge = |name: &str, help: &str| {
            register(
                &r,
                IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{e}")),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            register(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .unwrap_or_else(|e| unreachable!("{e}")),
            )
        };
        let errors = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "chatmesh_errors_total",
                    "error frames sent to clients, by code",
                ),
                &["code"],
            )
            .unwrap_or_else(|e| unreachable!("{e}")),
        );
        for code in ErrorCode::ALL {
            // Export every code from the start so that rate() works from zero.
            errors.with_label_values(&[code.as_str()]);
        }
        Metrics {
            connections: gauge("chatmesh_connections", "open websocket connections"),
            connections_closed: counter(
                "chatmesh_connections_closed_total",
                "websocket connections that ended, for any reason",
            ),
            messages_stored: counter(
                "chatmesh_messages_stored_total",
                "messages stored by this node (resends not counted)",
            ),
            deliveries: counter(
                "chatmesh_deliveries_total",
                "message frames written to websockets (live, sync and history)",
            ),
            peer_posts: counter(
                "chatmesh_peer_posts_total",
                "POST /internal/deliver requests sent to peers",
            ),
            peer_messages: counter(
                "chatmesh_peer_messages_total",
                "messages carried by POSTs to peers",
            ),
            peer_batch_size: histogram(
                "chatmesh_peer_batch_size",
                "messages per POST to a peer",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            peer_failures: counter(
                "chatmesh_peer_failures_total",
                "POSTs to peers that failed and were retried or dropped",
            ),
            peer_dropped: counter(
                "chatmesh_peer_dropped_total",
                "messages not forwarded to a dead or overloaded peer (they stay stored)",
            ),
            peer_queue_depth: gauge(
                "chatmesh_peer_queue_depth",
                "messages waiting in the outbound peer queues",
            ),
            live_peers: gauge(
                "chatmesh_live_peers",
                "other nodes in this node's live table (their heartbeat seen within the node TTL)",
            ),
            peer_received: counter(
                "chatmesh_peer_received_total",
                "messages received from peers",
            ),
            store_latency: histogram(
                "chatmesh_store_call_seconds",
                "latency of store calls made for client frames",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                    1.0, 5.0,
                ],
            ),
            slow_consumers: counter(
                "chatmesh_slow_consumers_closed_total",
                "connections closed with 1008 because they took nothing for the grace period",
            ),
            resyncs: counter(
                "chatmesh_resyncs_total",
                "resync frames written to connections (they may have missed live messages: a dropped peer batch, Redis lost, a node died, their own bound overflowed)",
            ),
            mailbox_full: counter(
                "chatmesh_mailbox_full_total",
                "messages an actor's bounded mailbox (or the directory upkeep queue) refused at once",
            ),
            outbox_dropped: counter(
                "chatmesh_outbox_dropped_total",
                "live message frames dropped for a connection over its outbound bound (it resyncs)",
            ),
            flooders: counter(
                "chatmesh_flooders_closed_total",
                "connections closed for flooding past rate_limited",
            ),
            store_commits: counter(
                "chatmesh_store_commits_total",
                "write transactions the database writer committed (SQL stores)",
            ),
            store_writes: counter(
                "chatmesh_store_writes_total",
                "writes those transactions carried: writes / commits is the group commit size",
            ),
            errors,
            registry: r,
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors.with_label_values(&[code.as_str()]).inc();
    }

    /// Brings the store's counts (kept by its writer) into the registry.
    pub fn set_write_stats(&self, stats: WriteStats) {
        for (counter, now) in [
            (&self.store_commits, stats.commits),
            (&self.store_writes, stats.writes),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::error!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
