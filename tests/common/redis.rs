//! A private `redis-server` for one test: its own temporary directory and unix socket,
//! no TCP port, no persistence, killed when the handle is dropped.
//!
//! Tests never share a server, so they can run in parallel and flush freely. The
//! binary is `redis-server` from `PATH`, or the one named by `$REDIS_SERVER`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
const START_DEADLINE: Duration = Duration::from_secs(10);

pub struct RedisServer {
    /// `redis+unix://` URL of the socket.
    pub url: String,
    pub socket: PathBuf,
    child: Child,
    aof: bool,
    // Dropped after `child` is killed (see `Drop`), removing the socket and the log.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server and returns once it answers PING. Panics (failing the test)
    /// when it cannot be started, with the server's log in the message.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Like [`RedisServer::start`] with an append-only file fsynced on every write,
    /// so a killed and restarted server comes back with every acknowledged write.
    pub fn start_aof() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> RedisServer {
        let dir = tempfile::TempDir::new().expect("temporary directory for redis-server");
        let socket = dir.path().join("redis.sock");
        let child = spawn(dir.path(), &socket, aof);
        let mut server = RedisServer {
            url: format!("redis+unix://{}", socket.display()),
            socket,
            child,
            aof,
            dir,
        };
        server.wait_ready();
        server
    }

    /// Kills the server; its data is gone (it saves nothing). The socket path stays
    /// reserved, so [`RedisServer::restart`] brings a server back at the same URL.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Stops the server (if running) and starts one at the same URL, like a Redis
    /// restart seen by connected clients: empty, or with its data when it has an AOF.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.dir.path(), &self.socket, self.aof);
        self.wait_ready();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    /// A blocking connection, for test setup and inspection.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to test redis-server")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let client = ::redis::Client::open(self.url.as_str()).expect("redis url");
        loop {
            if let Some(status) = self.child.try_wait().expect("poll redis-server") {
                panic!(
                    "redis-server exited with {status} before answering:\n{}",
                    self.log()
                );
            }
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| ::redis::cmd("PING").query::<String>(&mut c));
            if matches!(pong.as_deref(), Ok("PONG")) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server did not answer PING within {START_DEADLINE:?} ({pong:?}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

fn spawn(dir: &Path, socket: &Path, aof: bool) -> Child {
    let binary = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    Command::new(&binary)
        .arg("--port")
        .arg("0")
        .arg("--unixsocket")
        .arg(socket)
        .arg("--unixsocketperm")
        .arg("700")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg(if aof { "yes" } else { "no" })
        .arg("--appendfsync")
        .arg("always")
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {binary:?} (is redis-server installed?): {e}"))
}

/// A private Redis Cluster of three primaries on loopback ports (a cluster needs TCP:
/// its nodes talk over a bus on port + 10000). Killed when dropped.
pub struct RedisCluster {
    /// The seed URLs, comma-separated, as `--redis-url` takes them.
    pub url: String,
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// A loopback port that is free, and whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::TempDir::new().expect("temporary directory for the cluster");
        let binary = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for i in 0..3 {
            let port = cluster_port();
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {binary:?}: {e}"));
            ports.push(port);
            children.push(child);
        }
        let cluster = RedisCluster {
            url: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            ports,
            children,
            _dir: dir,
        };
        cluster.wait(|info| info.is_some(), "answer");
        let cli = std::env::var_os("REDIS_CLI").unwrap_or_else(|| "redis-cli".into());
        let out = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli:?} (redis-tools): {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait(
            |info| info.is_some_and(|i| i.contains("cluster_state:ok")),
            "report cluster_state:ok",
        );
        cluster
    }

    /// Waits until every node's CLUSTER INFO satisfies `ok`.
    fn wait(&self, ok: impl Fn(Option<&str>) -> bool, what: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let all = self.ports.iter().all(|p| {
                let info = ::redis::Client::open(format!("redis://127.0.0.1:{p}"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                    .and_then(|mut c| ::redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .ok();
                ok(info.as_deref())
            });
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not {what} within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Empties every primary (the cluster keeps its shape).
    pub fn flush(&self) {
        for p in &self.ports {
            let mut c = ::redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                .expect("connect to a cluster node");
            let () = ::redis::cmd("FLUSHALL").query(&mut c).expect("FLUSHALL");
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
