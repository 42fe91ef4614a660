//! The route tables (public and internal listener), the pages', websocket, health and
//! metrics handlers, and what the others share: the app state, the JSON error, the
//! bearer check. Each listener's other handlers have their file:
//!
//! - [`api`]: the server HTTP API under `/api` (contract section 5);
//! - [`peer`]: the peer API, `POST /internal/deliver` on the internal listener.

pub mod api;
pub mod peer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::Actor;
use actix_http::body::{BodyStream, BoxBody};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::auth::Authenticator;
use crate::chat::{Chat, ChatError};
use crate::config::Settings;
use crate::outbox::{Outbox, OutboxLimits};
use crate::pages::{ChatPage, ErrorPage, IndexPage, NotFoundPage, STATIC_FILES};
use crate::protocol::{dm_conv, room_conv, valid_id};
use crate::session::wire::OutboxBody;
use crate::session::{Timings, WsSession};
use crate::socket::KillSwitch;

/// Everything a handler needs: each worker has a copy, sharing everything in it.
#[derive(Clone)]
pub struct AppState {
    pub chat: Arc<Chat>,
    pub settings: Arc<Settings>,
    pub auth: Authenticator,
    /// Set when shutdown starts: new websockets are refused, /readyz says 503.
    pub draining: Arc<AtomicBool>,
}

/// Public listener: pages, /ws, /api, health and metrics.
pub fn public_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/chat", web::get().to(chat_page))
        .route("/inbox", web::get().to(inbox_page))
        .route("/home/index", web::get().to(old_dm_page))
        .route("/home/room", web::get().to(old_room_page))
        .route("/static/{file}", web::get().to(static_file))
        .route("/ws", web::get().to(websocket))
        .route("/session", web::get().to(session_check))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
    api::routes(cfg);
    cfg.default_service(web::to(not_found));
}

/// Internal listener: the peer API only.
pub fn internal_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz));
    peer::routes(cfg);
}

/// A JSON error `{"error": code, "message": ...}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Answer with `WWW-Authenticate: Bearer` (a 401 of the API key check).
    challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: &str) -> Self {
        ApiError {
            status,
            code,
            message: message.to_owned(),
            challenge: false,
        }
    }

    fn with_challenge(mut self) -> Self {
        self.challenge = true;
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.challenge {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(serde_json::json!({"error": self.code, "message": self.message}))
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        use crate::protocol::ErrorCode as C;
        let status = match e.code() {
            C::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            C::NotMember | C::Forbidden | C::Limit => StatusCode::FORBIDDEN,
            C::NotFound => StatusCode::NOT_FOUND,
            C::Conflict => StatusCode::CONFLICT,
            C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code().as_str(), &e.to_string())
    }
}

fn html(status: StatusCode, page: Result<String, askama::Error>) -> HttpResponse {
    match page {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(body),
        Err(e) => {
            log::error!("template error: {e}");
            HttpResponse::InternalServerError().body("template error")
        }
    }
}

type Query = web::Query<HashMap<String, String>>;

fn param<'a>(q: &'a Query, name: &str) -> &'a str {
    q.get(name).map(String::as_str).unwrap_or("")
}

async fn index(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let page = IndexPage {
        node: &state.chat.node_id,
        dev_mode: state.auth.is_development(),
        uid: param(&q, "uid"),
        to: param(&q, "to"),
        room: param(&q, "room"),
    };
    html(StatusCode::OK, page.render())
}

/// What a messenger URL asks for.
#[derive(Default)]
struct ChatWanted<'a> {
    uid: &'a str,
    to: &'a str,
    room: &'a str,
    /// `private` or `public`: create `room` (with this user as its owner) first.
    create: &'a str,
    /// No conversation open.
    inbox: bool,
}

/// The messenger page, with the conversation of `to` or `room` open (or none, when
/// `inbox`). In JWT mode `uid` may be empty: the page takes its identity from its token.
fn render_chat(state: &AppState, wanted: ChatWanted) -> HttpResponse {
    let ChatWanted {
        uid,
        to,
        room,
        create,
        inbox,
    } = wanted;
    let bad = |message: String| {
        html(
            StatusCode::BAD_REQUEST,
            ErrorPage {
                node: &state.chat.node_id,
                dev_mode: state.auth.is_development(),
                message: &message,
            }
            .render(),
        )
    };
    let dev_mode = state.auth.is_development();
    if (dev_mode || !uid.is_empty()) && !valid_id(uid) {
        return bad(format!(
            "Your id {uid:?} is not valid: use 1 to 64 characters of A-Z a-z 0-9 _ . -"
        ));
    }
    let conv = match (to.is_empty(), room.is_empty()) {
        (true, true) if inbox => String::new(),
        (false, true) if !valid_id(to) => {
            return bad(format!("The person {to:?} is not a valid id."))
        }
        (false, true) if to == uid => return bad("Choose someone other than yourself.".into()),
        (false, true) if uid.is_empty() => String::new(),
        (false, true) => dm_conv(uid, to),
        (true, false) if !valid_id(room) => {
            return bad(format!("The room {room:?} is not a valid id."))
        }
        (true, false) => room_conv(room),
        _ => return bad("Choose either a person (to) or a room, not both or neither.".into()),
    };
    if !create.is_empty() && (room.is_empty() || !matches!(create, "private" | "public")) {
        return bad(
            "To create a room, give its name (room) and create=private or create=public.".into(),
        );
    }
    html(
        StatusCode::OK,
        ChatPage {
            node: &state.chat.node_id,
            dev_mode,
            uid,
            to,
            room,
            conv: &conv,
            create,
        }
        .render(),
    )
}

