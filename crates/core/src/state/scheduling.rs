//! Placement: the scheduler (`crates/sched`) run on the current state, once per
//! resource pool.
//!
//! A pure function of the replicated state, its clock included: the alive nodes'
//! slots and labels, the queued trials of active experiments, the running trials
//! and the checkpoints' holders. Each pool's settings decide its policy (weighted
//! fair share between teams and experiments, the default, or priority), how long
//! a trial waits for owned capacity before it may burst onto preemptible or paid
//! nodes, and how long a started trial is safe from preemption.

use super::trial_mut;
use std::collections::{BTreeMap, BTreeSet};

use resolute_sched::{fair_share, priority, Decision, Group, Node, Task};

use super::{
    signal_trial, Change, Checkpoint, ClusterState, ExperimentState, NodeState, Pending, Signal,
    TrialId, TrialState,
};
use crate::pool::{Policy, PoolSettings};

/// What placement needs of an experiment, looked up once per pass.
struct ExperimentView<'a> {
    pool: &'a str,
    /// Index of `pool` among the pools of this pass (cheap grouping).
    pool_index: usize,
    settings: &'a PoolSettings,
    priority: u8,
    active: bool,
}

/// The unfinished experiments, and the distinct pools they use.
fn experiments(state: &ClusterState) -> (BTreeMap<u64, ExperimentView<'_>>, Vec<&str>) {
    let mut pools: Vec<&str> = Vec::new();
    let views = state
        .experiments
        .iter()
        .filter(|(_, e)| !e.state.is_finished())
        .map(|(id, e)| {
            let pool = e
                .config()
                .map_or("", |c| c.resources.resource_pool.as_str());
            let pool_index = match pools.iter().position(|p| *p == pool) {
                Some(i) => i,
                None => {
                    pools.push(pool);
                    pools.len() - 1
                }
            };
            let view = ExperimentView {
                pool,
                pool_index,
                settings: state.pool_settings(pool),
                priority: e
                    .config()
                    .map_or(resolute_types::config::PRIORITY_DEFAULT, |c| {
                        c.resources.priority
                    }),
                active: e.state == ExperimentState::Active,
            };
            (*id, view)
        })
        .collect();
    (views, pools)
}

/// The alive nodes of each pool, as the scheduler sees them.
pub type PoolNodes = BTreeMap<String, Vec<Node>>;

/// The alive nodes by pool.
pub fn pool_nodes(state: &ClusterState) -> PoolNodes {
    let mut nodes = PoolNodes::new();
    for (id, n) in &state.nodes {
        if n.state != NodeState::Alive {
            continue;
        }
        nodes.entry(n.info.pool.clone()).or_default().push(Node {
            id: *id,
            slots: n.info.slots,
            site: n.info.site.clone(),
            burst: n.info.preemptible || n.info.cost_per_slot_hour_micros > 0,
            cost_per_slot_hour_micros: n.info.cost_per_slot_hour_micros,
            closed: n.disk_low.is_some(),
        });
    }
    nodes
}

/// What to start and what to preempt now, over every pool.
pub fn place(state: &ClusterState) -> Decision {
    let now = state.now_ms;
    let nodes = state.pool_nodes();
    let (views, pools) = experiments(state);
    let per_pool = state.live_trials().len() / pools.len().max(1);
    let mut tasks: Vec<Vec<Task>> = (0..pools.len())
        .map(|_| Vec::with_capacity(per_pool))
        .collect();
    // Live trials come in runs of one experiment (ids are handed out per
    // experiment), so its view is looked up once per run.
    let mut view: Option<(u64, Option<&ExperimentView>)> = None;
    for (id, t) in state.live_trial_entries() {
        let e = match view {
            Some((experiment, e)) if experiment == t.experiment => e,
            _ => {
                let e = views.get(&t.experiment);
                view = Some((t.experiment, e));
                e
            }
        };
        let Some(e) = e else {
            continue;
        };
        let running = t.is_placed();
        let waiting = t.state == TrialState::Queued && e.active;
        if !running && !waiting {
            continue;
        }
        let settings = e.settings;
        // Work on a node that is draining or lost still holds its other nodes'
        // slots until it leaves; it is stopping already.
        let leaving = t.layout.iter().any(|(n, _)| {
            state
                .nodes
                .get(n)
                .is_none_or(|r| r.state != NodeState::Alive)
        });
        // Slots on a node that takes no new work are of no use to anyone else.
        let on_closed = t
            .layout
            .iter()
            .any(|(n, _)| state.nodes.get(n).is_some_and(|r| r.disk_low.is_some()));
        let young = now < t.started_ms.saturating_add(settings.min_runtime_s * 1000);
        let stopping = t.pending != Pending::None || t.preempting;
        let waited = t
            .queued_ms
            .is_some_and(|q| now >= q.saturating_add(settings.burst_after_s * 1000));
        let holders = t
            .latest_checkpoint
            .as_ref()
            .and_then(|c| state.checkpoints.get(c))
            .map(|c| c.holders.iter().copied().collect())
            .unwrap_or_default();
        tasks[e.pool_index].push(Task {
            id,
            group: t.experiment,
            slots: t.slots.max(1),
            running_on: if running {
                t.layout.clone()
            } else {
                Vec::new()
            },
            preemptible: true,
            protected: running && (leaving || on_closed || young || stopping),
            may_burst: !running && waited,
            holders,
            priority: e.priority,
            order: (t.experiment << 32) | (id & 0xffff_ffff),
        });
    }
    let mut decision = Decision::default();
    for (pool, tasks) in pools.into_iter().zip(tasks) {
        let Some(nodes) = nodes.get(pool) else {
            continue; // No node serves this pool (yet): its trials wait.
        };
        let settings = state.pool_settings(pool);
        let d = match settings.policy {
            Policy::FairShare => {
                let groups = groups(state, &tasks);
                fair_share::schedule(&groups, &settings.team_weights, &tasks, nodes)
            }
            Policy::Priority { preemption } => {
                priority::schedule(&tasks, nodes, priority::Options { preemption })
            }
        };
        decision.assign.extend(d.assign);
        decision.release.extend(d.release);
    }
    decision
}

