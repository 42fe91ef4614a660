//! The ClusterBridge actor: a thin shell over [`Liveness`] (heartbeats, the live table,
//! cleaning up after dead nodes) and [`Delivery`] (a batching queue per peer, POSTed to
//! its peer API with awc). Messages stored on this node are routed here: the bridge
//! looks up, in one Redis round trip for every message waiting, which nodes hold their
//! recipients, and queues each message for exactly those peers, serialised once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::delivery::{self, Delivery};
use super::directory::{Directory, Removed};
use super::liveness::{resync_after_death, Liveness, MAX_DEAD_CONVS};
use super::queue::{Batch, Item, MembershipEvent, PresenceEvent};
use super::recent_presence::RecentPresence;
use super::upkeep::UpkeepState;
use crate::metrics::Metrics;
use crate::protocol::Message as ChatMessage;
use crate::server::{ChatServer, PeerEvent, Presence, Reconcile, Resync, ResyncScope};
use crate::store::SharedStore;

/// Deadline of one POST to a peer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages waiting for a directory look-up; beyond this they go to every peer.
const MAX_ROUTING: usize = 50_000;
/// Messages one look-up serves.
const LOOKUP_BATCH: usize = 1024;
/// Mailbox bound of the bridge (senders use `send`, which waits for room).
pub const MAILBOX_CAPACITY: usize = 16_384;

pub struct BridgeConfig {
    pub node_id: String,
    pub advertise: String,
    pub secret: String,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
}

pub struct ClusterBridge {
    cfg: BridgeConfig,
    directory: Arc<Directory>,
    store: SharedStore,
    server: Addr<ChatServer>,
    metrics: Arc<Metrics>,
    registered: Arc<AtomicBool>,
    upkeep: Arc<UpkeepState>,
    liveness: Liveness,
    delivery: Delivery,
    /// Announcements of the last node TTL, for peers that appear (see its module).
    recent_presence: RecentPresence,
    client: Option<awc::Client>,
    /// Stored messages and events waiting for a look-up of their nodes.
    routing: Vec<Routed>,
    looking_up: bool,
    beating: bool,
    leaving: bool,
    ticker: Option<SpawnHandle>,
    /// Cleanups and announcements under way, so shutdown can wait for them.
    pending: usize,
}

