//! The ClusterBridge actor: heartbeats this node into Redis, keeps the table of live
//! peers, cleans up after dead ones, keeps this node's directory entries, and carries
//! stored messages and presence events to the peers that need them in batched POSTs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use serde_json::value::RawValue;

use super::directory::{Directory, LocalUser};
use super::queue::{Item, MembershipEvent, PeerQueue, PresenceEvent};
use crate::metrics::Metrics;
use crate::protocol::Message as ChatMessage;
use crate::server::{ChatServer, RoomPresence, Snapshot, MAILBOX_CAPACITY};
use crate::store::SharedStore;

/// Most items in one POST.
pub const MAX_BATCH: usize = 512;
/// Most items waiting for one peer; more are dropped (they are stored: recipients get
/// them at their next sync).
pub const PEER_QUEUE_CAPACITY: usize = 20_000;
/// Deadline of one POST to a peer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before sending a failed directory removal again. Removals are idempotent, so
/// one that did land and is sent again changes nothing.
const REMOVAL_RETRY: Duration = Duration::from_secs(1);
/// Attempts at one removal before it is given up (with an error in the log; the
/// connection then counts until this node stops).
const REMOVAL_ATTEMPTS: u32 = 30;

/// Shared with the [`super::Cluster`] handle.
pub struct SharedState {
    pub live: RwLock<HashMap<String, String>>,
    pub registered: AtomicBool,
}

pub struct ClusterBridge {
    node_id: String,
    advertise: String,
    secret: String,
    heartbeat: Duration,
    node_ttl: Duration,
    directory: Arc<Directory>,
    store: SharedStore,
    server: Addr<ChatServer>,
    metrics: Arc<Metrics>,
    shared: Arc<SharedState>,
    peers: HashMap<String, PeerQueue>,
    client: Option<awc::Client>,
    beating: bool,
    ticker: Option<SpawnHandle>,
    leaving: bool,
    /// Directory updates under way, so shutdown can wait for them.
    pending: usize,
}

pub struct BridgeConfig {
    pub node_id: String,
    pub advertise: String,
    pub secret: String,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
}

impl ClusterBridge {
    pub fn new(
        config: BridgeConfig,
        directory: Arc<Directory>,
        store: SharedStore,
        server: Addr<ChatServer>,
        metrics: Arc<Metrics>,
        shared: Arc<SharedState>,
    ) -> Self {
        ClusterBridge {
            node_id: config.node_id,
            advertise: config.advertise,
            secret: config.secret,
            heartbeat: config.heartbeat,
            node_ttl: config.node_ttl,
            directory,
            store,
            server,
            metrics,
            shared,
            peers: HashMap::new(),
            client: None,
            beating: false,
            ticker: None,
            leaving: false,
            pending: 0,
        }
    }

    fn queued(&self) -> usize {
        self.peers.values().map(PeerQueue::len).sum()
    }

    fn update_depth(&self) {
        self.metrics.peer_queue_depth.set(self.queued() as i64);
    }

    fn enqueue(&mut self, node: &str, item: Item, ctx: &mut Context<Self>) {
        if node == self.node_id {
            return;
        }
        let alive = self
            .shared
            .live
            .read()
            .map(|l| l.contains_key(node))
            .unwrap_or(false);
        if !alive {
            // A node that registered since our last heartbeat is in the directory but
            // not yet in our table: queue for it and look again now. A dead one's
            // queue is dropped by that heartbeat (its users sync when they reconnect).
            log::debug!("{node} is not in the live table yet; refreshing it");
            self.beat(ctx);
        }
        let queue = self
            .peers
            .entry(node.to_owned())
            .or_insert_with(|| PeerQueue::new(PEER_QUEUE_CAPACITY));
        if !queue.push(item) {
            self.metrics.peer_dropped.inc();
            log::warn!("peer {node}: outbound queue full, dropping a delivery (it stays stored)");
            return;
        }
        self.flush(node.to_owned(), ctx);
    }

