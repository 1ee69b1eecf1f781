//! The deterministic scheduler.
//!
//! A pure function of the current demand and supply: every replica computes the
//! same decisions from the same state, so nobody proposes "decisions"; they fall
//! out of the replicated state (see `core::placement`, which calls this crate once
//! per resource pool on apply).
//!
//! - [`fair_share`]: Determined's `fair_share` policy: max-min progressive filling
//!   of slot offers weighted by `weight` and capped by `max_slots`, first between
//!   teams (an experiment's workspace) and then between the experiments of a team;
//!   non-preemptible work offered first; deadlock breaking for groups whose offer
//!   cannot fit their smallest pending gang; release of preemptible trials of
//!   groups above their offer.
//! - [`priority`]: Determined's other policy: lower number first, FIFO within a
//!   priority, preemption of strictly lower priorities, backfill.
//! - [`place`]: where a trial goes once a policy lets it start: all of a gang or
//!   nothing, on one node when it fits (best fit) and across the fewest nodes
//!   otherwise; the node holding its checkpoint, then that node's site; owned
//!   nodes before burst (preemptible or paid) nodes, cheapest first.
//!
//! Time never enters this crate: the caller turns "waited longer than
//! `burst_after_s`" and "started less than `min_runtime_s` ago" into the flags
//! [`Task::may_burst`] and [`Task::protected`].

pub mod fair_share;
pub mod place;
pub mod priority;

pub use place::Placer;

/// Identifies a node.
pub type NodeId = u64;
/// Identifies a trial.
pub type TrialId = u64;
/// Identifies a group (an experiment).
pub type GroupId = u64;

/// Where a trial's slots are: `(node, slots)` per node, node rank 0 first.
pub type Layout = Vec<(NodeId, u32)>;

/// The lowest (first) priority.
pub const PRIORITY_MIN: u8 = 1;
/// The highest (last) priority.
pub const PRIORITY_MAX: u8 = 99;

/// A group of trials that shares one weight (an experiment).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// Its team (the experiment's workspace): slots are shared between teams
    /// first, then between the groups of a team.
    pub team: String,
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
    /// Slots it needs, all at once (a gang when more than one).
    pub slots: u32,
    /// Where it runs (empty: it waits).
    pub running_on: Layout,
    /// Whether it may be preempted at all (trials are).
    pub preemptible: bool,
    /// Not to be preempted now (it started less than `min_runtime_s` ago, or it
    /// is already stopping).
    pub protected: bool,
    /// It may use burst nodes (it waited longer than the pool's `burst_after_s`).
    pub may_burst: bool,
    /// Nodes holding its latest checkpoint (placement prefers them).
    pub holders: Vec<NodeId>,
    /// 1 (first) to 99 (last); used by the priority policy.
    pub priority: u8,
    /// Queue position (earlier first within a priority); used by the priority policy.
    pub order: u64,
}

impl Task {
    /// Whether it holds slots now.
    pub fn is_running(&self) -> bool {
        !self.running_on.is_empty()
    }

    /// Whether a policy may take its slots back now.
    pub fn releasable(&self) -> bool {
        self.preemptible && !self.protected
    }
}

/// A node's slots and what kind of capacity they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Total slots.
    pub slots: u32,
    /// Its site (locality: a checkpoint moves faster within a site).
    pub site: String,
    /// Burst capacity (preemptible or paid by the hour): used only by trials that
    /// waited long enough, or that owned capacity can never fit.
    pub burst: bool,
    /// Cost of one slot for an hour, in millionths of the currency unit (cheapest
    /// burst capacity first).
    pub cost_per_slot_hour_micros: u64,
    /// Takes no new work (its disk is below its low-water mark): the slots its
    /// running trials hold stay theirs, the rest are neither free nor counted
    /// as capacity, and its trials are not preempted for slots nobody can use.
    pub closed: bool,
}

impl Node {
    /// An owned node with `slots` slots on the default site.
    pub fn owned(id: NodeId, slots: u32) -> Self {
        Node {
            id,
            slots,
            site: String::new(),
            burst: false,
            cost_per_slot_hour_micros: 0,
            closed: false,
        }
    }
}

/// What the scheduler decides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Trials to start, and where (every slot of the gang at once).
    pub assign: Vec<(TrialId, Layout)>,
    /// Running trials to checkpoint and stop (they go back to the queue).
    pub release: Vec<TrialId>,
}
