//! A small Chrome DevTools Protocol driver for browser tests.
//!
//! It starts Debian's headless Chromium (`/usr/bin/chromium`, or `$CHROMIUM`) with a
//! fresh profile and `--remote-debugging-port=0`, reads the DevTools websocket URL from
//! the `DevToolsActivePort` file Chromium writes into its profile directory, and speaks
//! CDP over one websocket to the browser target. Pages are opened with
//! `Target.createTarget` and attached with `flatten: true`, so every page command is
//! the same socket with a `sessionId`.
//!
//! Every wait has a deadline; failures panic with a message that says what was awaited
//! and shows the page's recent console output (this is test code).
//!
//! ```ignore
//! let browser = Browser::launch().await;
//! let page = browser.new_page("http://127.0.0.1:8080/").await;
//! page.wait_for("document.querySelector('form') !== null", Duration::from_secs(5)).await;
//! assert_eq!(page.eval("document.title").await, "chatmesh");
//! ```
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long one CDP command may take before it is an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Chromium may take to start and open its DevTools port.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a navigation may take to finish loading.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll period of `wait_for`.
const POLL: Duration = Duration::from_millis(50);
/// Console lines kept per page (for failure messages).
const LOG_LINES: usize = 200;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;
type Logs = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The Chromium binary: `$CHROMIUM` if set, else `/usr/bin/chromium` if present, else
/// the first of `chromium`, `chromium-browser`, `google-chrome` found on `$PATH`.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.exists() {
        return Some(fixed.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// One CDP websocket: a writer task, a reader task that routes answers by `id` and
/// keeps console output per `sessionId`.
#[derive(Clone)]
struct Connection {
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    logs: Logs,
    next_id: Arc<AtomicU64>,
}

impl Connection {
    async fn connect(url: &str) -> Result<Connection, String> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("cannot connect to DevTools at {url}: {e}"))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let pending: Pending = Arc::default();
        let logs: Logs = Arc::default();

        tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let reader_pending = pending.clone();
        let reader_logs = logs.clone();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let text = match msg {
                    Ok(Message::Text(t)) => t.to_string(),
                    Ok(Message::Binary(b)) => String::from_utf8_lossy(&b).into_owned(),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    let waiter = reader_pending.lock().unwrap().remove(&id);
                    if let Some(waiter) = waiter {
                        let answer = match v.get("error") {
                            Some(err) => Err(err.to_string()),
                            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                        };
                        let _ = waiter.send(answer);
                    }
                } else if let Some(method) = v.get("method").and_then(Value::as_str) {
                    let session = v.get("sessionId").and_then(Value::as_str).unwrap_or("");
                    if let Some(line) = log_line(method, &v["params"]) {
                        let mut logs = reader_logs.lock().unwrap();
                        let lines = logs.entry(session.to_string()).or_default();
                        if lines.len() >= LOG_LINES {
                            lines.remove(0);
                        }
                        lines.push(line);
                    }
                }
            }
            // The browser went away: fail every outstanding command.
            for (_, waiter) in reader_pending.lock().unwrap().drain() {
                let _ = waiter.send(Err("DevTools connection closed".into()));
            }
        });

        Ok(Connection {
            out,
            pending,
            logs,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    fn frame(&self, method: &str, params: Value, session: Option<&str>) -> (u64, Message) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut cmd = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            cmd["sessionId"] = json!(s);
        }
        (id, Message::Text(cmd.to_string().into()))
    }

    /// Sends one command and waits for its answer (at most `COMMAND_TIMEOUT`).
    async fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, String> {
        let (id, frame) = self.frame(method, params, session);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if self.out.send(frame).is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(format!("{method}: DevTools connection closed"));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => Err(format!("{method}: DevTools connection closed")),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(format!("{method}: no answer within {COMMAND_TIMEOUT:?}"))
            }
        }
    }

    /// Sends one command without waiting (used from `Drop`).
    fn fire(&self, method: &str, params: Value, session: Option<&str>) {
        let (_, frame) = self.frame(method, params, session);
        let _ = self.out.send(frame);
    }

    fn logs(&self, session: &str) -> Vec<String> {
        self.logs
            .lock()
            .unwrap()
            .get(session)
            .cloned()
            .unwrap_or_default()
    }
}

