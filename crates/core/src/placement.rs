//! Placement: the scheduler (`crates/sched`) run on the current state, once per
//! resource pool.
//!
//! A pure function of the replicated state, its clock included: the alive nodes'
//! slots and labels, the queued trials of active experiments, the running trials
//! and the checkpoints' holders. Each pool's settings decide its policy (weighted
//! fair share between teams and experiments, the default, or priority), how long
//! a trial waits for owned capacity before it may burst onto preemptible or paid
//! nodes, and how long a started trial is safe from preemption.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use resolute_sched::{fair_share, priority, Decision, Group, Node, Task};

use crate::state::{ClusterState, ExperimentState, NodeState, Pending, Trial, TrialState};

/// Seconds a queued trial waits for owned capacity before burst nodes are offered.
pub const BURST_AFTER_DEFAULT_S: u64 = 300;
/// Seconds after its start during which a trial is not preempted (anti-thrash).
pub const MIN_RUNTIME_DEFAULT_S: u64 = 60;

/// How a pool shares its slots.
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

/// A resource pool's settings (from the node config, or `Command::SetPool`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSettings {
    /// How the pool shares its slots.
    pub policy: Policy,
    /// Seconds a queued trial waits for owned capacity before it may use burst
    /// (preemptible or paid) nodes.
    pub burst_after_s: u64,
    /// Seconds after its start during which a trial is not preempted.
    pub min_runtime_s: u64,
    /// Fair-share weight per team (workspace); a team not listed weighs the sum
    /// of its experiments' weights.
    pub team_weights: BTreeMap<String, f64>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            policy: Policy::default(),
            burst_after_s: BURST_AFTER_DEFAULT_S,
            min_runtime_s: MIN_RUNTIME_DEFAULT_S,
            team_weights: BTreeMap::new(),
        }
    }
}

/// A trial's pool: its experiment's `resources.resource_pool`.
fn pool_of(state: &ClusterState, t: &Trial) -> String {
    state
        .experiments
        .get(&t.experiment)
        .and_then(|e| e.config())
        .map(|c| c.resources.resource_pool.clone())
        .unwrap_or_default()
}

/// What to start and what to preempt now, over every pool.
pub fn place(state: &ClusterState) -> Decision {
    let now = state.now_ms;
    let mut nodes: BTreeMap<String, Vec<Node>> = BTreeMap::new();
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
        });
    }
    let mut tasks: BTreeMap<String, Vec<Task>> = BTreeMap::new();
    for id in state.live_trials() {
        let Some(t) = state.trials.get(id) else {
            continue;
        };
        let Some(e) = state.experiments.get(&t.experiment) else {
            continue;
        };
        let running = t.is_placed();
        if !running && !(t.state == TrialState::Queued && e.state == ExperimentState::Active) {
            continue;
        }
        let pool = pool_of(state, t);
        let settings = state.pool_settings(&pool);
        let config = e.config();
        // Work on a node that is draining or lost still holds its other nodes'
        // slots until it leaves; it is stopping already.
        let leaving = t.layout.iter().any(|(n, _)| {
            state
                .nodes
                .get(n)
                .is_none_or(|r| r.state != NodeState::Alive)
        });
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
        tasks.entry(pool).or_default().push(Task {
            id: *id,
            group: t.experiment,
            slots: t.slots.max(1),
            running_on: if running { t.layout.clone() } else { Vec::new() },
            preemptible: true,
            protected: running && (leaving || young || stopping),
            may_burst: !running && waited,
            holders,
            priority: config.map_or(resolute_types::config::PRIORITY_DEFAULT, |c| {
                c.resources.priority
            }),
            order: (t.experiment << 32) | (*id & 0xffff_ffff),
        });
    }
    let mut decision = Decision::default();
    for (pool, tasks) in tasks {
        let Some(nodes) = nodes.get(&pool) else {
            continue; // No node serves this pool (yet): its trials wait.
        };
        let settings = state.pool_settings(&pool);
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
    let burst_pools: Vec<&str> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Alive)
        .filter(|n| n.info.preemptible || n.info.cost_per_slot_hour_micros > 0)
        .map(|n| n.info.pool.as_str())
        .collect();
    let mut waiting_pools: Vec<String> = Vec::new();
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
        if t.state == TrialState::Queued {
            let pool = pool_of(state, t);
            let settings = state.pool_settings(&pool);
            if burst_pools.contains(&pool.as_str()) {
                if let Some(q) = t.queued_ms {
                    consider(q.saturating_add(settings.burst_after_s * 1000));
                }
            }
            if !waiting_pools.contains(&pool) {
                waiting_pools.push(pool);
            }
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
            if t.is_placed() {
                let pool = pool_of(state, t);
                if waiting_pools.contains(&pool) {
                    let settings = state.pool_settings(&pool);
                    consider(t.started_ms.saturating_add(settings.min_runtime_s * 1000));
                }
            }
        }
    }
    deadline
}
