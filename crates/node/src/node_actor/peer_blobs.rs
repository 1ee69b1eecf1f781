//! Peer messages too large to travel inline go through the blob path: a Raft
//! snapshot of a large state is the one that does (appends are cut at
//! `RAFT_MESSAGE_BYTES_MAX`).
//!
//! The sender puts the message's bytes in its blob store (content-addressed:
//! a snapshot sent again to the same or another follower is stored once) and
//! sends only `Request::PeerBlob { digest, size }`. The receiver fetches the
//! blob from the sender with the verified, chunked, resumable transfer, reads
//! it, deletes it and steps it as the `PeerMessage::Raft` it stands for: the
//! core sees the same message as if it had come inline, and checks it the
//! same way. So no message limit caps the state; the codec's decode limit
//! (`PEER_BLOB_MAX_BYTES`) and the disk do.
//!
//! A fetch that fails drops the message, as a lost inline one would be: the
//! leader sends a fresh snapshot when its wait runs out
//! (`core::Node::retry_lost_snapshots`). The sender keeps its blobs for
//! `PEER_BLOB_KEEP_MS` and at most `PEER_BLOBS_KEPT_MAX` of them; leftovers of
//! a crash are deleted by the agent's blob sweep.
//!
//! This is transport, the shell's job, like the chunking below it: nothing
//! here decides what the cluster does, and the simulator, whose messages have
//! no size limit, passes them whole.

use std::time::{Duration, Instant};

use actix::prelude::*;

use resolute_agent::Event;
use resolute_core::{NodeId, PeerMessage};
use resolute_net::wire::PEER_BLOB_MAX_BYTES;

use super::NodeActor;
use crate::net_actor;

/// Largest peer message sent inline, in bytes (capped at half the wire's
/// `net.max_message_bytes`, for the frame around it).
pub const PEER_INLINE_MAX_BYTES: usize = 4 << 20;
/// How long the sender keeps a message's blob for its receivers to fetch.
pub const PEER_BLOB_KEEP_MS: u64 = 600_000;
/// Most message blobs a sender keeps (the oldest goes first).
pub const PEER_BLOBS_KEPT_MAX: usize = 4;
/// Most message blobs a receiver fetches at once (one per sender is the norm:
/// only the leader sends snapshots).
pub const PEER_BLOBS_FETCHING_MAX: usize = 2;

/// The message blobs this node serves and fetches.
#[derive(Debug, Default)]
pub(super) struct PeerBlobs {
    /// Served: digest and when it was last sent, oldest first.
    kept: Vec<(String, Instant)>,
    /// Being fetched.
    fetching: Vec<String>,
}

impl NodeActor {
    /// Sends `msg` to `to`: inline when it is small enough, else as a blob.
    pub(super) fn send_peer(&mut self, ctx: &mut Context<Self>, to: NodeId, msg: PeerMessage) {
        let bytes = match msg {
            PeerMessage::Raft(bytes) if bytes.len() > self.peer_inline_max_bytes => bytes,
            msg => {
                // A full channel drops it: Raft and the proposers retransmit.
                self.peers.outbox.send(to, msg);
                return;
            }
        };
        let blobs = self.blobs.clone();
        let put = tokio::task::spawn_blocking(move || blobs.put_bytes(&bytes));
        ctx.spawn(put.into_actor(self).map(move |put, act, _| {
            let manifest = match put {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    eprintln!(
                        "node {:016x}: keeping a message for {to:016x} as a blob: {e}",
                        act.local.node
                    );
                    return;
                }
                Err(_) => return,
            };
            let digest = manifest.digest();
            act.keep_peer_blob(&digest);
            act.peers
                .outbox
                .handle()
                .send_blob_nowait(to, digest, manifest.size);
        }));
    }

    /// Remembers a served blob as just sent; forgets (and deletes) the ones
    /// past their time or beyond the count.
    fn keep_peer_blob(&mut self, digest: &str) {
        let kept = &mut self.peer_blobs.kept;
        kept.retain(|(d, _)| d != digest);
        kept.push((digest.to_string(), Instant::now()));
        let keep_for = Duration::from_millis(PEER_BLOB_KEEP_MS);
        while kept.len() > PEER_BLOBS_KEPT_MAX
            || kept
                .first()
                .is_some_and(|(_, sent)| sent.elapsed() > keep_for)
        {
            let (old, _) = kept.remove(0);
            let _ = self.blobs.remove(&old);
        }
    }

    /// A member sent a message as a blob: fetch it, then step it.
    pub(super) fn receive_peer_blob(
        &mut self,
        ctx: &mut Context<Self>,
        from: NodeId,
        digest: String,
        size: u64,
    ) {
        let fetching = &mut self.peer_blobs.fetching;
        if fetching.contains(&digest) || fetching.len() >= PEER_BLOBS_FETCHING_MAX {
            return; // Dropped, as a message to a busy receiver is.
        }
        fetching.push(digest.clone());
        let key = digest.clone();
        let fetch = self.peers.net.send(net_actor::Fetch {
            digest: digest.clone(),
            holders: vec![from],
        });
        let blobs = self.blobs.clone();
        let read = async move {
            fetch.await.map_err(|e| e.to_string())??;
            let path = blobs.path(&digest);
            let bytes = tokio::task::spawn_blocking(move || {
                let len = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
                if len != size || len > PEER_BLOB_MAX_BYTES {
                    return Err(format!("{len} bytes, not the {size} announced"));
                }
                std::fs::read(&path).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?;
            let _ = blobs.remove(&digest);
            bytes
        };
        ctx.spawn(read.into_actor(self).map(move |read, act, ctx| {
            act.peer_blobs.fetching.retain(|d| *d != key);
            match read {
                Ok(bytes) => {
                    act.step(
                        ctx,
                        Event::Peer {
                            from,
                            msg: PeerMessage::Raft(bytes),
                        },
                    );
                }
                Err(e) => {
                    // Dropped: the leader sends a fresh snapshot when its wait
                    // runs out.
                    eprintln!(
                        "node {:016x}: fetching a message from {from:016x}: {e}",
                        act.local.node
                    );
                }
            }
        }));
    }
}