impl ClusterBridge {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: BridgeConfig,
        directory: Arc<Directory>,
        store: SharedStore,
        server: Addr<ChatServer>,
        metrics: Arc<Metrics>,
        registered: Arc<AtomicBool>,
        upkeep: Arc<UpkeepState>,
        liveness: Liveness,
    ) -> Self {
        ClusterBridge {
            recent_presence: RecentPresence::new(cfg.node_ttl),
            cfg,
            directory,
            store,
            server,
            metrics,
            registered,
            upkeep,
            liveness,
            delivery: Delivery::default(),
            client: None,
            routing: Vec::new(),
            looking_up: false,
            beating: false,
            leaving: false,
            ticker: None,
            pending: 0,
        }
    }

    fn update_depth(&self) {
        self.metrics
            .peer_queue_depth
            .set(self.delivery.depth() as i64);
    }

    fn queue_message(&mut self, node: &str, json: &Arc<RawValue>, conv: &str) {
        if node == self.cfg.node_id {
            return;
        }
        if !self.delivery.message(node, json.clone(), conv) {
            self.metrics.peer_dropped.inc();
            log::warn!(
                "peer {node}: outbound queue full; it will resync the connections of {conv}"
            );
        }
    }

    /// Queues one routed thing for `node` (not this one).
    fn queue_routed(&mut self, node: &str, routed: &Routed, json: Option<&Arc<RawValue>>) {
        match (routed, json) {
            (Routed::Message(m, _), Some(json)) => self.queue_message(node, json, &m.conv),
            (Routed::Event(e), _) if node != self.cfg.node_id => {
                self.delivery.event(node, Item::Event(e.clone()), None)
            }
            _ => {}
        }
    }

    /// Starts a POST to `node` if none is in flight.
    fn flush(&mut self, node: String, ctx: &mut Context<Self>) {
        let Some(url) = self.liveness.url(&node) else {
            // Not (yet) in the live table: the next heartbeat decides.
            return;
        };
        let Some(batch) = self.delivery.take(&node, Instant::now()) else {
            self.update_depth();
            return;
        };
        self.update_depth();
        let Some(client) = self.client.clone() else {
            return;
        };
        let body = delivery::encode(&self.cfg.node_id, &batch);
        let n = batch
            .items
            .iter()
            .filter(|i| matches!(i, Item::Message(_)))
            .count();
        self.metrics.peer_posts.inc();
        self.metrics.peer_messages.inc_by(n as u64);
        self.metrics
            .peer_batch_size
            .observe(batch.items.len() as f64);
        let auth = format!("Bearer {}", self.cfg.secret);
        let fut = async move {
            let resp = client
                .post(format!("{url}/internal/deliver"))
                .insert_header(("Authorization", auth))
                .insert_header(("Content-Type", "application/json"))
                .timeout(PEER_TIMEOUT)
                .send_body(body)
                .await;
            match resp {
                Ok(mut r) => {
                    // Reading the (small) body to its end is what returns the connection
                    // to awc's pool; an unread body closes it.
                    let body = r.body().limit(64 * 1024).await;
                    match (r.status().is_success(), body) {
                        (true, Ok(_)) => Ok(()),
                        (true, Err(e)) => Err(format!("bad answer: {e}")),
                        (false, _) => Err(format!("answered {}", r.status())),
                    }
                }
                Err(e) => Err(e.to_string()),
            }
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            act.delivered(node, batch, result, ctx);
        }));
    }

    fn delivered(
        &mut self,
        node: String,
        batch: Batch,
        result: Result<(), String>,
        ctx: &mut Context<Self>,
    ) {
        match result {
            Ok(()) => {
                self.delivery.succeeded(&node, &batch);
                self.flush(node, ctx);
            }
            Err(e) => {
                self.metrics.peer_failures.inc();
                if let Some(wait) = self.delivery.failed(&node, batch, Instant::now()) {
                    log::warn!("peer {node}: delivery failed ({e}); retrying in {wait:?}");
                    ctx.run_later(wait, move |act, ctx| act.flush(node, ctx));
                }
            }
        }
        self.update_depth();
    }

    /// Looks up the nodes of every message waiting, then queues each for its peers.
    fn route(&mut self, ctx: &mut Context<Self>) {
        if self.looking_up || self.routing.is_empty() {
            return;
        }
        self.looking_up = true;
        let n = self.routing.len().min(LOOKUP_BATCH);
        let routed: Vec<Routed> = self.routing.drain(..n).collect();
        let lookups = delivery::lookups(routed.iter().map(Routed::conv));
        let directory = self.directory.clone();
        ctx.spawn(
            async move {
                let users = directory.user_nodes(&lookups.users).await?;
                let rooms = directory.room_nodes(&lookups.rooms).await?;
                let users: HashMap<String, Vec<String>> =
                    lookups.users.into_iter().zip(users).collect();
                let rooms: HashMap<String, Vec<String>> =
                    lookups.rooms.into_iter().zip(rooms).collect();
                Ok::<_, crate::store::StoreError>((users, rooms))
            }
            .into_actor(self)
            .map(move |found, act, ctx| {
                act.looking_up = false;
                let mut touched = std::collections::BTreeSet::new();
                match found {
                    Ok((users, rooms)) => {
                        for r in &routed {
                            let json = r.json();
                            for node in delivery::nodes_of(r.conv(), &users, &rooms) {
                                act.queue_routed(node, r, json.as_ref());
                                touched.insert(node.to_owned());
                            }
                        }
                    }
                    Err(e) => {
                        // Without the directory, every live peer gets them (each
                        // delivers to whoever it holds).
                        log::warn!(
                            "directory look-up failed ({e}); sending {} messages and events to every peer",
                            routed.len()
                        );
                        let peers = act.liveness.peers();
                        for r in &routed {
                            let json = r.json();
                            for node in &peers {
                                act.queue_routed(node, r, json.as_ref());
                            }
                        }
                        touched.extend(peers);
                    }
                }
                for node in touched {
                    act.flush(node, ctx);
                }
                act.route(ctx);
            }),
        );
    }

    fn beat(&mut self, ctx: &mut Context<Self>) {
        if self.beating || self.leaving {
            return;
        }
        self.beating = true;
        let directory = self.directory.clone();
        let advertise = self.cfg.advertise.clone();
        let ttl = self.cfg.node_ttl.as_millis() as u64;
        let started = Instant::now();
        ctx.spawn(
            async move { directory.heartbeat(&advertise, ttl).await }
                .into_actor(self)
                .map(move |r, act, ctx| {
                    act.beating = false;
                    if act.leaving {
                        return;
                    }
                    match r {
                        Ok(hb) => act.beat_answered(hb, started, ctx),
                        Err(e) => {
                            act.liveness.failed(started);
                            if act.registered.swap(false, Ordering::Relaxed) {
                                log::error!(
                                    "node {}: heartbeat failed, not ready: {e}",
                                    act.cfg.node_id
                                );
                            }
                        }
                    }
                }),
        );
    }

    fn beat_answered(
        &mut self,
        hb: super::directory::Heartbeat,
        started: Instant,
        ctx: &mut Context<Self>,
    ) {
        let live = hb.live.len();
        let now = Instant::now();
        let outcome = self.liveness.beat(hb, started, now);
        self.metrics
            .live_peers
            .set(self.liveness.peers().len() as i64);
        if !self.registered.swap(true, Ordering::Relaxed) {
            log::info!(
                "node {} registered in the cluster ({live} live nodes)",
                self.cfg.node_id
            );
        }
        if outcome.rejoin || self.upkeep.dirty.load(Ordering::SeqCst) {
            // Redis lost this node's entries (or some were not written): write them all
            // again, then tell every connection here to sync.
            if outcome.rejoin {
                log::warn!(
                    "node {}: missing from the registry or cut off; writing its directory entries again and resyncing its connections",
                    self.cfg.node_id
                );
                let directory = self.directory.clone();
                ctx.spawn(
                    async move {
                        if let Err(e) = directory.release_own_cleanup().await {
                            log::warn!("cannot release the cleanup claim on this node: {e}");
                        }
                    }
                    .into_actor(self),
                );
            }
            if self
                .server
                .try_send(Reconcile { resync_after: true })
                .is_err()
            {
                // Asked again at the next heartbeat (the directory stays dirty).
                self.metrics.mailbox_full.inc();
                self.upkeep.dirty.store(true, Ordering::SeqCst);
            }
        }
        let mut gone = outcome.gone;
        // A queue for a node that never appeared in the table since it was made.
        gone.extend(
            self.delivery
                .older_than(started)
                .into_iter()
                .filter(|n| !self.liveness.is_live(n)),
        );
        for node in gone {
            let n = self.delivery.give_up(&node);
            if n > 0 {
                self.metrics.peer_dropped.inc_by(n as u64);
                log::warn!("peer {node} is gone; dropped {n} queued deliveries (they stay stored)");
            }
        }
        // A peer that just appeared was left out of the announcements made before: it
        // gets those of the last TTL, ahead of any later one (its queue is in order).
        let replay = if outcome.joined.is_empty() {
            self.recent_presence.prune(now);
            Vec::new()
        } else {
            self.recent_presence.replay(now)
        };
        for peer in &outcome.joined {
            if !replay.is_empty() {
                log::debug!(
                    "node {peer} joined: replaying {} recent presence announcements to it",
                    replay.len()
                );
            }
            for event in &replay {
                self.delivery
                    .event(peer, Item::Presence(event.clone()), None);
            }
        }
        for peer in self.liveness.peers() {
            self.flush(peer, ctx);
        }
        for dead in outcome.dead {
            self.clean_up(dead, ctx);
        }
        self.update_depth();
    }

    /// Removes a dead node's entries (if no other node claimed it), announces its users
    /// offline and tells the connections that may have missed something, here and on
    /// every peer, to sync: the dead node may have stored messages it never delivered
    /// (see [`resync_after_death`]).
    fn clean_up(&mut self, dead: String, ctx: &mut Context<Self>) {
        let directory = self.directory.clone();
        let store = self.store.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                if !directory.claim_cleanup(&dead).await? {
                    return Ok(None);
                }
                let removed = directory.remove_node(&dead).await?;
                let (gone, scope) = after_death(&store, &dead, &removed).await;
                Ok::<_, crate::store::StoreError>(Some((dead, gone, scope)))
            }
            .into_actor(self)
            .map(|r, act, ctx| {
                act.pending -= 1;
                match r {
                    Ok(None) => {}
                    Ok(Some((dead, gone, scope))) => {
                        log::warn!(
                            "node {dead} stopped heartbeating; removed it ({} users went offline); resyncing {} on every node",
                            gone.len(),
                            describe(&scope)
                        );
                        act.resync_everywhere(gone, scope, ctx);
                    }
                    Err(e) => log::warn!("cannot clean up a dead node yet: {e}"),
                }
            }),
        );
    }

    /// What a dead node's cleaner does after the removal: announces the users who went
    /// offline and tells the connections in `scope`, here and on every peer, to sync.
    fn resync_everywhere(
        &mut self,
        gone: Vec<(String, Vec<String>)>,
        scope: ResyncScope,
        ctx: &mut Context<Self>,
    ) {
        for (uid, rooms) in gone {
            self.announce(uid, false, rooms, ctx);
        }
        for peer in self.liveness.peers() {
            self.delivery.resync(&peer, &scope);
            self.flush(peer, ctx);
        }
        let server = self.server.clone();
        ctx.spawn(
            async move {
                let _ = server.send(Resync { scope }).await;
            }
            .into_actor(self),
        );
    }

    /// Tells every node (this one included) that `uid` came online or went offline.
    fn announce(&mut self, uid: String, online: bool, rooms: Vec<String>, ctx: &mut Context<Self>) {
        let event = Arc::new(PresenceEvent {
            uid,
            online,
            rooms,
            recheck: false,
        });
        self.recent_presence.record(event.clone(), Instant::now());
        for peer in self.liveness.peers() {
            self.delivery
                .event(&peer, Item::Presence(event.clone()), None);
            self.flush(peer, ctx);
        }
        let server = self.server.clone();
        let local = Presence {
            uid: event.uid.clone(),
            online: event.online,
            rooms: event.rooms.clone(),
        };
        ctx.spawn(
            async move {
                let _ = server.send(local).await;
            }
            .into_actor(self),
        );
    }
}

