//! The blob sweep: deletes a blob on this node's disk that no record names.
//!
//! Blobs leave a disk when the log says so (`Effect::DeleteBlob`, sent to a
//! checkpoint's recorded holders when it is released). Some blobs are never
//! recorded here, so no release ever reaches them:
//! - a checkpoint whose `CheckpointSaved` or `CheckpointReplicated` was lost
//!   with a crash of this node before it committed;
//! - a copy that arrived after the state gave the copy to another node;
//! - a checkpoint released while this node was away, when it came back
//!   through a snapshot (the release is inside the snapshot, not in the log
//!   this node replays).
//!
//! Every `BLOB_SWEEP_MS` the agent looks at the blobs it has, while its node
//! is caught up with the leader (a lagging node has not yet applied the entry
//! that may name a blob). A blob that no applied record names (a checkpoint
//! this node holds, a model directory it keeps) and that nothing here is
//! still busy with (an incarnation's input, a fetch, an own proposal in
//! flight) becomes a suspect; one still a suspect `BLOB_ORPHAN_GRACE_MS`
//! later is deleted. The grace covers entries committed elsewhere that this
//! node has yet to learn about; it is far longer than a healthy member lags.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::Command;
use resolute_core::state::ModelRole;
use resolute_core::Node;

use crate::agent::{act, note, Agent, Outs};
use crate::io::Action;

/// How often the blobs on this node's disk are looked at.
pub const BLOB_SWEEP_MS: u64 = 60_000;
/// How long a blob stays unnamed by any record before it is deleted.
pub const BLOB_ORPHAN_GRACE_MS: u64 = 600_000;

/// The sweep's memory between two looks.
#[derive(Debug)]
pub(crate) struct Sweep {
    /// When to look next.
    next_at_ms: u64,
    /// Blobs no record named at the last looks, with when that was first seen.
    suspects: BTreeMap<String, u64>,
}

impl Sweep {
    pub(crate) fn new(now_ms: u64) -> Sweep {
        Sweep {
            next_at_ms: now_ms + BLOB_SWEEP_MS,
            suspects: BTreeMap::new(),
        }
    }
}

impl Agent {
    /// Looks at this node's blobs when a sweep is due.
    pub(crate) fn sweep_blobs_when_due(&mut self, node: &Node, out: &mut Outs) {
        if self.now_ms < self.sweep.next_at_ms {
            return;
        }
        self.sweep.next_at_ms = self.now_ms + BLOB_SWEEP_MS;
        if node.leader_id() == 0 || node.applied() < node.committed() {
            return; // Its suspects wait for a node that knows the log's end.
        }
        let models = node.state().models_for(self.cfg.node);
        let unnamed: BTreeSet<String> = self
            .have
            .iter()
            .filter(|d| !self.blob_named(node, &models, d))
            .cloned()
            .collect();
        self.sweep.suspects.retain(|d, _| unnamed.contains(d));
        for digest in unnamed {
            let now = self.now_ms;
            let since = *self.sweep.suspects.entry(digest.clone()).or_insert(now);
            if now.saturating_sub(since) < BLOB_ORPHAN_GRACE_MS {
                continue;
            }
            self.sweep.suspects.remove(&digest);
            self.have.remove(&digest);
            note(
                out,
                format!(
                    "blob {digest} was in no record for {} s: deleted",
                    (now - since) / 1000
                ),
            );
            act(out, Action::DeleteBlob { digest });
        }
    }

    /// Whether the applied state names `digest` as this node's: a checkpoint
    /// it holds, or a model directory it keeps (`models`).
    pub(crate) fn recorded_here(&self, node: &Node, digest: &str) -> bool {
        let models = node.state().models_for(self.cfg.node);
        self.recorded_in(node, &models, digest)
    }

    /// [`Agent::recorded_here`] with this node's model roles at hand.
    fn recorded_in(&self, node: &Node, models: &BTreeMap<String, ModelRole>, digest: &str) -> bool {
        match node.state().checkpoints.get(digest) {
            Some(c) => c.holders.contains(&self.cfg.node),
            None => models
                .get(digest)
                .is_some_and(|r| *r != ModelRole::KeptElsewhere),
        }
    }

    /// Whether a record or something in flight here names `digest`.
    fn blob_named(&self, node: &Node, models: &BTreeMap<String, ModelRole>, digest: &str) -> bool {
        self.recorded_in(node, models, digest)
            || self.uses_input(digest)
            || self.fetches.wants(digest)
            || self.proposals.any(|c| match c {
                Command::CheckpointSaved { uuid, .. }
                | Command::CheckpointReplicated { uuid, .. } => uuid == digest,
                Command::ModelKept { digest: d, .. } => d == digest,
                _ => false,
            })
    }
}
