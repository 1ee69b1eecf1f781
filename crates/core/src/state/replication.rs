//! Where copies of blobs go: which member copies a live trial's latest
//! checkpoint, which model directories every node keeps. Every node computes the
//! same answers from the same state, so nobody has to coordinate; each node's
//! agent (`crates/agent`) asks for its own share and fetches it.

use super::*;

/// Copies of each live trial's latest checkpoint kept on distinct nodes (the one
/// that made it, and this many minus one more).
pub const CHECKPOINT_REPLICAS: usize = 2;

impl ClusterState {
    /// Keeps the under-replicated index true for `trial` after its latest
    /// checkpoint, its liveness or that checkpoint's holders changed: the index
    /// holds the live trials whose latest checkpoint has fewer than
    /// [`CHECKPOINT_REPLICAS`] holders, so that asking who must copy what costs
    /// what is missing, not what exists.
    pub(super) fn refresh_replication(&mut self, trial: TrialId) {
        self.under_replicated.remove(&trial);
        if !self.live.contains(&trial) {
            return;
        }
        let short = self
            .trials
            .get(&trial)
            .and_then(|t| t.latest_checkpoint.as_ref())
            .and_then(|uuid| self.checkpoints.get(uuid))
            .is_some_and(|c| c.holders.len() < CHECKPOINT_REPLICAS);
        if short {
            self.under_replicated.insert(trial);
        }
    }

    /// Rebuilds the under-replicated index (after a snapshot is decoded).
    pub(super) fn rebuild_replication(&mut self) {
        let live: Vec<TrialId> = self.live.iter().copied().collect();
        for trial in live {
            self.refresh_replication(trial);
        }
    }

    /// The live trials' latest checkpoints that `me` should copy so that each has
    /// [`CHECKPOINT_REPLICAS`] holders, each with its current holders. Among the
    /// `members` that lack a copy, those on a site that holds no copy yet come
    /// first (a site outage then loses no checkpoint), then the lowest hash of
    /// (checkpoint, node): every node agrees on who copies without talking.
    pub fn checkpoints_to_copy(
        &self,
        me: NodeId,
        members: &[NodeId],
    ) -> Vec<(String, Vec<NodeId>)> {
        let rank = |uuid: &str, n: NodeId| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in uuid.bytes().chain(n.to_le_bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        };
        let site = |n: &NodeId| self.nodes.get(n).map(|r| r.info.site.as_str());
        let mut wanted = Vec::new();
        for id in &self.under_replicated {
            let Some(uuid) = self
                .trials
                .get(id)
                .and_then(|t| t.latest_checkpoint.as_ref())
            else {
                continue;
            };
            let Some(ck) = self.checkpoints.get(uuid) else {
                continue;
            };
            if ck.holders.len() >= CHECKPOINT_REPLICAS || ck.holders.contains(&me) {
                continue;
            }
            let held_sites: BTreeSet<Option<&str>> = ck.holders.iter().map(site).collect();
            let mut candidates: Vec<(bool, u64, NodeId)> = members
                .iter()
                .filter(|n| !ck.holders.contains(n))
                .map(|n| (held_sites.contains(&site(n)), rank(uuid, *n), *n))
                .collect();
            candidates.sort_unstable();
            let need = CHECKPOINT_REPLICAS - ck.holders.len();
            if candidates.iter().take(need).any(|(_, _, n)| *n == me) {
                wanted.push((uuid.clone(), ck.holders.iter().copied().collect()));
            }
        }
        wanted
    }

    /// The model directories of experiments that have not finished: every node
    /// keeps a copy, so that a trial starts without a transfer and an experiment
    /// outlives the node it was submitted to.
    pub fn models_to_keep(&self) -> Vec<String> {
        let mut digests: Vec<String> = self
            .experiments
            .values()
            .filter(|e| !e.state.is_finished() && !e.model_digest.is_empty())
            .map(|e| e.model_digest.clone())
            .collect();
        digests.sort_unstable();
        digests.dedup();
        digests
    }
}
