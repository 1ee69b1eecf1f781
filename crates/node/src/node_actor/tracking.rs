//! The node actor's side of the experiment-tracking store: writing the
//! applied batches, and the copies that fill a snapshot's gap.
//!
//! A node that caught up from a leader's snapshot holds every experiment,
//! trial and checkpoint row (rewritten from the state) but not the metric
//! reports the snapshot's entries carried. It asks the leader for a copy of
//! its store at or past that snapshot's index (`Request::TrackingCopy`); the
//! leader makes one with `VACUUM INTO` on a blocking thread, keeps it as a
//! blob and answers with its digest (or "not yet" while it makes it); the
//! node fetches the blob over the verified, chunked, resumable transfer,
//! installs it, and writes again the batches it applied meanwhile. No Raft
//! message carries any of it.
//!
//! This is I/O of the shell's own store, which the simulator does not keep
//! (its nodes run with `NodeConfig::track` off): nothing here decides what
//! the cluster does.

use actix::prelude::*;
use tokio::sync::oneshot;

use resolute_core::track::TrackBatch;
use resolute_tracking::Tracker;
use resolute_types::codec;

use super::NodeActor;
use crate::net_actor;

/// Applied batches kept for a tracking store that fails to write, or kept to
/// write again on a copy that is on its way; past it they are given up (the
/// store catches up from the state and keeps its gap).
pub const TRACK_PENDING_BATCHES_MAX: usize = 10_000;
/// Ticks between a gapped store's requests for a copy.
pub const TRACK_COPY_ASK_EVERY_TICKS: u64 = 10;
/// The file a copy is made in before it becomes a blob (in the data dir).
const COPY_FILE: &str = "tracking-copy.sqlite";

/// A copy of this node's store that it serves: its blob and index.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServedCopy {
    /// The blob's digest.
    pub digest: String,
    /// The applied index it covers.
    pub index: u64,
}

/// The store and what travels around it.
pub(super) struct Tracking {
    pub(super) tracker: Tracker,
    /// Applied batches not yet in the store.
    pub(super) tracks: Vec<TrackBatch>,
    /// The store failed to write: the error last logged.
    failed: Option<String>,
    /// Batches written since the store wanted a copy: written again on it.
    retained: Vec<TrackBatch>,
    /// A request for a copy is out.
    asking: bool,
    /// The copy this node serves, and whether it is making one.
    served: Option<ServedCopy>,
    making: bool,
}

impl Tracking {
    pub(super) fn new(tracker: Tracker) -> Tracking {
        Tracking {
            tracker,
            tracks: Vec::new(),
            failed: None,
            retained: Vec::new(),
            asking: false,
            served: None,
            making: false,
        }
    }
}

impl NodeActor {
    /// Writes the applied batches gathered so far into the tracking store (one
    /// transaction). A store that fails (a full disk) does not stop the node:
    /// the batches wait for the next try, and past `TRACK_PENDING_BATCHES_MAX`
    /// they are given up and the store catches up from the state later,
    /// recording the gap.
    pub(super) fn write_tracking(&mut self, durable: bool) {
        let t = &mut self.tracking;
        if t.tracks.is_empty() && !durable {
            return;
        }
        let state = self.driver.node().state();
        match t.tracker.write(&t.tracks, state, durable) {
            Ok(()) => {
                if t.tracker.wants_copy().is_some() {
                    if t.retained.len() + t.tracks.len() > TRACK_PENDING_BATCHES_MAX {
                        eprintln!(
                            "node {:016x}: no tracking copy came in time; the store keeps its gap",
                            self.local.node
                        );
                        t.tracker.forget_copy();
                        t.retained.clear();
                    } else {
                        t.retained.append(&mut t.tracks);
                    }
                }
                t.tracks.clear();
                if t.failed.take().is_some() {
                    eprintln!(
                        "node {:016x}: the tracking store writes again",
                        self.local.node
                    );
                }
            }
            Err(e) => {
                let text = e.to_string();
                if t.failed.as_deref() != Some(text.as_str()) {
                    eprintln!(
                        "node {:016x}: {text} (kept for the next try)",
                        self.local.node
                    );
                }
                t.failed = Some(text);
                if t.tracks.len() > TRACK_PENDING_BATCHES_MAX {
                    t.tracks = vec![TrackBatch {
                        applied_index: state.applied_index,
                        reports_applied: state.reports_applied,
                        replaced: true,
                        ..TrackBatch::default()
                    }];
                }
            }
        }
    }