    /// Starts a POST to `node` if none is in flight.
    fn flush(&mut self, node: String, ctx: &mut Context<Self>) {
        let Some(url) = self
            .shared
            .live
            .read()
            .ok()
            .and_then(|l| l.get(&node).cloned())
        else {
            return;
        };
        let Some(queue) = self.peers.get_mut(&node) else {
            return;
        };
        let Some(batch) = queue.take_batch(MAX_BATCH, Instant::now()) else {
            self.update_depth();
            return;
        };
        self.update_depth();
        let Some(client) = self.client.clone() else {
            return;
        };
        let body = encode_batch(&self.node_id, &batch);
        let n = batch
            .iter()
            .filter(|i| matches!(i, Item::Message(_)))
            .count();
        self.metrics.peer_posts.inc();
        self.metrics.peer_messages.inc_by(n as u64);
        self.metrics.peer_batch_size.observe(batch.len() as f64);
        let auth = format!("Bearer {}", self.secret);
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
            let Some(queue) = act.peers.get_mut(&node) else {
                return;
            };
            match result {
                Ok(()) => {
                    queue.succeeded();
                    act.flush(node, ctx);
                }
                Err(e) => {
                    act.metrics.peer_failures.inc();
                    let wait = queue.failed(batch, Instant::now());
                    log::warn!("peer {node}: delivery failed ({e}); retrying in {wait:?}");
                    ctx.run_later(wait, move |act, ctx| act.flush(node, ctx));
                }
            }
            act.update_depth();
        }));
    }

    fn beat(&mut self, ctx: &mut Context<Self>) {
        if self.beating || self.leaving {
            return;
        }
        self.beating = true;
        let directory = self.directory.clone();
        let advertise = self.advertise.clone();
        let ttl = self.node_ttl.as_millis() as u64;
        let started = Instant::now();
        ctx.spawn(
            async move { directory.heartbeat(&advertise, ttl).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.beating = false;
                    match result {
                        Ok(beat) => {
                            if !act.shared.registered.swap(true, Ordering::Relaxed) {
                                log::info!(
                                    "node {} registered in the cluster ({} live nodes)",
                                    act.node_id,
                                    beat.live.len()
                                );
                            }
                            act.apply_live(beat.live, started, ctx);
                            if beat.was_missing {
                                act.rewrite_directory(ctx);
                            }
                            for dead in beat.dead {
                                act.remove_dead(dead, ctx);
                            }
                        }
                        Err(e) => {
                            if act.shared.registered.swap(false, Ordering::Relaxed) {
                                log::error!(
                                    "node {}: heartbeat failed, not ready: {e}",
                                    act.node_id
                                );
                            }
                        }
                    }
                }),
        );
    }

    fn apply_live(
        &mut self,
        live: Vec<(String, String)>,
        beat_started: Instant,
        ctx: &mut Context<Self>,
    ) {
        let live: HashMap<String, String> = live
            .into_iter()
            .map(|(id, url)| (id, url.trim_end_matches('/').to_owned()))
            .collect();
        // Queues of peers that left: drop what they hold (it is stored). A queue made
        // after this beat started waits for the next beat.
        let gone: Vec<String> = self
            .peers
            .iter()
            .filter(|(id, q)| !live.contains_key(*id) && q.created < beat_started)
            .map(|(id, _)| id.clone())
            .collect();
        let unsure = self
            .peers
            .iter()
            .any(|(id, q)| !live.contains_key(id) && q.created >= beat_started);
        for id in gone {
            if let Some(mut q) = self.peers.remove(&id) {
                let n = q.clear();
                if n > 0 {
                    self.metrics.peer_dropped.inc_by(n as u64);
                    log::warn!(
                        "peer {id} is gone; dropped {n} queued deliveries (they stay stored)"
                    );
                }
            }
        }
        if let Ok(mut l) = self.shared.live.write() {
            *l = live;
        }
        // A peer that came back may have a queue waiting.
        let waiting: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.flush(id, ctx);
        }
        self.update_depth();
        if unsure {
            self.beat(ctx);
        }
    }

    fn rewrite_directory(&mut self, ctx: &mut Context<Self>) {
        let server = self.server.clone();
        let directory = self.directory.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                let snapshot = server.send(Snapshot).await.map_err(|e| e.to_string())?;
                let users: Vec<LocalUser> = snapshot.users;
                directory.rewrite(&users).await.map_err(|e| e.to_string())?;
                Ok::<usize, String>(users.len())
            }
            .into_actor(self)
            .map(|r, act, _| {
                act.pending -= 1;
                match r {
                    Ok(0) => {}
                    Ok(n) => log::info!(
                        "node {}: wrote the directory entries of {n} local users again",
                        act.node_id
                    ),
                    Err(e) => log::error!(
                        "node {}: cannot rewrite directory entries: {e}",
                        act.node_id
                    ),
                }
            }),
        );
    }

    fn remove_dead(&mut self, dead: String, ctx: &mut Context<Self>) {
        if dead == self.node_id {
            return;
        }
        let directory = self.directory.clone();
        let store = self.store.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                let offline = directory.remove_node(&dead).await?;
                let mut announcements = Vec::new();
                for uid in offline {
                    let rooms = store.rooms_of(&uid).await?;
                    announcements.push((uid, rooms));
                }
                Ok::<_, crate::store::StoreError>((dead, announcements))
            }
            .into_actor(self)
            .map(|r, act, ctx| {
                act.pending -= 1;
                match r {
                    Ok((dead, announcements)) => {
                        log::warn!(
                            "node {dead} stopped heartbeating; removed it ({} users went offline)",
                            announcements.len()
                        );
                        for (uid, rooms) in announcements {
                            act.announce(uid, rooms, false, ctx);
                        }
                    }
                    Err(e) => log::error!("cannot clean up a dead node: {e}"),
                }
            }),
        );
    }

    /// Tells every node with online members of `rooms` (this one included) that `uid`
    /// came online or went offline.
    fn announce(&mut self, uid: String, rooms: Vec<String>, online: bool, ctx: &mut Context<Self>) {
        if rooms.is_empty() {
            return;
        }
        let directory = self.directory.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                let nodes = directory.room_nodes(&rooms).await;
                (rooms, nodes)
            }
            .into_actor(self)
            .map(move |(rooms, nodes), act, ctx| {
                act.pending -= 1;
                let nodes = match nodes {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("presence of {uid} not announced to peers: {e}");
                        vec![Vec::new(); rooms.len()]
                    }
                };
                for (room, nodes) in rooms.into_iter().zip(nodes) {
                    act.server.do_send(RoomPresence {
                        room: room.clone(),
                        uid: uid.clone(),
                        online,
                    });
                    let event = Arc::new(PresenceEvent {
                        room,
                        uid: uid.clone(),
                        online,
                    });
                    for node in nodes {
                        act.enqueue(&node, Item::Presence(event.clone()), ctx);
                    }
                }
            }),
        );
    }
}

