//! Blob fetches: a verified, resumable download of one blob from any of its
//! holders, chunk requests spread over them round-robin (direct connections
//! before relayed ones), "busy" answers backed off, bad chunks asked of
//! another holder.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use libp2p::swarm::dial_opts::DialOpts;
use libp2p::PeerId;
use tokio::sync::oneshot;
use tokio::time::Instant;

use resolute_core::NodeId;
use resolute_storage::blob::{check_digest, Download, Manifest};

use super::{
    EventLoop, IoDone, Pending, BUSY_BACKOFF_MS, CHUNK_ATTEMPTS_MAX, FETCH_CONNECTIONS_PER_HOLDER,
};
use crate::identity::node_id;
use crate::wire::{Request, Response};
use crate::{FetchReport, NetError};

/// A blob fetch in progress.
pub(super) struct Fetch {
    digest: String,
    /// Holders still worth asking.
    holders: Vec<PeerId>,
    /// Everyone waiting for this blob (a second fetch of the same digest joins
    /// the first instead of racing it for the same partial file).
    replies: Vec<oneshot::Sender<Result<FetchReport, NetError>>>,
    download: Option<Download>,
    /// Chunks not yet asked for (or to ask again).
    queue: VecDeque<u32>,
    in_flight: usize,
    /// Round-robin position over `holders`.
    turn: usize,
    /// Failed attempts per chunk, and the holders that sent it bad.
    attempts: BTreeMap<u32, (u32, BTreeSet<PeerId>)>,
    report: FetchReport,
    last_error: String,
    /// Every chunk is written; the file is being made durable.
    finishing: bool,
    /// Holders that answered "busy", left alone until then.
    busy_until: BTreeMap<PeerId, Instant>,
}

impl EventLoop {
    pub(super) fn start_fetch(
        &mut self,
        digest: String,
        holders: Vec<NodeId>,
        reply: oneshot::Sender<Result<FetchReport, NetError>>,
    ) {
        if let Err(e) = check_digest(&digest) {
            let _ = reply.send(Err(NetError::Fetch {
                digest,
                reason: e.to_string(),
            }));
            return;
        }
        if self.store.has(&digest) {
            let _ = reply.send(Ok(FetchReport {
                path: self.store.path(&digest),
                chunks_resumed: 0,
                chunks_by_holder: BTreeMap::new(),
                bad_chunks: 0,
                busy_answers: 0,
                relayed_chunks: 0,
                links: BTreeMap::new(),
            }));
            return;
        }
        let holders: Vec<PeerId> = holders
            .iter()
            .filter_map(|n| self.peers.get(n).copied())
            .collect();
        if let Some(f) = self.fetches.values_mut().find(|f| f.digest == digest) {
            f.replies.push(reply);
            for h in holders {
                if !f.holders.contains(&h) {
                    f.holders.push(h);
                }
            }
            return;
        }
        for peer in &holders {
            // Several connections to a holder only when they go direct: a
            // relay caps its circuits, and one relayed stream is as fast as four.
            if !self.links.is_direct(peer) {
                continue;
            }
            let have = self.connections.get(peer).copied().unwrap_or(0);
            for _ in have..FETCH_CONNECTIONS_PER_HOLDER {
                // A new local port: with port reuse, a second connection to the
                // same peer would have the same address 4-tuple and reset the first.
                let opts = DialOpts::peer_id(*peer)
                    .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                    .allocate_new_port()
                    .build();
                let _ = self.swarm.dial(opts);
            }
        }
        let id = self.next_fetch;
        self.next_fetch += 1;
        self.fetches.insert(
            id,
            Fetch {
                digest,
                holders,
                replies: vec![reply],
                download: None,
                queue: VecDeque::new(),
                in_flight: 0,
                turn: 0,
                attempts: BTreeMap::new(),
                report: FetchReport {
                    path: Default::default(),
                    chunks_resumed: 0,
                    chunks_by_holder: BTreeMap::new(),
                    bad_chunks: 0,
                    busy_answers: 0,
                    relayed_chunks: 0,
                    links: BTreeMap::new(),
                },
                last_error: "no holder is connected".to_string(),
                finishing: false,
                busy_until: BTreeMap::new(),
            },
        );
        self.ask_manifest(id);
    }

