//! Where copies of blobs go: which member copies a live trial's latest
//! checkpoint, which nodes keep which model directories. Every node computes the
//! same answers from the same state, so nobody has to coordinate; each node's
//! agent (`crates/agent`) asks for its own share and fetches it.

use super::*;

/// Copies of each live trial's latest checkpoint kept on distinct nodes (the one
/// that made it, and this many minus one more).
pub const CHECKPOINT_REPLICAS: usize = 2;

/// Copies of an ended experiment's model directory kept on distinct alive
/// nodes (an unfinished experiment's is on every node). As many as of a
/// checkpoint: a model directory is what reproduces the checkpoints kept.
pub const MODEL_REPLICAS: usize = CHECKPOINT_REPLICAS;

/// What a node does with one model directory (`ClusterState::models_for`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRole {
    /// An unfinished experiment's: every node keeps a copy, so that a trial
    /// starts without a transfer and the experiment outlives the node it was
    /// submitted to.
    Everywhere,
    /// An ended experiment's, kept by too few alive nodes, and this node is
    /// one of those to keep it: it fetches a copy if it lacks one, then
    /// records it (`Command::ModelKept`). The recorded holders are its
    /// first sources.
    Hold(Vec<NodeId>),
    /// Recorded as kept here.
    Held,
    /// An ended experiment's, kept by too few alive nodes, others are better
    /// placed to keep it: a copy here stays until they do.
    Spare,
    /// An ended experiment's, kept by enough other alive nodes: a copy here
    /// is deleted.
    KeptElsewhere,
}

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
        let Some(my_site) = self.copier_site(me) else {
            return wanted;
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
            let need = CHECKPOINT_REPLICAS - ck.holders.len();
            if self.chosen_to_copy(me, my_site, uuid, &ck.holders, need) {
                wanted.push((uuid.clone(), ck.holders.iter().copied().collect()));
            }
        }
        wanted
    }

    /// What `me` does with each model directory the state names (by digest).
    /// Every node computes the same answers from the same state: no copy is
    /// deleted until [`MODEL_REPLICAS`] alive nodes have recorded theirs, and
    /// who copies is decided as for checkpoints (`checkpoints_to_copy`).
    pub fn models_for(&self, me: NodeId) -> BTreeMap<String, ModelRole> {
        let mut unfinished: BTreeMap<&str, bool> = BTreeMap::new();
        for e in self.experiments.values() {
            if !e.model_digest.is_empty() {
                *unfinished.entry(e.model_digest.as_str()).or_default() |= !e.state.is_finished();
            }
        }
        let my_site = self.copier_site(me);
        let no_holders = BTreeSet::new();
        unfinished
            .into_iter()
            .map(|(digest, unfinished)| {
                let holders = self.models.get(digest).unwrap_or(&no_holders);
                let role = if unfinished {
                    ModelRole::Everywhere
                } else if holders.contains(&me) {
                    ModelRole::Held
                } else {
                    // A lost holder's copy is out of reach, and so is its site's.
                    let alive = self.alive_among(holders);
                    match (MODEL_REPLICAS.checked_sub(alive.len()), my_site) {
                        (None | Some(0), _) => ModelRole::KeptElsewhere,
                        (Some(need), Some(site))
                            if self.chosen_to_copy(me, site, digest, &alive, need) =>
                        {
                            ModelRole::Hold(holders.iter().copied().collect())
                        }
                        _ => ModelRole::Spare,
                    }
                };
                (digest.to_string(), role)
            })
            .collect()
    }

    /// Changes whenever the answer of [`Self::models_for`] may have changed,
    /// for any node. Only compared with itself on one replica.
    pub fn models_generation(&self) -> u64 {
        self.models_generation
    }

    /// Records `holder`'s copy of a model directory, unless enough alive
    /// nodes keep it already (the holder then deletes its copy).
    pub(super) fn model_kept(&mut self, digest: String, holder: NodeId) -> Reply {
        if !self.experiments.values().any(|e| e.model_digest == digest) {
            return rejected(format!("no experiment has model directory {digest}"));
        }
        let holders = self.models.get(&digest).cloned().unwrap_or_default();
        let alive = self.alive_among(&holders).len();
        if !holders.contains(&holder) && alive >= MODEL_REPLICAS {
            return rejected(format!(
                "model directory {digest} is kept by {alive} nodes already"
            ));
        }
        self.models.entry(digest).or_default().insert(holder);
        self.models_generation += 1;
        Reply::Ok
    }

    /// Forgets a model directory no experiment names any more and releases
    /// it on the nodes that kept it.
    pub(super) fn release_model(&mut self, digest: &str, changes: &mut Vec<Change>) {
        if digest.is_empty() || self.experiments.values().any(|e| e.model_digest == digest) {
            return;
        }
        if let Some(holders) = self.models.remove(digest) {
            changes.push(Change::Released {
                digest: digest.to_string(),
                holders: holders.into_iter().collect(),
            });
        }
    }

    /// Those of `holders` that are alive members (a lost holder's copy is
    /// out of reach).
    fn alive_among(&self, holders: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        holders
            .iter()
            .copied()
            .filter(|h| {
                self.nodes
                    .get(h)
                    .is_some_and(|n| n.state == NodeState::Alive)
            })
            .collect()
    }

    /// The site of `me` if it takes copies (alive, not low on disk).
    fn copier_site(&self, me: NodeId) -> Option<&str> {
        self.nodes
            .get(&me)
            .filter(|n| n.state == NodeState::Alive && n.disk_low.is_none())
            .map(|n| n.info.site.as_str())
    }

    /// Whether `me` (on `my_site`) is among the `need` nodes best placed to
    /// copy `digest`, which `holders` keep: among the alive nodes that lack a
    /// copy (a draining, lost or disk-low node takes none), those on a site
    /// that holds no copy yet come first (a site outage then loses nothing),
    /// then the lowest hash of (digest, node). It stops counting the
    /// candidates better placed than `me` once there are enough of them.
    fn chosen_to_copy(
        &self,
        me: NodeId,
        my_site: &str,
        digest: &str,
        holders: &BTreeSet<NodeId>,
        need: usize,
    ) -> bool {
        let rank = |n: NodeId| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in digest.bytes().chain(n.to_le_bytes()) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        };
        let held_site = |site: &str| {
            holders
                .iter()
                .any(|h| self.nodes.get(h).is_some_and(|n| n.info.site == site))
        };
        let key = |n: NodeId, site: &str| (held_site(site), rank(n), n);
        let mine = key(me, my_site);
        let better = self
            .nodes
            .iter()
            .filter(|(n, r)| {
                **n != me
                    && r.state == NodeState::Alive
                    && r.disk_low.is_none()
                    && !holders.contains(n)
            })
            .filter(|(n, r)| key(**n, &r.info.site) < mine)
            .take(need)
            .count();
        better < need
    }
}
