//! The route tables (public and internal listener) and their handlers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::Actor;
use actix_http::body::{BodyStream, BoxBody};
use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{
    mime, web, FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError, Route,
};
use askama::Template;
use serde::de::DeserializeOwned;
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
    api_routes(cfg);
    cfg.default_service(web::to(not_found));
}

/// One route of the server HTTP API (contract section 5).
pub struct ApiRoute {
    pub method: Method,
    /// The path, in the template syntax actix and OpenAPI share (`/api/rooms/{room}`).
    pub path: &'static str,
    /// The route without its method guard (added from `method`).
    handler: fn() -> Route,
}

/// Every route of the server HTTP API, and the only list of them: [`public_routes`]
/// serves exactly these (and answers 405 with `Allow` for other methods on their paths),
/// and `tests/openapi.rs` checks that `docs/openapi.json` describes exactly these.
pub static API_ROUTES: &[ApiRoute] = &[
    ApiRoute {
        method: Method::GET,
        path: "/api/openapi.json",
        handler: || web::route().to(api_openapi),
    },
    ApiRoute {
        method: Method::POST,
        path: "/api/messages",
        handler: || web::route().to(api_post_message),
    },
    ApiRoute {
        method: Method::DELETE,
        path: "/api/messages/{conv}/{seq}",
        handler: || web::route().to(api_delete_message),
    },
    ApiRoute {
        method: Method::GET,
        path: "/api/online",
        handler: || web::route().to(api_online),
    },
    ApiRoute {
        method: Method::GET,
        path: "/api/history",
        handler: || web::route().to(api_history),
    },
    ApiRoute {
        method: Method::POST,
        path: "/api/rooms",
        handler: || web::route().to(api_create_room),
    },
    ApiRoute {
        method: Method::GET,
        path: "/api/rooms/{room}",
        handler: || web::route().to(api_room_info),
    },
    ApiRoute {
        method: Method::PUT,
        path: "/api/rooms/{room}/members/{uid}",
        handler: || web::route().to(api_add_member),
    },
    ApiRoute {
        method: Method::DELETE,
        path: "/api/rooms/{room}/members/{uid}",
        handler: || web::route().to(api_remove_member),
    },
    ApiRoute {
        method: Method::GET,
        path: "/api/users/{uid}/rooms",
        handler: || web::route().to(api_user_rooms),
    },
];

/// The OpenAPI 3.1 document of the server HTTP API, served at `/api/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

/// The largest request body the API reads (as the JSON of a websocket frame is bounded
/// by the max frame size, 64 KiB by default).
pub const MAX_API_BODY: usize = 64 * 1024;

/// [`API_ROUTES`] as resources, one per path, each answering 405 with `Allow` for a
/// method it does not serve; any other path under `/api/` answers a JSON 404.
fn api_routes(cfg: &mut web::ServiceConfig) {
    let mut paths: Vec<&'static str> = Vec::new();
    for r in API_ROUTES {
        if !paths.contains(&r.path) {
            paths.push(r.path);
        }
    }
    for path in paths {
        let routes: Vec<&ApiRoute> = API_ROUTES.iter().filter(|r| r.path == path).collect();
        let allow = routes
            .iter()
            .map(|r| r.method.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut resource = web::resource(path);
        for r in routes {
            resource = resource.route((r.handler)().method(r.method.clone()));
        }
        cfg.service(resource.default_service(web::to(move || {
            let allow = allow.clone();
            async move { method_not_allowed(&allow) }
        })));
    }
    cfg.service(web::scope("/api").default_service(web::to(|| async {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route").error_response()
    })));
}

fn method_not_allowed(allow: &str) -> HttpResponse {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this route answers {allow}"),
    )
    .error_response();
    if let Ok(value) = HeaderValue::from_str(allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// Internal listener: the peer API only.
pub fn internal_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz));
    crate::peer_api::peer_routes(cfg);
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

/// The caller of an API route showed the API key. As the first argument of a handler
/// it is checked before anything else of the request is looked at.
struct ApiAccess;

impl FromRequest for ApiAccess {
    type Error = ApiError;
    type Future = std::future::Ready<Result<ApiAccess, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let key = req
            .app_data::<web::Data<AppState>>()
            .and_then(|s| s.settings.api_key.as_deref());
        std::future::ready(match key {
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_enabled",
                "the server API is disabled (start with --api-key)",
            )),
            Some(key) if bearer_ok(req, key) => Ok(ApiAccess),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authorization: Bearer <api key> required",
            )
            .with_challenge()),
        })
    }
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
}

