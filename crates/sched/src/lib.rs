//! The deterministic scheduler (work in progress for the scheduler issue).
//!
//! A pure function of the current demand and supply: every replica computes the
//! same decisions from the same state. This first part is Determined's `fair_share`
//! policy (`master/internal/rm/agentrm/fair_share.go`): max-min progressive
//! filling of slot offers weighted by `weight` and capped by `max_slots`,
//! non-preemptible work offered first, deadlock breaking for groups whose offer
//! cannot fit their smallest pending gang, and release of preemptible trials of
//! groups above their offer. Placement is best fit on one node.
//!
//! [`priority`] is Determined's other policy (lower number first, FIFO within a
//! priority, preemption of strictly lower priorities, backfill).
//!
//! Not yet here (see the scheduler issue): multi-node gangs, locality, pools and
//! burst, anti-thrash, and the wiring into `core`.

pub mod fair_share;
pub mod priority;

/// Identifies a node.
pub type NodeId = u64;
/// Identifies a trial.
pub type TrialId = u64;
/// Identifies a group (an experiment).
pub type GroupId = u64;

/// A group of trials that shares one weight (an experiment).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// Fair-share weight (> 0).
    pub weight: f64,
    /// Cap on the group's slots at once.
    pub max_slots: Option<u32>,
    /// Submission order (earlier groups win ties and lose deadlock breaking last).
    pub order: u64,
}

/// A trial that wants slots or holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Its id.
    pub id: TrialId,
    /// Its group.
    pub group: GroupId,
    /// Slots it needs (all on one node, for now).
    pub slots: u32,
    /// Where it runs, if it does.
    pub running_on: Option<NodeId>,
    /// Whether it may be preempted (trials are).
    pub preemptible: bool,
}

/// A node's slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Total slots.
    pub slots: u32,
}

/// What the scheduler decides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Trials to start, and where.
    pub assign: Vec<(TrialId, NodeId)>,
    /// Running trials to checkpoint and stop (they go back to the queue).
    pub release: Vec<TrialId>,
}
