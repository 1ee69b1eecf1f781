//! [`Node`]: the sans-IO node. Inputs in, outputs out; no I/O, clock or thread.
//!
//! It follows raft-rs's asynchronous Ready contract to the letter:
//!
//! 1. `ready.messages` are sent at once (they do not depend on local writes);
//! 2. the snapshot, entries and hard state go out as one [`Output::Persist`], the
//!    in-memory log cache takes them, and the Ready is handed back with
//!    `advance_append_async`, so the node keeps stepping while the shell writes;
//! 3. when the shell answers [`Input::Persisted`], in order: `on_persist_ready`,
//!    the persisted messages are sent, and the committed entries are applied (their
//!    commit index was in that write or an earlier one: the commit index is durable
//!    before anything it covers applies).
//!
//! Membership has no master: the first node bootstraps a group of one; a joining
//! node starts uninitialized and announces itself; the leader adds it as a learner
//! and promotes learners (other sites first) until `voters` voters exist, and
//! replaces a voter whose lease expired. Proposals can be made on any node and are
//! forwarded to the leader; every proposal is answered (applied, refused, no
//! leader, or timed out).
//!
//! The rooms: this file (inputs and outputs, the Ready loop, applying entries
//! and snapshots); `peers` (peer messages, forwarding, joins and leaves);
//! `membership` (leases, voters, the fence).

// protobuf messages are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

use std::collections::{BTreeMap, BTreeSet};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, Message,
};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};

use crate::log_store as store;
use resolute_types::{codec, Value};

use crate::command::{
    Command, Envelope, ExperimentId, JoinRequest, NodeId, NodeInfo, ProposalId, Reply, TrialId,
    COMMAND_VERSION,
};
use crate::guard;
use crate::log_cache::{self, LogCache};
use crate::state::{Change, ClusterState, NodeState, Signal};
use crate::track;

mod membership;
mod peers;
mod timing;

pub use timing::{LatencyClass, Timing};

/// Default number of voters the leader keeps (1 to 7).
pub const VOTERS_DEFAULT: usize = 3;
/// Most voters allowed.
pub const VOTERS_MAX: usize = 7;
/// Default lease: a node not heard from for this long is lost.
pub const LEASE_TIMEOUT_DEFAULT_MS: u64 = 3000;
/// Default grace after the last connection to a node closed: a node that does
/// not reconnect (or send anything) within it is lost before its lease ends. A
/// killed process's sockets are reset by its kernel at once, so this is how a
/// crash is noticed in about a second; a silent failure still takes the lease.
pub const DISCONNECT_GRACE_DEFAULT_MS: u64 = 1000;
/// Default time after which an unanswered proposal fails.
pub const PROPOSAL_TIMEOUT_DEFAULT_MS: u64 = 5000;
/// Default: take a snapshot once this many entries were applied since the last.
pub const SNAPSHOT_ENTRIES_DEFAULT: u64 = 10_000;
/// Default: take a snapshot once this many bytes of entries were applied since the last.
pub const SNAPSHOT_LOG_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Largest raft message (entries are batched up to this size).
pub const RAFT_MESSAGE_BYTES_MAX: u64 = 1024 * 1024;
/// How often a joining node repeats its announcement, in ticks.
pub const ANNOUNCE_EVERY_TICKS: u64 = 10;

/// A node's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (never 0).
    pub id: NodeId,
    /// What it offers.
    pub info: NodeInfo,
    /// Voters the leader keeps (1-7).
    pub voters: usize,
    /// Milliseconds per tick (the shell ticks at this period).
    pub tick_ms: u64,
    /// Base election timeout, in ticks (each node adds seeded jitter).
    pub election_ticks: usize,
    /// Leader heartbeat period, in ticks.
    pub heartbeat_ticks: usize,
    /// Lease length.
    pub lease_timeout_ms: u64,
    /// How long a node may stay disconnected before it is lost (at most the lease).
    pub disconnect_grace_ms: u64,
    /// Proposal timeout.
    pub proposal_timeout_ms: u64,
    /// Entries applied between snapshots.
    pub snapshot_entries: u64,
    /// Bytes of entries applied between snapshots (the log's size).
    pub snapshot_log_bytes: u64,
    /// Seed of this node's randomness (election jitter).
    pub seed: u64,
    /// The join token this node presents when it asks to join.
    pub join_token: Option<String>,
    /// Whether to emit [`Output::Track`] after each applied batch (a node with
    /// a tracking store; the simulator's nodes keep none).
    pub track: bool,
}