    pub(super) fn ask_manifest(&mut self, id: u64) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let Some(&peer) = f.holders.first() else {
            return self.fail_fetch(id);
        };
        let request = Request::Manifest {
            digest: f.digest.clone(),
        };
        let rid = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
        self.pending.insert(rid, Pending::Manifest { fetch: id });
    }

    pub(super) fn on_manifest(&mut self, id: u64, peer: PeerId, result: Result<Response, String>) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let manifest = match result {
            Ok(Response::Manifest(bytes)) => {
                Manifest::decode(&f.digest, &bytes).map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e),
        };
        let manifest = match manifest {
            Ok(m) => m,
            Err(e) => {
                f.last_error = format!("manifest from {:016x}: {e}", node_id(&peer));
                f.holders.retain(|h| *h != peer);
                return self.ask_manifest(id);
            }
        };
        // Opening re-hashes what a broken fetch left on disk: off the loop.
        let store = self.store.clone();
        let done = self.io_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = store.download(&manifest).map_err(|e| e.to_string());
            let _ = done.blocking_send(IoDone::Opened { fetch: id, result });
        });
    }

    pub(super) fn on_opened(&mut self, id: u64, result: Result<Download, String>) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        match result {
            Ok(d) => {
                f.queue = d.missing().into();
                f.report.chunks_resumed = d.manifest().chunk_count() - f.queue.len() as u32;
                f.download = Some(d);
                self.pump(id);
            }
            Err(e) => {
                f.last_error = e;
                f.holders.clear();
                self.fail_fetch(id);
            }
        }
    }

    /// Keeps up to `fetch_parallel_chunks` chunk requests in flight, spread over
    /// the holders in turn (a chunk that came back bad goes to another holder).
    pub(super) fn pump(&mut self, id: u64) {
        let parallel = self.config.fetch_parallel_chunks.max(1);
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        if f.finishing {
            return;
        }
        if f.download.as_ref().is_some_and(Download::is_complete) {
            return self.complete_fetch(id);
        }
        if f.holders.is_empty() {
            if f.in_flight == 0 {
                self.fail_fetch(id);
            }
            return;
        }
        let now = Instant::now();
        f.busy_until.retain(|_, until| *until > now);
        let not_busy: Vec<PeerId> = f
            .holders
            .iter()
            .filter(|h| !f.busy_until.contains_key(*h))
            .copied()
            .collect();
        // Direct (or hole-punched) holders first: a relay carries a capped
        // number of bytes per circuit, and every byte twice.
        let direct: Vec<PeerId> = not_busy
            .iter()
            .filter(|h| self.links.is_direct(h))
            .copied()
            .collect();
        let ready = if direct.is_empty() { not_busy } else { direct };
        let mut requests = Vec::new();
        while f.in_flight < parallel && !ready.is_empty() {
            let Some(index) = f.queue.pop_front() else {
                break;
            };
            let bad = f
                .attempts
                .get(&index)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            let n = ready.len();
            let pick = (0..n)
                .map(|k| ready[(f.turn + k) % n])
                .find(|h| !bad.contains(h))
                .unwrap_or(ready[f.turn % n]);
            f.turn = (f.turn + 1) % n;
            f.in_flight += 1;
            requests.push((index, pick, f.digest.clone()));
        }
        for (index, peer, digest) in requests {
            let rid = self
                .swarm
                .behaviour_mut()
                .rpc
                .send_request(&peer, Request::Chunk { digest, index });
            self.pending
                .insert(rid, Pending::Chunk { fetch: id, index });
        }
    }

    pub(super) fn on_chunk(
        &mut self,
        id: u64,
        index: u32,
        peer: PeerId,
        relayed: bool,
        result: Result<Response, String>,
    ) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let failed = match result {
            Ok(Response::Chunk {
                index: got,
                data,
                crc32c: crc,
            }) if got == index => match f.download.as_ref().map(Download::writer) {
                Some(writer) => {
                    // Checked and written on a blocking thread; the chunk stays
                    // in flight (and in memory) until then, which bounds both.
                    let done = self.io_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = if crc32c::crc32c(&data) != crc {
                            Err((true, "chunk damaged in transit (crc32c)".to_string()))
                        } else {
                            writer
                                .write(index, &data)
                                .map_err(|e| (true, e.to_string()))
                        };
                        let _ = done.blocking_send(IoDone::ChunkWritten {
                            fetch: id,
                            index,
                            peer,
                            relayed,
                            result,
                        });
                    });
                    return;
                }
                None => (false, "no download".to_string()),
            },
            Ok(Response::Busy) => {
                // Back-pressure, not a failure: the chunk waits, and this holder
                // is left alone for a moment (the others go on).
                f.in_flight = f.in_flight.saturating_sub(1);
                f.report.busy_answers += 1;
                f.busy_until.insert(
                    peer,
                    Instant::now() + Duration::from_millis(BUSY_BACKOFF_MS),
                );
                f.queue.push_front(index);
                return self.pump(id);
            }
            Ok(Response::NotFound(e)) | Ok(Response::Denied(e)) => {
                // This holder cannot serve the blob: stop asking it.
                f.holders.retain(|h| *h != peer);
                (false, e)
            }
            Ok(other) => (true, format!("unexpected answer {other:?}")),
            Err(e) => {
                // The connection broke or timed out: leave this holder; the chunk
                // goes to another one, and a later fetch resumes what is on disk.
                f.holders.retain(|h| *h != peer);
                (false, e)
            }
        };
        self.on_chunk_written(id, index, peer, relayed, Err(failed));
    }

    /// A chunk request ended: written, or failed (`bad`: the holder sent wrong
    /// bytes, so the chunk is asked of another holder first).
    pub(super) fn on_chunk_written(
        &mut self,
        id: u64,
        index: u32,
        peer: PeerId,
        relayed: bool,
        result: Result<(), (bool, String)>,
    ) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        f.in_flight = f.in_flight.saturating_sub(1);
        let holder = node_id(&peer);
        match result {
            Ok(()) => {
                if let Some(d) = f.download.as_mut() {
                    d.mark_done(index);
                }
                *f.report.chunks_by_holder.entry(holder).or_default() += 1;
                if relayed {
                    f.report.relayed_chunks += 1;
                }
            }
            Err((bad, e)) => {
                f.last_error = format!("chunk {index} from {holder:016x}: {e}");
                let entry = f.attempts.entry(index).or_default();
                entry.0 += 1;
                if bad {
                    f.report.bad_chunks += 1;
                    entry.1.insert(peer);
                }
                if entry.0 >= CHUNK_ATTEMPTS_MAX {
                    f.holders.clear();
                } else {
                    f.queue.push_front(index);
                }
            }
        }
        self.pump(id);
    }

    /// Pumps the fetches that have chunks waiting and nothing in flight (every
    /// holder answered "busy" a moment ago).
    pub(super) fn pump_waiting(&mut self) {
        let waiting: Vec<u64> = self
            .fetches
            .iter()
            .filter(|(_, f)| !f.busy_until.is_empty() && f.in_flight == 0 && !f.queue.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.pump(id);
        }
    }

    /// Every chunk is written: the fsync and the move into the store run on a
    /// blocking thread (an fsync of a large blob takes seconds on a real disk).
    pub(super) fn complete_fetch(&mut self, id: u64) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let Some(download) = f.download.take() else {
            return;
        };
        f.finishing = true;
        let done = self.io_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = download.finish().map_err(|e| e.to_string());
            let _ = done.blocking_send(IoDone::Finished { fetch: id, result });
        });
    }

    pub(super) fn on_finished(&mut self, id: u64, result: Result<PathBuf, String>) {
        let Some(mut f) = self.fetches.remove(&id) else {
            return;
        };
        let result = match result {
            Ok(path) => {
                f.report.path = path;
                // How each holder that sent chunks is connected now (a
                // relayed one may have been hole-punched since).
                for (node, peer) in f.holders.iter().map(|p| (node_id(p), p)) {
                    if f.report.chunks_by_holder.contains_key(&node) {
                        if let Some(kind) = self.links.kind_of(peer) {
                            f.report.links.insert(node, kind);
                        }
                    }
                }
                Ok(f.report.clone())
            }
            Err(reason) => Err(NetError::Fetch {
                digest: f.digest.clone(),
                reason,
            }),
        };
        for r in f.replies.drain(..) {
            let _ = r.send(result.clone());
        }
    }

    pub(super) fn fail_fetch(&mut self, id: u64) {
        let Some(mut f) = self.fetches.remove(&id) else {
            return;
        };
        let err = NetError::Fetch {
            digest: f.digest.clone(),
            reason: format!("no holder left: {}", f.last_error),
        };
        for r in f.replies.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
    }
}
