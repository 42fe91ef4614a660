//! A private PostgreSQL for tests: `initdb` into a temporary directory and `postgres`
//! listening on a unix socket there only (`listen_addresses=''`), never on a port.
//!
//! [`PgServer::shared`] is one server per test binary, from which every test takes a
//! fresh database ([`PgServer::fresh_database`]), so tests never share state. A test
//! that freezes or kills the server starts its own with [`PgServer::start`].
//!
//! Binaries come from `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`. PostgreSQL
//! will not run as root, so as root the server runs as the `postgres` user (which the
//! Debian package creates). The shared server is told to quit when the test process
//! ends (`PR_SET_PDEATHSIG`); leftovers of killed runs are removed at the next start.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;

const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct PgServer {
    pub dir: PathBuf,
    child: Child,
    owns_dir: bool,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(1);

/// The directory holding PostgreSQL's programs.
pub fn bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.join("postgres").exists());
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().expect(
        "no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql, or set PG_BIN)",
    )
}

/// (uid, gid) to run the server as: the `postgres` user when we are root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "running as root needs a postgres user to run PostgreSQL as"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn chown(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown for postgres");
    }
}

fn scratch_root() -> PathBuf {
    let root = std::env::temp_dir().join("chatmesh-test-pg");
    std::fs::create_dir_all(&root).expect("scratch dir");
    chown(&root);
    root
}

/// Removes directories of servers whose test process is gone.
fn remove_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> = name.split('-').nth(1).and_then(|p| p.parse().ok());
        // SAFETY: kill with signal 0 only checks whether the process exists.
        if let Some(pid) = pid {
            if unsafe { libc::kill(pid, 0) } != 0 {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl PgServer {
    /// The server shared by the tests of this binary.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            // The thread that spawns a child with PR_SET_PDEATHSIG must outlive the
            // tests: the signal fires when that thread ends. So spawn from a thread
            // that never ends.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(PgServer::spawn(true));
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("postgres spawner thread")
        })
    }

    /// A server of this test's own (dropped: killed and removed).
    pub fn start() -> PgServer {
        PgServer::spawn(false)
    }

    fn spawn(shared: bool) -> PgServer {
        let root = scratch_root();
        remove_leftovers(&root);
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = root.join(format!(
            "pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("server dir");
        chown(&dir);
        let bin = bin_dir();
        let data = dir.join("data");
        let out = as_server_user(Command::new(bin.join("initdb")).args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
            "-D",
        ]))
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let child = launch(&dir, shared);
        let mut server = PgServer {
            dir,
            child,
            owns_dir: true,
        };
        server.wait_ready();
        server
    }

    /// A URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}",
            self.dir.display()
        )
    }

    /// Creates an empty database and answers its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let url = self.url("postgres");
        let sql = format!("CREATE DATABASE {name}");
        on_own_runtime(move || async move {
            let mut c = sqlx::PgConnection::connect(&url)
                .await
                .expect("connect to the test postgres");
            sqlx::query(&sql)
                .execute(&mut c)
                .await
                .expect("create database");
        });
        self.url(&name)
    }

    /// Freezes the server and every backend (SIGSTOP): connections stay open, nothing
    /// is answered. Backends are the postmaster's children, each in a session of its
    /// own, so they are signalled one by one (the postmaster first: it forks no more).
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
        for pid in children(self.child.id()) {
            signal(pid, "STOP");
        }
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        for pid in children(self.child.id()) {
            signal(pid, "CONT");
        }
        signal(self.child.id(), "CONT");
    }

    /// Stops the server (fast shutdown: every connection is closed) and starts it again
    /// on the same data; returns once it accepts connections.
    pub fn restart(&mut self) {
        self.resume();
        signal(self.child.id(), "INT");
        let _ = self.child.wait();
        self.child = launch(&self.dir, false);
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll postgres") {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            let url = self.url("postgres");
            let ok = on_own_runtime(move || async move {
                tokio::time::timeout(Duration::from_secs(1), sqlx::PgConnection::connect(&url))
                    .await
                    .is_ok_and(|c| c.is_ok())
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within {START_DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts `postgres` on the cluster in `dir/data`, its socket in `dir`.
fn launch(dir: &Path, shared: bool) -> Child {
    let bin = bin_dir();
    let data = dir.join("data");
    let mut cmd = Command::new(bin.join("postgres"));
    as_server_user(&mut cmd)
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=", "-c", "fsync=off"])
        .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("server.log"))
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        );
    if shared {
        // SAFETY: prctl is async-signal-safe; it only sets the parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
    }
    cmd.spawn().expect("run postgres")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate shutdown; a paused server must be thawed to hear it.
        self.resume();
        signal(self.child.id(), "QUIT");
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a future to completion on a thread and runtime of its own, so setup code works
/// the same from a test's runtime and from plain threads.
pub fn on_own_runtime<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
    .join()
    .expect("setup thread panicked")
}

/// The processes whose parent is `parent` (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