/// Formats console output and uncaught exceptions; other events are ignored.
fn log_line(method: &str, params: &Value) -> Option<String> {
    match method {
        "Runtime.consoleAPICalled" => {
            let kind = params["type"].as_str().unwrap_or("log");
            let args: Vec<String> = params["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|arg| match &arg["value"] {
                            Value::String(s) => s.clone(),
                            Value::Null => arg["description"]
                                .as_str()
                                .or(arg["type"].as_str())
                                .unwrap_or("?")
                                .to_string(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(format!("console.{kind}: {}", args.join(" ")))
        }
        "Runtime.exceptionThrown" => {
            let d = &params["exceptionDetails"];
            let text = d["exception"]["description"]
                .as_str()
                .or(d["text"].as_str())
                .unwrap_or("exception");
            Some(format!("uncaught: {text}"))
        }
        "Log.entryAdded" => {
            let e = &params["entry"];
            Some(format!(
                "log.{}: {} {}",
                e["level"].as_str().unwrap_or("?"),
                e["text"].as_str().unwrap_or(""),
                e["url"].as_str().unwrap_or("")
            ))
        }
        _ => None,
    }
}

/// A headless Chromium with a throwaway profile; killed when dropped.
pub struct Browser {
    conn: Connection,
    child: Child,
    // Dropped after `child` is killed (fields drop after `Drop::drop`).
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and connects to its browser target. Panics with Chromium's
    /// stderr if it does not come up within `LAUNCH_TIMEOUT`.
    pub async fn launch() -> Browser {
        match Browser::try_launch().await {
            Ok(b) => b,
            Err(e) => panic!("cannot launch headless Chromium: {e}"),
        }
    }

    pub async fn try_launch() -> Result<Browser, String> {
        let exe = chromium_path().ok_or(
            "Chromium not found: install Debian's `chromium` package \
             (/usr/bin/chromium) or set $CHROMIUM",
        )?;
        let profile = tempfile::Builder::new()
            .prefix("chatmesh-chromium-")
            .tempdir()
            .map_err(|e| format!("cannot create a profile directory: {e}"))?;
        let stderr_path = profile.path().join("chromium-stderr.log");
        let stderr = File::create(&stderr_path).map_err(|e| format!("{e}"))?;
        let data_dir = profile.path().join("profile");
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--disable-extensions",
                "--password-store=basic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", data_dir.display()))
            .arg("about:blank")
            // Chromium's own scratch files (its singleton socket dir) go into the
            // profile directory too, so nothing is left in /tmp.
            .env("TMPDIR", profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            // Its own process group, so that Drop can end Chromium's helper processes
            // (renderers, zygote) together with it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;

        let read_stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        // Chromium writes "<port>\n<browser ws path>\n" once DevTools listens.
        let port_file = data_dir.join("DevToolsActivePort");
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let ws_url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if !port.trim().is_empty() && path.starts_with('/') {
                        break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{} exited early ({status}); stderr:\n{}",
                    exe.display(),
                    read_stderr()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no DevToolsActivePort after {LAUNCH_TIMEOUT:?}; stderr:\n{}",
                    read_stderr()
                ));
            }
            tokio::time::sleep(POLL).await;
        };

        let conn = match Connection::connect(&ws_url).await {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{e}; stderr:\n{}", read_stderr()));
            }
        };
        Ok(Browser {
            conn,
            child,
            profile,
        })
    }

    /// Opens a new tab, attaches to it and navigates to `url` (waiting for the load).
    pub async fn new_page(&self, url: &str) -> Page {
        let page = self.blank_page().await;
        page.goto(url).await;
        page
    }

    /// Opens a new `about:blank` page in a window of its own and attaches to it. Each
    /// page is visible (`document.visibilityState === "visible"`), as the screens of two
    /// people are; tabs of one window would be hidden but for the front one.
    pub async fn blank_page(&self) -> Page {
        let target = self
            .conn
            .call(
                "Target.createTarget",
                json!({ "url": "about:blank", "newWindow": true }),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("cannot open a tab: {e}"));
        let target_id = target["targetId"]
            .as_str()
            .expect("Target.createTarget gave no targetId")
            .to_string();
        let attached = self
            .conn
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("cannot attach to tab {target_id}: {e}"));
        let session_id = attached["sessionId"]
            .as_str()
            .expect("Target.attachToTarget gave no sessionId")
            .to_string();
        let page = Page {
            conn: self.conn.clone(),
            target_id,
            session_id,
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.cmd(domain, json!({}))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        page
    }

    /// The browser's version string (checks the connection).
    pub async fn version(&self) -> String {
        let v = self
            .conn
            .call("Browser.getVersion", json!({}), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        v["product"].as_str().unwrap_or_default().to_string()
    }

    /// The profile directory (Chromium's stderr is in `chromium-stderr.log` there).
    pub fn profile_dir(&self) -> &Path {
        self.profile.path()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SIGKILL to the process group this Browser started (its id is Chromium's pid).
        let group = format!("-{}", self.child.id());
        let killed_group = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !killed_group {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // Helpers may still be exiting and writing into the profile: retry briefly.
        for _ in 0..40 {
            match std::fs::remove_dir_all(self.profile.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(25))
                }
                _ => break,
            }
        }
    }
}