impl Actor for ClusterBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        // awc clients belong to the thread that made them: this actor's arbiter.
        self.client = Some(
            awc::Client::builder()
                .timeout(PEER_TIMEOUT)
                .connector(awc::Connector::new().timeout(PEER_TIMEOUT).limit(64))
                .finish(),
        );
        self.beat(ctx);
        self.ticker = Some(ctx.run_interval(self.cfg.heartbeat, |act, ctx| act.beat(ctx)));
    }
}

/// What is routed to the peers holding a conversation's participants.
#[derive(Clone)]
pub enum Routed {
    /// A message this node stored, and its `message` frame (serialised once, for this
    /// node's sessions and every peer).
    Message(Arc<ChatMessage>, Arc<RawValue>),
    /// A mark or typing event that passed this node's rules.
    Event(Arc<PeerEvent>),
}

impl Routed {
    fn conv(&self) -> &str {
        match self {
            Routed::Message(m, _) => &m.conv,
            Routed::Event(e) => &e.conv,
        }
    }

    /// A message's frame, for all its peers.
    fn json(&self) -> Option<Arc<RawValue>> {
        match self {
            Routed::Message(_, json) => Some(json.clone()),
            Routed::Event(_) => None,
        }
    }
}

/// After node `dead`'s entries were removed: the users who went offline with it (and
/// their rooms, for presence) and whom to tell to resync (see [`resync_after_death`]):
/// the conversations of its users and of those who left it lately.
async fn after_death(
    store: &SharedStore,
    dead: &str,
    removed: &Removed,
) -> (Vec<(String, Vec<String>)>, ResyncScope) {
    let offline: std::collections::HashSet<&String> = removed.offline.iter().collect();
    let mut convs = Some(std::collections::BTreeSet::new());
    let mut gone = Vec::new();
    for uid in removed.users.iter().chain(&removed.left) {
        let theirs = tokio::time::timeout(PEER_TIMEOUT, store.conversations(uid))
            .await
            .unwrap_or(Err(crate::store::StoreError::Timeout(PEER_TIMEOUT)));
        let theirs = theirs.unwrap_or_else(|e| {
            log::warn!("cannot read the conversations of {uid} of dead node {dead}: {e}");
            convs = None;
            Vec::new()
        });
        if offline.contains(uid) {
            let rooms = theirs
                .iter()
                .filter_map(|c| match crate::protocol::Conv::parse(&c.conv) {
                    Some(crate::protocol::Conv::Room(r)) => Some(r.to_owned()),
                    _ => None,
                })
                .collect();
            gone.push((uid.clone(), rooms));
        }
        if let Some(set) = &mut convs {
            set.extend(theirs.into_iter().map(|c| c.conv));
            if set.len() > MAX_DEAD_CONVS {
                convs = None;
            }
        }
    }
    (gone, resync_after_death(removed.api_sends, convs))
}

