//! The OpenAPI document of the server HTTP API (docs/openapi.json) against the server:
//! it lists exactly the routes of `chatmesh::http::api::API_ROUTES`, the node serves it
//! byte for byte at /api/openapi.json, and schemathesis, driven by it against a running
//! node, finds nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatmesh::http::api::{API_ROUTES, OPENAPI_JSON};
use common::{http_blocking, settings, TestNode};
use serde_json::Value;

const KEY: &str = "openapi-test-key";

fn document_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn document() -> Value {
    serde_json::from_str(&document_text()).expect("docs/openapi.json is not JSON")
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// (METHOD, path) of every operation of the document.
fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for method in item.keys().filter(|k| METHODS.contains(&k.as_str())) {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

fn served_routes() -> BTreeSet<(String, String)> {
    let routes: BTreeSet<(String, String)> = API_ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(routes.len(), API_ROUTES.len(), "API_ROUTES has a duplicate");
    routes
}

/// `path` with sample values for its parameters.
fn sample(path: &str) -> String {
    path.replace("{conv}", "room:lobby")
        .replace("{seq}", "1")
        .replace("{room}", "lobby")
        .replace("{uid}", "alice")
}

/// Every `$ref` in `v` (all local to the document).
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_document_describes_exactly_the_served_routes() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "info.version follows Cargo.toml"
    );
    let documented = documented_routes(&doc);
    let served = served_routes();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not documented: {missing:?}; documented but not served: {extra:?}"
    );
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
    // the document is what the binary carries
    assert_eq!(OPENAPI_JSON, document_text());
}