#[derive(Serialize)]
struct BatchOut<'a> {
    from: &'a str,
    messages: Vec<&'a RawValue>,
    presence: Vec<&'a PresenceEvent>,
    membership: Vec<&'a MembershipEvent>,
}

fn encode_batch(from: &str, batch: &[Item]) -> Vec<u8> {
    let mut out = BatchOut {
        from,
        messages: Vec::new(),
        presence: Vec::new(),
        membership: Vec::new(),
    };
    for item in batch {
        match item {
            Item::Message(m) => out.messages.push(&**m),
            Item::Presence(p) => out.presence.push(p),
            Item::Membership(m) => out.membership.push(m),
        }
    }
    serde_json::to_vec(&out).unwrap_or_else(|e| {
        log::error!("cannot encode a peer batch: {e}");
        b"{}".to_vec()
    })
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
        self.ticker = Some(ctx.run_interval(self.heartbeat, |act, ctx| act.beat(ctx)));
    }
}

/// A stored message for the peers in `nodes`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    pub message: Arc<ChatMessage>,
    pub nodes: Vec<String>,
}

impl Handler<Route> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Route, ctx: &mut Context<Self>) {
        let json = match serde_json::value::to_raw_value(&*msg.message) {
            Ok(json) => Arc::<RawValue>::from(json),
            Err(e) => {
                log::error!("cannot serialise message {}: {e}", msg.message.id);
                return;
            }
        };
        for node in &msg.nodes {
            self.enqueue(node, Item::Message(json.clone()), ctx);
        }
    }
}

