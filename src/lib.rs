//! chatmesh: a distributed websocket chat server.
//!
//! A map of the crate, from the outside in:
//!
//! - [`run`] starts a node on listeners the caller bound (so tests can bind port 0) and
//!   stops it when the caller's shutdown future resolves. `main.rs` only parses settings,
//!   binds and waits for SIGTERM/SIGINT.
//! - [`config`]: settings, layered flag > environment > file > default.
//! - [`http`]: the route tables of the public and the internal listener; [`pages`]: the
//!   server-rendered pages; [`auth`]: development ids and JWTs.
//! - [`session`]: one actor per websocket; [`server`]: the ChatServer actor that knows the
//!   local sessions and rooms; [`registry`]: the plain routing table it owns;
//!   [`ratelimit`]: the per-connection token buckets.
//! - [`chat`]: the rules shared by websockets and the HTTP API: validate, store, deliver.
//! - [`store`]: the store interface with its embedded and Redis implementations.
//! - [`cluster`]: cluster mode: the ClusterBridge actor (registry heartbeat, directory,
//!   batched peer delivery) and the peer API.
//! - [`protocol`]: frames and id rules; [`keys`]: every Redis key name; [`metrics`].

pub mod auth;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod pages;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use actix_web::{web, App, HttpServer};

use crate::auth::Authenticator;
use crate::chat::Chat;
use crate::config::Settings;
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::server::{ChatServer, Shutdown};
use crate::store::memory::MemoryStore;
use crate::store::{SharedStore, StoreLimits, Timed};

/// How long shutdown waits for websockets to close before stopping the listeners.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the HTTP servers give in-flight requests when they stop.
const HTTP_SHUTDOWN_TIMEOUT_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Runs one node until `shutdown` resolves, then drains it: websockets are closed with
/// 1012, the node leaves the cluster, in-flight peer deliveries finish.
///
/// Must be called inside an actix system (`actix_web::rt::System`).
pub async fn run(
    settings: Settings,
    public: TcpListener,
    internal: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let public_addr = public.local_addr()?;
    let internal_addr = internal.local_addr()?;
    let mut settings = settings;
    if settings.advertise.is_none() {
        settings.advertise = Some(format!("http://{internal_addr}"));
    }
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let server = ChatServer::new(metrics.clone()).start();
    let limits = StoreLimits {
        history_per_conv: settings.limits.history_per_conv,
        idempotency_ttl: settings.limits.idempotency_ttl,
    };

    let (store, cluster): (SharedStore, _) = match &settings.redis_url {
        None => (
            Arc::new(Timed::new(MemoryStore::new(limits), settings.store_timeout)),
            None,
        ),
        Some(_) => {
            let (store, cluster) =
                cluster::start(settings.clone(), limits, server.clone(), metrics.clone())
                    .await
                    .map_err(|e| RunError::Cluster(e.to_string()))?;
            (store, Some(cluster))
        }
    };

    let chat = Arc::new(Chat::new(
        settings.node_id.clone(),
        store,
        server.clone(),
        cluster.clone(),
        metrics.clone(),
        settings.limits.clone(),
    ));
    let auth = Authenticator::new(settings.jwt_secret.as_deref());
    if auth.is_development() {
        log::warn!(
            "development mode: no --jwt-secret, so /ws trusts ?uid= and anyone can be anyone"
        );
    }
    let state = web::Data::new(AppState {
        chat: chat.clone(),
        settings: settings.clone(),
        auth,
        draining: AtomicBool::new(false),
    });

    let public_server = HttpServer::new({
        let state = state.clone();
        move || {
            App::new()
                .app_data(state.clone())
                .configure(http::public_routes)
        }
    })
    .listen(public)?
    .workers(settings.workers)
    .disable_signals()
    .shutdown_timeout(HTTP_SHUTDOWN_TIMEOUT_SECS)
    .run();
    let internal_server = HttpServer::new({
        let state = state.clone();
        move || {
            App::new()
                .app_data(state.clone())
                .configure(http::internal_routes)
        }
    })
    .listen(internal)?
    .workers(1)
    .disable_signals()
    .shutdown_timeout(HTTP_SHUTDOWN_TIMEOUT_SECS)
    .run();
    let public_handle = public_server.handle();
    let internal_handle = internal_server.handle();
    let public_task = actix_web::rt::spawn(public_server);
    let internal_task = actix_web::rt::spawn(internal_server);

    log::info!(
        "node {} listening on http://{public_addr} (peer API on {internal_addr}, advertised as {}, {} mode)",
        settings.node_id,
        settings.advertise.as_deref().unwrap_or_default(),
        if settings.cluster_mode() { "cluster" } else { "single-node" },
    );

    shutdown.await;

    log::info!(
        "node {} shutting down: closing websockets with 1012",
        settings.node_id
    );
    state.draining.store(true, Ordering::Relaxed);
    if let Some(cluster) = &cluster {
        cluster.deregister().await;
    }
    let sessions = server.send(Shutdown).await.unwrap_or(0);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while metrics.connections.get() > 0 && Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    log::info!(
        "closed {sessions} websockets ({} still open)",
        metrics.connections.get()
    );
    if let Some(cluster) = &cluster {
        // A round trip through the ChatServer: every disconnect it has seen has been
        // handed to the bridge before the bridge is asked to finish.
        let _ = server.send(server::Snapshot).await;
        cluster.stop().await;
    }
    public_handle.stop(true).await;
    internal_handle.stop(true).await;
    let _ = public_task.await;
    let _ = internal_task.await;
    log::info!("node {} stopped", settings.node_id);
    Ok(())
}
