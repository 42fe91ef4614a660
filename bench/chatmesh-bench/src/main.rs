//! chatmesh-bench: a load generator for chatmesh and, for comparison, a Socket.IO 4
//! server (bench/peers/socketio). It speaks both protocols, so one client measures both.
//!
//! Scenarios: `direct` (users in pairs, each pair across two nodes), `room` (rooms of many
//! members with a few senders), `idle` (many quiet connections: connect rate and server
//! memory per connection). Every message carries its sender, sequence number and send
//! time in its body; every receiver checks that each message it should get arrives exactly
//! once, and the end-to-end latency goes into an HDR histogram. `compare` turns the JSON
//! files of several runs into a side-by-side table.
//!
//! Exit codes: 0 pass; 1 lost, duplicated or unexpected deliveries, refused sends or
//! dropped connections; 2 setup error; 3 delivered everything but missed the latency
//! bound (`--max-p99-ms`) or could not send at the offered rate.

mod client;
mod report;
mod scenario;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::System;
use crate::stats::Proc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "chatmesh-bench",
    version,
    about = "Load generator for chatmesh and a Socket.IO peer: throughput, end-to-end latency, loss and memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Users in pairs (each pair's two users on different targets), both sending to each other.
    Direct {
        #[command(flatten)]
        common: Common,
        /// Number of users (rounded up to even)
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Messages per second per sender
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// Rooms of many members spread over the targets, a few senders per room.
    Room {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Members per room
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Senders per room (the first members)
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages per second per sender
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Open many connections, hold them, report connect rate and server RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Seconds to hold the connections after they are all open
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
    },
    /// Side-by-side table (markdown) of the JSON files of several runs, grouped by label;
    /// of several runs with one label and system, the best passing one counts.
    Compare {
        /// JSON files written by --json
        files: Vec<PathBuf>,
        /// The system in the ratio's numerator
        #[arg(long, value_enum, default_value_t = System::Chatmesh)]
        numerator: System,
    },
}

/// Settings shared by the scenarios.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Which protocol the targets speak
    #[arg(long, value_enum)]
    pub system: System,
    /// Websocket base URLs of the nodes (ws://127.0.0.1:PORT), comma-separated; only loopback
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<String>,
    /// Seconds of measurement (after the warm-up)
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Seconds of sending before the measurement window (checked, not timed)
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to wait for outstanding deliveries after sending stops
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Seconds allowed for each connect, handshake and join
    #[arg(long, default_value_t = 15.0)]
    pub timeout: f64,
    /// Connections being opened at once
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Message body size in bytes (at least the header `sender|seq|nanos|`)
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// A server process to watch (CPU, RSS): PID or NAME=PID; repeatable. Its CPU
    /// includes its child processes' (e.g. PostgreSQL's backends); RSS is its own
    #[arg(long = "pid")]
    pub pids: Vec<Proc>,
    /// Label of this run in `compare` (default: the scenario)
    #[arg(long)]
    pub label: Option<String>,
    /// Latency bound: a p99 above it exits 3 (used to find the sustainable rate)
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, ...; 0: let
    /// the kernel choose), so tens of thousands of connections do not exhaust one
    /// address's ephemeral ports
    #[arg(long, default_value_t = 8)]
    pub source_addrs: usize,
    /// Runtime worker threads (0: one per CPU)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Prefix of user and room ids (default: random, so runs never share state)
    #[arg(long)]
    pub run_id: Option<String>,
    /// Shell command run, and waited for (60 s at most), when the window opens, e.g. to
    /// switch a profiler on (bench/instructions.sh); the report counts what was sent
    /// and delivered from its end to the start of --at-window-end
    #[arg(long)]
    pub at_window_start: Option<String>,
    /// Shell command run, and waited for, when the window closes (sending stops)
    #[arg(long)]
    pub at_window_end: Option<String>,
}

fn write_json(path: &Option<PathBuf>, value: &impl serde::Serialize) -> Result<(), BoxError> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

fn run_id(common: &Common) -> Result<String, BoxError> {
    let id = common
        .run_id
        .clone()
        .unwrap_or_else(|| format!("b{:06x}", rand::random::<u32>() & 0xff_ffff));
    // Ids must stay valid (1..64 of A-Za-z0-9_.-) with the suffixes added.
    if id.len() > 40 || !chatmesh::protocol::valid_id(&id) {
        return Err(format!("--run-id {id:?}: use up to 40 of A-Z a-z 0-9 _ . -").into());
    }
    Ok(id)
}

fn real_main() -> Result<ExitCode, BoxError> {
    let cli = Cli::parse();
    let (common, scenario) = match cli.command {
        Command::Compare { files, numerator } => {
            print!("{}", report::compare(&files, numerator)?);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Direct { ref common, .. }
        | Command::Room { ref common, .. }
        | Command::Idle { ref common, .. } => (common.clone(), cli.command),
    };
    let targets = common
        .targets
        .iter()
        .map(|t| client::normalise_target(t))
        .collect::<Result<Vec<_>, _>>()?;
    for p in &common.pids {
        if !std::path::Path::new(&format!("/proc/{}", p.pid)).exists() {
            return Err(format!("--pid {}: no such process", p.pid).into());
        }
    }
    if common.body_bytes > 4000 {
        return Err("--body-bytes: at most 4000 (chatmesh's default body limit is 4096)".into());
    }
    let run = run_id(&common)?;
    let rt = runtime(common.threads)?;
    let system = common.system;
    match scenario {
        Command::Direct { users, rate, .. } => {
            let plan = scenario::direct_plan(&run, users, targets.len());
            let r = rt.block_on(scenario::run_load(
                "direct", system, &targets, plan, rate, &common,
            ))?;
            scenario::print_load(&r);
            write_json(&common.json, &r)?;
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            Ok(load_exit(&r))
        }
        Command::Room {
            rooms,
            members,
            senders,
            rate,
            ..
        } => {
            let plan = scenario::room_plan(&run, rooms.max(1), members, senders, targets.len());
            let r = rt.block_on(scenario::run_load(
                "room", system, &targets, plan, rate, &common,
            ))?;
            scenario::print_load(&r);
            write_json(&common.json, &r)?;
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            Ok(load_exit(&r))
        }
        Command::Idle {
            connections, hold, ..
        } => {
            let r = rt.block_on(scenario::run_idle(
                system,
                &targets,
                connections,
                hold.clamp(0.0, 3600.0),
                &run,
                &common,
            ))?;
            scenario::print_idle(&r);
            write_json(&common.json, &r)?;
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            Ok(if r.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Compare { .. } => unreachable!("handled above"),
    }
}

fn load_exit(r: &scenario::LoadReport) -> ExitCode {
    if !r.failures.is_empty() {
        ExitCode::from(1)
    } else if !r.slo_misses.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chatmesh-bench: {e}");
            ExitCode::from(2)
        }
    }
}
