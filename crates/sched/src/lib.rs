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

/// Free slots per node, indexed by amount, for best-fit lookups in O(log n).
#[derive(Debug, Clone, Default)]
pub struct FreeSlots {
    by_node: std::collections::BTreeMap<NodeId, u32>,
    by_free: std::collections::BTreeSet<(u32, NodeId)>,
}

impl FreeSlots {
    /// Free slots of `nodes`, minus what `used` says each node runs.
    pub fn new(nodes: &[Node], used: impl IntoIterator<Item = (NodeId, u32)>) -> Self {
        let mut by_node: std::collections::BTreeMap<NodeId, u32> =
            nodes.iter().map(|n| (n.id, n.slots)).collect();
        for (n, s) in used {
            if let Some(f) = by_node.get_mut(&n) {
                *f = f.saturating_sub(s);
            }
        }
        let by_free = by_node.iter().map(|(n, f)| (*f, *n)).collect();
        FreeSlots { by_node, by_free }
    }

    /// The node with the fewest free slots that still has `slots` (ties: lowest id).
    pub fn best_fit(&self, slots: u32) -> Option<NodeId> {
        self.by_free.range((slots, 0)..).next().map(|(_, n)| *n)
    }

    /// Adds `delta` (may be negative) to a node's free slots.
    pub fn adjust(&mut self, node: NodeId, delta: i64) {
        if let Some(f) = self.by_node.get_mut(&node) {
            self.by_free.remove(&(*f, node));
            *f = (i64::from(*f) + delta).clamp(0, i64::from(u32::MAX)) as u32;
            self.by_free.insert((*f, node));
        }
    }
}

/// What the scheduler decides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Trials to start, and where.
    pub assign: Vec<(TrialId, NodeId)>,
    /// Running trials to checkpoint and stop (they go back to the queue).
    pub release: Vec<TrialId>,
}