async fn chat_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let wanted = ChatWanted {
        uid: param(&q, "uid"),
        to: param(&q, "to"),
        room: param(&q, "room"),
        create: param(&q, "create"),
        inbox: false,
    };
    render_chat(&state, wanted)
}

/// `GET /inbox?uid=U`: the messenger with no conversation open.
async fn inbox_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let wanted = ChatWanted {
        uid: param(&q, "uid"),
        inbox: true,
        ..ChatWanted::default()
    };
    render_chat(&state, wanted)
}

/// The URL of the system chatmesh replaces: `/home/index?uid=U&to_uid=V`.
async fn old_dm_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let wanted = ChatWanted {
        uid: param(&q, "uid"),
        to: param(&q, "to_uid"),
        ..ChatWanted::default()
    };
    render_chat(&state, wanted)
}

/// The URL of the system chatmesh replaces: `/home/room?uid=U&groups_id=R`.
async fn old_room_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let wanted = ChatWanted {
        uid: param(&q, "uid"),
        room: param(&q, "groups_id"),
        ..ChatWanted::default()
    };
    render_chat(&state, wanted)
}

/// Unknown routes: a page for browsers, JSON under `/api` (and for other methods).
async fn not_found(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let path = req.path();
    let api = path == "/api" || path.starts_with("/api/");
    if api || req.method() != actix_web::http::Method::GET {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").error_response();
    }
    html(
        StatusCode::NOT_FOUND,
        NotFoundPage {
            node: &state.chat.node_id,
            dev_mode: state.auth.is_development(),
            path,
        }
        .render(),
    )
}

async fn static_file(path: web::Path<String>) -> HttpResponse {
    match STATIC_FILES.iter().find(|f| f.path == path.as_str()) {
        Some(f) => HttpResponse::Ok()
            .content_type(f.content_type)
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(f.body),
        None => HttpResponse::NotFound().body("not found"),
    }
}

#[derive(Deserialize)]
struct WsQuery {
    uid: Option<String>,
    token: Option<String>,
}

/// Same host by default; otherwise the configured list (`*` allows any).
fn origin_allowed(req: &HttpRequest, allowed: &[String]) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true; // not a browser
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        return matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o));
    }
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if !origin_allowed(&req, &state.settings.allowed_origins) {
        log::info!(
            "refused websocket from origin {:?}",
            req.headers().get(header::ORIGIN)
        );
        return Ok(
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "origin not allowed")
                .error_response(),
        );
    }
    let uid = match identify(&req, &state) {
        Ok(uid) => uid,
        Err(reason) => {
            log::info!(
                "refused a websocket upgrade from {:?}: {reason}",
                req.peer_addr()
            );
            return Ok(
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", &reason).error_response(),
            );
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        log::info!("refused a websocket upgrade for {uid}: the node is shutting down");
        return Ok(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is shutting down",
        )
        .error_response());
    }
    let timings = Timings {
        ping_interval: state.settings.ping_interval,
        client_timeout: state.settings.client_timeout,
    };
    let mut response = actix_http::ws::handshake(req.head())?;
    let outbox = Arc::new(Outbox::new(OutboxLimits {
        max_messages: state.chat.limits.outbound_queue,
        drop_grace: state.chat.limits.outbound_grace,
        grace: timings.grace(),
    }));
    let kill = req.conn_data::<Arc<KillSwitch>>().cloned();
    WsSession::new(
        uid,
        state.chat.clone(),
        timings,
        outbox.clone(),
        kill,
        stream,
    )
    .start();
    let body = OutboxBody::new(outbox, state.chat.metrics.clone());
    Ok(
        HttpResponse::from(response.body(BoxBody::new(BodyStream::new(body))))
            .map_into_boxed_body(),
    )
}

/// The user a `/ws` or `/session` request is for, or why it is refused.
fn identify(req: &HttpRequest, state: &AppState) -> Result<String, String> {
    let q = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|e| format!("bad query string: {e}"))?
        .into_inner();
    state
        .auth
        .authenticate(q.uid.as_deref(), q.token.as_deref())
        .map_err(|e| e.to_string())
}

/// `GET /session?token=` (or `?uid=` in development mode): whom `/ws` would accept
/// these credentials as, or why not. A browser cannot read the body of a refused
/// websocket upgrade, so pages ask here to show the reason.
async fn session_check(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match identify(&req, &state) {
        Ok(uid) => HttpResponse::Ok().json(serde_json::json!({ "uid": uid })),
        Err(reason) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", &reason).error_response()
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"ready": false, "reason": "shutting down"}));
    }
    if let Err(e) = state.chat.ping().await {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"ready": false, "reason": format!("store: {e}")}));
    }
    if let Some(cluster) = &state.chat.cluster {
        if !cluster.registered() {
            return HttpResponse::ServiceUnavailable().json(
                serde_json::json!({"ready": false, "reason": "not registered in the cluster"}),
            );
        }
    }
    HttpResponse::Ok().json(serde_json::json!({"ready": true, "node": state.chat.node_id}))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Some(stats) = state.chat.store.write_stats() {
        state.chat.metrics.set_write_stats(stats);
    }
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(state.chat.metrics.render())
}

/// Checks `Authorization: Bearer <secret>` in constant time.
pub fn bearer_ok(req: &HttpRequest, secret: &str) -> bool {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    given.as_bytes().ct_eq(secret.as_bytes()).into()
}
