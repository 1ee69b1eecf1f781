//! Where copies of blobs go: which member copies a live trial's latest
//! checkpoint, which model directories every node keeps. Every node computes the
//! same answers from the same state, so nobody has to coordinate.

use super::*;

impl ClusterState {
    /// The live trials' latest checkpoints that `me` should copy so that each
    /// has `replicas` holders, with their current holders. Among `members` that
    /// lack a copy, the ones with the lowest hash of (checkpoint, node) are
    /// chosen, so every node agrees on who copies without talking.
    pub fn checkpoints_to_copy(
        &self,
        me: NodeId,
        members: &[NodeId],
        replicas: usize,
    ) -> Vec<(String, Vec<NodeId>)> {
        let rank = |uuid: &str, n: NodeId| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in uuid.bytes().chain(n.to_le_bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            (h, n)
        };
        let mut wanted = Vec::new();
        for id in &self.live {
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
            if ck.holders.len() >= replicas || ck.holders.contains(&me) {
                continue;
            }
            let mut candidates: Vec<(u64, NodeId)> = members
                .iter()
                .filter(|n| !ck.holders.contains(n))
                .map(|n| rank(uuid, *n))
                .collect();
            candidates.sort_unstable();
            let need = replicas - ck.holders.len();
            if candidates.iter().take(need).any(|(_, n)| *n == me) {
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
