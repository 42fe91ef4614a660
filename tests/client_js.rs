//! The client library (`static/chatmesh.js`) under Node, against real nodes.
//!
//! This test runs `node --test` on `tests/js/*.test.js` (node:test and the `ws` package,
//! installed by `npm ci` in `tests/js`; `.ci/test` does that). The Node tests get:
//!
//! - `CHATMESH_URL`: a node this test started (memory store), for tests that need no
//!   restarts;
//! - `CHATMESH_CONTROL`: a small HTTP API of this test, through which a Node test starts
//!   its own node processes and stops, kills and restarts them on the same port:
//!   `POST /nodes` `{"store":"memory"|"sqlite","args":[...]}` -> `{"id","url"}`,
//!   `POST /nodes/ID/stop` (SIGTERM: websockets close with 1012), `POST /nodes/ID/kill`
//!   (SIGKILL), `POST /nodes/ID/start` (again, same port and database) -> `{"url"}`.
//!
//! Nothing is skipped: without Node or without `tests/js/node_modules` the test fails
//! and says what to install.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_blocking, LoggedProcess};
use serde_json::{json, Value};

/// How long the whole Node run may take.
const NODE_RUN_LIMIT: Duration = Duration::from_secs(300);

/// One chatmesh process a Node test asked for; it can be stopped and started again on
/// the same port and database.
struct Managed {
    process: Option<LoggedProcess>,
    port: u16,
    database: String,
    args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Managed {
    /// Starts the binary on `self.port` (0 the first time: the kernel picks one).
    fn start(&mut self) -> String {
        let mut proc = LoggedProcess::spawn(
            Command::new(env!("CARGO_BIN_EXE_chatmesh"))
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--internal-listen", "127.0.0.1:0"])
                .args(["--database-url", &self.database, "--workers", "1"])
                .args(&self.args)
                .env("RUST_LOG", "warn,chatmesh=info"),
        );
        let addr = proc.public_address();
        self.port = addr.rsplit_once(':').unwrap().1.parse().unwrap();
        let base = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match http_blocking("GET", &format!("{base}/readyz"), &[], None) {
                Ok(r) if r.status == 200 => break,
                _ => {}
            }
            assert!(
                proc.child.try_wait().unwrap().is_none(),
                "node exited during start"
            );
            assert!(
                Instant::now() < deadline,
                "node at {base} never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(proc);
        base
    }

    /// SIGTERM (websockets are closed with 1012) and wait; the exit code.
    fn stop(&mut self) -> Option<i32> {
        let mut proc = self.process.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &proc.child.id().to_string()])
            .status();
        proc.child.wait().ok().and_then(|s| s.code())
    }

    fn kill(&mut self) {
        if let Some(mut proc) = self.process.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.kill();
    }
}

type Nodes = Arc<Mutex<HashMap<String, Managed>>>;

/// Stops every node when the test ends, passed or not (the control thread keeps a
/// reference to the map for as long as the process lives).
struct StopAll(Nodes);

impl Drop for StopAll {
    fn drop(&mut self) {
        if let Ok(mut nodes) = self.0.lock() {
            nodes.clear();
        }
    }
}

/// Answers one control request.
fn control(nodes: &Nodes, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut nodes = nodes.lock().unwrap();
    match (method, parts.as_slice()) {
        ("POST", ["nodes"]) => {
            let id = format!("n{}", nodes.len() + 1);
            let (database, dir) = match body["store"].as_str().unwrap_or("memory") {
                "sqlite" => {
                    let dir = tempfile::tempdir().unwrap();
                    let db = format!("sqlite://{}", dir.path().join("chat.db").display());
                    (db, Some(dir))
                }
                _ => ("memory:".to_owned(), None),
            };
            let args = body["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let mut node = Managed {
                process: None,
                port: 0,
                database,
                args,
                _dir: dir,
            };
            let url = node.start();
            nodes.insert(id.clone(), node);
            (200, json!({ "id": id, "url": url }))
        }
        ("POST", ["nodes", id, action]) => {
            let Some(node) = nodes.get_mut(*id) else {
                return (404, json!({ "error": "no such node" }));
            };
            match *action {
                "stop" => (200, json!({ "code": node.stop() })),
                "kill" => {
                    node.kill();
                    (200, json!({}))
                }
                "start" => {
                    node.stop();
                    (200, json!({ "url": node.start() }))
                }
                _ => (404, json!({ "error": "no such action" })),
            }
        }
        _ => (404, json!({ "error": "no such route" })),
    }
}

/// Reads one HTTP/1.1 request (Content-Length bodies only) and writes the answer.
fn serve(stream: TcpStream, nodes: &Nodes) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut it = line.split_whitespace();
    let (method, path) = (
        it.next().unwrap_or("").to_owned(),
        it.next().unwrap_or("").to_owned(),
    );
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, answer) = match std::panic::catch_unwind(|| control(nodes, &method, &path, &body))
    {
        Ok(a) => a,
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (500, json!({ "error": why }))
        }
    };
    let text = answer.to_string();
    let mut out = stream;
    let _ = write!(
        out,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

/// The Node test files, in name order.
fn test_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.js"))
        .collect();
    files.sort();
    files
}

#[test]
fn client_library_under_node() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let js = root.join("tests/js");
    let version = Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("these tests need Node.js 20 or later on PATH (`node`): {e}"));
    assert!(version.status.success(), "`node --version` failed");
    assert!(
        js.join("node_modules/ws").is_dir(),
        "the Node tests need their dev dependencies: run `npm ci` in {} (.ci/test does)",
        js.display()
    );

    let nodes: Nodes = Arc::default();
    let _stop_all = StopAll(nodes.clone());
    let shared = control(&nodes, "POST", "/nodes", &json!({"store": "memory"})).1;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let control_url = format!("http://{}", listener.local_addr().unwrap());
    let server_nodes = nodes.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let nodes = server_nodes.clone();
            std::thread::spawn(move || serve(stream, &nodes));
        }
    });

    let mut child = Command::new("node")
        .args(["--test", "--test-force-exit"])
        .args(test_files(&js))
        .current_dir(&js)
        .env("CHATMESH_URL", shared["url"].as_str().unwrap())
        .env("CHATMESH_CONTROL", &control_url)
        // Its own process group: a timeout ends the runner and its test processes.
        .process_group(0)
        .spawn()
        .expect("start node --test");
    let deadline = Instant::now() + NODE_RUN_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!("node --test did not finish within {NODE_RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "node --test failed ({status}); its report is above"
    );
}