/// One tab, addressed through its flattened CDP session.
pub struct Page {
    conn: Connection,
    target_id: String,
    session_id: String,
}

impl Page {
    /// Sends a CDP command to this page.
    pub async fn cmd(&self, method: &str, params: Value) -> Result<Value, String> {
        self.conn.call(method, params, Some(&self.session_id)).await
    }

    /// Evaluates a JS expression (promises are awaited) and returns its value as JSON
    /// (`undefined` becomes `null`). A thrown exception is an `Err`.
    pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let r = self
            .cmd(
                "Runtime.evaluate",
                json!({
                    "expression": js,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(d) = r.get("exceptionDetails") {
            let text = d["exception"]["description"]
                .as_str()
                .or(d["text"].as_str())
                .unwrap_or("exception");
            return Err(format!("`{js}` threw: {text}"));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Like `try_eval`, but panics on an exception.
    pub async fn eval(&self, js: &str) -> Value {
        match self.try_eval(js).await {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", self.debug_dump().await),
        }
    }

    /// Polls `condition` (a JS expression) until it is truthy. Exceptions while polling
    /// (e.g. during a navigation) count as "not yet". Panics after `timeout`, with the
    /// last value or error, the page's text and its console output.
    pub async fn wait_for(&self, condition: &str, timeout: Duration) {
        if let Err(e) = self.try_wait_for(condition, timeout).await {
            panic!("{e}\n{}", self.debug_dump().await);
        }
    }

    /// Like `wait_for`, returning the last seen value (or error) on timeout.
    pub async fn try_wait_for(&self, condition: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let expr = format!("!!({condition})");
        loop {
            let last = match self.try_eval(&expr).await {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for `{condition}` (last: {last})"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `expr` until it returns something other than `null`/`false`, and returns it.
    pub async fn wait_value(&self, expr: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_eval(expr).await {
                Ok(Value::Null) | Ok(Value::Bool(false)) => "null/false".to_string(),
                Ok(v) => return v,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for a value of `{expr}` (last: {last})\n{}",
                    self.debug_dump().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Navigates to `url` and waits until the new document has loaded.
    pub async fn goto(&self, url: &str) {
        self.mark_document().await;
        let r = self
            .cmd("Page.navigate", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("navigating to {url}: {e}"));
        if let Some(err) = r.get("errorText").and_then(Value::as_str) {
            if !err.is_empty() {
                panic!("navigating to {url} failed: {err}");
            }
        }
        self.wait_new_document(&format!("navigation to {url}"))
            .await;
    }

    /// Reloads the page (bypassing nothing: like pressing F5) and waits for the load.
    pub async fn reload(&self) {
        self.mark_document().await;
        self.cmd("Page.reload", json!({}))
            .await
            .unwrap_or_else(|e| panic!("reload: {e}"));
        self.wait_new_document("reload").await;
    }

    /// Tags the current document so the next one can be told apart from it.
    async fn mark_document(&self) {
        // A failure here (a document still loading) only means there is nothing to tag.
        let _ = self.try_eval("window.__cdpOldDocument = true").await;
    }

    async fn wait_new_document(&self, what: &str) {
        let cond = "window.__cdpOldDocument === undefined && document.readyState === 'complete'";
        if let Err(e) = self.try_wait_for(cond, LOAD_TIMEOUT).await {
            panic!("{what} did not finish: {e}\n{}", self.debug_dump().await);
        }
    }

    /// Focuses the element matched by `selector` and types `text` into it (CDP
    /// `Input.insertText`: real `input` events, as from a keyboard or IME).
    pub async fn type_text(&self, selector: &str, text: &str) {
        let sel = json!(selector).to_string();
        self.eval(&format!(
            "(() => {{ const el = document.querySelector({sel}); \
               if (!el) throw new Error('no element ' + {sel}); el.focus(); return true; }})()"
        ))
        .await;
        self.cmd("Input.insertText", json!({ "text": text }))
            .await
            .unwrap_or_else(|e| panic!("typing into {selector}: {e}"));
    }

    /// Clicks the element matched by `selector` with a real mouse event at its centre
    /// (scrolled into view first).
    pub async fn click(&self, selector: &str) {
        let sel = json!(selector).to_string();
        let rect = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({sel}); \
                   if (!el) throw new Error('no element ' + {sel}); \
                   el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect(); \
                   return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.cmd(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await
            .unwrap_or_else(|e| panic!("clicking {selector}: {e}"));
        }
    }

    /// Presses Enter in the focused element (submits a form like a user would).
    pub async fn press_enter(&self) {
        for kind in ["keyDown", "keyUp"] {
            let mut params = json!({
                "type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
            });
            if kind == "keyDown" {
                params["text"] = json!("\r");
            }
            self.cmd("Input.dispatchKeyEvent", params)
                .await
                .unwrap_or_else(|e| panic!("pressing Enter: {e}"));
        }
    }

    /// Sets the viewport size (e.g. a phone's 390x844) for this page.
    pub async fn set_viewport(&self, width: u32, height: u32, mobile: bool) {
        self.cmd(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await
        .unwrap_or_else(|e| panic!("setting the viewport: {e}"));
    }

    /// A PNG screenshot of the viewport, base64-encoded (for debugging failures).
    pub async fn screenshot_base64(&self) -> String {
        let r = self
            .cmd("Page.captureScreenshot", json!({ "format": "png" }))
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        r["data"].as_str().unwrap_or_default().to_string()
    }

    /// Saves a PNG screenshot of the viewport to `path` (directories are created).
    pub async fn screenshot(&self, path: &Path) {
        let data = base64_decode(&self.screenshot_base64().await)
            .unwrap_or_else(|| panic!("screenshot of {}: not base64", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Makes this tab the visible one (headless Chromium reports the others as
    /// `document.visibilityState === "hidden"`, as a browser does for background tabs).
    pub async fn bring_to_front(&self) {
        self.cmd("Page.bringToFront", json!({}))
            .await
            .unwrap_or_else(|e| panic!("bringing the tab to front: {e}"));
    }

    /// Console output and uncaught exceptions seen on this page so far.
    pub fn console(&self) -> Vec<String> {
        self.conn.logs(&self.session_id)
    }

    /// The URL, the start of the body text and the last console lines, for failures.
    pub async fn debug_dump(&self) -> String {
        let url = self
            .try_eval("location.href")
            .await
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|e| e);
        let text = self
            .try_eval("document.body ? document.body.innerText.slice(0, 3000) : ''")
            .await
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|e| e);
        let logs = self.console();
        let start = logs.len().saturating_sub(40);
        format!(
            "--- page {url}\n--- text:\n{text}\n--- console (last {}):\n{}",
            logs.len() - start,
            logs[start..].join("\n")
        )
    }

    /// Closes the tab.
    pub async fn close(self) {
        let _ = self
            .conn
            .call(
                "Target.closeTarget",
                json!({ "targetId": self.target_id }),
                None,
            )
            .await;
    }
}

/// Standard base64 (with padding), as CDP sends binary data.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&b| b == b'=').count();
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("aGV5").unwrap(), b"hey");
        assert_eq!(super::base64_decode("aA==").unwrap(), b"h");
        assert!(super::base64_decode("a").is_none());
    }
}
