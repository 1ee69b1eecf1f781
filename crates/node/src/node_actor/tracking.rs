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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use resolute_core::track::TrackBatch;
use resolute_tracking::background::Background;
use resolute_tracking::Slice;
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
    /// The writer thread.
    writer: Background,
    /// The store's file.
    path: PathBuf,
    /// Applied batches not yet handed to the writer.
    pub(super) tracks: Vec<TrackBatch>,
    /// When batches were last handed over.
    handed_at: Instant,
    /// The store failed to write: the error last logged.
    failed: Option<String>,
    /// Batches written since the store wanted a copy: written again on it.
    retained: Vec<TrackBatch>,
    /// The store's index when batches began to be kept for a copy: the copy
    /// must reach it.
    retained_after: Option<u64>,
    /// Too many batches waited for a copy: the store keeps its gap (until the
    /// node restarts).
    copy_given_up: bool,
    /// The last applied index handed to the writer.
    handed_index: u64,
    /// A request for a copy is out.
    asking: bool,
    /// The copy this node serves, and whether it is making one.
    served: Option<ServedCopy>,
    making: bool,
}

impl Tracking {
    pub(super) fn new(writer: Background, path: PathBuf) -> Tracking {
        let writer_index = writer.status().applied_index;
        Tracking {
            writer,
            path,
            tracks: Vec::new(),
            handed_at: Instant::now(),
            failed: None,
            retained: Vec::new(),
            retained_after: None,
            copy_given_up: false,
            // What the store holds already counts as handed over.
            handed_index: writer_index,
            asking: false,
            served: None,
            making: false,
        }
    }
}

impl NodeActor {
    /// Hands the applied batches gathered so far, and the rows they changed,
    /// to the store's writer thread: every `WRITE_EVERY_MS` (a page many
    /// reports touch is written once), or now with `Flush::Wait` (a client's
    /// reply follows: it may query next) or `Flush::Durable` (a snapshot that
    /// compacts the log follows: the store must hold everything before it, on
    /// disk). A store that fails to write does not stop the node (the writer
    /// keeps the writes for another try, or asks for a resync from the state).
    pub(super) fn write_tracking(&mut self, flush: Flush) {
        let t = &self.tracking;
        let due = t.handed_at.elapsed() >= Duration::from_millis(resolute_tracking::WRITE_EVERY_MS)
            || t.tracks.len() >= resolute_tracking::WRITE_BATCHES_MAX;
        if (t.tracks.is_empty() || !due) && flush == Flush::IfDue {
            return;
        }
        let (batches, slice) = self.hand_over();
        let writer = &self.tracking.writer;
        match flush {
            Flush::IfDue => writer.write(batches, slice),
            Flush::Wait => writer.write_and_wait(batches, slice, false),
            Flush::Durable => writer.write_and_wait(batches, slice, true),
        }
    }

    /// Hands every applied batch to the writer now; the receiver answers once
    /// it is written: a query made after it sees everything this node applied.
    pub(super) fn flush_for_query(&mut self) -> std::sync::mpsc::Receiver<()> {
        let (batches, slice) = self.hand_over();
        self.tracking.writer.write_acked(batches, slice)
    }

    /// The batches gathered so far and the rows they changed (every row when
    /// the writer asks for a resync), kept for a copy on its way; logs the
    /// writer's failures as they start and end.
    fn hand_over(&mut self) -> (Vec<TrackBatch>, Slice) {
        let t = &mut self.tracking;
        let status = t.writer.status();
        match (&status.failed, &t.failed) {
            (Some(e), last) if last.as_ref() != Some(e) => {
                eprintln!(
                    "node {:016x}: {e} (the writer tries again)",
                    self.local.node
                )
            }
            (None, Some(_)) => {
                eprintln!(
                    "node {:016x}: the tracking store writes again",
                    self.local.node
                )
            }
            _ => {}
        }
        t.failed = status.failed.clone();
        let state = self.driver.node().state();
        let batches = std::mem::take(&mut t.tracks);
        let slice = if status.resync_wanted {
            Slice::whole(state)
        } else {
            Slice::of(&batches, state)
        };
        if status.wants_copy.is_some() && !t.copy_given_up {
            // A copy must reach past what was handed over before the batches
            // kept for it: those are not written again on it.
            t.retained_after.get_or_insert(t.handed_index);
            if t.retained.len() + batches.len() > TRACK_PENDING_BATCHES_MAX {
                eprintln!(
                    "node {:016x}: no tracking copy came in time; the store keeps its gap",
                    self.local.node
                );
                t.retained.clear();
                t.copy_given_up = true;
            } else {
                t.retained.extend(batches.iter().cloned());
            }
        }
        if let Some(last) = batches.iter().map(|b| b.applied_index).max() {
            t.handed_index = t.handed_index.max(last);
        }
        t.handed_at = Instant::now();
        (batches, slice)
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
        let src = self.tracking.path.clone();
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
        let Some(gap) = self.tracking.writer.status().wants_copy else {
            return;
        };
        let at_least = gap.max(self.tracking.retained_after.unwrap_or(0));
        let leader = self.driver.node().leader_id();
        let t = &self.tracking;
        if t.asking || t.copy_given_up || leader == 0 || leader == self.local.node {
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
        ctx.spawn(asked.into_actor(self).map(move |done, act, ctx| {
            match done {
                Ok(Some(copy)) => return act.install_tracking_copy(ctx, copy, at_least),
                // The leader is making one: ask again on a later tick.
                Ok(None) => {}
                Err(e) => eprintln!(
                    "node {:016x}: asking {leader:016x} for a tracking copy: {e}",
                    act.local.node
                ),
            }
            act.tracking.asking = false;
        }));
    }

    /// Has the writer replace the store with the fetched copy (after every
    /// write handed over before), then hands it the batches applied since.
    fn install_tracking_copy(&mut self, ctx: &mut Context<Self>, copy: ServedCopy, at_least: u64) {
        self.write_tracking(Flush::Wait);
        let path = self.blobs.path(&copy.digest);
        let answer = self.tracking.writer.install_copy(path, at_least);
        let waited = tokio::task::spawn_blocking(move || answer.recv());
        ctx.spawn(waited.into_actor(self).map(move |done, act, _| {
            act.tracking.asking = false;
            let _ = act.blobs.remove(&copy.digest);
            match done {
                Ok(Ok(Ok(Some(index)))) => {
                    let retained = std::mem::take(&mut act.tracking.retained);
                    act.tracking.retained_after = None;
                    let slice = Slice::of(&retained, act.driver.node().state());
                    act.tracking.writer.write(retained, slice);
                    eprintln!(
                        "node {:016x}: the tracking store caught up from a peer's copy at index {index}",
                        act.local.node
                    );
                }
                Ok(Ok(Ok(None))) => {}
                Ok(Ok(Err(e))) => {
                    eprintln!("node {:016x}: installing a tracking copy: {e}", act.local.node)
                }
                _ => eprintln!("node {:016x}: the tracking writer is gone", act.local.node),
            }
        }));
    }
}

/// How soon `write_tracking` hands batches over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    /// When `WRITE_EVERY_MS` has passed (or enough batches wait).
    IfDue,
    /// Now, and wait until they are written.
    Wait,
    /// Now, and wait until they are written and fsynced.
    Durable,
}