impl NodeConfig {
    /// Defaults for node `id`.
    pub fn new(id: NodeId, info: NodeInfo) -> Self {
        NodeConfig {
            id,
            info,
            voters: VOTERS_DEFAULT,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 3,
            lease_timeout_ms: LEASE_TIMEOUT_DEFAULT_MS,
            disconnect_grace_ms: DISCONNECT_GRACE_DEFAULT_MS,
            proposal_timeout_ms: PROPOSAL_TIMEOUT_DEFAULT_MS,
            snapshot_entries: SNAPSHOT_ENTRIES_DEFAULT,
            snapshot_log_bytes: SNAPSHOT_LOG_BYTES_DEFAULT,
            seed: id,
            join_token: None,
            track: true,
        }
    }
}

/// What the shell hands the node.
#[derive(Debug, Clone)]
pub enum Input {
    /// One tick of the logical clock.
    Tick,
    /// A message from a peer.
    Peer {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: PeerMessage,
    },
    /// A client proposal.
    Propose {
        /// Makes it exactly-once.
        id: ProposalId,
        /// What to apply.
        command: Command,
        /// The user this node authenticated and asks for (`None`: the node
        /// itself, for its own reports).
        user: Option<String>,
    },
    /// The write `Output::Persist { seq }` is durable.
    Persisted {
        /// Its sequence number.
        seq: u64,
    },
    /// A gossip heartbeat: `node` is alive.
    Heartbeat {
        /// The node.
        node: NodeId,
    },
    /// The last connection to `node` closed: unless it is heard from again
    /// within `disconnect_grace_ms`, it is lost.
    Disconnected {
        /// The node.
        node: NodeId,
    },
    /// Join the cluster through `via` (for a node that did not bootstrap).
    Join {
        /// A known member.
        via: NodeId,
    },
    /// Leave the cluster for good (graceful stop): the leader removes this node
    /// from the membership; the answer is the `Reply` for `id`.
    Leave {
        /// Proposal id for the answer.
        id: ProposalId,
    },
}

/// Messages between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// A raft-rs message (protobuf bytes).
    Raft(Vec<u8>),
    /// A proposal forwarded to the leader by the node it was made on. It is
    /// taken only from that node (the entry records it as the proposer), and
    /// never relayed: a node that is no longer the leader refuses it, and the
    /// origin asks again.
    Forward {
        /// The proposal id.
        id: ProposalId,
        /// The node it was made on (must be the sender).
        origin: NodeId,
        /// The user the origin authenticated, if any.
        user: Option<String>,
        /// The command.
        command: Command,
    },
    /// A forwarded proposal could not be proposed.
    Refused {
        /// The proposal id.
        id: ProposalId,
        /// Why.
        reason: String,
        /// Whether asking again may work (the receiver was not the leader).
        retry: bool,
    },
    /// A node asks to leave.
    Leave {
        /// The node.
        node: NodeId,
    },
    /// The leader applied the removal of the receiving node: it may stop.
    Removed,
    /// A node asks to join.
    Announce {
        /// The node.
        node: NodeId,
        /// What it offers.
        info: NodeInfo,
        /// The join token an admin gave it (`resolute cluster join-token`);
        /// a cluster with users admits no node without one.
        join_token: Option<String>,
    },
}

/// What the node asks of its shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send `msg` to `to`.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: PeerMessage,
    },
    /// Make this durable, in this order: install the snapshot (atomically with the
    /// hard state), append the entries, record the hard state, fsync; then answer
    /// `Input::Persisted { seq }`. Persists must be carried out in the order they
    /// were emitted (many may share one fsync).
    Persist {
        /// Sequence number to acknowledge.
        seq: u64,
        /// A snapshot to install first.
        snapshot: Option<store::SnapshotRecord>,
        /// Entries to append (replacing any conflicting suffix).
        entries: Vec<store::LogEntry>,
        /// The hard state.
        hard_state: Option<store::HardState>,
    },
    /// Something this node must do.
    Effect(Effect),
    /// Write this into the tracking store (in one transaction, with its applied
    /// index) before carrying out any later output; see [`crate::track`].
    Track(Box<track::TrackBatch>),
    /// The answer to a client proposal made on this node.
    Reply {
        /// The proposal.
        id: ProposalId,
        /// Its result.
        result: Result<Reply, NodeError>,
    },
}

/// A trial placed on this node, to start (or restart from its latest checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct StartTrial {
    /// The trial.
    pub trial: TrialId,
    /// Its new incarnation (its reports must carry it).
    pub incarnation: u64,
    /// Its experiment.
    pub experiment: ExperimentId,
    /// Hyperparameters.
    pub hparams: Value,
    /// Seed.
    pub seed: u32,
    /// Slots on this node.
    pub slots: u32,
    /// This node's rank in the trial's gang (0 runs the trial's chief; a
    /// single-node trial is rank 0).
    pub node_rank: usize,
    /// Every node of the gang and its slots, rank 0 first.
    pub layout: Vec<(NodeId, u32)>,
    /// Target length, if the searcher set one.
    pub target: Option<u64>,
    /// Checkpoint to resume from.
    pub latest_checkpoint: Option<String>,
}