/// The query string as `T`; a malformed one is `invalid`.
fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| invalid(&e.to_string()))
}

/// The JSON object of a request body as `T`, read up to [`MAX_API_BODY`] bytes; None
/// for an empty body. Errors as the websocket has them: not JSON or not an object is
/// `bad_json`, a missing or mistyped field `invalid`; a body over the bound is
/// `too_large` (413), one that does not say it is JSON 415.
async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Option<T>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("the request body is over {MAX_API_BODY} bytes"),
        )
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_API_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match payload.to_bytes_limited(MAX_API_BODY).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("cannot read the request body: {e}"),
            ))
        }
        Err(_) => return Err(too_large()),
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    let json = matches!(req.mime_type(), Ok(Some(m))
        if m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_json",
            "Content-Type must be application/json",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            &format!("the body is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| invalid(&e.to_string()))
}

/// [`json_body`] where the body is required.
async fn required_json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    json_body(req, payload).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the request body must be a JSON object",
        )
    })
}

/// For optional fields: absent is None, but an explicit `null` is refused like any
/// other value of the wrong type (the document says these are strings).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Sequence numbers are 64-bit signed integers in the store: 1 ..= i64::MAX.
const MAX_SEQ: u64 = i64::MAX as u64;

fn json_frame(status: StatusCode, frame: ServerFrame<'_>) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(frame.to_text().to_string())
}

async fn api_openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI_JSON)
}

#[derive(Deserialize)]
struct ApiMessage {
    from: String,
    #[serde(default, deserialize_with = "present")]
    to: Option<String>,
    #[serde(default, deserialize_with = "present")]
    room: Option<String>,
    body: String,
    #[serde(default, deserialize_with = "present")]
    client_id: Option<String>,
}

async fn api_post_message(
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let msg: ApiMessage = required_json_body(&req, payload).await?;
    let target = match (msg.to, msg.room) {
        (Some(to), None) => Target::User(to),
        (None, Some(room)) => Target::Room(room),
        _ => return Err(invalid("give exactly one of \"to\" and \"room\"")),
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
    Ok(json_frame(StatusCode::OK, ServerFrame::Sent(&sent)))
}

#[derive(Deserialize)]
struct OnlineQuery {
    uids: Option<String>,
}

async fn api_online(
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let q: OnlineQuery = query(&req)?;
    // Every comma-separated item must be an id: an empty one (`uids=`, `uids=a,,b`) is
    // refused by `online` like any other bad id. No `uids` at all asks about no one.
    let uids: Vec<String> = match &q.uids {
        None => Vec::new(),
        Some(list) => list.split(',').map(str::to_owned).collect(),
    };
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
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let q: HistoryQuery = query(&req)?;
    if q.before.is_some_and(|b| b > MAX_SEQ) {
        return Err(invalid(&format!("before must be at most {MAX_SEQ}")));
    }
    let page = state
        .chat
        .history(&By::Server, &q.conv, q.before, q.limit)
        .await?;
    Ok(json_frame(
        StatusCode::OK,
        ServerFrame::History {
            conv: &page.conv,
            messages: &page.messages,
            more: page.more,
        },
    ))
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
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let b: ApiRoom = required_json_body(&req, payload).await?;
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
    _: ApiAccess,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let info = state.chat.room_info(&By::Server, &path).await?;
    Ok(json_frame(StatusCode::OK, ServerFrame::RoomInfo(&info)))
}

#[derive(Deserialize)]
struct ApiRole {
    #[serde(default, deserialize_with = "present")]
    role: Option<String>,
}

async fn api_add_member(
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (room, uid) = path.into_inner();
    // No body: a plain member.
    let body: Option<ApiRole> = json_body(&req, payload).await?;
    let role = match body.and_then(|b| b.role).as_deref() {
        None | Some("member") => crate::store::Role::Member,
        Some("owner") => crate::store::Role::Owner,
        Some(other) => {
            return Err(invalid(&format!(
                "role {:?} must be member or owner",
                other.chars().take(70).collect::<String>()
            )))
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
    _: ApiAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (room, uid) = path.into_inner();
    let q: BanQuery = query(&req)?;
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
    _: ApiAccess,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if !valid_id(&path) {
        return Err(invalid(
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
    _: ApiAccess,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (conv, seq) = path.into_inner();
    let seq = seq
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=MAX_SEQ).contains(s) && !seq.starts_with('+'))
        .ok_or_else(|| invalid(&format!("seq must be an integer from 1 to {MAX_SEQ}")))?;
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
