//! `resolute bench submit`: three node processes on loopback; an experiment is
//! submitted to a follower over the REST API, and the clock runs until its first
//! trial's process has started (the node's TrialStarted record, as the follower
//! sees it). Repeated; each experiment is killed before the next submission.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::Value;

use crate::client;
use crate::local_cluster::LocalCluster;

/// Target for the p50, ms.
pub const P50_TARGET_MS: f64 = 100.0;
/// Poll period while the clock runs.
const POLL_MS: u64 = 2;
/// A submission whose trial has not started by then fails the benchmark.
const START_TIMEOUT_MS: u64 = 30_000;

/// The figures.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Submit -> first trial process started, p50, ms.
    pub submit_to_start_ms_p50: f64,
    /// ... p99, ms.
    pub submit_to_start_ms_p99: f64,
    /// Submissions measured.
    pub submissions: usize,
    /// Target for the p50.
    pub p50_target_ms: f64,
    /// p50 <= target.
    pub pass: bool,
}

/// Runs `count` submissions in a fresh cluster under `dir`.
pub fn run(dir: &std::path::Path, count: usize) -> anyhow::Result<Report> {
    let cluster = LocalCluster::start(dir, 3)?;
    cluster.stop_on_signal();
    let leader = cluster.leader(0).unwrap_or(0);
    let target = cluster.nodes[(leader + 1) % cluster.nodes.len()].target();
    let mut samples = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let id = client::create_experiment(
            &target,
            "bench-submit.yaml",
            &super::endless_trial("bench-submit", 100000),
            &[],
            None,
        )?;
        loop {
            let trials = client::get_json(&target, &format!("/experiments/{id}/trials"))?;
            let running = trials
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["state"] == "Running");
            if running {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if started.elapsed() > Duration::from_millis(START_TIMEOUT_MS) {
                bail!(
                    "experiment {id}: no trial started within {} s",
                    START_TIMEOUT_MS / 1000
                );
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
        client::post_json(&target, &format!("/experiments/{id}/kill"), Value::Null)?;
        wait_idle(&target, id, START_TIMEOUT_MS)?;
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
    let p50 = super::quantile(&mut samples, 0.5);
    let p99 = super::quantile(&mut samples, 0.99);
    Ok(Report {
        submit_to_start_ms_p50: p50,
        submit_to_start_ms_p99: p99,
        submissions: samples.len(),
        p50_target_ms: P50_TARGET_MS,
        pass: p50 <= P50_TARGET_MS,
    })
}

/// Until no trial of the killed experiment holds a slot (at most `timeout_ms`).
pub(super) fn wait_idle(target: &client::Target, id: u64, timeout_ms: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        let trials = client::get_json(target, &format!("/experiments/{id}/trials"))?;
        let busy = trials
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| !t["state"].as_str().unwrap_or("").starts_with("Done"));
        if !busy {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("experiment {id}: trials still running after the kill");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
