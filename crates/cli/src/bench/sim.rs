//! `resolute bench sim`: the simulator's large scenario (100 nodes x 8 GPUs, 24
//! simulated hours, 5% of nodes failing per hour, 5-minute checkpoints): how fast
//! it simulates and how much GPU time the cluster turns into progress.

use std::path::Path;

use serde::Serialize;

/// 24 simulated hours in at most 60 wall seconds.
pub const SIM_S_PER_WALL_S_TARGET: f64 = 86_400.0 / 60.0;
/// Goodput target under the scenario's churn.
pub const GOODPUT_TARGET: f64 = 0.95;
/// Simulated seconds of the fault phase with `--quick`.
const QUICK_DURATION_S: u64 = 3_600;

/// The figures.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Simulated seconds (fault phase and the drain after it).
    pub simulated_s: f64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Simulated seconds per wall second.
    pub sim_s_per_wall_s: f64,
    /// GPU time that became kept progress, as a fraction of GPU time used.
    pub gpu_goodput: f64,
    /// GPU seconds of training lost to failures.
    pub work_lost_gpu_s: f64,
    /// Failure to trial running again, p99, simulated seconds.
    pub recovery_s_p99: f64,
    /// Invariant violations (must be none).
    pub violations: usize,
    /// Target for sim_s_per_wall_s.
    pub sim_s_per_wall_s_target: f64,
    /// Target for gpu_goodput.
    pub gpu_goodput_target: f64,
}

/// Runs `file` with `seed` (`quick`: one simulated hour of faults instead of the
/// scenario's duration).
pub fn run(file: &Path, seed: u64, quick: bool) -> anyhow::Result<Report> {
    let mut scenario = resolute_sim::Scenario::load(file)?;
    if quick {
        // One hour of the same cluster, churn and workload: the experiments that
        // would arrive later are left out (they could not finish in the hour).
        scenario.duration_s = scenario.duration_s.min(QUICK_DURATION_S);
        for e in &mut scenario.experiments {
            let fit = scenario.duration_s.saturating_sub(e.arrive_s) / e.every_s.max(1) + 1;
            e.count = e.count.min(u32::try_from(fit).unwrap_or(u32::MAX));
        }
    }
    let opts = resolute_sim::Options {
        seed,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let (r, _) = resolute_sim::run(&scenario, &opts);
    let wall_s = start.elapsed().as_secs_f64();
    Ok(Report {
        scenario: r.scenario.clone(),
        seed,
        simulated_s: r.simulated_s,
        wall_s,
        sim_s_per_wall_s: r.simulated_s / wall_s.max(1e-9),
        gpu_goodput: r.gpu_goodput,
        work_lost_gpu_s: r.work_lost_gpu_s,
        recovery_s_p99: r.recovery_s_p99,
        violations: r.violations.len(),
        sim_s_per_wall_s_target: SIM_S_PER_WALL_S_TARGET,
        gpu_goodput_target: GOODPUT_TARGET,
    })
}
