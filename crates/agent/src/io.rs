//! What a shell hands the driver ([`Event`]) and what it must carry out
//! ([`Action`]): the whole contract between the sans-IO node and the world.
//!
//! The production shell (`crates/node`: actix actors, libp2p, real processes) and
//! the simulator (`crates/sim`: a virtual clock) speak exactly this, so every
//! decision behind these types is made once, in this crate or in `core`.

use std::collections::BTreeMap;

use resolute_core::command::{Command, MetricKind, ProposalId, Reply, TrialId};
use resolute_core::log_store::{HardState, LogEntry, SnapshotRecord};
use resolute_core::{NodeError, NodeId, PeerMessage};
use resolute_types::Value;
use serde::{Deserialize, Serialize};

use crate::launch::LaunchSpec;

/// An input to the driver, with the time it happened (passed beside it).
#[derive(Debug, Clone)]
pub enum Event {
    /// One tick of the node's clock (every `tick_ms`).
    Tick,
    /// A message from a peer.
    Peer {
        /// The sender, as the transport authenticated it.
        from: NodeId,
        /// The message.
        msg: PeerMessage,
    },
    /// The write `Action::Persist { seq }` (and every earlier one) is durable.
    Persisted {
        /// Its sequence number.
        seq: u64,
    },
    /// `node` is alive (a connection to it is up, or it gossiped).
    Heartbeat {
        /// The node.
        node: NodeId,
    },
    /// The last connection to `node` closed.
    Disconnected {
        /// The node.
        node: NodeId,
    },
    /// Join the cluster through `via` (a node that did not bootstrap).
    Join {
        /// A member this node can reach.
        via: NodeId,
    },
    /// A client's proposal (the REST API, a simulated user), answered with
    /// `Action::Reply` for the same id. The client keeps the id when it retries,
    /// so that the command applies at most once.
    Propose {
        /// The client's id.
        id: ProposalId,
        /// What to apply.
        command: Command,
        /// The user the shell authenticated (`None`: the node's own).
        user: Option<String>,
    },
    /// What a trial process (or its launch) did.
    Trial(TrialReport),
    /// A fetch asked for by `Action::Fetch` ended.
    Fetched {
        /// The blob.
        digest: String,
        /// Verified and in the local store, or why not.
        result: Result<(), String>,
    },
    /// What NVML says of this node's GPU slots (asked for by `Action::CheckGpus`):
    /// `None` when NVML could not be asked (nothing is concluded from that).
    GpuHealth(Option<Vec<SlotHealth>>),
    /// Free bytes on the data dir's file system (asked for by
    /// `Action::CheckDisk`, or measured after the log used its reserve): `None`
    /// when it could not be measured.
    DiskSpace {
        /// Free bytes (available to the node's user).
        free_bytes: Option<u64>,
    },
    /// This node should take no new work and move its trials away (a spot
    /// notice, an operator's drain): it proposes `NodeDraining` for itself.
    Drain,
    /// Stop gracefully: drain, let the trials checkpoint and exit, then leave the
    /// Raft group. `Action::Left` says when it is done.
    Leave,
}

/// One GPU slot as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotHealth {
    /// Listed and free of uncorrected errors.
    Healthy,
    /// Gone or failing, and why.
    Failed(String),
}

/// Why training code said it ends early (Determined's `report_early_exit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyExit {
    /// The hyperparameters cannot be trained (Determined's `InvalidHP`).
    InvalidHyperparameters,
    /// The user's code decided to stop.
    UserCanceled,
    /// The code hit an error it reported before exiting.
    Errored,
}

/// How a trial process ended, as the operating system tells it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessExit {
    /// Its exit code (None: ended by a signal).
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The last lines it printed (for an error's message).
    pub last_lines: Vec<String>,
}

