//! The replicated state machine: what every node knows once the log is applied.
//!
//! Applying a command is deterministic. It also drives each experiment's searcher
//! and the placement of queued trials, so trial creations, assignments and stop
//! signals are never proposed: they fall out of applying the same log everywhere.
//! [`Change`]s describe what happened; the node turns the ones addressed to itself
//! into effects (start this trial, signal that one).
//!
//! The rooms:
//! - this file: the records (nodes, experiments, trials, checkpoints) and the
//!   derived indexes, snapshot encoding and the digest;
//! - [`apply`]: what each command does;
//! - [`auth`]: who may apply what (users, roles, tokens, node scope);
//! - `search`: experiments and their searchers, trial reports and exits;
//! - [`scheduling`]: the scheduler (`crates/sched`) run on the state, per pool,
//!   and the time-based deadlines;
//! - `replication`: which node copies which checkpoint, which model directories
//!   are kept.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use resolute_search::{
    ExitedReason, Operation, RequestId, SearchEvent, Searcher, SearcherSnapshot,
};
use resolute_types::config::{self, ExperimentConfig};
use resolute_types::{codec, Value};

mod apply;
pub mod auth;
mod replication;
pub use replication::{ModelRole, CHECKPOINT_REPLICAS, MODEL_REPLICAS};
mod retention;
pub mod scheduling;
mod search;

use crate::command::{
    Command, Control, Envelope, ExperimentId, MetricKind, MetricRecord, NodeId, NodeInfo,
    ProposalId, Reply, TrialId, TrialOutcome,
};
use crate::pool;

/// Proposal ids remembered for deduplication; the oldest are forgotten first.
pub const SEEN_PROPOSALS_MAX: usize = 100_000;

/// A node's standing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Heartbeating; gets work.
    Alive,
    /// Gets no new work; its trials move away.
    Draining,
    /// Its lease expired; its trials went back to the queue.
    Lost,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What it offers.
    pub info: NodeInfo,
    /// Its standing.
    pub state: NodeState,
    /// Its disk is below its low-water mark: it takes no new trials and no
    /// checkpoint copies.
    pub disk_low: Option<crate::command::DiskLow>,
}

/// Where an experiment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExperimentState {
    /// Trials are scheduled.
    Active,
    /// No trial is scheduled until it is activated.
    Paused,
    /// The searcher finished.
    Completed,
    /// A user canceled or killed it.
    Canceled,
    /// Every trial errored, or the config turned out invalid.
    Errored,
}

impl ExperimentState {
    /// Whether the experiment has ended (completed, canceled or errored).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            ExperimentState::Completed | ExperimentState::Canceled | ExperimentState::Errored
        )
    }
}

/// An experiment and its searcher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Experiment {
    /// The config as submitted (re-parsed on snapshot restore).
    pub config_yaml: String,
    /// Its overrides.
    pub overrides: Vec<String>,
    /// Who submitted it.
    pub owner: String,
    /// Model directory digest.
    pub model_digest: String,
    /// The seed in use.
    pub seed: u32,
    /// Where it is.
    pub state: ExperimentState,
    /// The last searcher error, if any (a bad metrics report).
    pub last_error: Option<String>,
    /// Searcher request id to trial id.
    pub trials: BTreeMap<RequestId, TrialId>,
    /// When (state clock) it was created.
    pub created_ms: u64,
    /// When (state clock) it ended, once it has.
    pub ended_ms: Option<u64>,
    /// Hidden from lists (`experiment archive`), kept.
    pub archived: bool,
    /// Its checkpoint policy has been applied (`retention`).
    pub collected: bool,
    #[serde(skip)]
    config: Option<ExperimentConfig>,
    #[serde(skip)]
    searcher: Option<Searcher>,
}

impl Experiment {
    /// The parsed config.
    pub fn config(&self) -> Option<&ExperimentConfig> {
        self.config.as_ref()
    }

