//! Placement of queued trials: a pure function of the state.
//!
//! First fit, in trial order, onto alive nodes in id order: the interim policy until
//! the scheduler crate replaces this function (same inputs, same output shape).

use std::collections::BTreeMap;

use crate::command::{NodeId, TrialId};
use crate::state::{ClusterState, ExperimentState, NodeState, TrialState};

/// The assignments to make now: `(trial, node)` pairs.
pub fn first_fit(state: &ClusterState) -> Vec<(TrialId, NodeId)> {
    let mut free: BTreeMap<NodeId, u32> = state
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Alive)
        .map(|(id, n)| (*id, n.info.slots))
        .collect();
    for t in state.trials.values() {
        if let TrialState::Assigned { node } | TrialState::Running { node } = t.state {
            if let Some(f) = free.get_mut(&node) {
                *f = f.saturating_sub(t.slots);
            }
        }
    }
    let mut out = Vec::new();
    for (id, t) in &state.trials {
        if t.state != TrialState::Queued {
            continue;
        }
        let active = state
            .experiments
            .get(&t.experiment)
            .is_some_and(|e| e.state == ExperimentState::Active);
        if !active {
            continue;
        }
        if let Some((node, f)) = free.iter_mut().find(|(_, f)| **f >= t.slots.max(1)) {
            *f -= t.slots.max(1);
            out.push((*id, *node));
        }
    }
    out
}