/// A user came online (first connection anywhere) or went offline.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Announce {
    pub uid: String,
    pub rooms: Vec<String>,
    pub online: bool,
}

impl Handler<Announce> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Announce, ctx: &mut Context<Self>) {
        self.announce(msg.uid, msg.rooms, msg.online, ctx);
    }
}

impl Handler<super::ClusterEvent> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: super::ClusterEvent, ctx: &mut Context<Self>) {
        match msg {
            super::ClusterEvent::Disconnected { uid, sid, rooms } => {
                self.remove_connection(uid, sid, rooms, 1, ctx);
            }
        }
    }
}

impl ClusterBridge {
    /// Stops counting connection `sid` of `uid`; announces the user offline when it was
    /// their last connection anywhere. Retried while it fails, since a count left
    /// behind would route messages here and show the user online for nothing.
    fn remove_connection(
        &mut self,
        uid: String,
        sid: u64,
        rooms: Vec<String>,
        attempt: u32,
        ctx: &mut Context<Self>,
    ) {
        let directory = self.directory.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                let change = directory.connection(&uid, sid, &rooms, false).await;
                (uid, rooms, change)
            }
            .into_actor(self)
            .map(move |(uid, rooms, change), act, ctx| {
                act.pending -= 1;
                match change {
                    Ok(change) if change.changed && change.total == 0 => {
                        act.announce(uid, rooms, false, ctx)
                    }
                    Ok(_) => {}
                    // A stopping node takes all its entries out at once.
                    Err(_) if act.leaving => {}
                    Err(e) if attempt < REMOVAL_ATTEMPTS => {
                        log::warn!(
                            "directory: removal of connection {sid} of {uid} failed (attempt {attempt}), retrying: {e}"
                        );
                        ctx.run_later(REMOVAL_RETRY, move |act, ctx| {
                            act.remove_connection(uid, sid, rooms, attempt + 1, ctx)
                        });
                    }
                    Err(e) => log::error!(
                        "directory: gave up removing connection {sid} of {uid} after {attempt} attempts; it counts until node {} stops: {e}",
                        act.node_id
                    ),
                }
            }),
        );
    }
}

/// A user joined or left a room: the other nodes holding their connections must
/// start or stop delivering that room to them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MembershipChanged {
    pub uid: String,
    pub room: String,
    pub joined: bool,
}

impl Handler<MembershipChanged> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: MembershipChanged, ctx: &mut Context<Self>) {
        let directory = self.directory.clone();
        self.pending += 1;
        ctx.spawn(
            async move {
                let nodes = directory.user_nodes(&msg.uid).await;
                (msg, nodes)
            }
            .into_actor(self)
            .map(|(msg, nodes), act, ctx| {
                act.pending -= 1;
                let nodes = match nodes {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("membership change of {} not forwarded: {e}", msg.uid);
                        return;
                    }
                };
                let event = Arc::new(MembershipEvent {
                    uid: msg.uid,
                    room: msg.room,
                    joined: msg.joined,
                });
                for node in nodes {
                    act.enqueue(&node, Item::Membership(event.clone()), ctx);
                }
            }),
        );
    }
}

/// Whether anything is still on its way (directory updates, peer POSTs).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Busy;

impl Handler<Busy> for ClusterBridge {
    type Result = bool;

    fn handle(&mut self, _: Busy, _: &mut Context<Self>) -> bool {
        self.pending > 0 || self.peers.values().any(|q| q.in_flight() || !q.is_empty())
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
        let id = self.node_id.clone();
        Box::pin(
            async move { directory.remove_node(&id).await }
                .into_actor(self)
                .map(|r, act, _| {
                    act.shared.registered.store(false, Ordering::Relaxed);
                    match r {
                        Ok(_) => log::info!("node {} left the cluster", act.node_id),
                        Err(e) => log::warn!("node {} could not deregister: {e}", act.node_id),
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