    /// The searcher's progress (0 to 1).
    pub fn progress(&self) -> f64 {
        self.searcher.as_ref().map_or(1.0, Searcher::progress)
    }
}

/// What a searcher (or, for `Kill`, its user) asked of a trial that its node
/// has not yet carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// Nothing.
    None,
    /// Checkpoint and pause (may be resumed).
    Pause,
    /// Checkpoint and stop for good.
    Stop,
    /// Killed by its user: stopped at once and for good, whatever its exit
    /// (appended last: snapshots keep their variant numbers).
    Kill,
}

/// Where a trial is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrialState {
    /// Waiting for slots.
    Queued,
    /// Placed on a node (which starts it).
    Assigned {
        /// The node.
        node: NodeId,
    },
    /// Its process runs.
    Running {
        /// The node.
        node: NodeId,
    },
    /// Checkpointed and waiting for the searcher (or the user).
    Paused,
    /// Finished for good.
    Done(TrialOutcome),
}

/// A trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Its experiment.
    pub experiment: ExperimentId,
    /// The searcher's id for it.
    pub request_id: RequestId,
    /// Hyperparameters.
    pub hparams: Value,
    /// Seed.
    pub seed: u32,
    /// PBT: start from this trial's checkpoint.
    pub warm_start: Option<TrialId>,
    /// Where it is.
    pub state: TrialState,
    /// Bumped at every assignment; reports from older incarnations are rejected.
    pub incarnation: u64,
    /// Failures so far (lost nodes and preemptions do not count).
    pub restarts: u32,
    /// Train until this many `time_metric` units.
    pub target: Option<u64>,
    /// Progress reported so far.
    pub steps_completed: u64,
    /// The newest checkpoint.
    pub latest_checkpoint: Option<String>,
    /// Slots it needs.
    pub slots: u32,
    /// A searcher request not yet carried out.
    pub pending: Pending,
    /// Paused by the user (resumed on activate), not by the searcher.
    pub user_paused: bool,
    /// The scheduler asked it to checkpoint and stop (it goes back to the queue).
    pub preempting: bool,
    /// Where its slots are while placed: `(node, slots)` per node, node rank 0
    /// first (the node in its `state`). More than one node for a multi-node gang.
    pub layout: Vec<(NodeId, u32)>,
    /// When (state clock) it last entered the queue; None while placed.
    pub queued_ms: Option<u64>,
    /// When (state clock) it was last placed.
    pub started_ms: u64,
    /// Seconds it has to checkpoint and exit after a stop or pause signal (its
    /// experiment's `preemption_timeout`).
    pub preemption_timeout_s: u64,
    /// Its latest validation value of the searcher metric (the series itself is
    /// in the tracking store, not in the state).
    pub latest_validation: Option<f64>,
    /// Its best validation value of the searcher metric.
    pub best_validation: Option<f64>,
    /// The step of its latest validation.
    pub latest_validation_step: Option<u64>,
    /// Metric reports accepted for it (the tracking store holds them).
    pub reports: u64,
    /// After a stop or pause signal: when it is killed if it has not exited
    /// (`preemption_timeout` after the signal).
    pub stop_deadline_ms: Option<u64>,
}

impl Trial {
    /// Whether it holds slots (assigned or running).
    pub fn is_placed(&self) -> bool {
        matches!(
            self.state,
            TrialState::Assigned { .. } | TrialState::Running { .. }
        )
    }

    /// Whether it holds slots on `node`.
    pub fn is_placed_on(&self, node: NodeId) -> bool {
        self.is_placed() && self.layout.iter().any(|(n, _)| *n == node)
    }

    /// Its node rank on `node` (0 for the node that runs rank 0).
    pub fn node_rank(&self, node: NodeId) -> Option<usize> {
        self.layout.iter().position(|(n, _)| *n == node)
    }
}

