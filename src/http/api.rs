//! The server HTTP API under `/api` (contract section 5): its one route table,
//! [`API_ROUTES`], and its handlers, each checking the API key first.

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{
    mime, web, FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError, Route,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{bearer_ok, ApiError, AppState};
use crate::chat::{Outgoing, Target};
use crate::protocol::{valid_id, ServerFrame};
use crate::store::By;

/// One route of the server HTTP API (contract section 5).
pub struct ApiRoute {
    pub method: Method,
    /// The path, in the template syntax actix and OpenAPI share (`/api/rooms/{room}`).
    pub path: &'static str,
    /// The route without its method guard (added from `method`).
    handler: fn() -> Route,
}

/// Every route of the server HTTP API, and the only list of them: [`super::public_routes`]
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
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// The largest request body the API reads (as the JSON of a websocket frame is bounded
/// by the max frame size, 64 KiB by default).
pub const MAX_API_BODY: usize = 64 * 1024;

/// [`API_ROUTES`] as resources, one per path, each answering 405 with `Allow` for a
/// method it does not serve; any other path under `/api/` answers a JSON 404.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
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