/// Work for this node's trial runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start (or restart from its latest checkpoint) a trial placed here.
    StartTrial(StartTrial),
    /// Deliver a signal to a trial running here.
    SignalTrial {
        /// The trial.
        trial: TrialId,
        /// Its incarnation.
        incarnation: u64,
        /// What.
        signal: Signal,
    },
    /// A checkpoint this node holds was deleted (its experiment's policy, or
    /// the experiment): delete its blob.
    DeleteBlob {
        /// The blob.
        digest: String,
    },
    /// This node lost contact with a quorum for longer than its lease: stop every
    /// local trial (they have been or will be reassigned elsewhere).
    StopAllTrials,
    /// This node's state was rebuilt (restart replay, snapshot from the leader):
    /// exactly these trial incarnations should run here. Stop any other; the
    /// `StartTrial` effects that follow start the missing ones (a runner ignores a
    /// start for an incarnation it already runs).
    Reconcile {
        /// `(trial, incarnation)` pairs placed on this node.
        keep: Vec<(TrialId, u64)>,
    },
}

/// Why a proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// No leader is known (election in progress or no quorum); retry later.
    #[error("no leader: the cluster is electing or has no quorum")]
    NoLeader,
    /// The proposal was not applied in time; it may still be applied later, so
    /// retry with the same proposal id.
    #[error("proposal timed out")]
    Timeout,
    /// The leader refused the proposal.
    #[error("proposal refused: {0}")]
    Refused(String),
}

/// A Ready whose writes the shell has not acknowledged yet.
struct Unacked {
    /// The `Persist` sequence number (0: nothing to write).
    seq: u64,
    /// raft-rs's Ready number.
    number: u64,
    snapshot: Option<raft::eraftpb::Snapshot>,
    persisted_messages: Vec<Message>,
    committed: Vec<Entry>,
}