#[test]
fn the_node_serves_the_document_and_the_security_it_declares() {
    let text = document_text();
    let doc = document();
    // without an API key the document is still served; the rest is `not_enabled`
    let node = TestNode::start(settings());
    let r = http_blocking("GET", &format!("{}/api/openapi.json", node.base), &[], None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, text);
    let r = http_blocking("GET", &format!("{}/api/rooms/lobby", node.base), &[], None).unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, "not_enabled".into())
    );
    drop(node);

    let mut s = settings();
    s.api_key = Some(KEY.into());
    let node = TestNode::start(s);
    let auth = format!("Bearer {KEY}");
    let r = http_blocking(
        "GET",
        &format!("{}/api/openapi.json", node.base),
        &[("Authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, text.as_str()));

    // Every operation that the document says needs the key answers 401 (with a
    // challenge) without it; the one that says `security: []` answers without.
    for route in API_ROUTES {
        let method = route.method.as_str();
        let op = &doc["paths"][route.path][method.to_lowercase()];
        let open = op["security"] == serde_json::json!([]);
        let url = format!("{}{}", node.base, sample(route.path));
        let r = http_blocking(method, &url, &[], None).unwrap();
        if open {
            assert_eq!(r.status, 200, "{method} {url}: {}", r.body);
        } else {
            assert_eq!(r.status, 401, "{method} {url}: {}", r.body);
            assert_eq!(r.json()["error"], "unauthorized");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }

    // A method a path does not serve: 405 with the methods it does serve in Allow.
    let paths: BTreeSet<&str> = API_ROUTES.iter().map(|r| r.path).collect();
    for path in paths {
        let methods: BTreeSet<&str> = API_ROUTES
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.method.as_str())
            .collect();
        let other = ["PATCH", "GET", "POST", "PUT", "DELETE"]
            .into_iter()
            .find(|m| !methods.contains(m))
            .unwrap();
        let url = format!("{}{}", node.base, sample(path));
        let r = http_blocking(other, &url, &[("Authorization", &auth)], None).unwrap();
        assert_eq!(r.status, 405, "{other} {url}: {}", r.body);
        assert_eq!(r.json()["error"], "method_not_allowed");
        let allow: BTreeSet<&str> = r
            .header("allow")
            .unwrap_or_else(|| panic!("{other} {url}: no Allow"))
            .split(',')
            .map(str::trim)
            .collect();
        assert_eq!(allow, methods, "{other} {url}");
    }
    // a path under /api/ that is no route: a JSON 404
    let r = http_blocking(
        "GET",
        &format!("{}/api/nothing/here", node.base),
        &[("Authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, "not_found".into())
    );
}

/// What schemathesis found (and review around it), pinned down: every answer here is
/// the one the document gives.
#[test]
fn requests_are_refused_as_the_document_says() {
    let mut s = settings();
    s.api_key = Some(KEY.into());
    let node = TestNode::start(s);
    let auth = format!("Bearer {KEY}");
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>| {
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let r = http_blocking(method, &format!("{}{path}", node.base), &all, body).unwrap();
        let code = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (r.status, code)
    };
    let ok = (200, String::new());
    let err = |status: u16, code: &str| (status, code.to_owned());

    // the key is checked before the body is read
    let r = http_blocking(
        "POST",
        &format!("{}/api/messages", node.base),
        &[],
        Some("{not json"),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);

    // PUT members: no body is a plain member; a body must be a JSON object whose role
    // (if any) is a string
    call("POST", "/api/rooms", &[], Some(r#"{"room":"team"}"#));
    let put = |body: Option<&str>| call("PUT", "/api/rooms/team/members/carol", &[], body);
    assert_eq!(put(None), ok);
    assert_eq!(put(Some("{}")), ok);
    assert_eq!(put(Some(r#"{"role":"owner"}"#)), ok);
    assert_eq!(put(Some("[null, null]")), err(400, "bad_json"));
    assert_eq!(put(Some("nope")), err(400, "bad_json"));
    assert_eq!(put(Some(r#"{"role":null}"#)), err(400, "invalid"));
    assert_eq!(put(Some(r#"{"role":5}"#)), err(400, "invalid"));

    // optional fields are left out, not null
    let post = |body: &str| call("POST", "/api/messages", &[], Some(body));
    assert_eq!(
        post(r#"{"from":"system","to":"bob","body":"hi","client_id":"k1"}"#),
        ok
    );
    assert_eq!(
        post(r#"{"from":"system","to":"bob","body":"hi","client_id":null}"#),
        err(400, "invalid")
    );
    assert_eq!(
        post(r#"{"from":"system","to":null,"room":"team","body":"hi"}"#),
        err(400, "invalid")
    );
    assert_eq!(
        post(r#"{"from":"bob","to":"bob","body":"hi"}"#),
        err(400, "invalid")
    );
    // client_id: at most 128 characters (not bytes), as JSON Schema counts them
    let id = |n: usize| "é".repeat(n);
    let with_id = |n: usize| {
        format!(
            r#"{{"from":"system","to":"bob","body":"hi","client_id":"{}"}}"#,
            id(n)
        )
    };
    assert_eq!(post(&with_id(128)), ok);
    assert_eq!(post(&with_id(129)), err(400, "invalid"));
    // request bodies: at most 64 KiB, JSON
    let huge = format!(
        r#"{{"from":"system","to":"bob","body":"{}"}}"#,
        "x".repeat(70_000)
    );
    assert_eq!(post(&huge), err(413, "too_large"));
    assert_eq!(
        call(
            "POST",
            "/api/messages",
            &[("Content-Type", "text/plain")],
            Some(r#"{"from":"system","to":"bob","body":"hi"}"#)
        ),
        err(415, "bad_json")
    );
    assert_eq!(post(""), err(400, "bad_json"));

    // uids: left out is no one; given, every comma-separated item is an id
    assert_eq!(call("GET", "/api/online", &[], None), ok);
    assert_eq!(call("GET", "/api/online?uids=a,b", &[], None), ok);
    assert_eq!(
        call("GET", "/api/online?uids=", &[], None),
        err(400, "invalid")
    );
    assert_eq!(
        call("GET", "/api/online?uids=a,,b", &[], None),
        err(400, "invalid")
    );

    // sequence numbers are 1 ..= i64::MAX
    let max = i64::MAX.to_string();
    let over = (i64::MAX as u64 + 1).to_string();
    let history = |before: &str| {
        call(
            "GET",
            &format!("/api/history?conv=room:team&before={before}"),
            &[],
            None,
        )
    };
    assert_eq!(history("0"), ok);
    assert_eq!(history(&max), ok);
    assert_eq!(history(&over), err(400, "invalid"));
    let delete = |seq: &str| {
        call(
            "DELETE",
            &format!("/api/messages/room:team/{seq}"),
            &[],
            None,
        )
    };
    assert_eq!(delete(&max), err(404, "not_found"));
    assert_eq!(delete(&over), err(400, "invalid"));
    assert_eq!(delete("0"), err(400, "invalid"));
}

/// The schemathesis CLI (4.x): `$SCHEMATHESIS`, else the virtualenv `.ci/test` makes
/// under the target directory, else `schemathesis` on the PATH.
fn schemathesis_cli() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        candidates.push(p.into());
    }
    // the target directory: target/debug/chatmesh (or target/<triple>/debug/chatmesh)
    for dir in Path::new(env!("CARGO_BIN_EXE_chatmesh"))
        .ancestors()
        .skip(2)
        .take(2)
    {
        candidates.push(dir.join("schemathesis/bin/st"));
    }
    candidates.push("schemathesis".into());
    let mut tried = Vec::new();
    for c in candidates {
        match Command::new(&c).arg("--version").output() {
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains("version 4.") => return Ok(c),
            Ok(out) => tried.push(format!(
                "{}: {}",
                c.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            )),
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    Err(format!(
        "no schemathesis 4.x CLI (run .ci/test, which installs it into target/schemathesis, \
         or set SCHEMATHESIS to its `st`); tried: {}",
        tried.join("; ")
    ))
}

/// Examples per operation and phase, and the wall-clock bound of the whole run.
const MAX_EXAMPLES: &str = "100";
const DEADLINE: Duration = Duration::from_secs(240);

#[test]
fn schemathesis_finds_nothing_against_a_running_node() {
    let st = schemathesis_cli().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings();
    s.api_key = Some(KEY.into());
    s.database_url = format!("sqlite://{}", dir.path().join("chatmesh.db").display());
    let node = TestNode::start(s);

    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/hooks.py");
    let log_path = dir.path().join("schemathesis.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(&st);
    cmd.current_dir(dir.path())
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .env("NO_COLOR", "1")
        .args(["run", &format!("{}/api/openapi.json", node.base)])
        .args(["--url", &node.base])
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        // every check: positive and negative data, status codes, content types,
        // response schemas and headers, auth, unsupported methods, stateful links
        .args(["--checks", "all"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", "10"])
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .arg("--no-color")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("{output}");
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("schemathesis failed ({s}):\n{output}"),
        None => panic!("schemathesis ran over {DEADLINE:?}:\n{output}"),
    }
    assert!(
        output.contains("No issues found"),
        "schemathesis exited 0 without saying it found nothing:\n{output}"
    );
}
