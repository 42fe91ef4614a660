//! Directory upkeep: this node's entries in the Redis directory follow its ChatServer.
//!
//! The ChatServer hands every change (a user's first or last connection here, a room's
//! first or last member here) to [`UpkeepSink`], in the order it made them; one task
//! writes them in that order, pipelining whatever is waiting into one round trip, and
//! acknowledges them, so a session is welcomed (and a `join` answered) only once the
//! directory routes to this node. The writes are idempotent set operations; when one
//! fails, or the queue is full, the sink marks the directory dirty and the bridge has
//! it written again in full from the ChatServer's tables ([`Work::Reconcile`]), after
//! which the node's connections are told to sync (they may have missed messages that
//! were not routed here meanwhile).
//!
//! Applying a change also shows whether a user just came online anywhere, or went
//! offline everywhere; the task hands those to the bridge to announce.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::bridge::{Announce, ClusterBridge};
use super::directory::{DirOp, Directory, Transition};
use crate::server::{ChatServer, ClusterSink, LocalChange, Resync, ResyncScope};

/// Changes waiting to be written; past this the directory is rewritten in full later.
pub const UPKEEP_QUEUE: usize = 8192;
/// Most queued works one pass writes.
const MAX_PASS: usize = 512;

/// What the upkeep task does, in order.
pub enum Work {
    Record {
        changes: Vec<LocalChange>,
        ack: Option<oneshot::Sender<bool>>,
    },
    Reconcile {
        users: BTreeSet<String>,
        rooms: BTreeSet<String>,
        resync_after: bool,
    },
}

/// State shared by the sink, the task and the bridge.
#[derive(Default)]
pub struct UpkeepState {
    /// Something was not written: the bridge asks for a reconcile.
    pub dirty: AtomicBool,
    /// Works queued or being written, so shutdown can wait for them.
    pub pending: AtomicUsize,
    /// Works the full queue refused since the directory was last written in full.
    pub refused: AtomicU64,
}

/// The ChatServer's side of the channel.
pub struct UpkeepSink {
    tx: mpsc::Sender<Work>,
    state: Arc<UpkeepState>,
}

/// What became of a work handed to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    Yes,
    /// Refused: the queue is full. `first` when no work had been refused since the
    /// directory was last written in full (the one refusal worth a warning: a storm of
    /// disconnects refuses thousands).
    Refused {
        first: bool,
    },
}

impl UpkeepSink {
    fn queue(&self, work: Work) -> Queued {
        self.state.pending.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(work) {
            Ok(()) => Queued::Yes,
            Err(_) => {
                self.state.pending.fetch_sub(1, Ordering::SeqCst);
                self.state.dirty.store(true, Ordering::SeqCst);
                let before = self.state.refused.fetch_add(1, Ordering::SeqCst);
                Queued::Refused { first: before == 0 }
            }
        }
    }
}

fn warn_refused(queued: Queued) {
    match queued {
        Queued::Yes => {}
        Queued::Refused { first: true } => log::warn!(
            "directory upkeep queue is full ({UPKEEP_QUEUE} changes waiting); changes are \
             dropped until the directory is written again in full from this node's tables"
        ),
        Queued::Refused { first: false } => {
            log::debug!("directory upkeep queue is still full; change dropped")
        }
    }
}

impl ClusterSink for UpkeepSink {
    fn record(&self, changes: Vec<LocalChange>, ack: Option<oneshot::Sender<bool>>) {
        // A refused work drops its ack: the waiter sees the directory did not record.
        warn_refused(self.queue(Work::Record { changes, ack }));
    }

    fn reconcile(&self, users: BTreeSet<String>, rooms: BTreeSet<String>, resync_after: bool) {
        warn_refused(self.queue(Work::Reconcile {
            users,
            rooms,
            resync_after,
        }));
    }
}

/// Makes the channel; [`run`] drains it.
pub fn channel(state: Arc<UpkeepState>) -> (UpkeepSink, mpsc::Receiver<Work>) {
    channel_of(state, UPKEEP_QUEUE)
}

fn channel_of(state: Arc<UpkeepState>, capacity: usize) -> (UpkeepSink, mpsc::Receiver<Work>) {
    let (tx, rx) = mpsc::channel(capacity);
    (UpkeepSink { tx, state }, rx)
}