/// A Resolute node's logic.
pub struct Node {
    cfg: NodeConfig,
    /// What the entries applied so far in this batch mean to the tracking store.
    track: track::TrackBatch,
    /// Blobs of this node's released while the log replayed (see `effects`).
    released_in_replay: BTreeSet<String>,
    /// Peer messages dropped before raft-rs, by reason.
    guard: guard::Guard,
    raw: RawNode<LogCache>,
    state: ClusterState,
    now_ms: u64,
    ticks: u64,
    persist_seq: u64,
    unacked: std::collections::VecDeque<Unacked>,
    acked_seq: u64,
    pending: BTreeMap<ProposalId, u64>,
    last_seen: BTreeMap<NodeId, u64>,
    /// When the last connection to a node closed (cleared by nothing: a later
    /// `last_seen` outweighs it).
    disconnected_at: BTreeMap<NodeId, u64>,
    /// When this node last heard from a leader (None: not since it started).
    last_quorum_ms: Option<u64>,
    /// Trials stopped by self-fencing, reported when contact resumes.
    fenced_trials: Vec<(TrialId, u64)>,
    fenced: bool,
    replay_until: u64,
    replaying: bool,
    join_via: Option<NodeId>,
    last_term_role: (u64, StateRole),
    internal_seq: u64,
    log_bytes_since_snapshot: u64,
    leaving: Option<ProposalId>,
    /// When (in ticks) each follower began waiting for a snapshot.
    snapshot_waits: BTreeMap<NodeId, u64>,
    proposed: BTreeSet<(NodeId, bool)>,
    /// The deadline a `Tick` was proposed for, and when.
    tick_proposed: Option<(u64, u64)>,
    /// The next scheduling deadline, computed at this applied index.
    deadline_cache: Option<(u64, Option<u64>)>,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Node {
    /// A node from what its store recovered. With an empty store, `bootstrap`
    /// makes it a group of one; otherwise it starts uninitialized and joins.
    /// Returns the outputs to carry out first (the bootstrap write).
    pub fn new(
        cfg: NodeConfig,
        recovered: &store::Recovered,
        bootstrap: bool,
    ) -> Result<(Node, Vec<Output>), raft::Error> {
        assert!(cfg.id != 0, "node id 0 is reserved");
        assert!(
            (1..=VOTERS_MAX).contains(&cfg.voters),
            "voters must be 1 to {VOTERS_MAX}"
        );
        let fresh = recovered.snapshot.is_none()
            && recovered.entries.is_empty()
            && recovered.hard_state == store::HardState::default();
        let mut out = Vec::new();
        let (cache, mut state) = if !fresh {
            let state = match &recovered.snapshot {
                Some(s) if !s.data.is_empty() => ClusterState::decode(&s.data)
                    .map_err(|e| raft::Error::ConfigInvalid(e.to_string()))?,
                _ => ClusterState::default(),
            };
            (LogCache::from_recovered(recovered), state)
        } else if bootstrap {
            let mut state = ClusterState::default();
            state.add_node(cfg.id, cfg.info.clone(), &mut Vec::new());
            let conf = ConfState::from((vec![cfg.id], vec![]));
            let record = store::SnapshotRecord {
                index: 0,
                term: 0,
                conf_state: log_cache::from_conf_state(&conf),
                data: state.encode(),
            };
            out.push(Output::Persist {
                seq: 0,
                snapshot: Some(record),
                entries: Vec::new(),
                hard_state: None,
            });
            (LogCache::new(conf), state)
        } else {
            (LogCache::new(ConfState::default()), ClusterState::default())
        };
        state.note_touched(cfg.track);
        // raft-rs draws its randomized election timeout from thread_rng, which would
        // make runs irreproducible. A width-one range makes that draw constant; the
        // spread comes from a per-node timeout derived from the seed (and, in the
        // simulator, from jittered tick times).
        let mut jitter = cfg.seed ^ cfg.id.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let base = cfg.election_ticks.max(2);
        let election = base + (splitmix(&mut jitter) % base as u64) as usize;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: election,
            heartbeat_tick: cfg.heartbeat_ticks.max(1),
            min_election_tick: election,
            max_election_tick: election + 1,
            applied: cache.snapshot_index(),
            max_size_per_msg: RAFT_MESSAGE_BYTES_MAX,
            max_inflight_msgs: 256,
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, cache, &logger)?;
        let replay_until = recovered.hard_state.commit;
        let mut node = Node {
            guard: guard::Guard::default(),
            raw,
            state,
            now_ms: 0,
            ticks: 0,
            persist_seq: 0,
            unacked: std::collections::VecDeque::new(),
            acked_seq: 0,
            pending: BTreeMap::new(),
            last_seen: BTreeMap::new(),
            disconnected_at: BTreeMap::new(),
            last_quorum_ms: None,
            fenced_trials: Vec::new(),
            fenced: false,
            replaying: replay_until > 0,
            replay_until,
            join_via: None,
            last_term_role: (0, StateRole::Follower),
            internal_seq: 0,
            log_bytes_since_snapshot: 0,
            leaving: None,
            snapshot_waits: BTreeMap::new(),
            proposed: BTreeSet::new(),
            tick_proposed: None,
            deadline_cache: None,
            track: track::TrackBatch::default(),
            released_in_replay: BTreeSet::new(),
            cfg,
        };
        node.watch_role();
        if fresh && bootstrap {
            node.raw.campaign()?;
        }
        Ok((node, out))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The replicated state as applied here.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The leader this node knows of (0: none).
    pub fn leader_id(&self) -> NodeId {
        self.raw.raft.leader_id
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    /// The index of the last committed entry.
    pub fn committed(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Voters and learners as last applied.
    pub fn membership(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        let cs = self.raw.store().conf_state();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// The applied-log hash chain and the index it covers (for checking that
    /// replicas apply the same prefix).
    pub fn log_hash(&self) -> (u64, u64) {
        (self.state.applied_index, self.state.log_hash)
    }

    /// The latest term this node knows of for which it is leader (0: not leader).
    pub fn leader_term(&self) -> u64 {
        if self.is_leader() {
            self.raw.raft.term
        } else {
            0
        }
    }

    /// Peer messages dropped before raft-rs, by reason (forgeries, messages
    /// that would make raft-rs panic).
    pub fn dropped(&self) -> &guard::Guard {
        &self.guard
    }

    /// Index of the latest snapshot.
    pub fn snapshot_index(&self) -> u64 {
        self.raw.store().snapshot_index()
    }

    /// Handles one input at time `now_ms` (the shell's clock, only compared with
    /// itself) and returns what to do.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Vec<Output> {
        self.now_ms = now_ms;
        let mut out = Vec::new();
        match input {
            Input::Tick => {
                self.ticks += 1;
                self.raw.tick();
                self.on_tick(&mut out);
            }
            Input::Peer { from, msg } => {
                self.last_seen.insert(from, now_ms);
                self.on_peer(from, msg, &mut out);
            }
            Input::Propose { id, command, user } => {
                if let Some(reply) = self.state.seen(id) {
                    out.push(Output::Reply {
                        id,
                        result: Ok(reply.clone()),
                    });
                } else {
                    self.pending
                        .insert(id, now_ms + self.cfg.proposal_timeout_ms);
                    self.propose(id, self.cfg.id, user, command, &mut out);
                }
            }
            Input::Persisted { seq } => self.on_persisted(seq, &mut out),
            Input::Heartbeat { node } => {
                self.last_seen.insert(node, now_ms);
            }
            Input::Disconnected { node } => {
                self.disconnected_at.insert(node, now_ms);
            }
            Input::Join { via } => {
                self.join_via = Some(via);
                self.announce(&mut out);
            }
            Input::Leave { id } => {
                self.leaving = Some(id);
                self.pending
                    .insert(id, now_ms + self.cfg.proposal_timeout_ms);
                self.on_leave(self.cfg.id, &mut out);
            }
        }
        self.drive(&mut out);
        self.watch_role();
        out
    }

    /// Notices elections: a new leader gives every member a full lease.
    fn watch_role(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.state);
        if now != self.last_term_role {
            if now.1 == StateRole::Leader {
                // Except those whose connections this node saw close and that have
                // not been heard from since: that is first-hand evidence, and a
                // fresh lease would hide a crashed leader's death for a whole lease.
                let members: Vec<NodeId> = self.state.nodes.keys().copied().collect();
                for n in members {
                    let seen = self.last_seen.get(&n).copied();
                    let gone = self
                        .disconnected_at
                        .get(&n)
                        .is_some_and(|d| seen.is_none_or(|s| s <= *d));
                    if !gone {
                        self.last_seen.insert(n, self.now_ms);
                    }
                }
                self.proposed.clear();
            }
            self.last_term_role = now;
        }
    }

    fn on_tick(&mut self, out: &mut Vec<Output>) {
        let now = self.now_ms;
        let expired: Vec<ProposalId> = self
            .pending
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.pending.remove(&id);
            out.push(Output::Reply {
                id,
                result: Err(NodeError::Timeout),
            });
        }
        if self.ticks % ANNOUNCE_EVERY_TICKS == 0 {
            self.announce(out);
            if self.leaving.is_some() {
                self.on_leave(self.cfg.id, out);
            }
        }
        self.fence(out);
        if self.is_leader() {
            self.maintain_membership();
            self.maintain_leases(out);
            self.propose_due_tick(out);
            if self.raw.store().take_snapshot_wanted() {
                // A follower needs a snapshot that includes it.
                self.snapshot_now(out);
            }
            self.retry_lost_snapshots();
        }
    }

    /// raft-rs waits for a sent snapshot until the application reports how it went;
    /// a lost one (the network may drop it) would stall that follower forever. A
    /// follower still waiting after a few election timeouts is reported as failed,
    /// so the leader probes it again and sends a fresh snapshot.
    fn retry_lost_snapshots(&mut self) {
        let waiting: Vec<NodeId> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(_, p)| p.state == raft::ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        let patience = 3 * self.cfg.election_ticks.max(2) as u64;
        self.snapshot_waits.retain(|id, _| waiting.contains(id));
        for id in waiting {
            let since = *self.snapshot_waits.entry(id).or_insert(self.ticks);
            if self.ticks.saturating_sub(since) > patience {
                self.snapshot_waits.remove(&id);
                self.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// When a time-based scheduling decision is due (see
    /// `placement::next_deadline_ms`), the leader proposes an entry that carries
    /// its clock; applying it lets every replica make that decision. At most one
    /// is in flight per deadline, retried after a proposal timeout.
    fn propose_due_tick(&mut self, out: &mut Vec<Output>) {
        let applied = self.state.applied_index;
        let due = match self.deadline_cache {
            Some((index, due)) if index == applied => due,
            _ => {
                let due = self.state.next_deadline_ms();
                self.deadline_cache = Some((applied, due));
                due
            }
        };
        let Some(due) = due else {
            return;
        };
        if self.now_ms < due {
            return;
        }
        if let Some((deadline, at)) = self.tick_proposed {
            if deadline == due && self.now_ms < at + self.cfg.proposal_timeout_ms {
                return;
            }
        }
        self.tick_proposed = Some((due, self.now_ms));
        let id = self.internal_id();
        self.propose(id, self.cfg.id, None, Command::Tick, out);
    }

    fn next_seq(&mut self) -> u64 {
        self.persist_seq += 1;
        self.persist_seq
    }

    fn send_all(&self, msgs: Vec<Message>, out: &mut Vec<Output>) {
        for m in msgs {
            if let Ok(bytes) = m.write_to_bytes() {
                out.push(Output::Send {
                    to: m.to,
                    msg: PeerMessage::Raft(bytes),
                });
            }
        }
    }

    /// Takes every Ready: the log cache learns its writes at once (raft-rs reads
    /// handed-over entries from storage right after `advance_append_async`), the
    /// writes go to the shell as `Output::Persist`, and the rest waits for the
    /// shell's acknowledgement (`on_persist_ready`).
    fn drive(&mut self, out: &mut Vec<Output>) {
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            self.send_all(rd.take_messages(), out);
            let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
            let hard_state = match (rd.hs(), &snapshot) {
                (Some(hs), _) => Some(hs.clone()),
                // A snapshot is installed atomically with a hard state.
                (None, Some(_)) => Some(self.raw.raft.hard_state()),
                (None, None) => None,
            };
            let entries = rd.entries().clone();
            let seq = if snapshot.is_none() && entries.is_empty() && hard_state.is_none() {
                0
            } else {
                let seq = self.next_seq();
                out.push(Output::Persist {
                    seq,
                    snapshot: snapshot.as_ref().map(log_cache::from_snapshot),
                    entries: entries.iter().map(log_cache::from_entry).collect(),
                    hard_state: hard_state.as_ref().map(log_cache::from_hard_state),
                });
                seq
            };
            if let Some(snap) = &snapshot {
                self.raw.mut_store().apply_snapshot(snap.clone());
            }
            self.raw.mut_store().append(&entries);
            if let Some(hs) = hard_state {
                self.raw.mut_store().set_hard_state(hs);
            }
            self.unacked.push_back(Unacked {
                seq,
                number: rd.number(),
                snapshot,
                persisted_messages: rd.take_persisted_messages(),
                committed: rd.take_committed_entries(),
            });
            self.raw.advance_append_async(rd);
            self.finish_acked(out);
        }
    }

    fn on_persisted(&mut self, seq: u64, out: &mut Vec<Output>) {
        // The shell carries out writes in order, so `seq` covers every earlier one.
        self.acked_seq = self.acked_seq.max(seq);
        self.finish_acked(out);
    }

    /// Completes, in order, every Ready whose writes are durable: raft-rs learns
    /// it (`on_persist_ready`), persisted messages go out, and committed entries are
    /// applied (their commit index was in that write or an earlier one, so it is
    /// durable before anything it covers is applied).
    fn finish_acked(&mut self, out: &mut Vec<Output>) {
        while self
            .unacked
            .front()
            .is_some_and(|u| u.seq == 0 || u.seq <= self.acked_seq)
        {
            let Some(u) = self.unacked.pop_front() else {
                break;
            };
            self.raw.on_persist_ready(u.number);
            if let Some(snap) = u.snapshot {
                let index = snap.get_metadata().index;
                // A snapshot that does not decode came from a different version;
                // keep the old state rather than crash.
                self.flush_tracking(out);
                if let Ok(mut state) = ClusterState::decode(&snap.data) {
                    state.note_touched(self.cfg.track);
                    self.state = state;
                }
                // The state now is the snapshot's: it counts as applied.
                self.state.applied_index = self.state.applied_index.max(index);
                if self.cfg.track {
                    self.track.replaced = true;
                    self.flush_tracking(out);
                }
                self.raw.advance_apply_to(index);
                if self.replaying && index >= self.replay_until {
                    self.replaying = false;
                }
                if !self.replaying {
                    // No change events came with the snapshot.
                    self.reconcile(out);
                }
            }
            self.send_all(u.persisted_messages, out);
            let last = u.committed.last().map(|e| e.index);
            self.apply_entries(u.committed, out);
            if let Some(index) = last {
                self.raw.advance_apply_to(index);
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Vec<Output>) {
        for entry in entries {
            let index = entry.index;
            self.log_bytes_since_snapshot += entry.data.len() as u64;
            self.state.note_entry(index, entry.term, &entry.data);
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {}
                EntryType::EntryNormal => self.apply_command(index, &entry.data, out),
                EntryType::EntryConfChange => {
                    if let Ok(cc) = ConfChange::parse_from_bytes(&entry.data) {
                        let mut v2 = ConfChangeV2::default();
                        v2.set_changes(vec![single(cc.node_id, cc.get_change_type())].into());
                        v2.context = cc.context.clone();
                        self.apply_conf_change(index, v2, out);
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    if let Ok(cc) = ConfChangeV2::parse_from_bytes(&entry.data) {
                        self.apply_conf_change(index, cc, out);
                    }
                }
            }
            self.state.applied_index = self.state.applied_index.max(index);
            if self.replaying && index >= self.replay_until {
                self.replaying = false;
                self.reconcile(out);
            }
        }
        // Before the snapshot that may follow: the store must not fall behind
        // a log compaction.
        self.flush_tracking(out);
        self.maybe_snapshot(out);
    }

    fn apply_command(&mut self, index: u64, data: &[u8], out: &mut Vec<Output>) {
        // An entry that does not decode (a newer version, corruption) is skipped, not
        // fatal: every replica skips it the same way.
        let Ok(envelope) = codec::decode::<Envelope>(data) else {
            return;
        };
        if envelope.version > COMMAND_VERSION {
            return;
        }
        let id = envelope.id;
        let (reply, mut changes) = self.state.apply(index, envelope);
        self.note_tracking(index, &mut changes);
        if self.pending.remove(&id).is_some() {
            out.push(Output::Reply {
                id,
                result: Ok(reply),
            });
        }
        self.effects(changes, out);
    }

    fn apply_conf_change(&mut self, index: u64, cc: ConfChangeV2, out: &mut Vec<Output>) {
        let Ok(cs) = self.raw.apply_conf_change(&cc) else {
            return;
        };
        self.raw.mut_store().set_conf_state(cs);
        let request: JoinRequest = codec::decode(&cc.context).unwrap_or_default();
        let info = request.info;
        let mut changes = Vec::new();
        for change in cc.get_changes() {
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if !self.state.nodes.contains_key(&change.node_id) {
                        // What admitted it is used up: a join token's use, or
                        // the approval.
                        if let Some(id) = &request.join_token {
                            self.state.use_join_token(id);
                        } else {
                            self.state.approved_nodes.remove(&change.node_id);
                        }
                    }
                    self.state
                        .add_node(change.node_id, info.clone(), &mut changes);
                    self.last_seen.entry(change.node_id).or_insert(self.now_ms);
                }
                ConfChangeType::RemoveNode => {
                    self.state.remove_node(change.node_id, &mut changes);
                    if change.node_id == self.cfg.id {
                        self.left(out);
                    } else if self.is_leader() {
                        // The removed node may never see this entry committed.
                        out.push(Output::Send {
                            to: change.node_id,
                            msg: PeerMessage::Removed,
                        });
                    }
                }
            }
        }
        self.state.applied_index = self.state.applied_index.max(index);
        self.note_tracking(index, &mut changes);
        self.effects(changes, out);
        // raft-rs refuses a snapshot whose membership lacks the receiver, so a new
        // member needs a snapshot taken at or after its own addition.
        let added = cc
            .get_changes()
            .iter()
            .any(|c| c.get_change_type() != ConfChangeType::RemoveNode);
        if added {
            self.snapshot_now(out);
        }
    }

    /// Takes what entry `index` means to the tracking store out of its changes
    /// (the reports it accepted move out; the rest stay for `effects`) and the
    /// state's touched records.
    fn note_tracking(&mut self, index: u64, changes: &mut Vec<Change>) {
        let touched = self.state.take_touched();
        if !self.cfg.track {
            changes.retain(|c| !matches!(c, Change::Reported(_)));
            return;
        }
        let at_ms = self.state.now_ms;
        let batch = &mut self.track;
        batch.trials.extend(touched.trials);
        batch.experiments.extend(touched.experiments);
        changes.retain_mut(|change| match change {
            Change::Reported(record) => {
                let record = std::mem::replace(record, empty_record());
                batch.trials.insert(record.trial);
                batch.reports.push(track::Report { index, record });
                false
            }
            Change::Assigned {
                trial,
                node,
                incarnation,
            } => {
                batch.runs.push(track::RunEvent::Started {
                    index,
                    trial: *trial,
                    incarnation: *incarnation,
                    node: *node,
                    at_ms,
                });
                true
            }
            Change::RunEnded {
                trial,
                incarnation,
                why,
            } => {
                batch.runs.push(track::RunEvent::Ended {
                    index,
                    trial: *trial,
                    incarnation: *incarnation,
                    why: std::mem::take(why),
                    at_ms,
                });
                false
            }
            Change::Checkpoint { uuid } => {
                batch.checkpoints.insert(std::mem::take(uuid));
                false
            }
            _ => true,
        });
    }

    /// Hands the batch gathered so far to the shell (`Output::Track`), when the
    /// applied index moved past what it last handed out or there is anything
    /// to write.
    fn flush_tracking(&mut self, out: &mut Vec<Output>) {
        if !self.cfg.track {
            return;
        }
        let applied = self.state.applied_index;
        if self.track.is_empty() && applied <= self.track.applied_index {
            return;
        }
        let mut batch = std::mem::take(&mut self.track);
        batch.applied_index = applied;
        batch.reports_applied = self.state.reports_applied;
        self.track.applied_index = applied;
        out.push(Output::Track(Box::new(batch)));
    }

    /// Turns changes addressed to this node into effects (not while replaying the
    /// log after a restart: `reconcile` covers that).
    fn effects(&mut self, changes: Vec<Change>, out: &mut Vec<Output>) {
        if self.replaying {
            // Blobs released while the log replays are deleted when it is
            // over, unless a later entry saved the same checkpoint again.
            for change in changes {
                if let Change::Released { digest, holders } = change {
                    if holders.contains(&self.cfg.id) {
                        self.released_in_replay.insert(digest);
                    }
                }
            }
            return;
        }
        for change in changes {
            match change {
                Change::Assigned { trial, node, .. } if node == self.cfg.id => {
                    if let Some(effect) = self.start_effect(trial) {
                        out.push(Output::Effect(effect));
                    }
                }
                Change::Released { digest, holders } if holders.contains(&self.cfg.id) => {
                    out.push(Output::Effect(Effect::DeleteBlob { digest }));
                }
                Change::Signal {
                    trial,
                    node,
                    incarnation,
                    signal,
                } if node == self.cfg.id => {
                    out.push(Output::Effect(Effect::SignalTrial {
                        trial,
                        incarnation,
                        signal,
                    }));
                }
                _ => {}
            }
        }
    }

    fn start_effect(&self, trial: TrialId) -> Option<Effect> {
        let t = self.state.trials.get(&trial)?;
        let node_rank = t.node_rank(self.cfg.id)?;
        Some(Effect::StartTrial(StartTrial {
            trial,
            incarnation: t.incarnation,
            experiment: t.experiment,
            hparams: t.hparams.clone(),
            seed: t.seed,
            slots: t.layout[node_rank].1,
            node_rank,
            layout: t.layout.clone(),
            target: t.target,
            latest_checkpoint: t.latest_checkpoint.clone(),
        }))
    }

    /// After a restart has replayed the log, or a snapshot replaced the state: the
    /// trials placed here, as a whole.
    fn reconcile(&mut self, out: &mut Vec<Output>) {
        let me = self.cfg.id;
        let mine: Vec<TrialId> = self
            .state
            .trials
            .iter()
            .filter(|(_, t)| t.is_placed_on(me))
            .map(|(id, _)| *id)
            .collect();
        let keep = mine
            .iter()
            .filter_map(|t| self.state.trials.get(t).map(|x| (*t, x.incarnation)))
            .collect();
        out.push(Output::Effect(Effect::Reconcile { keep }));
        for trial in mine {
            if let Some(effect) = self.start_effect(trial) {
                out.push(Output::Effect(effect));
            }
        }
        for digest in std::mem::take(&mut self.released_in_replay) {
            let named = self.state.checkpoints.contains_key(&digest)
                || self.state.models.contains_key(&digest);
            if !named {
                out.push(Output::Effect(Effect::DeleteBlob { digest }));
            }
        }
    }

    /// Takes a snapshot when enough entries were applied since the last one (and
    /// right after the first entry, so that joiners always start from a snapshot:
    /// the bootstrap membership is not in the log).
    fn maybe_snapshot(&mut self, out: &mut Vec<Output>) {
        let applied = self.state.applied_index;
        let last = self.raw.store().snapshot_index();
        let first_one = last == 0 && applied > 0;
        let big = self.log_bytes_since_snapshot >= self.cfg.snapshot_log_bytes;
        if applied > last && (first_one || big || applied - last >= self.cfg.snapshot_entries) {
            self.snapshot_now(out);
        }
    }

    /// Snapshots the state at the applied index and compacts the log to it.
    fn snapshot_now(&mut self, out: &mut Vec<Output>) {
        let applied = self.state.applied_index;
        if applied <= self.raw.store().snapshot_index() {
            return;
        }
        let Ok(term) = raft::Storage::term(self.raw.store(), applied) else {
            return;
        };
        // A state past the decoder's limit is never snapshotted (the log is
        // kept instead): no node could restart from such a snapshot.
        let Ok(data) = self.state.try_encode() else {
            return;
        };
        let mut snap = raft::eraftpb::Snapshot::default();
        snap.data = data.into();
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.raw.store().conf_state().clone());
        let record = log_cache::from_snapshot(&snap);
        self.log_bytes_since_snapshot = 0;
        self.raw.mut_store().compact_to(snap);
        let hs = log_cache::from_hard_state(&self.raw.raft.hard_state());
        let seq = self.next_seq();
        out.push(Output::Persist {
            seq,
            snapshot: Some(record),
            entries: Vec::new(),
            hard_state: Some(hs),
        });
    }
}

/// A placeholder left where a report moved out of a change.
fn empty_record() -> crate::command::MetricRecord {
    crate::command::MetricRecord {
        trial: 0,
        incarnation: 0,
        kind: crate::command::MetricKind::Training,
        steps_completed: 0,
        metrics: BTreeMap::new(),
    }
}

fn single(node: NodeId, ty: ConfChangeType) -> ConfChangeSingle {
    let mut s = ConfChangeSingle::default();
    s.node_id = node;
    s.set_change_type(ty);
    s
}
