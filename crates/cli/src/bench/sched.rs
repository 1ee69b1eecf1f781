//! `resolute bench sched`: the cost of the scheduler on apply.
//!
//! 1,000 nodes x 8 GPUs and 20,000 queued trials in 50 experiments (gangs of 1, 2,
//! 4, 8 and 16 slots; 16 spans two nodes), built through the replicated state machine's own commands.
//! Measured: placements per second while the cluster fills, then the cost of one
//! apply (a trial exits, the scheduler places the next) at the p50 and p99 — and
//! the same again after 10x as much finished history is in the state.

use std::time::Instant;

use serde::Serialize;

use resolute_core::command::{Command, Envelope, ProposalId, TrialOutcome, COMMAND_VERSION};
use resolute_core::state::{Change, ClusterState, TrialState};
use resolute_core::NodeInfo;

use super::quantile;

const NODES: u64 = 1_000;
const GPUS: u32 = 8;
const GROUPS: u64 = 50;
const TRIALS_PER_GROUP: u64 = 400;
const SAMPLES: usize = 1_000;

/// The figures (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Trials placed per second while the empty cluster fills.
    pub placements_per_s: f64,
    /// Median cost of one apply that frees a gang and places the next.
    pub apply_us_p50: f64,
    /// 99th percentile of the same.
    pub apply_us_p99: f64,
    /// The same median with 10x the finished trials in the state.
    pub apply_us_p50_10x_history: f64,
    /// The same p99 with 10x the finished trials in the state.
    pub apply_us_p99_10x_history: f64,
    /// Trials placed while filling.
    pub placements: u64,
}

struct Sm {
    state: ClusterState,
    index: u64,
}

impl Sm {
    fn apply(&mut self, command: Command) -> Vec<Change> {
        self.apply_from(1, command)
    }

    /// Applies `command` as proposed by `node` (a trial's report comes from a
    /// node it runs on).
    fn apply_from(&mut self, node: u64, command: Command) -> Vec<Change> {
        self.index += 1;
        let envelope = Envelope {
            version: COMMAND_VERSION,
            id: ProposalId(u128::from(self.index)),
            // One simulated second per entry.
            time_ms: self.index * 1000,
            proposer: node,
            leader: 1,
            user: None,
            command,
        };
        self.state.apply(self.index, envelope).1
    }
}

/// Slots per trial of the experiments, in turn: 16 spans two 8-GPU nodes.
const GANG_SLOTS: [u32; 5] = [1, 2, 4, 8, 16];

fn experiment(slots: u32, trials: u64) -> Command {
    let yaml = format!(
        "hyperparameters: {{lr: {{type: double, minval: 0.001, maxval: 0.1}}}}
searcher: {{name: random, metric: loss, max_trials: {trials}, max_concurrent_trials: {trials}}}
resources: {{slots_per_trial: {slots}, weight: {}}}\n",
        1 + trials % 3
    );
    Command::ExperimentCreated {
        config_yaml: yaml,
        overrides: Vec::new(),
        owner: "bench".into(),
        model_digest: String::new(),
        default_seed: 7,
    }
}

/// Trials placed (a multi-node gang is one placement with one change per node).
fn placed(changes: &[Change]) -> u64 {
    let mut trials: Vec<u64> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Assigned { trial, .. } => Some(*trial),
            _ => None,
        })
        .collect();
    trials.sort_unstable();
    trials.dedup();
    trials.len() as u64
}

/// Applies `SAMPLES` trial exits (each frees a gang and lets the scheduler place
/// another) and returns the per-apply costs in microseconds.
fn churn(sm: &mut Sm) -> Vec<f64> {
    let mut costs = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let running = sm.state.trials.iter().find_map(|(id, t)| match t.state {
            TrialState::Assigned { node } | TrialState::Running { node } => {
                Some((*id, t.incarnation, node))
            }
            _ => None,
        });
        let Some((trial, incarnation, node)) = running else {
            break;
        };
        let start = Instant::now();
        sm.apply_from(
            node,
            Command::TrialExited {
                trial,
                incarnation,
                outcome: TrialOutcome::Completed,
            },
        );
        costs.push(start.elapsed().as_secs_f64() * 1e6);
    }
    costs
}

/// Runs the benchmark.
pub fn run() -> Report {
    let mut sm = Sm {
        state: ClusterState::default(),
        index: 0,
    };
    let mut changes = Vec::new();
    for n in 1..=NODES {
        let info = NodeInfo {
            site: format!("site-{}", n % 4),
            slots: GPUS,
            ..Default::default()
        };
        sm.state.add_node(n, info, &mut changes);
    }
    let mut placements = 0;
    let mut placing = 0.0;
    for g in 0..GROUPS {
        let slots = GANG_SLOTS[(g % 5) as usize];
        let start = Instant::now();
        let changes = sm.apply(experiment(slots, TRIALS_PER_GROUP));
        placing += start.elapsed().as_secs_f64();
        placements += placed(&changes);
    }
    let mut now = churn(&mut sm);
    // Ten times as much finished history: experiments created and killed.
    for g in 0..GROUPS * 10 {
        let slots = GANG_SLOTS[(g % 5) as usize];
        sm.apply(experiment(slots, TRIALS_PER_GROUP));
        let id = *sm.state.experiments.keys().next_back().unwrap_or(&0);
        sm.apply(Command::ExperimentControl {
            experiment: id,
            action: resolute_core::command::Control::Kill,
        });
    }
    let mut later = churn(&mut sm);
    let mut now2 = now.clone();
    let mut later2 = later.clone();
    Report {
        placements_per_s: placements as f64 / placing.max(1e-9),
        apply_us_p50: quantile(&mut now, 0.5),
        apply_us_p99: quantile(&mut now2, 0.99),
        apply_us_p50_10x_history: quantile(&mut later, 0.5),
        apply_us_p99_10x_history: quantile(&mut later2, 0.99),
        placements,
    }
}
