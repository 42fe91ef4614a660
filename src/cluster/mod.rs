//! Cluster mode: placeholder until the cluster work lands.

use std::sync::Arc;

use actix::prelude::*;

use crate::chat::ChatError;
use crate::protocol::Message as ChatMessage;

/// Presence and membership transitions of local users, for the cluster directory.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ClusterEvent {
    UserOnline {
        uid: String,
        rooms: Vec<String>,
    },
    UserOffline {
        uid: String,
        rooms: Vec<String>,
    },
    Membership {
        uid: String,
        room: String,
        joined: bool,
    },
}

#[derive(Clone)]
pub struct Cluster {}

impl Cluster {
    pub fn route(&self, _message: Arc<ChatMessage>) {}

    pub async fn online(&self, uids: &[String]) -> Result<Vec<bool>, ChatError> {
        Ok(vec![false; uids.len()])
    }
}

impl Cluster {
    pub fn registered(&self) -> bool {
        true
    }
}

pub fn peer_routes(_cfg: &mut actix_web::web::ServiceConfig) {}

impl Cluster {
    pub async fn deregister(&self) {}
    pub async fn stop(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("not built yet")]
    NotBuilt,
}

pub async fn start(
    _settings: std::sync::Arc<crate::config::Settings>,
    _limits: crate::store::StoreLimits,
    _server: Addr<crate::server::ChatServer>,
    _metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<(crate::store::SharedStore, Cluster), ClusterError> {
    Err(ClusterError::NotBuilt)
}
