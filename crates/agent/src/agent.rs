//! [`Agent`]: what a node decides about itself, beside the replicated state.
//!
//! `core::Node` decides what the cluster does (by applying the log); the agent
//! decides what this node does about it: it turns the node's effects (start this
//! incarnation, signal that one) into launches, fetches and signals, and its own
//! observations (trial reports, fetch results, GPU health) into proposals that
//! it retries until they apply. Each group of decisions has its room:
//!
//! - `trials`: one incarnation's life here (prepare, launch, run, stop, exit)
//!   and how its exit is classified;
//! - `fetch`: which blobs this node fetches (a launch's inputs, checkpoint
//!   copies, model directories) and when it tries again;
//! - `models`: which model directories this node keeps, records and deletes;
//! - `sweep`: blobs no record names;
//! - `proposals`: its own proposals, retried with the same id, and metric
//!   batching;
//! - `gpu`: GPU health turned into capacity;
//! - `disk`: free space against the low-water mark;
//! - `leave`: draining and leaving.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::{Command, ProposalId, TrialId};
use resolute_core::{Effect, Node, NodeId};

use crate::io::Action;
use crate::slots::Slots;

/// Time between SIGTERM and SIGKILL for an incarnation that is killed.
pub const KILL_GRACE_DEFAULT_MS: u64 = 10_000;

/// An agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id.
    pub node: NodeId,
    /// GPU uuid of each slot (empty: CPU slots).
    pub gpus: Vec<String>,
    /// CPU slots offered when there are no GPUs.
    pub cpu_slots: u32,
    /// The first proposal id this agent hands out. Ids must never repeat across
    /// the lives of a node (the state machine answers a repeated id with the
    /// first reply), so a shell draws it at random (production) or from the
    /// seed and the node's life (the simulator). The top bit is reserved for
    /// `core`'s internal proposals.
    pub proposal_base: u128,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace_ms: u64,
    /// Below this many free bytes on the data dir's file system the node takes
    /// no new work (`disk`); 0: the disk is not watched.
    pub disk_low_water_bytes: u64,
}

impl AgentConfig {
    /// Defaults for node `node` with `gpus` (or `cpu_slots` CPU slots).
    pub fn new(node: NodeId, gpus: Vec<String>, cpu_slots: u32, proposal_base: u128) -> Self {
        AgentConfig {
            node,
            gpus,
            cpu_slots,
            proposal_base: proposal_base & !(1u128 << 127),
            kill_grace_ms: KILL_GRACE_DEFAULT_MS,
            disk_low_water_bytes: 0,
        }
    }
}

/// What the agent asks of the driver.
#[derive(Debug)]
pub(crate) enum Out {
    /// Propose `command` to the node with this id.
    Propose { id: ProposalId, command: Command },
    /// Ask the node to leave the group (`core::Input::Leave`).
    Leave { id: ProposalId },
    /// Something for the shell.
    Act(Action),
}

/// The outputs of one step, in order.
pub(crate) type Outs = Vec<Out>;

pub(crate) fn act(out: &mut Outs, action: Action) {
    out.push(Out::Act(action));
}

pub(crate) fn note(out: &mut Outs, text: String) {
    out.push(Out::Act(Action::Note(text)));
}

/// A launch that has been handed to the shell or is being prepared, until its
/// process has exited: see `trials`.
pub(crate) use crate::trials::Incarnation;

/// The node agent.
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) slots: Slots,
    /// The incarnations on this node, from their start effect to their exit.
    pub(crate) incarnations: BTreeMap<(TrialId, u64), Incarnation>,
    /// Blobs in this node's store (as far as the agent has seen).
    pub(crate) have: BTreeSet<String>,
    pub(crate) fetches: crate::fetch::Fetches,
    pub(crate) proposals: crate::proposals::Proposals,
    pub(crate) gpu: crate::gpu::GpuWatch,
    pub(crate) disk: crate::disk::DiskWatch,
    pub(crate) leave: crate::leave::Leaving,
    pub(crate) sweep: crate::sweep::Sweep,
    /// How long each trial's latest launch here took to prepare (fetches and
    /// waiting for slots), by trial: (incarnation, milliseconds).
    pub(crate) launches: BTreeMap<TrialId, (u64, u64)>,
    pub(crate) now_ms: u64,
}