    /// A member asks for a copy of this store at or past `min_index`: the
    /// copy's blob when one is ready, else "not yet" (and one is made).
    pub(super) fn serve_tracking_copy(
        &mut self,
        ctx: &mut Context<Self>,
        min_index: u64,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    ) {
        let ready = self
            .tracking
            .served
            .clone()
            .filter(|c| c.index >= min_index && self.blobs.has(&c.digest));
        let answer = codec::encode(&ready).map_err(|e| e.to_string());
        let _ = reply.send(answer);
        if ready.is_some() || self.tracking.making {
            return;
        }
        self.tracking.making = true;
        let src = self.tracking.tracker.path().to_path_buf();
        let tmp = self.data_dir.join(COPY_FILE);
        let blobs = self.blobs.clone();
        let made = tokio::task::spawn_blocking(move || {
            let index = resolute_tracking::copy_store(&src, &tmp).map_err(|e| e.to_string())?;
            let manifest = blobs.put_file(&tmp).map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&tmp);
            Ok::<_, String>(ServedCopy {
                digest: manifest?.digest(),
                index,
            })
        });
        ctx.spawn(made.into_actor(self).map(|done, act, _| {
            act.tracking.making = false;
            match done.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(copy) => {
                    if let Some(old) = act.tracking.served.replace(copy.clone()) {
                        if old.digest != copy.digest {
                            let _ = act.blobs.remove(&old.digest);
                        }
                    }
                }
                Err(e) => eprintln!("node {:016x}: a tracking copy failed: {e}", act.local.node),
            }
        }));
    }

    /// When the store wants a copy: asks the leader for one, fetches its blob,
    /// installs it and writes the batches applied since on top.
    pub(super) fn ask_for_tracking_copy(&mut self, ctx: &mut Context<Self>) {
        let Some(at_least) = self.tracking.tracker.wants_copy() else {
            return;
        };
        let leader = self.driver.node().leader_id();
        if self.tracking.asking || leader == 0 || leader == self.local.node {
            return;
        }
        self.tracking.asking = true;
        let net = self.peers.outbox.handle();
        let fetcher = self.peers.net.clone();
        let asked = async move {
            let answer = net
                .tracking_copy(leader, at_least)
                .await
                .map_err(|e| e.to_string())?;
            let ready: Option<ServedCopy> = codec::decode(&answer).map_err(|e| e.to_string())?;
            let Some(copy) = ready else {
                return Ok(None);
            };
            let fetch = net_actor::Fetch {
                digest: copy.digest.clone(),
                holders: vec![leader],
            };
            fetcher.send(fetch).await.map_err(|e| e.to_string())??;
            Ok::<_, String>(Some(copy))
        };
        ctx.spawn(asked.into_actor(self).map(move |done, act, _| {
            act.tracking.asking = false;
            match done {
                Ok(Some(copy)) => act.install_tracking_copy(&copy, at_least),
                // The leader is making one: ask again on a later tick.
                Ok(None) => {}
                Err(e) => eprintln!(
                    "node {:016x}: asking {leader:016x} for a tracking copy: {e}",
                    act.local.node
                ),
            }
        }));
    }

    fn install_tracking_copy(&mut self, copy: &ServedCopy, at_least: u64) {
        self.write_tracking(false);
        let path = self.blobs.path(&copy.digest);
        let t = &mut self.tracking;
        match t.tracker.install_copy(&path, at_least) {
            Ok(Some(index)) => {
                let retained = std::mem::take(&mut t.retained);
                let state = self.driver.node().state();
                if let Err(e) = t.tracker.write(&retained, state, false) {
                    eprintln!("node {:016x}: {e}", self.local.node);
                }
                eprintln!(
                    "node {:016x}: the tracking store caught up from a peer's copy at index {index}",
                    self.local.node
                );
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "node {:016x}: installing a tracking copy: {e}",
                self.local.node
            ),
        }
        let _ = self.blobs.remove(&copy.digest);
    }
}
