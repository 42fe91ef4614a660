//! The route tables (public and internal listener) and their handlers.

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
use crate::chat::{Chat, ChatError, Outgoing, Target};
use crate::config::Settings;
use crate::outbox::{Outbox, OutboxLimits};
use crate::pages::{ChatPage, ErrorPage, IndexPage, NotFoundPage, STATIC_FILES};
use crate::protocol::{dm_conv, room_conv, valid_id, ServerFrame};
use crate::session::wire::OutboxBody;
use crate::session::{Timings, WsSession};
use crate::socket::KillSwitch;
use crate::store::By;

/// Everything a handler needs, shared by all workers.
pub struct AppState {
    pub chat: Arc<Chat>,
    pub settings: Arc<Settings>,
    pub auth: Authenticator,
    /// Set when shutdown starts: new websockets are refused, /readyz says 503.
    pub draining: AtomicBool,
}

/// Public listener: pages, /ws, /api, health and metrics.
pub fn public_routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(64 * 1024)
            .error_handler(|err, _| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_json", &err.to_string()).into()
            }),
    )
    .route("/", web::get().to(index))
    .route("/chat", web::get().to(chat_page))
    .route("/inbox", web::get().to(inbox_page))
    .route("/home/index", web::get().to(old_dm_page))
    .route("/home/room", web::get().to(old_room_page))
    .route("/static/{file}", web::get().to(static_file))
    .route("/ws", web::get().to(websocket))
    .route("/session", web::get().to(session_check))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(readyz))
    .route("/metrics", web::get().to(metrics))
    .service(
        web::scope("/api")
            .route("/messages", web::post().to(api_post_message))
            .route(
                "/messages/{conv}/{seq}",
                web::delete().to(api_delete_message),
            )
            .route("/online", web::get().to(api_online))
            .route("/history", web::get().to(api_history))
            .route("/rooms", web::post().to(api_create_room))
            .route("/rooms/{room}", web::get().to(api_room_info))
            .route("/rooms/{room}/members/{uid}", web::put().to(api_add_member))
            .route(
                "/rooms/{room}/members/{uid}",
                web::delete().to(api_remove_member),
            )
            .route("/users/{uid}/rooms", web::get().to(api_user_rooms)),
    )
    .default_service(web::to(not_found));
}

/// Internal listener: the peer API only.
pub fn internal_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz));
    crate::cluster::peer_routes(cfg);
}

/// A JSON error `{"error": code, "message": ...}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: &str) -> Self {
        ApiError {
            status,
            code,
            message: message.to_owned(),
        }
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
        HttpResponse::build(self.status)
            .json(serde_json::json!({"error": self.code, "message": self.message}))
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

/// The messenger page, with the conversation of `to` or `room` open (or none, when
/// `inbox`). In JWT mode `uid` may be empty: the page takes its identity from its token.
fn render_chat(state: &AppState, uid: &str, to: &str, room: &str, inbox: bool) -> HttpResponse {
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
    html(
        StatusCode::OK,
        ChatPage {
            node: &state.chat.node_id,
            dev_mode,
            uid,
            to,
            room,
            conv: &conv,
        }
        .render(),
    )
}

async fn chat_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    let (uid, to, room) = (param(&q, "uid"), param(&q, "to"), param(&q, "room"));
    render_chat(&state, uid, to, room, false)
}

/// `GET /inbox?uid=U`: the messenger with no conversation open.
async fn inbox_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    render_chat(&state, param(&q, "uid"), "", "", true)
}

/// The URL of the system chatmesh replaces: `/home/index?uid=U&to_uid=V`.
async fn old_dm_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    render_chat(&state, param(&q, "uid"), param(&q, "to_uid"), "", false)
}

/// The URL of the system chatmesh replaces: `/home/room?uid=U&groups_id=R`.
async fn old_room_page(state: web::Data<AppState>, q: Query) -> HttpResponse {
    render_chat(&state, param(&q, "uid"), "", param(&q, "groups_id"), false)
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

fn api_auth(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    match &state.settings.api_key {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "the server API is disabled (start with --api-key)",
        )),
        Some(key) if bearer_ok(req, key) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authorization: Bearer <api key> required",
        )),
    }
}

#[derive(Deserialize)]
struct ApiMessage {
    from: String,
    to: Option<String>,
    room: Option<String>,
    body: String,
    client_id: Option<String>,
}

