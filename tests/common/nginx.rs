//! A private nginx in front of test nodes, rendered from `nginx/chatmesh.conf.template`
//! (the same file operators use), so tests exercise the shipped configuration.
//!
//! Each instance has its own temporary directory (config, pid file, logs, temp paths)
//! and its own port on 127.0.0.1; it runs in the foreground (`-g 'daemon off;'`) and is
//! stopped with SIGTERM when the handle is dropped. The binary is `/usr/sbin/nginx`, or
//! the one named by `$NGINX`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long nginx may take to start and answer /healthz through to a node.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long nginx may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// How much of each log a failure message quotes.
const PANIC_LOG_LINES: usize = 30;
/// Fresh ports to try when another process takes ours between choosing and binding.
const PORT_ATTEMPTS: usize = 5;

pub const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/chatmesh.conf.template");

pub struct Nginx {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// `ws://127.0.0.1:PORT/ws`
    pub ws: String,
    pub addr: SocketAddr,
    child: Child,
    // Removed after the process has exited (see `Drop`).
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in front of these node public listeners and returns once GET
    /// /healthz through it answers 200. Panics (failing the test) with nginx's logs
    /// when it cannot be started.
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        assert!(
            !upstreams.is_empty(),
            "nginx needs at least one upstream node"
        );
        let template = std::fs::read_to_string(TEMPLATE)
            .unwrap_or_else(|e| panic!("cannot read {TEMPLATE}: {e}"));
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match Nginx::try_start(&template, upstreams) {
                Ok(n) => return n,
                Err(Failure::PortTaken(log)) => last_failure = log,
                Err(Failure::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("nginx could not bind a free port in {PORT_ATTEMPTS} attempts:\n{last_failure}");
    }

    fn try_start(template: &str, upstreams: &[SocketAddr]) -> Result<Nginx, Failure> {
        let dir = tempfile::Builder::new()
            .prefix("chatmesh-nginx.")
            .tempdir()
            .expect("temporary directory for nginx");
        let prefix = dir.path();
        for sub in ["logs", "temp"] {
            std::fs::create_dir(prefix.join(sub)).expect("nginx runtime subdirectory");
        }
        let addr = free_port();
        let conf = render(
            template,
            &addr.to_string(),
            prefix,
            upstreams,
            running_as_root(),
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");

        let binary = nginx_binary();
        // Errors before the config's error_log is open go to stderr: keep them.
        let stderr = File::create(prefix.join("stderr.log")).expect("nginx stderr log");
        let mut prefix_arg = prefix.as_os_str().to_owned();
        prefix_arg.push("/");
        let child = Command::new(&binary)
            .arg("-p")
            .arg(prefix_arg)
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                Failure::Fatal(format!(
                    "cannot run {} (is nginx installed? set $NGINX): {e}",
                    binary.display()
                ))
            })?;
        let mut nginx = Nginx {
            base: format!("http://{addr}"),
            ws: format!("ws://{addr}/ws"),
            addr,
            child,
            dir,
        };
        nginx.wait_ready()?;
        Ok(nginx)
    }

    /// Polls until the port accepts connections and GET /healthz through nginx is 200.
    fn wait_ready(&mut self) -> Result<(), Failure> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(status) = self.child.try_wait().expect("poll nginx") {
                let logs = self.logs(PANIC_LOG_LINES);
                return Err(if logs.contains("Address already in use") {
                    Failure::PortTaken(logs)
                } else {
                    Failure::Fatal(format!(
                        "nginx exited with {status} during start ({last}):\n{logs}"
                    ))
                });
            }
            match get_status(self.addr, "/healthz") {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("GET /healthz through nginx: {code}"),
                Err(e) => last = format!("GET /healthz through nginx: {e}"),
            }
            if Instant::now() > deadline {
                return Err(Failure::Fatal(format!(
                    "nginx not ready within {START_DEADLINE:?} ({last}):\n{}",
                    self.logs(PANIC_LOG_LINES)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The websocket URL of `uid` through nginx (development mode).
    pub fn ws_url(&self, uid: &str) -> String {
        format!("{}?uid={uid}", self.ws)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The error log (including anything nginx wrote to stderr).
    pub fn error_log(&self) -> String {
        self.logs(usize::MAX)
    }

    /// The access log: one line per request, with `upstream=<node address>`.
    pub fn access_log(&self) -> String {
        read(&self.dir.path().join("logs/access.log"))
    }

    /// The rendered configuration.
    pub fn config(&self) -> String {
        read(&self.dir.path().join("nginx.conf"))
    }

    /// stderr and the error log, each cut to its last `lines` lines.
    fn logs(&self, lines: usize) -> String {
        let p = self.dir.path();
        format!(
            "--- nginx stderr ---\n{}--- {} ---\n{}",
            tail(&read(&p.join("stderr.log")), lines),
            p.join("logs/error.log").display(),
            tail(&read(&p.join("logs/error.log")), lines),
        )
    }

    /// Stops nginx (SIGTERM, then SIGKILL after a deadline) and waits for it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        // `dir` is removed when the field is dropped, after this.
    }
}

enum Failure {
    /// Someone else bound the port between `free_port` and nginx's bind: try another.
    PortTaken(String),
    Fatal(String),
}

/// Fills in the template's placeholders; see the header of the template.
pub fn render(
    template: &str,
    listen: &str,
    prefix: &Path,
    upstreams: &[SocketAddr],
    as_root: bool,
) -> String {
    let prefix = prefix.to_str().expect("UTF-8 temporary path");
    assert!(
        !prefix.contains(|c: char| c.is_whitespace() || ";{}'\"$".contains(c)),
        "nginx prefix {prefix:?} would need quoting"
    );
    let user = if as_root { "user root;" } else { "" };
    let mut out = String::with_capacity(template.len() + 64 * upstreams.len());
    for line in template.lines() {
        if let Some((indent, _)) = line.split_once("@UPSTREAM_SERVERS@") {
            for u in upstreams {
                out.push_str(&format!(
                    "{indent}server {u} max_fails=1 fail_timeout=2s;\n"
                ));
            }
            continue;
        }
        let line = line
            .replace("@USER_DIRECTIVE@", user)
            .replace("@PREFIX@", prefix)
            .replace("@LISTEN@", listen);
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(name) = leftover_placeholder(&out) {
        panic!("unknown placeholder @{name}@ in {TEMPLATE}");
    }
    out
}

/// The first `@NAME@` (upper case and `_`) left in the text, if any.
fn leftover_placeholder(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(start) = rest.find('@') {
        rest = &rest[start + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .unwrap_or(rest.len());
        if len > 0 && rest[len..].starts_with('@') {
            return Some(&rest[..len]);
        }
    }
    None
}

fn nginx_binary() -> PathBuf {
    std::env::var_os("NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// A root master starts its workers as `nobody`, which cannot enter the private
/// temporary directory: then the template gets `user root;`. The owner of
/// /proc/self is this process's effective uid (std only, no libc).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A port that was free a moment ago (nginx binds it next; a lost race is retried).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address")
}

/// The status of a GET through nginx, or an error if there is no HTTP answer.
fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    stream.read_to_end(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

/// The last `n` lines of `text`, each ending in a newline.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    for l in &lines[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
