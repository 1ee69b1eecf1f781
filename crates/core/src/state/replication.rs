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
        self.replication_generation += 1;
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

    /// Changes whenever the answer of [`Self::checkpoints_to_copy`] may have
    /// changed, for any node (a node asks again only then). Only compared with
    /// itself on one replica: its value says nothing across replicas.
    pub fn replication_generation(&self) -> u64 {
        self.replication_generation
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
    /// alive nodes that lack a copy (a draining, lost or disk-low node takes none), those
    /// on a site that holds no copy yet come first (a site outage then loses no
    /// checkpoint), then the lowest hash of (checkpoint, node): every node
    /// agrees on who copies without talking. Cheap enough for every node's every
    /// tick: it looks only at what lacks a copy, and stops counting the
    /// candidates better placed than `me` once there are enough of them.
    pub fn checkpoints_to_copy(&self, me: NodeId) -> Vec<(String, Vec<NodeId>)> {
        let mut wanted = Vec::new();
        // A node low on disk takes no copies either.
        let alive = |n: &NodeRecord| n.state == NodeState::Alive && n.disk_low.is_none();
        let Some(my_site) = self
            .nodes
            .get(&me)
            .filter(|n| alive(n))
            .map(|n| n.info.site.as_str())
        else {
            return wanted;
        };
        let rank = |uuid: &str, n: NodeId| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in uuid.bytes().chain(n.to_le_bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        };
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
            let held_site = |site: &str| {
                ck.holders
                    .iter()
                    .any(|h| self.nodes.get(h).is_some_and(|n| n.info.site == site))
            };
            let key = |n: NodeId, site: &str| (held_site(site), rank(uuid, n), n);
            let mine = key(me, my_site);
            let need = CHECKPOINT_REPLICAS - ck.holders.len();
            let better = self
                .nodes
                .iter()
                .filter(|(n, r)| **n != me && alive(r) && !ck.holders.contains(n))
                .filter(|(n, r)| key(**n, &r.info.site) < mine)
                .take(need)
                .count();
            if better < need {
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