/// A checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its trial.
    pub trial: TrialId,
    /// Progress it captures.
    pub steps_completed: u64,
    /// Bytes.
    pub size: u64,
    /// Content digest.
    pub digest: String,
    /// Nodes holding a copy.
    pub holders: BTreeSet<NodeId>,
    /// The trial's validation value of the searcher metric at this
    /// checkpoint's step, when it reported one (what `save_*_best` rank by).
    pub validation: Option<f64>,
}

/// Something that happened while applying, for the node to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A trial was placed on `node` with a new incarnation.
    Assigned {
        /// The trial.
        trial: TrialId,
        /// The node.
        node: NodeId,
        /// The new incarnation.
        incarnation: u64,
    },
    /// The node running `trial` should deliver a signal to it.
    Signal {
        /// The trial.
        trial: TrialId,
        /// Its node.
        node: NodeId,
        /// Its incarnation.
        incarnation: u64,
        /// What to deliver.
        signal: Signal,
    },
    /// A new member (learner or voter) joined.
    NodeJoined {
        /// The node.
        node: NodeId,
    },
    /// A metrics report was accepted: for the tracking store, which keeps the
    /// series (the state keeps only the trial's latest and best validation).
    Reported(MetricRecord),
    /// A placed incarnation ended: it exited, or its node left the cluster (for
    /// the tracking store's run history).
    RunEnded {
        /// The trial.
        trial: TrialId,
        /// The incarnation that ended.
        incarnation: u64,
        /// Why, in words (`completed`, `preempted by the scheduler`, ...).
        why: String,
    },
    /// A checkpoint was deleted (its experiment's policy, or the experiment
    /// was), or a model directory no experiment has any more: its holders
    /// delete the blob.
    Released {
        /// The blob (the checkpoint's uuid, or the model directory's digest).
        digest: String,
        /// Who held it.
        holders: Vec<NodeId>,
    },
    /// A checkpoint was recorded or gained a holder (for the tracking store).
    Checkpoint {
        /// Its uuid.
        uuid: String,
    },
}

/// A signal to a running trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Checkpoint, then pause.
    Pause,
    /// Checkpoint, then stop.
    Stop,
    /// Stop now.
    Kill,
    /// The searcher changed the target length.
    Target(u64),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Experiments by id.
    pub experiments: BTreeMap<ExperimentId, Experiment>,
    /// Trials by id.
    pub trials: BTreeMap<TrialId, Trial>,
    /// Checkpoints by uuid.
    pub checkpoints: BTreeMap<String, Checkpoint>,
    /// The nodes that keep each ended experiment's model directory, by its
    /// digest (`ModelKept`; see `replication`).
    pub models: BTreeMap<String, BTreeSet<NodeId>>,
    /// Replies of applied proposals, for exactly-once submission.
    seen: BTreeMap<ProposalId, Reply>,
    seen_order: VecDeque<ProposalId>,
    /// Metric reports accepted, ever: the tracking store holds this many rows
    /// unless it caught up from a snapshot (then it knows how many it lacks).
    pub reports_applied: u64,
    /// Reports refused because they came from a stale incarnation.
    pub stale_reports: u64,
    /// Entries (or metric records) refused because their proposer or user may
    /// not make them (`auth`).
    pub forbidden: u64,
    /// Users by name (`auth`).
    pub users: BTreeMap<String, auth::User>,
    /// API tokens by id (`auth`).
    pub tokens: BTreeMap<String, auth::Token>,
    /// Join tokens by id (`auth`).
    pub join_tokens: BTreeMap<String, auth::JoinToken>,
    /// Nodes an admin approved that have not joined yet (`NodeApproved`).
    pub approved_nodes: BTreeSet<NodeId>,
    /// Nodes an admin removed: never admitted again unless approved.
    pub removed_nodes: BTreeSet<NodeId>,
    /// Trial processes that completed on their own short of their target (the
    /// searcher raised it while they ran) and went back to the queue to resume
    /// from a checkpoint: each cost a relaunch that the node could have saved by
    /// letting the process train on.
    pub unfinished_exits: u64,
    /// Settings of the resource pools that have any (the rest use the defaults).
    pub pools: BTreeMap<String, pool::PoolSettings>,
    /// The state's clock: the largest leader time stamp applied (milliseconds).
    pub now_ms: u64,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// A hash chain over every applied entry (index, term, bytes): two replicas with
    /// the same chain value at the same index applied the same log prefix.
    pub log_hash: u64,
    /// Whether placement may find new work: a trial was queued, slots were freed,
    /// a node or experiment changed. Every apply ends with placement, so this is
    /// false between entries on every replica (and need not be stored).
    #[serde(skip)]
    placement_dirty: bool,
    /// Trials that are not finished: what the scheduler looks at, so that a pass
    /// costs the same however much history the state holds. Derived, not stored.
    #[serde(skip)]
    live: BTreeSet<TrialId>,
    /// The live trials whose latest checkpoint has fewer copies than
    /// `CHECKPOINT_REPLICAS` (see `replication`). Derived, not stored.
    #[serde(skip)]
    under_replicated: BTreeSet<TrialId>,
    /// Bumped whenever who should copy what may have changed (the
    /// under-replicated index, or a node's standing): a node's agent asks
    /// `checkpoints_to_copy` again only then. Derived, not stored.
    #[serde(skip)]
    replication_generation: u64,
    /// Bumped whenever which model directories a node keeps may have
    /// changed (an experiment, a node or a model's holders changed): a node's
    /// agent asks `models_for` again only then. Derived, not stored.
    #[serde(skip)]
    models_generation: u64,
    /// The alive nodes as the scheduler sees them, by pool: rebuilt only when a
    /// node changes (derived).
    #[serde(skip)]
    pool_nodes: Option<scheduling::PoolNodes>,
    /// Trials and experiments changed since the node last took them
    /// ([`ClusterState::take_touched`]): whose tracking rows to rewrite. Not stored.
    #[serde(skip)]
    touched: Touched,
}