/// The upkeep task: ends when the ChatServer (the channel's only sender) is gone.
pub async fn run(
    directory: Arc<Directory>,
    mut rx: mpsc::Receiver<Work>,
    state: Arc<UpkeepState>,
    bridge: Addr<ClusterBridge>,
    server: Addr<ChatServer>,
) {
    let mut works = Vec::with_capacity(MAX_PASS);
    while rx.recv_many(&mut works, MAX_PASS).await > 0 {
        let n = works.len();
        let mut records: Vec<(Vec<LocalChange>, Option<oneshot::Sender<bool>>)> = Vec::new();
        for work in works.drain(..) {
            match work {
                Work::Record { changes, ack } => records.push((changes, ack)),
                Work::Reconcile {
                    users,
                    rooms,
                    resync_after,
                } => {
                    write_records(&directory, std::mem::take(&mut records), &state, &bridge).await;
                    // Everything before this snapshot is in it; everything after
                    // follows it in the queue.
                    state.dirty.store(false, Ordering::SeqCst);
                    let refused = state.refused.swap(0, Ordering::SeqCst);
                    match directory.reconcile(&users, &rooms).await {
                        Ok(()) => {
                            log::info!(
                                "directory written again: {} users, {} rooms here ({refused} changes the full queue had refused)",
                                users.len(),
                                rooms.len()
                            );
                            if resync_after {
                                let _ = server
                                    .send(Resync {
                                        scope: ResyncScope::All,
                                    })
                                    .await;
                            }
                        }
                        Err(e) => {
                            log::warn!("directory rewrite failed, will retry: {e}");
                            state.dirty.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        write_records(&directory, records, &state, &bridge).await;
        state.pending.fetch_sub(n, Ordering::SeqCst);
    }
}

/// Writes recorded changes in one round trip, acknowledges them and has the bridge
/// announce who came online or went offline.
async fn write_records(
    directory: &Directory,
    records: Vec<(Vec<LocalChange>, Option<oneshot::Sender<bool>>)>,
    state: &UpkeepState,
    bridge: &Addr<ClusterBridge>,
) {
    if records.is_empty() {
        return;
    }
    let changes: Vec<&LocalChange> = records.iter().flat_map(|(c, _)| c).collect();
    let ops: Vec<DirOp> = changes
        .iter()
        .map(|c| match c {
            LocalChange::UserOnline { uid, .. } => DirOp::UserOnline(uid.clone()),
            LocalChange::UserOffline { uid, .. } => DirOp::UserOffline(uid.clone()),
            LocalChange::RoomOccupied(r) => DirOp::RoomOccupied(r.clone()),
            LocalChange::RoomVacated(r) => DirOp::RoomVacated(r.clone()),
        })
        .collect();
    let result = directory.apply(&ops).await;
    let ok = result.is_ok();
    let announcements: Vec<Announce> = match result {
        Ok(transitions) => changes
            .iter()
            .zip(transitions)
            .filter_map(|(change, t)| match (change, t) {
                (LocalChange::UserOnline { uid, rooms }, Transition::FirstAnywhere) => {
                    Some(Announce {
                        uid: uid.clone(),
                        online: true,
                        rooms: rooms.clone(),
                    })
                }
                (LocalChange::UserOffline { uid, rooms }, Transition::GoneEverywhere) => {
                    Some(Announce {
                        uid: uid.clone(),
                        online: false,
                        rooms: rooms.clone(),
                    })
                }
                _ => None,
            })
            .collect(),
        Err(e) => {
            log::warn!("directory update failed; it will be written again: {e}");
            state.dirty.store(true, Ordering::SeqCst);
            Vec::new()
        }
    };
    for (_, ack) in records {
        if let Some(ack) = ack {
            let _ = ack.send(ok);
        }
    }
    for a in announcements {
        let _ = bridge.send(a).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Work {
        Work::Record {
            changes: vec![LocalChange::RoomOccupied("lobby".into())],
            ack: None,
        }
    }

    #[test]
    fn a_full_queue_marks_the_directory_dirty_and_warns_once_per_episode() {
        let state = Arc::new(UpkeepState::default());
        let (sink, mut rx) = channel_of(state.clone(), 1);
        assert_eq!(sink.queue(record()), Queued::Yes);
        assert!(!state.dirty.load(Ordering::SeqCst));
        assert_eq!(sink.queue(record()), Queued::Refused { first: true });
        assert!(
            state.dirty.load(Ordering::SeqCst),
            "a refused change is rewritten later"
        );
        assert_eq!(sink.queue(record()), Queued::Refused { first: false });
        assert_eq!(sink.queue(record()), Queued::Refused { first: false });
        assert_eq!(state.refused.load(Ordering::SeqCst), 3);
        assert_eq!(
            state.pending.load(Ordering::SeqCst),
            1,
            "only the queued work waits"
        );

        // The rewrite starts a new episode (as `run` does when it takes a Reconcile).
        assert!(rx.try_recv().is_ok());
        assert_eq!(state.refused.swap(0, Ordering::SeqCst), 3);
        assert_eq!(sink.queue(record()), Queued::Yes);
        assert_eq!(sink.queue(record()), Queued::Refused { first: true });
    }
}
