//! The commands of the experiment log and the replies to their proposers.
//!
//! Every log entry is an [`Envelope`]: a format version, the proposal id that makes
//! submission exactly-once, and a [`Command`]. Applying a command is deterministic:
//! every replica computes the same state, trial creations and placements from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use resolute_types::Value;

/// Identifies a node in the cluster (also its Raft id); never 0.
pub type NodeId = u64;
/// Identifies an experiment, from 1 in creation order.
pub type ExperimentId = u64;
/// Identifies a trial cluster-wide, from 1 in creation order.
pub type TrialId = u64;

/// The format version written into every entry; decoders refuse newer versions.
/// Version 2 added who proposed an entry (`proposer`, `leader`, `user`).
pub const COMMAND_VERSION: u16 = 2;
/// Metric names one record (one report) carries at most.
pub const METRIC_NAMES_PER_RECORD_MAX: usize = 1_000;
/// Longest metric name, in bytes.
pub const METRIC_NAME_BYTES_MAX: usize = 256;
/// Most bytes of one report's metrics (names and values, strings and nested
/// lists and maps counted whole): a report is a few numbers, not a payload.
pub const METRIC_RECORD_BYTES_MAX: usize = 64 * 1024;

/// A client-chosen id that makes a proposal exactly-once: applying the same id twice
/// is a no-op that returns the first result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId(pub u128);

/// One log entry's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`COMMAND_VERSION`] when written.
    pub version: u16,
    /// The proposal id, for deduplication.
    pub id: ProposalId,
    /// The leader's clock when it proposed the entry (milliseconds since the Unix
    /// epoch in production, virtual time in the simulator). The state's clock is
    /// the largest stamp applied so far, so it never runs backwards even when
    /// leaders' clocks disagree; time-based decisions (burst, anti-thrash,
    /// preemption timeouts) read only that clock.
    pub time_ms: u64,
    /// The node whose proposal this is, as the leader saw it: the leader itself,
    /// or the authenticated peer that forwarded it (a forward is taken only from
    /// its origin). Node-scoped commands are applied only from their node.
    pub proposer: NodeId,
    /// The leader that appended the entry. Only a leader appends entries, so
    /// this is what the entry's term says: leader-scoped commands (leases, the
    /// clock) are applied only when `proposer == leader`.
    pub leader: NodeId,
    /// The user on whose authority the proposer asks, once it authenticated
    /// them (a node vouches for the users of its own API). User-scoped commands
    /// are applied only when that user is active and holds the role.
    pub user: Option<String>,
    /// What to apply.
    pub command: Command,
}

/// A node's description, carried when it joins.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Site (data centre, cloud region): voters are spread across sites, and a
    /// trial prefers the site of its checkpoint.
    pub site: String,
    /// Slots (GPUs, or CPU slots) it offers.
    pub slots: u32,
    /// Its resource pool (empty: the default pool).
    pub pool: String,
    /// Spot or preemptible capacity: burst capacity, used after owned capacity.
    pub preemptible: bool,
    /// What one slot costs for an hour, in millionths of the currency unit; a node
    /// that costs something is burst capacity (cheapest first).
    pub cost_per_slot_hour_micros: u64,
    /// The pool's settings as this node's config declares them; adopted when the
    /// pool has none yet (`Command::SetPool` changes them later).
    pub pool_settings: Option<crate::pool::PoolSettings>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

/// What a user asks of a running experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Stop scheduling new work; running trials checkpoint and stop.
    Pause,
    /// Resume a paused experiment.
    Activate,
    /// Stop all trials (checkpointing) and end the experiment.
    Cancel,
    /// Stop all trials at once and end the experiment.
    Kill,
    /// Hide an ended experiment from lists (everything is kept).
    Archive,
    /// Show an archived experiment again.
    Unarchive,
    /// Delete an ended experiment: its trials, checkpoints and metrics.
    Delete,
}

/// A user's role in a workspace, weakest first (Determined's roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads experiments, trials, metrics, logs and checkpoints.
    Viewer,
    /// Also creates experiments and controls their own.
    User,
    /// Also controls anyone's experiments in the workspace.
    Editor,
    /// Also grants roles in the workspace.
    Admin,
}