/// Records changed while applying (see [`ClusterState::take_touched`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Trials.
    pub trials: BTreeSet<TrialId>,
    /// Experiments.
    pub experiments: BTreeSet<ExperimentId>,
    /// Whether anyone takes them (a node with a tracking store): a node
    /// without one (the simulator's) notes nothing.
    enabled: bool,
}

impl Touched {
    fn trial(&mut self, id: TrialId) {
        if self.enabled {
            self.trials.insert(id);
        }
    }

    fn experiment(&mut self, id: ExperimentId) {
        if self.enabled {
            self.experiments.insert(id);
        }
    }
}

/// A trial to change, noted as touched. Every change of a trial record goes
/// through here (or marks `touched` itself where it walks all trials), so the
/// tracking store learns of it.
fn trial_mut<'a>(
    trials: &'a mut BTreeMap<TrialId, Trial>,
    touched: &mut Touched,
    id: TrialId,
) -> Option<&'a mut Trial> {
    touched.trial(id);
    trials.get_mut(&id)
}

/// An experiment to change, noted as touched (as [`trial_mut`]).
fn experiment_mut<'a>(
    experiments: &'a mut BTreeMap<ExperimentId, Experiment>,
    touched: &mut Touched,
    id: ExperimentId,
) -> Option<&'a mut Experiment> {
    touched.experiment(id);
    experiments.get_mut(&id)
}

/// How many trial ids per live trial a walk over the live id range may pass
/// before searching per id is cheaper (see `live_trial_entries`).
const LIVE_WALK_SPARSENESS_MAX: u64 = 4;

/// Why a snapshot could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes are not a state snapshot.
    #[error("state snapshot: {0}")]
    Decode(String),
    /// The state is too large to encode into a snapshot a node could read.
    #[error("state snapshot: {0}")]
    Encode(String),
}

impl ClusterState {
    /// The trials that are not finished.
    pub fn live_trials(&self) -> &BTreeSet<TrialId> {
        &self.live
    }

