//! `resolute bench recovery`: three node processes on loopback (real libp2p,
//! real fsync, the default leases); the node running a trial is SIGKILLed, and
//! the clock runs until the cluster has declared it lost (`detect_ms`) and the
//! trial's process runs on another node (`restart_ms`, without the checkpoint
//! transfer, which is `transfer_ms`). Repeated over several rounds, the killed
//! node restarted between them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::client;
use crate::local_cluster::LocalCluster;

/// Target for `restart_ms` (p50).
pub const RESTART_TARGET_MS: f64 = 3000.0;
/// Poll period while the clock runs.
const POLL_MS: u64 = 5;
/// A round that has not recovered by then fails the benchmark.
const ROUND_TIMEOUT_MS: u64 = 60_000;

/// The figures.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Kill -> NodeLost committed (p50 over rounds), ms.
    pub detect_ms: f64,
    /// Kill -> the trial's process runs elsewhere, less the checkpoint transfer (p50), ms.
    pub restart_ms: f64,
    /// Fetching the checkpoint (and model) before the restart (p50), ms.
    pub transfer_ms: f64,
    /// Every round's figures: (detect, restart, transfer) ms.
    pub rounds: Vec<(f64, f64, f64)>,
    /// The lease the nodes ran with, ms.
    pub lease_timeout_ms: u64,
    /// The disconnect grace the nodes ran with, ms.
    pub disconnect_grace_ms: u64,
    /// Target for restart_ms.
    pub restart_target_ms: f64,
    /// restart_ms <= target.
    pub pass: bool,
}

/// Runs `rounds` kills in a fresh cluster under `dir`.
pub fn run(dir: &std::path::Path, rounds: usize) -> anyhow::Result<Report> {
    let mut cluster = LocalCluster::start(dir, 3)?;
    cluster.stop_on_signal();
    let target = cluster.nodes[0].target();
    let id = client::create_experiment(
        &target,
        "bench-recovery.yaml",
        &super::endless_trial("bench-recovery", 500),
        &[],
        None,
    )?;
    let trial = first_trial(&target, id)?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        samples.push(one_round(&mut cluster, trial)?);
    }
    let _ = client::post_json(&target, &format!("/experiments/{id}/kill"), Value::Null);
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
    let p50 = |k: usize| {
        let mut v: Vec<f64> = samples
            .iter()
            .map(|s: &(f64, f64, f64)| [s.0, s.1, s.2][k])
            .collect();
        super::quantile(&mut v, 0.5)
    };
    let restart_ms = p50(1);
    Ok(Report {
        detect_ms: p50(0),
        restart_ms,
        transfer_ms: p50(2),
        rounds: samples,
        lease_timeout_ms: resolute_core::node::LEASE_TIMEOUT_DEFAULT_MS,
        disconnect_grace_ms: resolute_core::node::DISCONNECT_GRACE_DEFAULT_MS,
        restart_target_ms: RESTART_TARGET_MS,
        pass: restart_ms <= RESTART_TARGET_MS,
    })
}

fn first_trial(target: &client::Target, id: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
    loop {
        let trials = client::get_json(target, &format!("/experiments/{id}/trials"))?;
        if let Some(t) = trials.as_array().and_then(|a| a.first()) {
            return t["id"].as_u64().context("trial id");
        }
        if Instant::now() > deadline {
            bail!("experiment {id} created no trial");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the trial to run with a checkpoint, kills its node, times the
/// recovery, restarts the node. (detect, restart, transfer) in ms.
fn one_round(cluster: &mut LocalCluster, trial: u64) -> anyhow::Result<(f64, f64, f64)> {
    let deadline = Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
    let running_on = |c: &LocalCluster| -> Option<usize> {
        let observer = c.nodes.iter().find(|n| n.is_running())?;
        let t = client::get_json(&observer.target(), &format!("/trials/{trial}")).ok()?;
        let node = t["node"].as_str()?;
        (t["state"] == "Running" && !t["latest_checkpoint"].is_null())
            .then(|| c.nodes.iter().position(|n| n.id == node))
            .flatten()
    };
    let victim = loop {
        if let Some(k) = running_on(cluster) {
            break k;
        }
        if Instant::now() > deadline {
            bail!("trial {trial} never ran with a checkpoint");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let observer = (victim + 1) % cluster.nodes.len();
    let watch = cluster.nodes[observer].target();
    let victim_id = cluster.nodes[victim].id.clone();
    let killed = Instant::now();
    cluster.kill(victim);
    let mut detect = None;
    let (restart, new_node) = loop {
        let elapsed = killed.elapsed().as_secs_f64() * 1000.0;
        if detect.is_none() {
            let lost =
                client::get_json(&watch, "/cluster").is_ok_and(|s| {
                    s["nodes"].as_array().into_iter().flatten().any(|n| {
                        n["id"].as_str() == Some(victim_id.as_str()) && n["state"] == "Lost"
                    })
                });
            if lost {
                detect = Some(elapsed);
            }
        }
        let t = client::get_json(&watch, &format!("/trials/{trial}")).unwrap_or_default();
        let node = t["node"].as_str().unwrap_or("").to_string();
        if t["state"] == "Running" && !node.is_empty() && node != victim_id {
            break (elapsed, node);
        }
        if Instant::now() > deadline {
            bail!(
                "trial {trial} did not restart within {} s",
                ROUND_TIMEOUT_MS / 1000
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    // The node that restarted it knows how long its fetch took.
    let new = cluster
        .nodes
        .iter()
        .find(|n| n.id == new_node)
        .context("the trial's new node")?;
    let t = client::get_json(&new.target(), &format!("/trials/{trial}"))?;
    let transfer = t["launched_here"]["fetch_ms"].as_f64().unwrap_or(0.0);
    cluster.restart(victim)?;
    cluster.wait_connected()?;
    Ok((detect.unwrap_or(restart), restart - transfer, transfer))
}