impl Role {
    /// The role's name as the CLI and REST spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    /// Parses a role's name.
    pub fn parse(name: &str) -> Option<Role> {
        [Role::Viewer, Role::User, Role::Editor, Role::Admin]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Which group a metrics report belongs to: Determined's two built-in
/// groups, or another the training code names (`report_metrics(group, ...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricKind {
    /// Reported during training.
    Training,
    /// Reported after a validation pass; drives the searcher.
    Validation,
    /// Any other group (kept and served, never read by the searcher).
    /// Appended last: entries in the log keep their variant numbers.
    Group(GroupName),
}

impl MetricKind {
    /// The kind of a group named `name`: `training` and `validation` are the
    /// built-in ones; any other must be a valid [`GroupName`].
    pub fn of_group(name: &str) -> Result<MetricKind, String> {
        match name {
            "training" => Ok(MetricKind::Training),
            "validation" => Ok(MetricKind::Validation),
            other => GroupName::new(other).map(MetricKind::Group),
        }
    }

    /// The group's name (`training`, `validation`, or its own).
    pub fn group(&self) -> &str {
        match self {
            MetricKind::Training => "training",
            MetricKind::Validation => "validation",
            MetricKind::Group(g) => g.as_str(),
        }
    }
}

/// Longest name of a metric group other than training and validation, in bytes.
pub const GROUP_NAME_MAX_BYTES: usize = 32;

/// The name of a metric group: 1 to [`GROUP_NAME_MAX_BYTES`] bytes of ASCII
/// letters, digits, `_`, `-` and `.`. Fixed-size so that a [`MetricKind`]
/// stays `Copy`; checked when it is made and when it is decoded (a peer's
/// bytes included).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName {
    len: u8,
    bytes: [u8; GROUP_NAME_MAX_BYTES],
}

