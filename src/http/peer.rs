//! The peer API on the internal listener: `POST /internal/deliver`, the receiving end
//! of [`crate::cluster`]'s peer queues. It is part of the HTTP layer, not of `cluster`,
//! because it applies batches through [`crate::chat::Chat`], which itself uses the
//! cluster: so the layers stay one-way (cluster below chat below http).
//!
//! A batch is applied in order: membership changes first (a message to a room just
//! joined elsewhere may be in the same batch), then the messages, then presence, then
//! the resyncs for what the sender had to drop. The answer comes only after the
//! ChatServer took everything (its mailbox is bounded), so a node that falls behind
//! slows its peers' queues instead of growing its own.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytestring::ByteString;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{bearer_ok, ApiError, AppState};
use crate::cluster::queue::{MembershipEvent, PresenceEvent};
use crate::protocol::{FrameHead, Message, ServerFrame};
use crate::server::{
    ConvEvent, FanoutBatch, Membership, PeerEvent, PeerMessage, Presence, Resync, ResyncScope,
};

/// Largest batch body a peer may send (MAX_BATCH messages of the largest body, with
/// room for JSON escaping).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
struct BatchIn<'a> {
    from: String,
    /// `message` frames, passed on to the sessions as they came (see [`peer_message`]).
    #[serde(default, borrow)]
    messages: Vec<&'a RawValue>,
    #[serde(default)]
    presence: Vec<PresenceEvent>,
    #[serde(default)]
    membership: Vec<MembershipEvent>,
    #[serde(default)]
    events: Vec<PeerEvent>,
    #[serde(default)]
    lost: Vec<String>,
    #[serde(default)]
    lost_all: bool,
}

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/internal/deliver")
            .app_data(web::PayloadConfig::new(MAX_BATCH_BYTES))
            .route(web::post().to(deliver)),
    );
}

/// A stored message from a peer's batch: its frame's bytes as the peer serialised them
/// (once, for every connection that gets it), and whom it is for, read from the frame.
/// A peer of an older version sends the bare message; its frame is made here.
fn peer_message(json: &RawValue) -> Result<PeerMessage, serde_json::Error> {
    let head: FrameHead = serde_json::from_str(json.get())?;
    let owned = |s: Option<std::borrow::Cow<str>>| s.map(|s| s.into_owned());
    let frame = if head.kind.as_deref() == Some("message") {
        ByteString::from(json.get())
    } else {
        ServerFrame::Message(&serde_json::from_str::<Message>(json.get())?).to_text()
    };
    Ok(PeerMessage {
        from: head.from.into_owned(),
        to: owned(head.to),
        room: owned(head.room),
        frame,
    })
}

fn stopped() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "this node is stopping",
    )
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
    let bad_json =
        |e: serde_json::Error| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", &e.to_string());
    let batch: BatchIn = serde_json::from_slice(&body).map_err(bad_json)?;
    let messages = batch
        .messages
        .iter()
        .map(|json| peer_message(json))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad_json)?;
    let chat = &state.chat;
    let server = &chat.server;
    let n = batch.messages.len();
    chat.metrics.peer_received.inc_by(n as u64);
    log::trace!(
        "{n} messages, {} presence and {} membership events from {}",
        batch.presence.len(),
        batch.membership.len(),
        batch.from
    );
    for m in batch.membership {
        // The sender waits for this answer before it confirms the change, so the
        // directory must route (or stop routing) the room here first.
        let change = Membership {
            uid: m.uid,
            room: m.room,
            joined: m.joined,
            members: m.members,
            by: m.by,
            origin: None,
        };
        if let Err(e) = chat.apply_membership(change).await {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("a membership change was not applied: {e}"),
            ));
        }
    }
    if n > 0 {
        server
            .send(FanoutBatch { messages })
            .await
            .map_err(|_| stopped())?;
    }
    for e in batch.events {
        server
            .send(ConvEvent::from(e))
            .await
            .map_err(|_| stopped())?;
    }
    let now = rechecked(chat, &batch.presence, &batch.from).await;
    for p in batch.presence {
        let online = if p.recheck {
            now.get(&p.uid).copied().unwrap_or(p.online)
        } else {
            p.online
        };
        server
            .send(Presence {
                uid: p.uid,
                online,
                rooms: p.rooms,
            })
            .await
            .map_err(|_| stopped())?;
    }
    let scope = if batch.lost_all {
        Some(ResyncScope::All)
    } else if !batch.lost.is_empty() {
        Some(ResyncScope::Convs(batch.lost))
    } else {
        None
    };
    if let Some(scope) = scope {
        log::warn!(
            "peer {} dropped messages for this node ({scope:?}); resyncing those connections",
            batch.from
        );
        server.send(Resync { scope }).await.map_err(|_| stopped())?;
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "delivered": n })))
}

/// The presence now of the users of the batch's rechecks (replays of announcements made
/// before this node was in the sender's live table). Without the directory, the
/// replays are taken as they came: the sender's state, likely still right.
async fn rechecked(
    chat: &crate::chat::Chat,
    presence: &[PresenceEvent],
    from: &str,
) -> HashMap<String, bool> {
    let uids: Vec<String> = presence
        .iter()
        .filter(|p| p.recheck)
        .map(|p| p.uid.clone())
        .collect();
    let Some(cluster) = chat.cluster.as_ref().filter(|_| !uids.is_empty()) else {
        return HashMap::new();
    };
    match cluster.online(&uids).await {
        Ok(online) => uids.into_iter().zip(online).collect(),
        Err(e) => {
            log::warn!(
                "cannot recheck the presence of {} users replayed by {from} ({e}); taking them as sent",
                uids.len()
            );
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn a_peers_frame_is_passed_on_as_it_came() {
        let m = Message::new(
            "dm:alice:bob",
            3,
            "i".into(),
            "alice",
            Some("a \"b\"".into()),
            7,
        );
        let frame = m.frame().unwrap();
        assert_eq!(frame.get(), &*ServerFrame::Message(&m).to_text());
        // A field this version does not know travels through: the bytes are not remade.
        let newer = raw(&frame.get().replacen('{', r#"{"later":[1,2],"#, 1));
        let p = peer_message(&newer).unwrap();
        assert_eq!(&*p.frame, newer.get());
        assert_eq!(p.from, "alice");
        assert_eq!(p.to.as_deref(), Some("bob"));
        assert_eq!(p.room, None);
    }

    #[test]
    fn an_older_peers_bare_message_gets_its_frame_made_here() {
        let m = Message::new("room:lobby", 1, "i".into(), "carol", Some("x".into()), 7);
        let bare = serde_json::value::to_raw_value(&m).unwrap();
        let p = peer_message(&bare).unwrap();
        assert_eq!(p.frame, ServerFrame::Message(&m).to_text());
        assert_eq!(p.room.as_deref(), Some("lobby"));
        assert_eq!(p.to, None);
    }

    #[test]
    fn a_message_without_its_sender_is_refused() {
        assert!(peer_message(&raw(r#"{"type":"message","conv":"room:x","seq":1}"#)).is_err());
        assert!(peer_message(&raw(r#"[1]"#)).is_err());
    }
}
