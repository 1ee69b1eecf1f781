//! Placement: the scheduler (`crates/sched`) run on the current state.
//!
//! A pure function of the replicated state: the alive nodes' slots, the queued
//! trials of active experiments and the running trials. The cluster's policy
//! decides: weighted fair share between experiments (the default) or priority.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use resolute_sched::{fair_share, priority, Decision, Group, Node, Task};

use crate::state::{ClusterState, ExperimentState, NodeState, Pending, TrialState};

/// How the cluster shares its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Max-min fair share weighted by `resources.weight`, capped by `max_slots`.
    #[default]
    FairShare,
    /// Lower `resources.priority` first; optionally preempting lower priorities.
    Priority {
        /// Preempt lower-priority trials (checkpoint and stop).
        preemption: bool,
    },
}

/// What to start and what to preempt now.
pub fn place(state: &ClusterState) -> Decision {
    let nodes: Vec<Node> = state
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Alive)
        .map(|(id, n)| Node {
            id: *id,
            slots: n.info.slots,
        })
        .collect();
    // Work on nodes that are lost or draining still occupies them until it leaves.
    let alive: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
    // (task, priority, queue order) for every trial the scheduler may touch.
    let mut candidates = Vec::new();
    for id in state.live_trials() {
        let Some(t) = state.trials.get(id) else {
            continue;
        };
        let Some(e) = state.experiments.get(&t.experiment) else {
            continue;
        };
        let running_on = match t.state {
            TrialState::Assigned { node } | TrialState::Running { node } => Some(node),
            TrialState::Queued if e.state == ExperimentState::Active => None,
            _ => continue,
        };
        if running_on.is_some_and(|n| !alive.contains(&n)) {
            continue;
        }
        // A trial already told to stop, pause or yield is not released again.
        let preemptible = t.pending == Pending::None && !t.preempting;
        let slots = t.slots.max(1);
        let task = Task {
            id: *id,
            group: t.experiment,
            slots,
            running_on,
            preemptible,
        };
        let prio = e
            .config()
            .map_or(resolute_types::config::PRIORITY_DEFAULT, |c| {
                c.resources.priority
            });
        candidates.push((task, prio, (t.experiment << 32) | (*id & 0xffff_ffff)));
    }
    match state.policy {
        Policy::FairShare => {
            let groups: Vec<Group> = state
                .experiments
                .iter()
                .map(|(id, e)| Group {
                    id: *id,
                    weight: e.config().map_or(1.0, |c| c.resources.weight),
                    max_slots: e.config().and_then(|c| c.resources.max_slots),
                    order: *id,
                })
                .collect();
            let tasks: Vec<Task> = candidates.into_iter().map(|(t, _, _)| t).collect();
            fair_share::schedule(&groups, &tasks, &nodes)
        }
        Policy::Priority { preemption } => {
            let tasks: Vec<priority::PTask> = candidates
                .into_iter()
                .map(|(t, priority, order)| priority::PTask {
                    id: t.id,
                    slots: t.slots,
                    priority,
                    order,
                    running_on: t.running_on,
                    preemptible: t.preemptible,
                })
                .collect();
            priority::schedule(&tasks, &nodes, priority::Options { preemption })
        }
    }
}