/// What a trial incarnation's process, or its launch, did.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialReport {
    /// Its process started (after `Action::Launch`).
    Launched {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
    },
    /// Its process could not be started.
    LaunchFailed {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// Why.
        reason: String,
    },
    /// Training or validation metrics.
    Metrics {
        /// The trial.
        trial: TrialId,
        /// The reporting incarnation.
        incarnation: u64,
        /// Training or validation.
        kind: MetricKind,
        /// Progress when reported.
        steps_completed: u64,
        /// The values.
        metrics: BTreeMap<String, Value>,
    },
    /// A checkpoint was packed into this node's blob store.
    CheckpointSaved {
        /// The trial.
        trial: TrialId,
        /// The reporting incarnation.
        incarnation: u64,
        /// The blob's digest (the checkpoint's uuid).
        uuid: String,
        /// Progress it captures.
        steps_completed: u64,
        /// Packed bytes.
        size: u64,
    },
    /// The code said it ends early, and why.
    EarlyExit {
        /// The trial.
        trial: TrialId,
        /// The reporting incarnation.
        incarnation: u64,
        /// Why.
        reason: EarlyExit,
    },
    /// The trial trained to its target (`steps`), reported its validation, and
    /// asks whether to go on: answered with `Action::Proceed` once that
    /// validation is applied (the searcher may have raised the target).
    Reached {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// How far it trained.
        steps: u64,
    },
    /// The process ended.
    Exited {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// How.
        exit: ProcessExit,
    },
}

/// What the shell must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `msg` to `to` (best effort: Raft and the proposers retry).
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: PeerMessage,
    },
    /// Make this durable, in this order: install the snapshot (atomically with the
    /// hard state), append the entries, record the hard state, fsync; then answer
    /// `Event::Persisted { seq }`. Persists are carried out in the order given
    /// (many may share one fsync).
    Persist {
        /// Sequence number to acknowledge (0: none needed).
        seq: u64,
        /// A snapshot to install first.
        snapshot: Option<SnapshotRecord>,
        /// Entries to append (replacing any conflicting suffix).
        entries: Vec<LogEntry>,
        /// The hard state.
        hard_state: Option<HardState>,
    },
    /// Write this into the tracking store (one transaction, with its applied
    /// index) before carrying out any later action (`core::track`).
    Track(Box<resolute_core::track::TrackBatch>),
    /// Delete this blob from the local store (its checkpoint was deleted).
    DeleteBlob {
        /// The blob.
        digest: String,
    },
    /// The answer to a client's `Event::Propose`.
    Reply {
        /// The client's id.
        id: ProposalId,
        /// Applied (with the state machine's reply), or why not.
        result: Result<Reply, NodeError>,
    },
    /// Start a trial incarnation's process: its blobs are in the local store and
    /// its slots are free.
    Launch(Box<LaunchSpec>),
    /// Ask an incarnation to checkpoint and stop (its preemption signal).
    Preempt {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
    },
    /// The searcher changed a running incarnation's target length.
    Retarget {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// Train until this many units.
        target: u64,
    },
    /// The answer to `TrialReport::Reached`: train on to `target`, or (None)
    /// finish now.
    Proceed {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// The new target, when it is beyond what was reached.
        target: Option<u64>,
    },
    /// Send SIGTERM to an incarnation's process group.
    Terminate {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
    },
    /// Send SIGKILL to an incarnation's process group.
    Kill {
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
    },
    /// Fetch a blob into the local store from any of `holders` (verified), then
    /// answer `Event::Fetched`. A blob already in the store is answered at once.
    Fetch {
        /// The blob's digest.
        digest: String,
        /// Who has it (none of them this node).
        holders: Vec<NodeId>,
    },
    /// Ask NVML about this node's GPU slots, then answer `Event::GpuHealth`.
    CheckGpus,
    /// Measure the free space of the data dir's file system, then answer
    /// `Event::DiskSpace`.
    CheckDisk,
    /// One of this node's own proposals applied (for logs and observers: the
    /// simulator checks fencing with it).
    Settled {
        /// What was proposed.
        command: Command,
        /// The state machine's reply.
        reply: Reply,
    },
    /// Something an operator would want in the node's log.
    Note(String),
    /// The node has left the cluster (after `Event::Leave`): stop.
    Left,
}