impl GroupName {
    /// `name` as a group name, or why it is not one.
    pub fn new(name: &str) -> Result<GroupName, String> {
        let ok = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.');
        if name.is_empty() || name.len() > GROUP_NAME_MAX_BYTES || !name.bytes().all(ok) {
            return Err(format!(
                "metric group {:?}: a name is 1 to {GROUP_NAME_MAX_BYTES} letters, digits, `_`, `-` or `.`",
                name.chars().take(GROUP_NAME_MAX_BYTES + 8).collect::<String>()
            ));
        }
        let mut bytes = [0u8; GROUP_NAME_MAX_BYTES];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(GroupName {
            len: name.len() as u8,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ever built from checked ASCII (`new`), so this cannot fail.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for GroupName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for GroupName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for GroupName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GroupName, D::Error> {
        let name = String::deserialize(d)?;
        GroupName::new(&name).map_err(serde::de::Error::custom)
    }
}

/// One metrics report of one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// The trial.
    pub trial: TrialId,
    /// The incarnation that produced it (stale ones are rejected).
    pub incarnation: u64,
    /// Its group (training, validation or another).
    pub kind: MetricKind,
    /// Training progress when reported.
    pub steps_completed: u64,
    /// Metric name to value.
    pub metrics: BTreeMap<String, Value>,
}

impl MetricRecord {
    /// Checks a report's metrics against the limits every path holds (the
    /// report endpoint refuses them, applying drops them): the error names
    /// the field.
    pub fn check_metrics(metrics: &BTreeMap<String, Value>) -> Result<(), String> {
        if metrics.len() > METRIC_NAMES_PER_RECORD_MAX {
            return Err(format!(
                "metrics: {} names, at most {METRIC_NAMES_PER_RECORD_MAX}",
                metrics.len()
            ));
        }
        let bytes: usize = metrics.iter().map(|(k, v)| k.len() + value_bytes(v)).sum();
        if bytes > METRIC_RECORD_BYTES_MAX {
            return Err(format!(
                "metrics: {bytes} bytes of names and values, at most {METRIC_RECORD_BYTES_MAX}"
            ));
        }
        if let Some(long) = metrics.keys().find(|k| k.len() > METRIC_NAME_BYTES_MAX) {
            return Err(format!(
                "metrics: the name {:?}... is {} bytes, at most {METRIC_NAME_BYTES_MAX}",
                long.chars().take(32).collect::<String>(),
                long.len()
            ));
        }
        Ok(())
    }
}

/// How a trial process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrialOutcome {
    /// It reached its target length.
    Completed,
    /// It stopped after a stop or pause signal.
    Stopped,
    /// It failed.
    Errored {
        /// Last lines of its log, or the runner's message.
        message: String,
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
    },
    /// It was preempted (node draining, spot notice) and stopped cleanly.
    Preempted,
    /// The training code reported invalid hyperparameters.
    InvalidHyperparameters,
}

/// A command of the experiment log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Does nothing (a new leader's first entry, tests).
    Noop,
    /// Sets how a resource pool shares its slots.
    SetPool {
        /// The pool (empty: the default pool).
        pool: String,
        /// Its settings.
        settings: crate::pool::PoolSettings,
    },
    /// Carries only the leader's clock: proposed when a time-based decision is due
    /// (a trial may burst, a protected trial may be preempted, a stopping trial
    /// ran out of `preemption_timeout`).
    Tick,
    /// A node is no longer reachable: its trials go back to the queue.
    NodeLost {
        /// The node.
        node: NodeId,
    },
    /// A node asks for no new work; its trials checkpoint and move.
    NodeDraining {
        /// The node.
        node: NodeId,
    },
    /// A node's slot count changed (a GPU appeared or disappeared).
    NodeCapacity {
        /// The node.
        node: NodeId,
        /// Its slots now.
        slots: u32,
        /// Trials to stop first when its placed trials no longer fit: the ones
        /// on the failed GPUs, which only the node knows.
        stop_first: Vec<TrialId>,
    },
    /// A node came back (after a lost lease) and is alive again.
    NodeAlive {
        /// The node.
        node: NodeId,
    },
    /// A cluster admin lets a node join without a join token (`resolute node
    /// approve`, after the node printed its id): the leader admits it once.
    /// Approving a removed node lifts its removal.
    NodeApproved {
        /// The node.
        node: NodeId,
    },
    /// A cluster admin removes a node for good (`resolute node remove`): its
    /// trials go back to the queue at once, the leader takes it out of the
    /// Raft membership (so no peer admits it any more: raft, forwards, blobs,
    /// gossip) and never admits it again unless it is approved.
    NodeRemoved {
        /// The node.
        node: NodeId,
    },
    /// A user submitted an experiment. The YAML text and overrides are stored (not
    /// the parsed config) and parsed on apply, which is deterministic.
    ExperimentCreated {
        /// The experiment config, as submitted.
        config_yaml: String,
        /// `--config` overrides.
        overrides: Vec<String>,
        /// Who submitted it.
        owner: String,
        /// Digest of the model directory blob.
        model_digest: String,
        /// The experiment seed chosen by the accepting node when the config has none.
        default_seed: u32,
    },
    /// A user controls an experiment.
    ExperimentControl {
        /// The experiment.
        experiment: ExperimentId,
        /// What to do.
        action: Control,
    },
    /// A trial's process started on its node.
    TrialStarted {
        /// The trial.
        trial: TrialId,
        /// Its incarnation.
        incarnation: u64,
    },
    /// Metrics of many trials in one entry.
    Metrics {
        /// The records.
        records: Vec<MetricRecord>,
    },
    /// A trial saved a checkpoint.
    CheckpointSaved {
        /// Content-addressed id.
        uuid: String,
        /// The trial.
        trial: TrialId,
        /// The incarnation that saved it.
        incarnation: u64,
        /// Training progress it captures.
        steps_completed: u64,
        /// Size in bytes.
        size: u64,
        /// Digest over its files.
        digest: String,
        /// The node that holds it.
        holder: NodeId,
    },
    /// A checkpoint was copied to another node.
    CheckpointReplicated {
        /// The checkpoint.
        uuid: String,
        /// The new holder.
        holder: NodeId,
    },
    /// A node keeps a copy of an ended experiment's model directory (one of
    /// the few the state asks for: `ClusterState::models_to_hold`); the other
    /// nodes then delete theirs (node-scoped).
    ModelKept {
        /// The model directory's blob.
        digest: String,
        /// The node that keeps it.
        holder: NodeId,
    },
    /// A trial process ended.
    TrialExited {
        /// The trial.
        trial: TrialId,
        /// The incarnation that ended.
        incarnation: u64,
        /// How.
        outcome: TrialOutcome,
    },
    /// Users, roles and tokens.
    User(UserCommand),
    /// A node's disk went below its low-water mark (`Some`) or came back
    /// (`None`): a node low on disk takes no new trials and no checkpoint
    /// copies; what runs there goes on (node-scoped).
    NodeDisk {
        /// The node.
        node: NodeId,
        /// What it measured when it went low.
        low: Option<DiskLow>,
    },
    /// A user kills one trial (`resolute trial kill`, Determined's `det trial
    /// kill`): a running one gets SIGKILL at once; it ends stopped for good,
    /// and its searcher hears that it exited early, canceled by its user. The
    /// experiment goes on with its other trials. Appended last: entries in
    /// the log keep their variant numbers.
    TrialKill {
        /// The trial.
        trial: TrialId,
    },
}

/// A node's disk below its low-water mark, as the node measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLow {
    /// Free bytes on its data dir's file system.
    pub free_bytes: u64,
    /// Its low-water mark (`[disk] low_water_mib`), in bytes.
    pub low_water_bytes: u64,
}