    /// The unfinished trials with their records, in id order.
    ///
    /// Placement walks this on every pass, so it avoids one map search per trial
    /// where it can: trial ids are handed out in sequence, and when the live ids
    /// are dense within their range (the common case: recent experiments are the
    /// live ones) one ordered walk over that range of `trials` is several times
    /// cheaper than a search per id. Sparse live sets (much finished history
    /// between them) fall back to the searches.
    pub fn live_trial_entries(&self) -> Box<dyn Iterator<Item = (TrialId, &Trial)> + '_> {
        let by_search = || {
            Box::new(
                self.live
                    .iter()
                    .filter_map(|id| self.trials.get(id).map(|t| (*id, t))),
            )
        };
        let (Some(&lo), Some(&hi)) = (self.live.first(), self.live.last()) else {
            return by_search();
        };
        if (hi - lo) / LIVE_WALK_SPARSENESS_MAX > self.live.len() as u64 {
            return by_search();
        }
        let mut walk = self.trials.range(lo..=hi).peekable();
        Box::new(self.live.iter().filter_map(move |id| {
            while walk.next_if(|(k, _)| *k < id).is_some() {}
            walk.next_if(|(k, _)| *k == id).map(|(k, t)| (*k, t))
        }))
    }

    /// The alive nodes by pool, as the scheduler sees them (cached between node
    /// changes).
    pub fn pool_nodes(&self) -> std::borrow::Cow<'_, scheduling::PoolNodes> {
        match &self.pool_nodes {
            Some(p) => std::borrow::Cow::Borrowed(p),
            None => std::borrow::Cow::Owned(scheduling::pool_nodes(self)),
        }
    }

    /// A pool's settings (the defaults when it has none).
    pub fn pool_settings(&self, pool: &str) -> &pool::PoolSettings {
        self.pools.get(pool).unwrap_or(&pool::POOL_SETTINGS_DEFAULT)
    }

    /// When (state clock) a time-based decision is next due, if any: the leader
    /// proposes a `Command::Tick` once its clock passes it. Computed on demand
    /// (it looks at every unfinished trial; the leader caches it per applied index).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        scheduling::next_deadline_ms(self)
    }

    /// The trials and experiments changed since the last call (the node takes
    /// them after each entry, for the tracking store).
    pub fn take_touched(&mut self) -> Touched {
        let enabled = self.touched.enabled;
        let taken = std::mem::take(&mut self.touched);
        self.touched.enabled = enabled;
        taken
    }

    /// Whether this replica notes the records it changes (`take_touched`):
    /// only a node with a tracking store asks for them.
    pub fn note_touched(&mut self, on: bool) {
        self.touched.enabled = on;
    }

    /// The reply of an already-applied proposal.
    pub fn seen(&self, id: ProposalId) -> Option<&Reply> {
        self.seen.get(&id)
    }

    /// Adds a member (from an applied membership change); a known member (a voter
    /// demoted to learner, a learner promoted) keeps its record.
    pub fn add_node(&mut self, node: NodeId, info: NodeInfo, changes: &mut Vec<Change>) {
        if self.nodes.contains_key(&node) {
            return;
        }
        self.pool_nodes = None;
        self.replication_generation += 1;
        if let Some(settings) = &info.pool_settings {
            if !self.pools.contains_key(&info.pool) {
                self.pools.insert(info.pool.clone(), settings.clone());
            }
        }
        self.nodes.insert(
            node,
            NodeRecord {
                info,
                state: NodeState::Alive,
                disk_low: None,
            },
        );
        changes.push(Change::NodeJoined { node });
        self.schedule(changes);
    }

    /// Removes a member (from an applied membership change); its trials are requeued.
    pub fn remove_node(&mut self, node: NodeId, changes: &mut Vec<Change>) {
        self.requeue_from(node, changes);
        self.nodes.remove(&node);
        self.pool_nodes = None;
        self.replication_generation += 1;
        self.placement_dirty = true;
        self.schedule(changes);
    }

    /// Extends the applied-log hash chain with one entry (every entry, including
    /// empty and membership ones).
    pub fn note_entry(&mut self, index: u64, term: u64, data: &[u8]) {
        let mut h =
            self.log_hash ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ term.rotate_left(32);
        for b in data {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.log_hash = h.rotate_left(17) ^ (h >> 29);
    }

    /// Encodes the state (searchers included) for a Raft snapshot; refuses a
    /// state larger than a decoder accepts (`codec::DECODE_LIMIT_BYTES`), so
    /// that no node takes a snapshot no node could restart from.
    pub fn try_encode(&self) -> Result<Vec<u8>, StateError> {
        let searchers: BTreeMap<ExperimentId, SearcherSnapshot> = self
            .experiments
            .iter()
            .filter_map(|(id, e)| e.searcher.as_ref().map(|s| (*id, s.snapshot())))
            .collect();
        codec::encode(&(self, searchers)).map_err(|e| StateError::Encode(e.to_string()))
    }

    /// [`ClusterState::try_encode`] for sizes and digests: empty for a state
    /// too large to encode (which `snapshot_now` never snapshots).
    pub fn encode(&self) -> Vec<u8> {
        self.try_encode().unwrap_or_default()
    }

    /// Decodes a snapshot, re-parsing configs and restoring searchers exactly.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, StateError> {
        let (mut state, mut searchers): (ClusterState, BTreeMap<ExperimentId, SearcherSnapshot>) =
            codec::decode(bytes).map_err(|e| StateError::Decode(e.to_string()))?;
        for (id, e) in state.experiments.iter_mut() {
            let config = config::parse_str("experiment.yaml", &e.config_yaml, &e.overrides)
                .map_err(|err| StateError::Decode(err.to_string()))?
                .config;
            if let Some(snapshot) = searchers.remove(id) {
                let searcher =
                    Searcher::restore(&config.searcher, &config.hyperparameters, snapshot)
                        .map_err(|err| StateError::Decode(err.to_string()))?;
                e.searcher = Some(searcher);
            }
            e.config = Some(config);
        }
        state.live = state
            .trials
            .iter()
            .filter(|(_, t)| !matches!(t.state, TrialState::Done(_)))
            .map(|(id, _)| *id)
            .collect();
        state.rebuild_replication();
        // A state replaced by a snapshot must not look unchanged to an agent
        // that saw the old one.
        state.replication_generation = state
            .replication_generation
            .wrapping_add(state.applied_index << 20);
        state.models_generation = state
            .models_generation
            .wrapping_add(state.applied_index << 20);
        Ok(state)
    }

    /// A digest of the whole state, for comparing replicas. The applied index and the
    /// log hash are left out: a new leader's empty entry advances them without
    /// changing anything.
    pub fn digest(&self) -> String {
        let mut copy = self.clone();
        copy.applied_index = 0;
        copy.log_hash = 0;
        let bytes = copy.encode();
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &bytes {
            fnv = (fnv ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{fnv:016x}{:08x}", crc32c_of(&bytes))
    }
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    // A second, independent checksum makes accidental digest collisions negligible.
    let mut crc: u32 = !0;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Sends `signal` to every node of a placed trial (rank 0 acts on it; the others
/// only on a kill). A stop or pause starts the clock of its `preemption_timeout`.
fn signal_trial(
    id: TrialId,
    t: &mut Trial,
    signal: Signal,
    now_ms: u64,
    changes: &mut Vec<Change>,
) {
    match signal {
        Signal::Stop | Signal::Pause => {
            if t.stop_deadline_ms.is_none() {
                let timeout_s = t.preemption_timeout_s;
                t.stop_deadline_ms = Some(now_ms.saturating_add(timeout_s.saturating_mul(1000)));
            }
        }
        Signal::Kill => t.stop_deadline_ms = None,
        Signal::Target(_) => {}
    }
    for (node, _) in &t.layout {
        changes.push(Change::Signal {
            trial: id,
            node: *node,
            incarnation: t.incarnation,
            signal,
        });
    }
}

fn rejected(reason: String) -> Reply {
    Reply::Rejected { reason }
}
