//! The `chatmesh` binary: settings, listeners, signals. Everything else is the library.

use std::net::TcpListener;
use std::process::ExitCode;

use chatmesh::config::Settings;

/// jemalloc, not glibc's malloc: a message's life is dozens of small allocations, many
/// freed on another path than they were made, where glibc spends its time consolidating
/// and unlinking chunks (BENCHMARKS.md, "What changed for issue 12"). After a storm of
/// connections the node gives the memory back with jemalloc's purge (`chatmesh::run`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatmesh: {e}");
            return ExitCode::from(2);
        }
    };
    let bind = |what: &str, addr: &str| {
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
    };
    let listeners = bind("--listen", &settings.listen)
        .and_then(|p| Ok((p, bind("--internal-listen", &settings.internal_listen)?)));
    let (public, internal) = match listeners {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chatmesh: {e}");
            return ExitCode::from(1);
        }
    };
    let result = actix_web::rt::System::new().block_on(chatmesh::run(
        settings,
        public,
        internal,
        shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatmesh: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen for SIGTERM: {e}; only Ctrl-C will stop the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received"),
    }
}