impl std::fmt::Display for DiskLow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: u64 = 1024 * 1024;
        write!(
            f,
            "its disk has {} MiB free, under its low-water mark of {} MiB ([disk] low_water_mib)",
            self.free_bytes / MIB,
            self.low_water_bytes / MIB
        )
    }
}

/// The commands that manage users and their tokens (user-scoped: see
/// `state::auth` for who may make each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserCommand {
    /// The cluster's first administrator, from `resolute cluster init`: applied
    /// only while the cluster has no users, and from then on every user-scoped
    /// command needs a user's authority.
    Bootstrap {
        /// The administrator's name.
        admin: String,
        /// Their first token.
        token: NewToken,
    },
    /// A user is created (cluster admin).
    Create {
        /// Their name.
        name: String,
        /// Whether they administer the cluster (nodes, users, pools).
        cluster_admin: bool,
        /// Their roles by workspace.
        roles: BTreeMap<String, Role>,
    },
    /// A user can no longer act; their tokens stop working (cluster admin).
    Deactivate {
        /// Their name.
        name: String,
    },
    /// A role in a workspace is granted, changed or (with `None`) taken away
    /// (cluster admin, or the workspace's admin).
    Grant {
        /// The user.
        name: String,
        /// The workspace.
        workspace: String,
        /// The role.
        role: Option<Role>,
    },
    /// A token is created for `user` (the user themself, or a cluster admin).
    CreateToken {
        /// The user.
        user: String,
        /// The token.
        token: NewToken,
    },
    /// A token stops working (its user, or a cluster admin).
    RevokeToken {
        /// The token's id.
        id: String,
    },
    /// A join token: a new node that presents it may become a member, `uses`
    /// times at most (cluster admin). Its `hash` is the BLAKE3 of its secret
    /// (hex): 256 random bits need no slow hash, and every replica checks it.
    CreateJoinToken {
        /// The token.
        token: NewToken,
        /// How many nodes may join with it.
        uses: u32,
    },
}

/// What a joining node asks, carried in the conf change that adds it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JoinRequest {
    /// What it offers.
    pub info: NodeInfo,
    /// The id of the join token it presented (used up on apply).
    pub join_token: Option<String>,
}

/// A token as the log keeps it: its public id and a slow salted hash of its
/// secret (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    /// The id (the part of the token before its secret; unique).
    pub id: String,
    /// The argon2 hash of the secret, in PHC string form.
    pub hash: String,
    /// When it stops working (milliseconds since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
    /// What it is for (shown by `token list`).
    pub label: String,
}

/// What applying a proposal produced, returned to its proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Applied; nothing to report.
    Ok,
    /// An experiment was created.
    ExperimentCreated {
        /// Its id.
        experiment: ExperimentId,
    },
    /// Applied, but the command was refused (e.g. a stale incarnation).
    Rejected {
        /// Why.
        reason: String,
    },
    /// Applied, but its proposer or user may not do this (counted in
    /// `ClusterState::forbidden`).
    Forbidden {
        /// Why.
        reason: String,
    },
}

/// About how many bytes a value takes (numbers 8, strings their length,
/// lists and maps what they hold).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Int(_) | Value::Float(_) => 8,
        Value::String(s) => s.len(),
        Value::List(items) => items.iter().map(value_bytes).sum::<usize>() + 1,
        Value::Map(m) => {
            m.iter()
                .map(|(k, v)| k.len() + value_bytes(v))
                .sum::<usize>()
                + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{GroupName, MetricKind, GROUP_NAME_MAX_BYTES};
    use resolute_types::codec;

    #[test]
    fn group_names_are_checked_when_made_and_when_decoded() {
        for ok in [
            "inference",
            "test-set.v2",
            "a",
            &"x".repeat(GROUP_NAME_MAX_BYTES),
        ] {
            let kind = MetricKind::of_group(ok).expect(ok);
            assert_eq!(kind.group(), ok);
            let back: MetricKind =
                codec::decode(&codec::encode(&kind).expect("encode")).expect("decode");
            assert_eq!(back, kind);
        }
        assert_eq!(MetricKind::of_group("training"), Ok(MetricKind::Training));
        assert_eq!(
            MetricKind::of_group("validation"),
            Ok(MetricKind::Validation)
        );
        for bad in [
            "",
            "has space",
            "ünï",
            &"x".repeat(GROUP_NAME_MAX_BYTES + 1),
            "../x/",
        ] {
            let err = MetricKind::of_group(bad).expect_err(bad);
            assert!(err.starts_with("metric group"), "{err}");
        }
        // A peer's bytes that name a bad group fail to decode; nothing panics.
        let forged = codec::encode(&"has space").expect("encode");
        assert!(codec::decode::<GroupName>(&forged).is_err());
    }
}