impl Agent {
    /// An agent for a node whose store holds `blobs`, at time `now_ms`.
    pub fn new(cfg: AgentConfig, blobs: impl IntoIterator<Item = String>, now_ms: u64) -> Agent {
        let slots = Slots::new(cfg.gpus.clone(), cfg.cpu_slots);
        let gpu = crate::gpu::GpuWatch::new(slots.are_gpus(), now_ms);
        let disk = crate::disk::DiskWatch::new(cfg.disk_low_water_bytes, now_ms);
        Agent {
            disk,
            proposals: crate::proposals::Proposals::new(cfg.proposal_base),
            cfg,
            slots,
            incarnations: BTreeMap::new(),
            have: blobs.into_iter().collect(),
            fetches: crate::fetch::Fetches::default(),
            gpu,
            leave: crate::leave::Leaving::default(),
            sweep: crate::sweep::Sweep::new(now_ms),
            launches: BTreeMap::new(),
            now_ms,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.node
    }

    /// The slot table.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Slots offered now (all but those on failed GPUs).
    pub fn slots_offered(&self) -> u32 {
        self.slots.offered()
    }

    /// Slots free now.
    pub fn slots_free(&self) -> u32 {
        self.slots.offered().saturating_sub(self.slots.used())
    }

    /// Why each failed GPU failed, by uuid.
    pub fn gpu_failures(&self) -> &BTreeMap<String, String> {
        self.gpu.failures()
    }

    /// The latest launch here of a trial: its incarnation and how many
    /// milliseconds its preparation (fetches, waiting for slots) took.
    pub fn launched(&self, trial: TrialId) -> Option<(u64, u64)> {
        self.launches.get(&trial).copied()
    }

    /// What the agent holds, in a line (for a liveness report or a debugger):
    /// each incarnation with its phase, inputs still missing and slots.
    pub fn summary(&self) -> String {
        let incarnations: Vec<String> = self
            .incarnations
            .iter()
            .map(|((t, i), x)| {
                format!(
                    "{t}.{i} {:?} slots {:?}{}",
                    x.phase,
                    self.slots.held_by((*t, *i)),
                    x.missing_summary()
                )
            })
            .collect();
        format!(
            "incarnations [{}], slots used {} of {}, fetches {}, own proposals in flight {}",
            incarnations.join(", "),
            self.slots.used(),
            self.slots.offered(),
            self.fetches.len(),
            self.proposals.len()
        )
    }

    /// Whether anything of this node's is still in flight: incarnations here or
    /// own proposals not yet applied.
    pub fn busy(&self) -> bool {
        !self.incarnations.is_empty() || !self.proposals.is_empty()
    }

    /// A fresh id for a client's proposal (the REST API's).
    pub fn next_id(&mut self) -> ProposalId {
        self.proposals.next_id()
    }

    /// Whether `id` is one of this agent's own proposals (its reply is the
    /// agent's, not a client's).
    pub fn owns(&self, id: ProposalId) -> bool {
        self.proposals.owns(id) || self.leave.owns(id)
    }

    /// One tick: retries, deadlines, copies, health checks, leaving.
    pub(crate) fn on_tick(&mut self, now_ms: u64, node: &Node, out: &mut Outs) {
        self.now_ms = now_ms;
        self.flush_metrics(out);
        self.retry_proposals(out);
        self.drop_stale(node, out);
        self.escalate_stops(out);
        self.launch_waiting(node, out);
        self.retry_fetches(node, out);
        self.copy_checkpoints(node, out);
        self.keep_models(node, out);
        self.check_gpus_when_due(out);
        self.check_disk_when_due(out);
        self.sweep_blobs_when_due(node, out);
        self.continue_leaving(node, out);
    }

    /// An effect the node's state addressed to this node.
    pub(crate) fn on_effect(&mut self, now_ms: u64, node: &Node, effect: Effect, out: &mut Outs) {
        self.now_ms = now_ms;
        match effect {
            Effect::StartTrial(start) => self.start(node, start, out),
            Effect::SignalTrial {
                trial,
                incarnation,
                signal,
            } => self.signal(node, trial, incarnation, signal, out),
            Effect::StopAllTrials => self.stop_all(out),
            Effect::DeleteBlob { digest } => {
                // Its checkpoint is gone from the state: no launch or copy here
                // asks for it again.
                self.have.remove(&digest);
                out.push(Out::Act(Action::DeleteBlob { digest }));
            }
            Effect::Reconcile { keep } => self.reconcile(&keep, out),
        }
    }

    /// The other Raft members (where blobs can come from).
    pub(crate) fn other_members(&self, node: &Node) -> Vec<NodeId> {
        let (voters, learners) = node.membership();
        let me = self.cfg.node;
        let mut members: Vec<NodeId> = voters
            .into_iter()
            .chain(learners)
            .filter(|n| *n != me)
            .collect();
        members.sort_unstable();
        members
    }
}
