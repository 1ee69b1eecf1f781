//! The replicated state machine: what every node knows once the log is applied.
//!
//! Applying a command is deterministic. It also drives each experiment's searcher
//! and the placement of queued trials, so trial creations, assignments and stop
//! signals are never proposed: they fall out of applying the same log everywhere.
//! [`Change`]s describe what happened; the node turns the ones addressed to itself
//! into effects (start this trial, signal that one).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use resolute_search::{
    ExitedReason, Operation, RequestId, SearchEvent, Searcher, SearcherSnapshot,
};
use resolute_types::config::{self, ExperimentConfig};
use resolute_types::{codec, Value};

use crate::command::{
    Command, Control, Envelope, ExperimentId, MetricKind, MetricRecord, NodeId, NodeInfo,
    ProposalId, Reply, TrialId, TrialOutcome,
};
use crate::placement;

/// Proposal ids remembered for deduplication; the oldest are forgotten first.
pub const SEEN_PROPOSALS_MAX: usize = 100_000;
/// Metric points kept per trial; older training points are dropped first.
pub const METRIC_POINTS_PER_TRIAL_MAX: usize = 100_000;

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

/// What a searcher asked of a trial that its node has not yet carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// Nothing.
    None,
    /// Checkpoint and pause (may be resumed).
    Pause,
    /// Checkpoint and stop for good.
    Stop,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One stored metrics report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Training or validation.
    pub kind: MetricKind,
    /// Progress.
    pub steps_completed: u64,
    /// Values.
    pub metrics: BTreeMap<String, Value>,
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
    /// Metric series by trial.
    pub metrics: BTreeMap<TrialId, VecDeque<MetricPoint>>,
    /// Replies of applied proposals, for exactly-once submission.
    seen: BTreeMap<ProposalId, Reply>,
    seen_order: VecDeque<ProposalId>,
    /// Reports refused because they came from a stale incarnation.
    pub stale_reports: u64,
    /// Settings of the resource pools that have any (the rest use the defaults).
    pub pools: BTreeMap<String, placement::PoolSettings>,
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
    /// The alive nodes as the scheduler sees them, by pool: rebuilt only when a
    /// node changes (derived).
    #[serde(skip)]
    pool_nodes: Option<placement::PoolNodes>,
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
    pub fn pool_nodes(&self) -> std::borrow::Cow<'_, placement::PoolNodes> {
        match &self.pool_nodes {
            Some(p) => std::borrow::Cow::Borrowed(p),
            None => std::borrow::Cow::Owned(placement::pool_nodes(self)),
        }
    }

    /// A pool's settings (the defaults when it has none).
    pub fn pool_settings(&self, pool: &str) -> &placement::PoolSettings {
        self.pools
            .get(pool)
            .unwrap_or(&placement::POOL_SETTINGS_DEFAULT)
    }

    /// When (state clock) a time-based decision is next due, if any: the leader
    /// proposes a `Command::Tick` once its clock passes it. Computed on demand
    /// (it looks at every unfinished trial; the leader caches it per applied index).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        placement::next_deadline_ms(self)
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

    /// Applies one entry.
    pub fn apply(&mut self, index: u64, envelope: Envelope) -> (Reply, Vec<Change>) {
        self.applied_index = self.applied_index.max(index);
        if let Some(reply) = self.seen.get(&envelope.id) {
            return (reply.clone(), Vec::new());
        }
        let mut changes = Vec::new();
        self.now_ms = self.now_ms.max(envelope.time_ms);
        if envelope.command == Command::Tick {
            // Time-based decisions are made on the leader's Tick entries (and,
            // for placement, on every entry that runs it).
            self.enforce_stop_deadlines(&mut changes);
        }
        let reply = self.apply_command(envelope.command, &mut changes);
        self.schedule(&mut changes);
        self.remember(envelope.id, reply.clone());
        (reply, changes)
    }

    fn remember(&mut self, id: ProposalId, reply: Reply) {
        self.seen.insert(id, reply);
        self.seen_order.push_back(id);
        while self.seen_order.len() > SEEN_PROPOSALS_MAX {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    fn apply_command(&mut self, command: Command, changes: &mut Vec<Change>) -> Reply {
        // Everything but progress reports can change what placement sees; metrics
        // can too, through the searcher (run_op marks those cases).
        if !matches!(
            command,
            Command::Metrics { .. }
                | Command::CheckpointSaved { .. }
                | Command::CheckpointReplicated { .. }
                | Command::TrialStarted { .. }
                | Command::Noop
        ) {
            self.placement_dirty = true;
        }
        if matches!(
            command,
            Command::NodeLost { .. }
                | Command::NodeDraining { .. }
                | Command::NodeAlive { .. }
                | Command::NodeCapacity { .. }
        ) {
            self.pool_nodes = None;
        }
        match command {
            Command::Noop => Reply::Ok,
            Command::SetPool { pool, settings } => {
                self.pools.insert(pool, settings);
                Reply::Ok
            }
            Command::Tick => Reply::Ok,
            Command::NodeLost { node } => self.set_node_state(node, NodeState::Lost, changes),
            Command::NodeDraining { node } => {
                let reply = self.set_node_state(node, NodeState::Draining, changes);
                self.signal_node(node, Signal::Stop, changes);
                reply
            }
            Command::NodeAlive { node } => self.set_node_state(node, NodeState::Alive, changes),
            Command::NodeCapacity {
                node,
                slots,
                stop_first,
            } => self.set_capacity(node, slots, &stop_first, changes),
            Command::ExperimentCreated {
                config_yaml,
                overrides,
                owner,
                model_digest,
                default_seed,
            } => self.create_experiment(
                config_yaml,
                overrides,
                owner,
                model_digest,
                default_seed,
                changes,
            ),
            Command::ExperimentControl { experiment, action } => {
                self.control(experiment, action, changes)
            }
            Command::TrialStarted { trial, incarnation } => {
                match self.current(trial, incarnation) {
                    Ok(t) => {
                        if let TrialState::Assigned { node } = t.state {
                            t.state = TrialState::Running { node };
                        }
                        Reply::Ok
                    }
                    Err(reply) => reply,
                }
            }
            Command::Metrics { records } => self.metrics(records, changes),
            Command::CheckpointSaved {
                uuid,
                trial,
                incarnation,
                steps_completed,
                size,
                digest,
                holder,
            } => match self.current(trial, incarnation) {
                Ok(t) => {
                    t.latest_checkpoint = Some(uuid.clone());
                    let holders = BTreeSet::from([holder]);
                    self.checkpoints.insert(
                        uuid,
                        Checkpoint {
                            trial,
                            steps_completed,
                            size,
                            digest,
                            holders,
                        },
                    );
                    Reply::Ok
                }
                Err(reply) => reply,
            },
            Command::CheckpointReplicated { uuid, holder } => match self.checkpoints.get_mut(&uuid)
            {
                Some(c) => {
                    c.holders.insert(holder);
                    Reply::Ok
                }
                None => rejected(format!("unknown checkpoint {uuid}")),
            },
            Command::TrialExited {
                trial,
                incarnation,
                outcome,
            } => self.trial_exited(trial, incarnation, outcome, changes),
        }
    }

    fn set_node_state(
        &mut self,
        node: NodeId,
        state: NodeState,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(n) = self.nodes.get_mut(&node) else {
            return rejected(format!("unknown node {node}"));
        };
        n.state = state;
        if state == NodeState::Lost {
            self.requeue_from(node, changes);
        }
        Reply::Ok
    }

    /// A node's slot count changed (a GPU failed its health check, or came back).
    /// When its placed trials no longer fit, trials checkpoint and stop and go
    /// back to the queue, like trials the scheduler releases (a failed GPU is not
    /// their fault, so no restart is charged): first those the node named (they
    /// ran on the failed GPUs; only the node knows which slot is which), then the
    /// most recently started.
    fn set_capacity(
        &mut self,
        node: NodeId,
        slots: u32,
        stop_first: &[TrialId],
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(n) = self.nodes.get_mut(&node) else {
            return rejected(format!("unknown node {node}"));
        };
        n.info.slots = slots;
        let mut placed: Vec<(u64, TrialId, u32)> = self
            .live_trial_entries()
            .filter(|(_, t)| t.is_placed())
            .map(|(id, t)| {
                let here: u32 = t
                    .layout
                    .iter()
                    .filter(|(n, _)| *n == node)
                    .map(|(_, s)| *s)
                    .sum();
                (t.started_ms, id, here)
            })
            .filter(|(_, _, here)| *here > 0)
            .collect();
        let mut used: u32 = placed.iter().map(|(_, _, here)| *here).sum();
        // Named first, then newest first (ties: the larger trial id).
        placed.sort_unstable_by(|a, b| {
            let named = |t: &(u64, TrialId, u32)| stop_first.contains(&t.1);
            named(b).cmp(&named(a)).then(b.cmp(a))
        });
        let now = self.now_ms;
        for (_, id, here) in placed {
            if used <= slots {
                break;
            }
            used -= here;
            let Some(t) = self.trials.get_mut(&id) else {
                continue;
            };
            if !t.preempting {
                t.preempting = true;
                signal_trial(id, t, Signal::Stop, now, changes);
            }
        }
        Reply::Ok
    }

    /// Trials with slots on `node` go back to the queue; a lost node is not the
    /// trial's fault, so it does not count toward `max_restarts` (as in
    /// Determined). The other nodes of a multi-node gang kill their part: a gang
    /// runs whole or not at all.
    fn requeue_from(&mut self, node: NodeId, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        for (id, t) in self.trials.iter_mut() {
            if !t.is_placed_on(node) {
                continue;
            }
            for (other, _) in &t.layout {
                if *other != node {
                    changes.push(Change::Signal {
                        trial: *id,
                        node: *other,
                        incarnation: t.incarnation,
                        signal: Signal::Kill,
                    });
                }
            }
            t.state = TrialState::Queued;
            t.queued_ms = Some(now);
            t.stop_deadline_ms = None;
        }
    }

    fn signal_node(&mut self, node: NodeId, signal: Signal, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        for (id, t) in self.trials.iter_mut() {
            if t.is_placed_on(node) {
                signal_trial(*id, t, signal, now, changes);
            }
        }
    }

    /// Kills the placed trials whose stop or pause signal went unanswered for
    /// their `preemption_timeout`.
    fn enforce_stop_deadlines(&mut self, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        for id in &self.live {
            let Some(t) = self.trials.get_mut(id) else {
                continue;
            };
            if t.is_placed() && t.stop_deadline_ms.is_some_and(|d| d <= now) {
                signal_trial(*id, t, Signal::Kill, now, changes);
            }
        }
    }

    /// The trial, if `incarnation` is its current one; otherwise the rejection.
    fn current(&mut self, trial: TrialId, incarnation: u64) -> Result<&mut Trial, Reply> {
        let Some(t) = self.trials.get_mut(&trial) else {
            return Err(rejected(format!("unknown trial {trial}")));
        };
        let live = matches!(
            t.state,
            TrialState::Assigned { .. } | TrialState::Running { .. }
        );
        if t.incarnation != incarnation || !live {
            self.stale_reports += 1;
            return Err(rejected(format!(
                "stale incarnation {incarnation} of trial {trial} (current {}, {:?})",
                t.incarnation, t.state
            )));
        }
        Ok(t)
    }

    fn create_experiment(
        &mut self,
        config_yaml: String,
        overrides: Vec<String>,
        owner: String,
        model_digest: String,
        default_seed: u32,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let loaded = match config::parse_str("experiment.yaml", &config_yaml, &overrides) {
            Ok(l) => l,
            Err(e) => return rejected(e.to_string()),
        };
        let config = loaded.config;
        let seed = config
            .reproducibility
            .experiment_seed
            .unwrap_or(default_seed);
        let id = self.experiments.keys().next_back().map_or(1, |k| k + 1);
        let mut searcher =
            Searcher::new(&config.searcher, &config.hyperparameters, u64::from(seed));
        let ops = searcher.initial_operations();
        self.experiments.insert(
            id,
            Experiment {
                config_yaml,
                overrides,
                owner,
                model_digest,
                seed,
                state: ExperimentState::Active,
                last_error: None,
                trials: BTreeMap::new(),
                config: Some(config),
                searcher: Some(searcher),
            },
        );
        self.run_ops(id, ops, changes);
        Reply::ExperimentCreated { experiment: id }
    }

    /// Feeds an event to an experiment's searcher and carries out its operations.
    fn search_event(
        &mut self,
        experiment: ExperimentId,
        event: SearchEvent,
        changes: &mut Vec<Change>,
    ) {
        let Some(exp) = self.experiments.get_mut(&experiment) else {
            return;
        };
        let Some(searcher) = exp.searcher.as_mut() else {
            return;
        };
        match searcher.handle(&event) {
            Ok(ops) => self.run_ops(experiment, ops, changes),
            Err(e) => exp.last_error = Some(e.to_string()),
        }
    }

    fn run_ops(
        &mut self,
        experiment: ExperimentId,
        ops: Vec<Operation>,
        changes: &mut Vec<Change>,
    ) {
        // A searcher's operations can queue, resume or stop trials.
        if !ops.is_empty() {
            self.placement_dirty = true;
        }
        let mut queue: VecDeque<Operation> = ops.into();
        while let Some(op) = queue.pop_front() {
            let follow_up = self.run_op(experiment, op, changes);
            queue.extend(follow_up);
        }
    }

    fn trial_of(&self, experiment: ExperimentId, request: RequestId) -> Option<TrialId> {
        self.experiments
            .get(&experiment)
            .and_then(|e| e.trials.get(&request))
            .copied()
    }

    fn run_op(
        &mut self,
        experiment: ExperimentId,
        op: Operation,
        changes: &mut Vec<Change>,
    ) -> Vec<Operation> {
        let mut follow_up = Vec::new();
        match op {
            Operation::Create {
                request_id,
                hparams,
                trial_seed,
                warm_start,
            } => {
                let config = self
                    .experiments
                    .get(&experiment)
                    .and_then(Experiment::config);
                let slots = config.map_or(1, |c| c.resources.slots_per_trial);
                let preemption_timeout_s = config
                    .map_or(resolute_types::config::PREEMPTION_TIMEOUT_DEFAULT_S, |c| {
                        c.preemption_timeout
                    });
                let warm = warm_start.and_then(|r| self.trial_of(experiment, r));
                let id = self.trials.keys().next_back().map_or(1, |k| k + 1);
                let latest_checkpoint = warm
                    .and_then(|w| self.trials.get(&w))
                    .and_then(|t| t.latest_checkpoint.clone());
                self.trials.insert(
                    id,
                    Trial {
                        experiment,
                        request_id,
                        hparams,
                        seed: trial_seed,
                        warm_start: warm,
                        state: TrialState::Queued,
                        incarnation: 0,
                        restarts: 0,
                        target: None,
                        steps_completed: 0,
                        latest_checkpoint,
                        slots,
                        pending: Pending::None,
                        user_paused: false,
                        preempting: false,
                        layout: Vec::new(),
                        queued_ms: Some(self.now_ms),
                        started_ms: 0,
                        preemption_timeout_s,
                        stop_deadline_ms: None,
                    },
                );
                self.live.insert(id);
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    e.trials.insert(request_id, id);
                    if let Some(s) = e.searcher.as_mut() {
                        match s.handle(&SearchEvent::TrialCreated { request_id }) {
                            Ok(ops) => follow_up.extend(ops),
                            Err(err) => e.last_error = Some(err.to_string()),
                        }
                    }
                }
            }
            Operation::RunUntil { request_id, length }
            | Operation::Resume { request_id, length } => {
                let now = self.now_ms;
                if let Some(t) = self
                    .trial_of(experiment, request_id)
                    .and_then(|id| self.trials.get_mut(&id).map(|t| (id, t)))
                {
                    let (id, t) = t;
                    t.target = Some(length);
                    t.pending = Pending::None;
                    match t.state {
                        TrialState::Paused => {
                            t.state = TrialState::Queued;
                            t.queued_ms = Some(now);
                        }
                        TrialState::Assigned { .. } | TrialState::Running { .. } => {
                            signal_trial(id, t, Signal::Target(length), now, changes);
                        }
                        _ => {}
                    }
                }
            }
            Operation::Pause { request_id } => self.request(
                experiment,
                request_id,
                Pending::Pause,
                changes,
                &mut follow_up,
            ),
            Operation::Stop { request_id } => self.request(
                experiment,
                request_id,
                Pending::Stop,
                changes,
                &mut follow_up,
            ),
            Operation::Shutdown { failure, .. } => {
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    if e.state != ExperimentState::Canceled {
                        e.state = if failure {
                            ExperimentState::Errored
                        } else {
                            ExperimentState::Completed
                        };
                    }
                }
            }
        }
        follow_up
    }

    /// A searcher's pause or stop: signal a running trial, or act at once on one
    /// that is not running.
    fn request(
        &mut self,
        experiment: ExperimentId,
        request_id: RequestId,
        what: Pending,
        changes: &mut Vec<Change>,
        follow_up: &mut Vec<Operation>,
    ) {
        let Some(id) = self.trial_of(experiment, request_id) else {
            return;
        };
        let Some(t) = self.trials.get_mut(&id) else {
            return;
        };
        let now = self.now_ms;
        match t.state {
            TrialState::Assigned { .. } | TrialState::Running { .. } => {
                t.pending = what;
                let signal = if what == Pending::Pause {
                    Signal::Pause
                } else {
                    Signal::Stop
                };
                signal_trial(id, t, signal, now, changes);
            }
            TrialState::Queued | TrialState::Paused => {
                if what == Pending::Pause {
                    t.state = TrialState::Paused;
                } else {
                    t.state = TrialState::Done(TrialOutcome::Stopped);
                }
                self.settle(id);
                if what != Pending::Pause {
                    follow_up.extend(self.close(experiment, request_id));
                }
            }
            TrialState::Done(_) => {}
        }
    }

    /// Tells the searcher a trial is closed for good.
    fn close(&mut self, experiment: ExperimentId, request_id: RequestId) -> Vec<Operation> {
        let Some(e) = self.experiments.get_mut(&experiment) else {
            return Vec::new();
        };
        let Some(s) = e.searcher.as_mut() else {
            return Vec::new();
        };
        match s.handle(&SearchEvent::TrialExited { request_id }) {
            Ok(ops) => ops,
            Err(err) => {
                e.last_error = Some(err.to_string());
                Vec::new()
            }
        }
    }

    fn metrics(&mut self, records: Vec<MetricRecord>, changes: &mut Vec<Change>) -> Reply {
        let mut refused = 0usize;
        for record in records {
            let (experiment, request_id) = match self.current(record.trial, record.incarnation) {
                Ok(t) => {
                    t.steps_completed = t.steps_completed.max(record.steps_completed);
                    (t.experiment, t.request_id)
                }
                Err(_) => {
                    refused += 1;
                    continue;
                }
            };
            let series = self.metrics.entry(record.trial).or_default();
            series.push_back(MetricPoint {
                kind: record.kind,
                steps_completed: record.steps_completed,
                metrics: record.metrics.clone(),
            });
            if series.len() > METRIC_POINTS_PER_TRIAL_MAX {
                let drop = series
                    .iter()
                    .position(|p| p.kind == MetricKind::Training)
                    .unwrap_or(0);
                series.remove(drop);
            }
            if record.kind == MetricKind::Validation {
                self.search_event(
                    experiment,
                    SearchEvent::ValidationCompleted {
                        request_id,
                        metrics: record.metrics,
                    },
                    changes,
                );
            }
        }
        if refused > 0 {
            rejected(format!("{refused} records from stale incarnations"))
        } else {
            Reply::Ok
        }
    }

    fn trial_exited(
        &mut self,
        trial: TrialId,
        incarnation: u64,
        outcome: TrialOutcome,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let max_restarts = {
            let Some(t) = self.trials.get(&trial) else {
                return rejected(format!("unknown trial {trial}"));
            };
            self.experiments
                .get(&t.experiment)
                .and_then(Experiment::config)
                .map_or(5, |c| c.max_restarts)
        };
        let (experiment, request_id, pending, unfinished) = match self.current(trial, incarnation) {
            Ok(t) => (
                t.experiment,
                t.request_id,
                t.pending,
                t.target.is_some_and(|target| t.steps_completed < target),
            ),
            Err(reply) => return reply,
        };
        let Some(t) = self.trials.get_mut(&trial) else {
            return Reply::Ok;
        };
        let preempting = std::mem::take(&mut t.preempting);
        let mut events = Vec::new();
        match outcome {
            TrialOutcome::Completed | TrialOutcome::Stopped => {
                if preempting && pending == Pending::None && outcome == TrialOutcome::Stopped {
                    // The scheduler took its slots back: it waits in the queue and
                    // resumes from its latest checkpoint.
                    t.state = TrialState::Queued;
                } else if pending == Pending::Pause {
                    t.state = TrialState::Paused;
                    t.pending = Pending::None;
                } else if pending == Pending::None && (unfinished || t.user_paused) {
                    // It exited before its target (or was paused by its user): it
                    // resumes from its latest checkpoint.
                    t.state = if t.user_paused {
                        TrialState::Paused
                    } else {
                        TrialState::Queued
                    };
                } else {
                    t.state = TrialState::Done(outcome);
                    events.push(SearchEvent::TrialExited { request_id });
                }
            }
            TrialOutcome::Preempted => t.state = TrialState::Queued,
            TrialOutcome::Errored { .. } => {
                t.restarts += 1;
                if t.restarts > max_restarts || pending == Pending::Stop {
                    t.state = TrialState::Done(outcome);
                    events.push(SearchEvent::TrialExitedEarly {
                        request_id,
                        reason: ExitedReason::Errored,
                    });
                    events.push(SearchEvent::TrialExited { request_id });
                } else {
                    t.state = TrialState::Queued;
                }
            }
            TrialOutcome::InvalidHyperparameters => {
                t.state = TrialState::Done(outcome);
                events.push(SearchEvent::TrialExitedEarly {
                    request_id,
                    reason: ExitedReason::InvalidHp,
                });
                events.push(SearchEvent::TrialExited { request_id });
            }
        }
        self.settle(trial);
        for event in events {
            self.search_event(experiment, event, changes);
        }
        Reply::Ok
    }

    /// Keeps a trial's derived bookkeeping true after its state changed: a queued
    /// trial's queue clock starts (once), a finished one leaves the live set.
    fn settle(&mut self, id: TrialId) {
        let now = self.now_ms;
        if let Some(t) = self.trials.get_mut(&id) {
            match t.state {
                TrialState::Queued => {
                    t.queued_ms.get_or_insert(now);
                }
                TrialState::Done(_) => {
                    t.queued_ms = None;
                    self.live.remove(&id);
                }
                _ => t.queued_ms = None,
            }
        }
    }

    fn control(
        &mut self,
        experiment: ExperimentId,
        action: Control,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(e) = self.experiments.get_mut(&experiment) else {
            return rejected(format!("unknown experiment {experiment}"));
        };
        if matches!(
            e.state,
            ExperimentState::Completed | ExperimentState::Canceled | ExperimentState::Errored
        ) {
            return rejected(format!("experiment {experiment} has ended ({:?})", e.state));
        }
        match action {
            Control::Pause => e.state = ExperimentState::Paused,
            Control::Activate => e.state = ExperimentState::Active,
            Control::Cancel | Control::Kill => e.state = ExperimentState::Canceled,
        }
        let ids: Vec<TrialId> = self
            .trials
            .iter()
            .filter(|(_, t)| t.experiment == experiment)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(t) = self.trials.get_mut(&id) else {
                continue;
            };
            let placed = t.is_placed();
            let now = self.now_ms;
            match action {
                Control::Pause => {
                    t.user_paused = true;
                    if placed {
                        signal_trial(id, t, Signal::Pause, now, changes);
                    } else if t.state == TrialState::Queued {
                        t.state = TrialState::Paused;
                    }
                }
                Control::Activate => {
                    if t.user_paused {
                        t.user_paused = false;
                        if t.state == TrialState::Paused && t.pending == Pending::None {
                            t.state = TrialState::Queued;
                        }
                    }
                }
                Control::Cancel | Control::Kill => {
                    let signal = if action == Control::Kill {
                        Signal::Kill
                    } else {
                        Signal::Stop
                    };
                    if placed {
                        t.pending = Pending::Stop;
                        signal_trial(id, t, signal, now, changes);
                    } else if !matches!(t.state, TrialState::Done(_)) {
                        t.state = TrialState::Done(TrialOutcome::Stopped);
                        let request_id = t.request_id;
                        self.search_event(
                            experiment,
                            SearchEvent::TrialExitedEarly {
                                request_id,
                                reason: ExitedReason::UserCanceled,
                            },
                            changes,
                        );
                        self.search_event(
                            experiment,
                            SearchEvent::TrialExited { request_id },
                            changes,
                        );
                    }
                }
            }
            self.settle(id);
        }
        if let Some(e) = self.experiments.get_mut(&experiment) {
            if matches!(action, Control::Cancel | Control::Kill) {
                e.state = ExperimentState::Canceled;
            }
        }
        Reply::Ok
    }

    /// Runs the scheduler: starts queued trials and preempts (checkpoint and stop)
    /// trials the policy takes back.
    fn schedule(&mut self, changes: &mut Vec<Change>) {
        if !std::mem::take(&mut self.placement_dirty) {
            return;
        }
        let now = self.now_ms;
        if self.pool_nodes.is_none() {
            self.pool_nodes = Some(placement::pool_nodes(self));
        }
        let decision = placement::place(self);
        for (trial, layout) in decision.assign {
            self.fall_back_to_a_reachable_checkpoint(trial);
            let Some(t) = self.trials.get_mut(&trial) else {
                continue;
            };
            let Some(&(node, _)) = layout.first() else {
                continue;
            };
            if t.state != TrialState::Queued {
                continue;
            }
            t.incarnation += 1;
            t.state = TrialState::Assigned { node };
            t.queued_ms = None;
            t.started_ms = now;
            t.stop_deadline_ms = None;
            for (n, _) in &layout {
                changes.push(Change::Assigned {
                    trial,
                    node: *n,
                    incarnation: t.incarnation,
                });
            }
            t.layout = layout;
        }
        for trial in decision.release {
            if let Some(t) = self.trials.get_mut(&trial) {
                if t.is_placed() {
                    t.preempting = true;
                    signal_trial(trial, t, Signal::Stop, now, changes);
                }
            }
        }
    }

    /// A trial about to start resumes from its newest checkpoint that a member
    /// not known to be lost still holds: the newest may have been only on a node
    /// that died before another copied it. (With none left, it starts over.)
    fn fall_back_to_a_reachable_checkpoint(&mut self, trial: TrialId) {
        let Some(latest) = self
            .trials
            .get(&trial)
            .and_then(|t| t.latest_checkpoint.clone())
        else {
            return;
        };
        let reachable = |c: &Checkpoint| {
            c.holders.iter().any(|h| {
                self.nodes
                    .get(h)
                    .is_some_and(|n| n.state != NodeState::Lost)
            })
        };
        if self.checkpoints.get(&latest).is_some_and(reachable) {
            return;
        }
        // Rare (a holder died): scanning the checkpoints is fine here.
        let best = self
            .checkpoints
            .iter()
            .filter(|(_, c)| c.trial == trial && reachable(c))
            .max_by_key(|(uuid, c)| (c.steps_completed, (*uuid).clone()))
            .map(|(uuid, _)| uuid.clone());
        if let Some(t) = self.trials.get_mut(&trial) {
            t.latest_checkpoint = best;
        }
    }

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

    /// Encodes the state (searchers included) for a Raft snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let searchers: BTreeMap<ExperimentId, SearcherSnapshot> = self
            .experiments
            .iter()
            .filter_map(|(id, e)| e.searcher.as_ref().map(|s| (*id, s.snapshot())))
            .collect();
        // The state is plain data; encoding it cannot fail.
        codec::encode(&(self, searchers)).unwrap_or_default()
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