/// The experiments of `tasks` as fair-share groups, their workspace as the team.
fn groups(state: &ClusterState, tasks: &[Task]) -> Vec<Group> {
    let mut ids: Vec<u64> = tasks.iter().map(|t| t.group).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let c = state.experiments.get(&id)?.config()?;
            Some(Group {
                id,
                team: c.workspace.clone(),
                weight: c.resources.weight,
                max_slots: c.resources.max_slots,
                order: id,
            })
        })
        .collect()
}

/// The earliest time at which placement could decide differently with no new
/// command: a queued trial may burst, a young trial stops being protected while
/// work waits, or a stopping trial's `preemption_timeout` runs out. The leader
/// proposes a `Tick` then.
pub fn next_deadline_ms(state: &ClusterState) -> Option<u64> {
    let now = state.now_ms;
    let burst_pools: BTreeSet<&str> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Alive)
        .filter(|n| n.info.preemptible || n.info.cost_per_slot_hour_micros > 0)
        .map(|n| n.info.pool.as_str())
        .collect();
    let (views, _) = experiments(state);
    let mut waiting_pools: BTreeSet<&str> = BTreeSet::new();
    let mut deadline: Option<u64> = None;
    let mut consider = |at: u64| {
        if at > now {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
    };
    for id in state.live_trials() {
        let Some(t) = state.trials.get(id) else {
            continue;
        };
        let Some(e) = views.get(&t.experiment) else {
            continue;
        };
        if t.state == TrialState::Queued && e.active {
            if burst_pools.contains(e.pool) {
                if let Some(q) = t.queued_ms {
                    consider(q.saturating_add(e.settings.burst_after_s * 1000));
                }
            }
            waiting_pools.insert(e.pool);
        } else if t.is_placed() {
            if let Some(d) = t.stop_deadline_ms {
                consider(d.max(now + 1));
            }
        }
    }
    if !waiting_pools.is_empty() {
        for id in state.live_trials() {
            let Some(t) = state.trials.get(id) else {
                continue;
            };
            let Some(e) = views.get(&t.experiment) else {
                continue;
            };
            if t.is_placed() && waiting_pools.contains(e.pool) {
                consider(t.started_ms.saturating_add(e.settings.min_runtime_s * 1000));
            }
        }
    }
    deadline
}

impl ClusterState {
    /// Runs the scheduler: starts queued trials and preempts (checkpoint and stop)
    /// trials the policy takes back.
    pub(super) fn schedule(&mut self, changes: &mut Vec<Change>) {
        if !std::mem::take(&mut self.placement_dirty) {
            return;
        }
        // What changes placement (an experiment, a node) can change who keeps
        // which model directory.
        self.models_generation += 1;
        let now = self.now_ms;
        if self.pool_nodes.is_none() {
            self.pool_nodes = Some(pool_nodes(self));
        }
        let decision = place(self);
        for (trial, layout) in decision.assign {
            self.fall_back_to_a_reachable_checkpoint(trial);
            let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) else {
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
            if let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) {
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
    pub(super) fn fall_back_to_a_reachable_checkpoint(&mut self, trial: TrialId) {
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
        if let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) {
            t.latest_checkpoint = best;
        }
        self.refresh_replication(trial);
    }
}