fn describe(scope: &ResyncScope) -> String {
    match scope {
        ResyncScope::All => "every connection".to_owned(),
        ResyncScope::Convs(c) => format!("the connections of {} conversations", c.len()),
    }
}

/// What an earlier process with this node's id left in the directory when it started:
/// that process ended without leaving (killed, crashed) and may have stored messages it
/// never delivered. A restart within the TTL is never seen dead by the others, so this
/// node does for its predecessor what a dead node's cleaner does.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Predecessor {
    pub removed: Removed,
}

impl Handler<Predecessor> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Predecessor, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let me = self.cfg.node_id.clone();
        self.pending += 1;
        ctx.spawn(
            async move { after_death(&store, &me, &msg.removed).await }
                .into_actor(self)
                .map(|(gone, scope), act, ctx| {
                    act.pending -= 1;
                    log::warn!(
                        "node {}: an earlier process with this id ended without leaving; resyncing {} on every node",
                        act.cfg.node_id,
                        describe(&scope)
                    );
                    act.resync_everywhere(gone, scope, ctx);
                }),
        );
    }
}

/// Deliver a message or event to the peers that hold its participants.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    pub routed: Routed,
}

impl Handler<Route> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Route, ctx: &mut Context<Self>) {
        if self.routing.len() >= MAX_ROUTING {
            // Look-ups are far behind: skip the look-up, every peer gets it.
            let json = msg.routed.json();
            for peer in self.liveness.peers() {
                self.queue_routed(&peer, &msg.routed, json.as_ref());
                self.flush(peer, ctx);
            }
            return;
        }
        self.routing.push(msg.routed);
        self.route(ctx);
    }
}

