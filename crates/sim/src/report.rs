//! What a simulation run reports.

use serde::Serialize;

/// The result of one run (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Digest of the trace (every delivered message, write and applied entry).
    pub digest: String,
    /// Invariant violations (empty when none).
    pub violations: Vec<String>,
    /// Experiments submitted.
    pub experiments_submitted: u64,
    /// Experiments that finished (completed, canceled or errored).
    pub experiments_completed: u64,
    /// Trials created.
    pub trials: u64,
    /// Useful GPU-seconds over allocated GPU-seconds.
    pub gpu_goodput: f64,
    /// GPU-seconds of training lost to faults (after the last checkpoint).
    pub work_lost_gpu_s: f64,
    /// Trials interrupted by a fault and started again.
    pub recoveries: u64,
    /// Median time from interruption to restart.
    pub recovery_s_p50: f64,
    /// 99th percentile of the same.
    pub recovery_s_p99: f64,
    /// Median recovery time by the sites a trial moved between, keyed
    /// `from->to` (site names; `dc1->dc1` when it restarted on its own site).
    pub recovery_s_p50_by_sites: std::collections::BTreeMap<String, f64>,
    /// Median time a trial waited in the queue.
    pub queue_wait_s_p50: f64,
    /// 99th percentile of the same.
    pub queue_wait_s_p99: f64,
    /// Messages delivered.
    pub messages: u64,
    /// Checkpoint bytes moved between nodes.
    pub bytes_moved: u64,
    /// Messages that went through a relay (two NATed sites).
    pub relayed_messages: u64,
    /// Checkpoint bytes that went through a relay.
    pub relayed_bytes: u64,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Wall seconds (measured by the caller).
    pub wall_s: f64,
    /// Simulated seconds per wall second.
    pub sim_s_per_wall_s: f64,
    /// Events processed.
    pub events: u64,
    /// Best final validation loss per experiment (the optimum is 0.05).
    pub best_loss: Vec<f64>,
    /// Each group's (workspace, or experiment) share of the GPU-seconds used while
    /// every group had work waiting in the queue.
    pub group_share: std::collections::BTreeMap<String, f64>,
    /// GPU-seconds placed on each of the scenario's pools.
    pub gpu_s_by_pool: std::collections::BTreeMap<String, f64>,
    /// What the placed GPU time cost (`cost_per_gpu_hour` of each pool).
    pub gpu_cost: f64,
    /// Trials that were placed across more than one node (multi-node gangs).
    pub multi_node_trials: u64,
    /// GPU failures injected (`gpu_failure` faults that hit a running node).
    pub gpu_failures: u64,
    /// Restarts charged to trials (errors): lost nodes, preemptions and failed
    /// GPUs charge none.
    pub restarts_charged: u64,
    /// Trial processes that completed short of their (raised) target and were
    /// relaunched from a checkpoint (`ClusterState::unfinished_exits`).
    pub unfinished_exits: u64,
}

/// The value at quantile `q` of `samples` (sorted in place); 0 when empty.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}
