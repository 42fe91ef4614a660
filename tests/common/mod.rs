//! Test harness: nodes on port 0 in their own actix system, a websocket client that
//! speaks only the contract, a tiny HTTP client, and (in submodules) redis-server and
//! headless Chromium.
#![allow(dead_code)]

pub mod browser;
pub mod nginx;
pub mod postgres;
pub mod redis;

use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chatmesh::config::Settings;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Settings for a test node: the memory store, one worker.
pub fn settings() -> Settings {
    Settings {
        workers: 1,
        database_url: "memory:".into(),
        ..Settings::default()
    }
}

/// A node running in its own thread and actix system, on 127.0.0.1 port 0.
pub struct TestNode {
    pub base: String,
    pub ws: String,
    pub internal: String,
    pub node_id: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), chatmesh::RunError>>>,
}

impl TestNode {
    pub fn start(settings: Settings) -> TestNode {
        let _ = env_logger::builder().is_test(true).try_init();
        let public = TcpListener::bind("127.0.0.1:0").expect("bind public");
        let internal = TcpListener::bind("127.0.0.1:0").expect("bind internal");
        let public_addr = public.local_addr().unwrap();
        let internal_addr = internal.local_addr().unwrap();
        let node_id = settings.node_id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(chatmesh::run(
                settings,
                public,
                internal,
                async {
                    let _ = rx.await;
                },
            ))
        });
        let node = TestNode {
            base: format!("http://{public_addr}"),
            ws: format!("ws://{public_addr}/ws"),
            internal: format!("http://{internal_addr}"),
            node_id,
            shutdown: Some(tx),
            thread: Some(thread),
        };
        node.wait_ready();
        node
    }

    /// Polls /readyz until 200, with a deadline.
    pub fn wait_ready(&self) {
        let exited = || self.thread.as_ref().is_some_and(|t| t.is_finished());
        wait_ready(&self.base, &self.node_id, exited);
    }

    pub fn ws_url(&self, uid: &str) -> String {
        format!("{}?uid={uid}", self.ws)
    }

    /// Graceful shutdown; returns what `run` returned.
    pub fn stop(mut self) -> Result<(), chatmesh::RunError> {
        self.stop_inner().expect("node already stopped")
    }

    fn stop_inner(&mut self) -> Option<Result<(), chatmesh::RunError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let thread = self.thread.take()?;
        Some(thread.join().expect("node thread panicked"))
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_at(&self.base, name)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Polls `base`/readyz until 200, failing after [`WAIT`] or when `exited()` says the
/// node is gone.
fn wait_ready(base: &str, node_id: &str, exited: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http_blocking("GET", &format!("{base}/readyz"), &[], None) {
            if r.status == 200 {
                return;
            }
        }
        assert!(!exited(), "node {node_id} exited during start");
        assert!(
            Instant::now() < deadline,
            "node {node_id} never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of a metric line `name value` (name may include labels).
/// The value of metric `name` on the node whose public listener is `base`.
pub fn metric_at(base: &str, name: &str) -> f64 {
    metric_value(
        &http_blocking("GET", &format!("{base}/metrics"), &[], None)
            .unwrap()
            .body,
        name,
    )
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `http://HOST/PATH` as (HOST, /PATH).
fn split_url(url: &str) -> (&str, String) {
    let rest = url.strip_prefix("http://").expect("http:// url");
    rest.split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")))
}

/// A minimal HTTP/1.1 client (Connection: close), enough for tests.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let (host, path) = split_url(url);
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(host)).await??;
    stream
        .write_all(request_text(method, host, &path, headers, body).as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await??;
    Ok(parse_response(&raw))
}

/// POSTs `batch` to the peer API of the node whose internal listener is `internal`,
/// with the test cluster secret, as a peer would.
pub async fn post_to_peer_api(internal: &str, batch: &str) -> HttpResponse {
    http(
        "POST",
        &format!("{internal}/internal/deliver"),
        &[("Authorization", "Bearer test-cluster-secret")],
        Some(batch),
    )
    .await
    .unwrap()
}

fn request_text(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
    } else if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    req
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// [`http`] from synchronous code (plain std I/O, so it works inside or outside a runtime).
pub fn http_blocking(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let (host, path) = split_url(url);
    let addr: std::net::SocketAddr = host.parse().map_err(std::io::Error::other)?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(request_text(method, host, &path, headers, body).as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(parse_response(&raw))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A websocket client that speaks only the contract.
pub struct Client {
    pub uid: String,
    pub welcome: Value,
    ws: Ws,
}

impl Client {
    /// Connects as `uid` (development mode) and reads the welcome.
    pub async fn connect(node: &TestNode, uid: &str) -> Client {
        Client::connect_url(&node.ws_url(uid), uid).await
    }

    pub async fn connect_url(url: &str, uid: &str) -> Client {
        let mut c = Client::open(url, uid).await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        assert_eq!(welcome["uid"], uid);
        c.welcome = welcome;
        c
    }

    /// Connects as `uid` where the server is expected to close the websocket instead
    /// of welcoming it; returns the close code and the frames before it.
    pub async fn connect_refused(node: &TestNode, uid: &str) -> (Option<CloseCode>, Vec<Value>) {
        Client::open(&node.ws_url(uid), uid)
            .await
            .expect_close()
            .await
    }

    /// The websocket, upgraded, before anything is read from it.
    async fn open(url: &str, uid: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client {
            uid: uid.to_owned(),
            welcome: Value::Null,
            ws,
        }
    }

    /// The next frame whose type is one of `types`.
    pub async fn recv_type_of(&mut self, types: &[&str]) -> Value {
        loop {
            let v = self.recv().await;
            if types.iter().any(|t| v["type"] == *t) {
                return v;
            }
        }
    }

    /// Connects with a small socket receive buffer, for slow-consumer tests.
    pub async fn connect_with_rcvbuf(node: &TestNode, uid: &str, rcvbuf: u32) -> Client {
        let addr: std::net::SocketAddr = node.base.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .unwrap()
            .unwrap();
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(node.ws_url(uid), MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("handshake timed out")
        .expect("handshake");
        let mut c = Client {
            uid: uid.to_owned(),
            welcome: Value::Null,
            ws,
        };
        c.welcome = c.recv().await;
        assert_eq!(c.welcome["type"], "welcome");
        c
    }

    /// Writes raw bytes to the TCP stream under the websocket (to send what a
    /// well-behaved client library would not: bad headers, bad UTF-8).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(s) => tokio::time::timeout(WAIT, s.write_all(bytes))
                .await
                .map_err(|_| std::io::Error::other("write timed out"))?,
            _ => unreachable!("tests use plain TCP"),
        }
    }

    /// The kernel's TCP state of this connection (1 = ESTABLISHED, 7 = CLOSE after a
    /// reset, 8 = CLOSE_WAIT after the server's FIN).
    pub fn tcp_state(&self) -> u8 {
        use std::os::fd::AsRawFd;
        let fd = match self.ws.get_ref() {
            MaybeTlsStream::Plain(s) => s.as_raw_fd(),
            _ => unreachable!("tests use plain TCP"),
        };
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
        unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let r = libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut libc::tcp_info as *mut libc::c_void,
                &mut len,
            );
            assert_eq!(r, 0, "getsockopt(TCP_INFO)");
            info.tcpi_state
        }
    }

    pub async fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        match tokio::time::timeout(WAIT, self.ws.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    /// A frame if one is already waiting, without blocking.
    pub async fn try_recv(&mut self) -> Option<Value> {
        match tokio::time::timeout(Duration::from_millis(1), self.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str(&t).ok(),
            _ => None,
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Sends a frame; an error (the server closed the connection) is returned.
    pub async fn try_send_raw(&mut self, m: Message) -> Result<(), String> {
        match tokio::time::timeout(WAIT, self.ws.send(m)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    pub async fn send_raw(&mut self, m: Message) {
        tokio::time::timeout(WAIT, self.ws.send(m))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// The next JSON frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(v) => v,
            Event::Closed(c) => panic!(
                "{}: connection closed ({c:?}) while waiting for a frame",
                self.uid
            ),
        }
    }

    /// The next frame of this type, skipping others (e.g. presence events).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
            assert!(Instant::now() < deadline, "{}: no {ty} frame", self.uid);
        }
    }

    /// The `message` frame of the message `sent` answered (same `conv` and `seq`),
    /// skipping every frame before it.
    pub async fn recv_message_of(&mut self, sent: &Value) -> Value {
        loop {
            let m = self.recv_type("message").await;
            if m["conv"] == sent["conv"] && m["seq"] == sent["seq"] {
                return m;
            }
        }
    }

    pub async fn next_event(&mut self) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: nothing received within {WAIT:?}", self.uid));
            match m {
                Some(Ok(Message::Text(t))) => {
                    return Event::Frame(
                        serde_json::from_str(&t)
                            .unwrap_or_else(|e| panic!("bad JSON from server ({e}): {t}")),
                    )
                }
                Some(Ok(Message::Close(c))) => return Event::Closed(c.map(|c| c.code)),
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue, // ping/pong
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// Reads until the connection closes; returns the close code and the frames before it.
    pub async fn expect_close(&mut self) -> (Option<CloseCode>, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match self.next_event().await {
                Event::Frame(v) => frames.push(v),
                Event::Closed(c) => return (c, frames),
            }
        }
    }

    /// Closes the websocket (1000) and waits for the server's close.
    pub async fn close(mut self) {
        self.send_raw(Message::Close(None)).await;
        self.expect_close().await;
    }

    /// A direct message; returns the `sent` answer.
    pub async fn direct(&mut self, to: &str, body: &str, client_id: &str) -> Value {
        self.send(json!({"type":"direct","to":to,"body":body,"client_id":client_id}))
            .await;
        self.sent(client_id).await
    }

    pub async fn room(&mut self, room: &str, body: &str, client_id: &str) -> Value {
        self.send(json!({"type":"room","room":room,"body":body,"client_id":client_id}))
            .await;
        self.sent(client_id).await
    }

    /// The `sent` of `client_id`, skipping other frames (and other `sent`s); an error
    /// answering it fails the test with the error (not with a timeout).
    async fn sent(&mut self, client_id: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let f = self.recv().await;
            match f["type"].as_str() {
                Some("sent") if f["client_id"] == client_id => return f,
                Some("error") if f["client_id"] == client_id => {
                    panic!("{}: {client_id} refused: {f}", self.uid)
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "{}: no sent frame", self.uid);
        }
    }

    pub async fn join(&mut self, room: &str) {
        self.send(json!({"type":"join","room":room})).await;
        let j = self.recv_type("joined").await;
        assert_eq!(j["room"], room);
    }

    /// Sends a `presence` question and returns the next frame per uid (the answers,
    /// unless something else arrives first, which the caller's assertions catch).
    pub async fn presence(&mut self, uids: &[&str]) -> Vec<Value> {
        self.send(json!({"type":"presence","uids":uids})).await;
        let mut answers = Vec::with_capacity(uids.len());
        for _ in uids {
            answers.push(self.recv().await);
        }
        answers
    }

    /// Whether `uid` is online, asked with a `presence` frame; other frames that arrive
    /// first are skipped.
    pub async fn is_online(&mut self, uid: &str) -> bool {
        self.send(json!({"type":"presence","uids":[uid]})).await;
        loop {
            let f = self.recv().await;
            if f["type"] == "presence" && f["uid"] == uid && f.get("room").is_none() {
                return f["online"] == true;
            }
            assert_ne!(f["type"], "error", "{}: {f}", self.uid);
        }
    }

    /// Polls [`Client::is_online`] (at a pace the rate limit allows) until it answers
    /// `online`, failing after [`WAIT`].
    pub async fn wait_online(&mut self, uid: &str, online: bool) {
        let deadline = Instant::now() + WAIT;
        while self.is_online(uid).await != online {
            assert!(
                Instant::now() < deadline,
                "{}: {uid} never became {}",
                self.uid,
                if online { "online" } else { "offline" }
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `message` frames among what [`Client::drain`] finds.
    pub async fn drain_messages(&mut self) -> Vec<Value> {
        let mut frames = self.drain().await;
        frames.retain(|f| f["type"] == "message");
        frames
    }

    /// Proves nothing else is queued for this connection: two presence round trips, and
    /// every frame before the second answer is returned.
    pub async fn drain(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        for round in 0..2 {
            let probe = format!("probe-{round}");
            self.send(json!({"type":"presence","uids":[probe]})).await;
            loop {
                let v = self.recv().await;
                if v["type"] == "presence" && v["uid"] == probe.as_str() {
                    break;
                }
                frames.push(v);
            }
        }
        frames
    }
}

pub enum Event {
    Frame(Value),
    Closed(Option<CloseCode>),
}

/// Polls `cond` until true, failing after `WAIT`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, cond: F) {
    eventually_within(what, WAIT, cond).await
}

/// Polls `cond` until true, failing after `wait`.
pub async fn eventually_within<F: FnMut() -> bool>(what: &str, wait: Duration, mut cond: F) {
    let deadline = Instant::now() + wait;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings for a cluster node on `redis_url` and PostgreSQL `database_url`, with fast
/// heartbeats.
pub fn cluster_settings(redis_url: &str, database_url: &str, node_id: &str) -> Settings {
    let mut s = settings();
    s.redis_url = Some(redis_url.to_owned());
    s.database_url = database_url.to_owned();
    s.cluster_secret = Some("test-cluster-secret".into());
    s.node_id = node_id.to_owned();
    s.heartbeat = Duration::from_millis(100);
    s.node_ttl = Duration::from_millis(1000);
    s
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The chatmesh binary with both listeners on port 0 of 127.0.0.1: the kernel picks free
/// ports and the node logs which (see [`LoggedProcess::public_address`]).
pub fn chatmesh_on_port_0() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chatmesh"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--internal-listen",
        "127.0.0.1:0",
    ]);
    cmd
}

/// A child process whose log (stderr) is read line by line on a thread, so a test can
/// wait for a line with a deadline and show the log when it does not come.
pub struct LoggedProcess {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LoggedProcess {
    pub fn spawn(cmd: &mut std::process::Command) -> LoggedProcess {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn chatmesh");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LoggedProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The public address a node logs once it listens (`listening on http://ADDR ...`).
    pub fn public_address(&mut self) -> String {
        let line = self.wait_for("listening on http://");
        line.split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned()
    }

    /// The first log line from now on that contains `needle`. Panics with the log so
    /// far if the process ends first or [`WAIT`] passes.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "no log line with {needle:?} ({e}; exit status {:?}); the log:\n{}",
                    self.child.try_wait().ok().flatten(),
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// A node running as its own `chatmesh` process, for tests that must kill it or
/// measure it.
pub struct ProcessNode {
    pub base: String,
    pub ws: String,
    pub node_id: String,
    child: std::process::Child,
}

impl ProcessNode {
    /// A single node on `database_url`, with `args` added.
    pub fn single(database_url: &str, args: &[&str]) -> ProcessNode {
        let mut proc = LoggedProcess::spawn(
            chatmesh_on_port_0()
                .args(["--database-url", database_url, "--workers", "1"])
                .args(args)
                .env("RUST_LOG", "warn,chatmesh=info"),
        );
        let addr = proc.public_address();
        let node = ProcessNode {
            base: format!("http://{addr}"),
            ws: format!("ws://{addr}/ws"),
            node_id: "single".into(),
            child: proc.child,
        };
        wait_ready(&node.base, "single", || false);
        node
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_at(&self.base, name)
    }

    /// Starts the binary on port 0 for both listeners and learns its address from its
    /// `listening on` log line, so no other test can take the port in between.
    pub fn start(redis_url: &str, database_url: &str, node_id: &str) -> ProcessNode {
        ProcessNode::start_with(redis_url, database_url, node_id, &[])
    }

    /// [`ProcessNode::start`] with `args` added (with `--heartbeat-ms` among them, they
    /// give the heartbeat and TTL instead of the fast ones).
    pub fn start_with(
        redis_url: &str,
        database_url: &str,
        node_id: &str,
        args: &[&str],
    ) -> ProcessNode {
        let mut proc = LoggedProcess::spawn(
            chatmesh_on_port_0()
                .args(["--redis-url", redis_url])
                .args(["--database-url", database_url])
                .args(["--cluster-secret", "test-cluster-secret"])
                .args(["--node-id", node_id])
                .args(if args.contains(&"--heartbeat-ms") {
                    &[][..]
                } else {
                    &["--heartbeat-ms", "100", "--node-ttl-ms", "1000"][..]
                })
                .args(["--workers", "1"])
                .args(args)
                .env("RUST_LOG", "warn,chatmesh=info"),
        );
        let addr = proc.public_address();
        let node = ProcessNode {
            base: format!("http://{addr}"),
            ws: format!("ws://{addr}/ws"),
            node_id: node_id.to_owned(),
            child: proc.child,
        };
        wait_ready(&node.base, node_id, || false);
        node
    }

    pub fn ws_url(&self, uid: &str) -> String {
        format!("{}?uid={uid}", self.ws)
    }

    /// SIGSTOP: the process freezes with its sockets open.
    pub fn pause(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// SIGKILL: no goodbye, no deregistration.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// What a client has seen, as a real client keeps it: messages by conversation
/// (deduplicated by seq), and how often it was told to resync.
#[derive(Debug, Default)]
pub struct Seen {
    pub convs: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
    /// Message frames received, duplicates included.
    pub frames: usize,
    pub resyncs: usize,
}

impl Seen {
    /// Records a frame; true if it was a message.
    pub fn record(&mut self, f: &Value) -> bool {
        if f["type"] == "resync" {
            self.resyncs += 1;
        }
        if f["type"] != "message" {
            return false;
        }
        let (Some(conv), Some(seq)) = (f["conv"].as_str(), f["seq"].as_u64()) else {
            return false;
        };
        self.frames += 1;
        self.convs.entry(conv.to_owned()).or_default().insert(seq);
        true
    }

    /// The highest seq of `conv` below which nothing is missing.
    pub fn cursor(&self, conv: &str) -> u64 {
        let mut c = 0;
        for s in self.convs.get(conv).into_iter().flatten() {
            if *s == c + 1 {
                c = *s;
            } else if *s > c + 1 {
                break;
            }
        }
        c
    }

    pub fn has(&self, conv: &str, seq: u64) -> bool {
        self.convs.get(conv).is_some_and(|s| s.contains(&seq))
    }
}

impl Client {
    /// Syncs (cursors: the gap-free prefix of `convs` seen so far) until `synced` lists
    /// nothing more, recording everything that arrives meanwhile.
    pub async fn sync_into(&mut self, seen: &mut Seen, convs: &[String]) {
        loop {
            let cursors: serde_json::Map<String, Value> = convs
                .iter()
                .map(|c| (c.clone(), json!(seen.cursor(c))))
                .collect();
            self.send(json!({"type":"sync","cursors":cursors})).await;
            let more = loop {
                let f = self.recv().await;
                seen.record(&f);
                if f["type"] == "synced" {
                    break !f["more"].as_array().is_none_or(|m| m.is_empty());
                }
            };
            if !more {
                return;
            }
        }
    }
}

/// What a cluster test runs on: a private redis-server and a fresh database on the
/// binary's PostgreSQL.
pub struct ClusterEnv {
    pub redis: redis::RedisServer,
    pub db: String,
}

impl ClusterEnv {
    pub fn start() -> ClusterEnv {
        ClusterEnv {
            redis: redis::RedisServer::start(),
            db: postgres::PgServer::shared().fresh_database(),
        }
    }

    /// Settings of node `id` of this cluster.
    pub fn settings(&self, id: &str) -> Settings {
        cluster_settings(&self.redis.url, &self.db, id)
    }

    /// Node `id` in this process.
    pub fn node(&self, id: &str) -> TestNode {
        TestNode::start(self.settings(id))
    }

    /// Node `id` as its own process.
    pub fn process(&self, id: &str) -> ProcessNode {
        ProcessNode::start(&self.redis.url, &self.db, id)
    }
}
