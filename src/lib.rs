//! chatmesh: a distributed websocket chat server.
//!
//! A map of the crate, from the outside in:
//!
//! - [`run`] starts a node on listeners the caller bound (so tests can bind port 0) and
//!   stops it when the caller's shutdown future resolves. `main.rs` only parses settings,
//!   binds and waits for SIGTERM/SIGINT.
//! - [`config`]: settings, layered flag > environment > file > default.
//! - [`http`]: the route tables of the public and the internal listener; [`pages`]: the
//!   server-rendered pages; [`auth`]: development ids and JWTs; [`socket`]: the public
//!   listener's connections, which a session can drop.
//! - [`session`]: one actor per websocket, and its wire format ([`session::wire`]);
//!   [`outbox`]: each connection's bounded outbound queue; [`server`]: the ChatServer
//!   actor that knows the local sessions and rooms; [`registry`]: the plain routing table
//!   it owns; [`ratelimit`]: the per-connection token buckets.
//! - [`chat`]: the rules shared by websockets and the HTTP API: validate, store, deliver.
//! - [`store`]: the store of record (SQLite, PostgreSQL, memory) behind one interface.
//! - [`cluster`]: cluster mode: the Redis registry and directory, the ClusterBridge actor
//!   (heartbeats, batched peer delivery) and the peer API.
//! - [`protocol`]: frames and id rules; [`keys`]: every Redis key name; [`metrics`].

pub mod auth;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod pages;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod session;
pub mod socket;
pub mod store;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use actix_service::{fn_service, map_config, ServiceFactoryExt as _};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::{web, App, HttpServer};

use crate::auth::Authenticator;
use crate::chat::Chat;
use crate::config::Settings;
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::server::{ChatServer, Shutdown};
use crate::socket::Guarded;
use crate::store::{SharedStore, StoreError};

/// How long shutdown waits for websockets to close before stopping the listeners.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the HTTP servers give in-flight requests when they stop.
const HTTP_SHUTDOWN_TIMEOUT_SECS: u64 = 5;
/// How often expired idempotency records and (with a retention) old messages go.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// How often the node looks whether connections went away in numbers.
const TRIM_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Store(StoreError),
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
}

/// Runs one node until `shutdown` resolves, then drains it: websockets are closed with
/// 1012, the directory and the peers are told, the node leaves the cluster.
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
    let store = store::open(
        &settings.database_url,
        settings.store,
        settings.store_timeout,
    )
    .await
    .map_err(RunError::Store)?;
    let server = ChatServer::new(metrics.clone(), settings.limits.live_room_size).start();
    let cluster = match &settings.redis_url {
        None => None,
        Some(_) => Some(
            cluster::start(
                settings.clone(),
                store.clone(),
                server.clone(),
                metrics.clone(),
            )
            .await?,
        ),
    };

    let chat = Arc::new(Chat::new(
        settings.node_id.clone(),
        store.clone(),
        server.clone(),
        cluster.clone(),
        metrics.clone(),
        settings.limits.clone(),
        settings.store_timeout,
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

    let public_server = serve_public(public, settings.workers, state.clone())?;
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
    let purge_task = actix_web::rt::spawn(purge(store.clone()));
    let trim_task = actix_web::rt::spawn(return_memory(metrics.clone()));

    log::info!(
        "node {} listening on http://{public_addr} (peer API on {internal_addr}, advertised as {}, {} mode, epoch {})",
        settings.node_id,
        settings.advertise.as_deref().unwrap_or_default(),
        if settings.cluster_mode() { "cluster" } else { "single-node" },
        store.epoch(),
    );

    shutdown.await;

    log::info!(
        "node {} shutting down: closing websockets with 1012",
        settings.node_id
    );
    state.draining.store(true, Ordering::Relaxed);
    purge_task.abort();
    trim_task.abort();
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
        // Sessions first (their users' offline presence goes out), then the peer
        // deliveries and directory writes under way, then leave the registry. The round
        // trip through the ChatServer makes sure every disconnect it was sent has been
        // handed to the directory upkeep before the bridge is asked whether it is done.
        let _ = server.send(server::LocalOnline { uids: Vec::new() }).await;
        cluster.drain().await;
        cluster.deregister().await;
        cluster.stop().await;
    }
    public_handle.stop(true).await;
    internal_handle.stop(true).await;
    let _ = public_task.await;
    let _ = internal_task.await;
    log::info!("node {} stopped", settings.node_id);
    Ok(())
}

/// The public listener: every connection wrapped in [`Guarded`], whose kill switch the
/// websocket handler finds in the connection data.
fn serve_public(
    listener: TcpListener,
    workers: usize,
    state: web::Data<AppState>,
) -> std::io::Result<actix_server::Server> {
    let addr = listener.local_addr()?;
    Ok(actix_server::Server::build()
        .listen("chatmesh-public", listener, move || {
            let app = App::new()
                .app_data(state.clone())
                .configure(http::public_routes);
            let http = actix_http::HttpService::build()
                .local_addr(addr)
                .on_connect_ext(|io: &Guarded, ext: &mut Extensions| {
                    ext.insert(io.switch());
                })
                .finish(map_config(
                    actix_service::IntoServiceFactory::into_factory(app)
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ));
            fn_service(|io: tokio::net::TcpStream| async move {
                let peer = io.peer_addr().ok();
                // Chat frames are small and latency matters more than packing them.
                let _ = io.set_nodelay(true);
                Ok::<_, actix_http::error::DispatchError>((
                    Guarded::new(io),
                    actix_http::Protocol::Http1,
                    peer,
                ))
            })
            .and_then(http)
        })?
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(HTTP_SHUTDOWN_TIMEOUT_SECS)
        .run())
}

/// Purges expired idempotency records and, with a retention, old messages.
async fn purge(store: SharedStore) {
    loop {
        actix_web::rt::time::sleep(PURGE_EVERY).await;
        match store.purge(protocol::now_ms()).await {
            Ok(p) if p.messages + p.idempotency > 0 => log::info!(
                "purged {} messages past the retention and {} expired client ids",
                p.messages,
                p.idempotency
            ),
            Ok(_) => {}
            Err(e) => log::warn!("purge failed, will retry: {e}"),
        }
    }
}

/// Gives memory back to the system after a storm of connections went away.
///
/// glibc keeps freed memory in its arenas for reuse, so after thousands of connections
/// close the process stays at its peak size although nothing leaks. When at least a
/// hundred connections, and a fifth of them, ended since the last look, `malloc_trim`
/// returns the free pages (it takes a few milliseconds, and only then).
async fn return_memory(metrics: Arc<Metrics>) {
    let mut closed_before = metrics.connections_closed.get();
    loop {
        actix_web::rt::time::sleep(TRIM_EVERY).await;
        let closed = metrics.connections_closed.get() - closed_before;
        let open = metrics.connections.get().max(0) as u64;
        if closed >= 100 && closed * 5 >= open + closed {
            trim();
            log::debug!("{closed} connections ended ({open} open): returned free memory");
            closed_before += closed;
        } else if closed >= 100 {
            closed_before += closed;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