async fn api_post_message(
    req: HttpRequest,
    state: web::Data<AppState>,
    msg: web::Json<ApiMessage>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let msg = msg.into_inner();
    let target = match (msg.to, msg.room) {
        (Some(to), None) => Target::User(to),
        (None, Some(room)) => Target::Room(room),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "give exactly one of \"to\" and \"room\"",
            ))
        }
    };
    let sent = state
        .chat
        .send(Outgoing {
            from: msg.from,
            target,
            body: msg.body,
            client_id: msg.client_id,
            origin: None,
            by: By::Server,
        })
        .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(ServerFrame::Sent(&sent).to_text().to_string()))
}

async fn api_online(
    req: HttpRequest,
    state: web::Data<AppState>,
    q: Query,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let uids: Vec<String> = param(&q, "uids")
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    let answers = state.chat.online(uids).await?;
    let map: serde_json::Map<String, serde_json::Value> = answers
        .into_iter()
        .map(|(u, o)| (u, serde_json::Value::Bool(o)))
        .collect();
    Ok(HttpResponse::Ok().json(map))
}

#[derive(Deserialize)]
struct HistoryQuery {
    conv: String,
    before: Option<u64>,
    limit: Option<u64>,
}

async fn api_history(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let q = web::Query::<HistoryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", &e.to_string()))?;
    let page = state
        .chat
        .history(&By::Server, &q.conv, q.before, q.limit)
        .await?;
    let body = ServerFrame::History {
        conv: &page.conv,
        messages: &page.messages,
        more: page.more,
    }
    .to_text();
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body.to_string()))
}

fn json_frame(status: StatusCode, frame: ServerFrame<'_>) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(frame.to_text().to_string())
}

#[derive(Deserialize)]
struct ApiRoom {
    room: String,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    owners: Vec<String>,
    #[serde(default)]
    members: Vec<String>,
}

async fn api_create_room(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<ApiRoom>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let b = body.into_inner();
    let info = state
        .chat
        .create(
            &By::Server,
            crate::store::NewRoom {
                room: b.room,
                private: b.private,
                owners: b.owners,
                members: b.members,
            },
            None,
        )
        .await?;
    Ok(json_frame(
        StatusCode::CREATED,
        ServerFrame::RoomInfo(&info),
    ))
}

async fn api_room_info(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let info = state.chat.room_info(&By::Server, &path).await?;
    Ok(json_frame(StatusCode::OK, ServerFrame::RoomInfo(&info)))
}

#[derive(Deserialize, Default)]
struct ApiRole {
    #[serde(default)]
    role: Option<String>,
}

async fn api_add_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: Option<web::Json<ApiRole>>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let (room, uid) = path.into_inner();
    let role = match body.and_then(|b| b.into_inner().role).as_deref() {
        None | Some("member") => crate::store::Role::Member,
        Some("owner") => crate::store::Role::Owner,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("role {other:?} must be member or owner"),
            ))
        }
    };
    state.chat.add(&By::Server, &room, &uid, role).await?;
    Ok(json_frame(
        StatusCode::OK,
        ServerFrame::Added {
            room: &room,
            uid: &uid,
            role: role.as_str(),
        },
    ))
}

#[derive(Deserialize)]
struct BanQuery {
    #[serde(default)]
    ban: bool,
}

async fn api_remove_member(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let (room, uid) = path.into_inner();
    let q = web::Query::<BanQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", &e.to_string()))?;
    state.chat.remove(&By::Server, &room, &uid, q.ban).await?;
    Ok(json_frame(
        StatusCode::OK,
        ServerFrame::Removed {
            room: &room,
            uid: &uid,
            ban: q.ban,
        },
    ))
}

async fn api_user_rooms(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    if !valid_id(&path) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "uid must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
        ));
    }
    let rooms: Vec<String> = state
        .chat
        .rooms_of(&path)
        .await?
        .into_iter()
        .map(|r| r.room)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "rooms": rooms })))
}

async fn api_delete_message(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    api_auth(&req, &state)?;
    let (conv, seq) = path.into_inner();
    let seq: u64 = seq.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "seq must be a positive integer",
        )
    })?;
    let sent = state
        .chat
        .change(crate::chat::ChangeRequest {
            by: By::Server,
            from: "system".into(),
            conv,
            change: crate::store::Change::Delete(seq),
            body: None,
            client_id: None,
            origin: None,
        })
        .await?;
    Ok(json_frame(StatusCode::OK, ServerFrame::Sent(&sent)))
}
