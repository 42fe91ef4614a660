//! chatmesh: a distributed websocket chat server.
//!
//! A map of the crate, from the outside in:
//!
//! - [`run`] starts a node on listeners the caller bound (so tests can bind port 0) and
//!   stops it when the caller's shutdown future resolves. `main.rs` only parses settings,
//!   binds and waits for SIGTERM/SIGINT. Both listeners share the worker threads, and the
//!   node's core is built on the first worker, beside the sockets it serves.
//! - [`config`]: settings, layered flag > environment > file > default.
//! - [`http`]: the route tables of the public and the internal listener, with the server
//!   API ([`http::api`]) and the peer API's `POST /internal/deliver` ([`http::peer`]);
//!   [`pages`]: the server-rendered pages;
//!   [`auth`]: development ids and JWTs; [`socket`]: the public listener's connections,
//!   which a session can drop.
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

use actix::{Actor, Addr};
use actix_service::{fn_service, map_config, ServiceFactoryExt as _};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::App;
use tokio::sync::oneshot;

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
///
/// Both listeners are served by the same worker threads, and the node's core (the
/// store's writer and connections, the ChatServer, the cluster's actors and Redis
/// connections) is built on the first worker (see `Boot`), so with one worker a
/// message crosses no thread on its way from one socket to another.
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
    let (report, booted) = oneshot::channel();
    let boot = Arc::new(Boot {
        settings: settings.clone(),
        metrics: metrics.clone(),
        claimed: AtomicBool::new(false),
        report: std::sync::Mutex::new(Some(report)),
        state: tokio::sync::SetOnce::new(),
    });
    let server = serve(public, internal, settings.workers, boot)?;
    let server_handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    let node = match booted.await {
        Ok(Ok(node)) => node,
        Ok(Err(e)) => {
            server_handle.stop(false).await;
            let _ = server_task.await;
            return Err(e);
        }
        // The worker that was building it ended first: the server says why.
        Err(_) => {
            server_handle.stop(false).await;
            return match server_task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(RunError::Io(std::io::Error::other(
                    "the worker building the node stopped",
                ))),
            };
        }
    };
    let Node {
        state,
        server,
        cluster,
        store,
    } = node;
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
    server_handle.stop(true).await;
    let _ = server_task.await;
    log::info!("node {} stopped", settings.node_id);
    Ok(())
}

/// What [`run`] needs of a built node to run and stop it.
struct Node {
    state: AppState,
    server: Addr<ChatServer>,
    cluster: Option<cluster::Cluster>,
    store: SharedStore,
}

/// Builds the node's core once, on the worker whose app asks first, and hands every
/// worker's app the same state. Actors, the store's writer task and the Redis and
/// database connections belong to the thread that starts them, so they share that
/// worker's thread with its sockets. (The apps are built before a worker serves
/// anything, so no request arrives before the node is ready, as when it was built
/// before the listeners started.)
struct Boot {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    claimed: AtomicBool,
    /// Where the first worker reports the result to [`run`].
    report: std::sync::Mutex<Option<oneshot::Sender<Result<Node, RunError>>>>,
    /// The state every app gets; None if the node could not be built.
    state: tokio::sync::SetOnce<Option<AppState>>,
}

impl Boot {
    /// The app state of a worker: built here by the first worker that asks.
    /// (actix-web wraps it in the `web::Data` the handlers take.)
    async fn state(self: Arc<Self>) -> Result<AppState, String> {
        if !self.claimed.swap(true, Ordering::SeqCst) {
            let built = build(self.settings.clone(), self.metrics.clone()).await;
            let _ = self.state.set(built.as_ref().ok().map(|n| n.state.clone()));
            if let Some(report) = self.report.lock().ok().and_then(|mut r| r.take()) {
                let _ = report.send(built);
            }
        }
        self.state
            .wait()
            .await
            .clone()
            .ok_or_else(|| "the node could not start (see the error above)".to_owned())
    }
}

/// Opens the store, starts the ChatServer and, in cluster mode, joins the cluster.
async fn build(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Result<Node, RunError> {
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
    let state = AppState {
        chat,
        settings,
        auth,
        draining: Arc::new(AtomicBool::new(false)),
    };
    Ok(Node {
        state,
        server,
        cluster,
        store,
    })
}

/// One server, two listeners on the same workers: the public one (every connection
/// wrapped in [`Guarded`], whose kill switch the websocket handler finds in the
/// connection data) and the internal one (the peer API).
fn serve(
    public: TcpListener,
    internal: TcpListener,
    workers: usize,
    boot: Arc<Boot>,
) -> std::io::Result<actix_server::Server> {
    let public_addr = public.local_addr()?;
    let internal_addr = internal.local_addr()?;
    let internal_boot = boot.clone();
    let builder = actix_server::Server::build();
    // On a graceful stop, idle keep-alive connections (nginx's upstream pool, the peers'
    // pooled ones) close at once instead of holding the stop for its whole timeout (as
    // HttpServer does it). It costs a connection 0.18 KiB, measured: worth a prompt stop.
    let stopping = builder.graceful_shutdown_signal();
    let internal_stopping = stopping.clone();
    Ok(builder
        .listen("chatmesh-public", public, move || {
            let boot = boot.clone();
            let app = App::new()
                .data_factory(move || boot.clone().state())
                .configure(http::public_routes);
            let stopping = stopping.clone();
            let http = actix_http::HttpService::build()
                .local_addr(public_addr)
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
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
        .listen("chatmesh-internal", internal, move || {
            let boot = internal_boot.clone();
            let app = App::new()
                .data_factory(move || boot.clone().state())
                .configure(http::internal_routes);
            let stopping = internal_stopping.clone();
            actix_http::HttpService::build()
                .local_addr(internal_addr)
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
                .finish(map_config(
                    actix_service::IntoServiceFactory::into_factory(app)
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ))
                .tcp()
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
/// Allocators keep freed memory for reuse, so after thousands of connections close the
/// process stays near its peak size although nothing leaks. When at least a hundred
/// connections, and a fifth of them, ended since the last look, [`trim`] returns the
/// free pages (it takes a few milliseconds, and only then).
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

/// Returns free memory to the system: jemalloc's (the binary's allocator: every
/// arena, whichever thread freed it) and glibc's (what C code such as SQLite allocates).
fn trim() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge" takes and gives nothing.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name and no buffers, as this mallctl requires. Where
    // jemalloc is not the global allocator (tests in this process) its arenas are
    // empty and the purge does nothing.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        log::debug!("jemalloc purge failed (error {rc})");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
