//! The peer API on the internal listener: `POST /internal/deliver`.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::queue::{MembershipEvent, PresenceEvent};
use crate::http::{bearer_ok, ApiError, AppState};
use crate::protocol::Message;
use crate::server::{Fanout, RoomPresence};

/// Largest batch body a peer may send (MAX_BATCH messages of the largest body, with
/// room for JSON escaping).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
struct BatchIn {
    from: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    presence: Vec<PresenceEvent>,
    #[serde(default)]
    membership: Vec<MembershipEvent>,
}

pub fn peer_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/internal/deliver")
            .app_data(web::PayloadConfig::new(MAX_BATCH_BYTES))
            .route(web::post().to(deliver)),
    );
}

async fn deliver(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let authorized = state
        .settings
        .cluster_secret
        .as_deref()
        .is_some_and(|secret| bearer_ok(&req, secret));
    if !authorized {
        log::warn!(
            "refused a peer delivery from {:?}: wrong or missing cluster secret",
            req.peer_addr()
        );
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authorization: Bearer <cluster secret> required",
        ));
    }
    let batch: BatchIn = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", &e.to_string()))?;
    let chat = &state.chat;
    let n = batch.messages.len();
    chat.metrics.peer_received.inc_by(n as u64);
    log::trace!(
        "{n} messages and {} presence events from {}",
        batch.presence.len(),
        batch.from
    );
    // Membership first: a message to a room just joined elsewhere may be in this batch.
    for m in batch.membership {
        if let Err(e) = chat.apply_membership(&m.uid, &m.room, m.joined).await {
            log::warn!(
                "membership of {} in {} from {} not applied: {e}",
                m.uid,
                m.room,
                batch.from
            );
        }
    }
    for message in batch.messages {
        chat.server.do_send(Fanout {
            message: Arc::new(message),
            exclude: None,
        });
    }
    for p in batch.presence {
        chat.server.do_send(RoomPresence {
            room: p.room,
            uid: p.uid,
            online: p.online,
        });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "delivered": n })))
}