/// A user came online (first connection anywhere) or went offline.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Announce {
    pub uid: String,
    pub online: bool,
    /// Their rooms small enough for live presence events.
    pub rooms: Vec<String>,
}

impl Handler<Announce> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Announce, ctx: &mut Context<Self>) {
        self.announce(msg.uid, msg.online, msg.rooms, ctx);
    }
}

/// A membership change: the other nodes holding connections of the user must follow
/// it. Answers once they all confirmed (or the wait ran out).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Forward {
    pub event: MembershipEvent,
    pub timeout: Duration,
}

impl Handler<Forward> for ClusterBridge {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: Forward, _: &mut Context<Self>) -> Self::Result {
        let directory = self.directory.clone();
        let uid = msg.event.uid.clone();
        let timeout = msg.timeout;
        Box::pin(
            async move { directory.user_nodes(&[uid]).await }
                .into_actor(self)
                .map(move |nodes, act, ctx| {
                    let nodes = match nodes {
                        Ok(mut n) => n.pop().unwrap_or_default(),
                        Err(e) => {
                            log::warn!("membership change of {} not forwarded: {e}", msg.event.uid);
                            // Every live peer then: better twice than never.
                            act.liveness.peers()
                        }
                    };
                    let event = Arc::new(msg.event);
                    let mut acks = Vec::new();
                    for node in nodes {
                        if node == act.cfg.node_id {
                            continue;
                        }
                        let (ack, acked) = oneshot::channel();
                        act.delivery
                            .event(&node, Item::Membership(event.clone()), Some(ack));
                        acks.push(acked);
                        act.flush(node, ctx);
                    }
                    acks
                })
                .then(move |acks, act, _| {
                    async move {
                        let all = futures_util::future::join_all(acks);
                        match tokio::time::timeout(timeout, all).await {
                            Ok(answers) => answers.into_iter().all(|a| a == Ok(true)),
                            Err(_) => false,
                        }
                    }
                    .into_actor(act)
                }),
        )
    }
}

/// Whether anything is still on its way (directory writes, peer POSTs, look-ups).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Busy;

impl Handler<Busy> for ClusterBridge {
    type Result = bool;

    fn handle(&mut self, _: Busy, _: &mut Context<Self>) -> bool {
        self.pending > 0
            || self.looking_up
            || !self.routing.is_empty()
            || self.upkeep.pending.load(Ordering::SeqCst) > 0
            || self.delivery.busy()
    }
}

/// Leaves the cluster: removes this node's registry and directory entries.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deregister;

impl Handler<Deregister> for ClusterBridge {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Deregister, ctx: &mut Context<Self>) -> Self::Result {
        // No more heartbeats: they would register the node again.
        self.leaving = true;
        if let Some(t) = self.ticker.take() {
            ctx.cancel_future(t);
        }
        let directory = self.directory.clone();
        let id = self.cfg.node_id.clone();
        Box::pin(
            async move { directory.remove_node(&id).await }
                .into_actor(self)
                .map(|r, act, _| {
                    act.registered.store(false, Ordering::Relaxed);
                    match r {
                        Ok(_) => log::info!("node {} left the cluster", act.cfg.node_id),
                        Err(e) => log::warn!("node {} could not deregister: {e}", act.cfg.node_id),
                    }
                }),
        )
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
