//! `resolute bench wan`: the three-site topology of `resolute-netns` (a cloud
//! node with a public address, two on-prem nodes each behind its own NAT),
//! one real node process in each, with the shipped `cloud.toml` and
//! `onprem.toml` configs (the `wan` timing). It measures what crossing sites
//! costs a user:
//!
//! - submit-to-start: an experiment of four trials submitted on site dc1,
//!   until each trial's process runs, by the site it runs on (the cloud node
//!   is burst capacity: it takes trials once on-prem slots are full and
//!   `burst_after_s`, set to 0 here, has passed);
//! - recovery: SIGKILL of the on-prem node dc2 under a checkpointed trial,
//!   until the trial runs on another site;
//! - transfers: the experiment's model directory (with a payload of
//!   `--payload-mb` random bytes) as every node fetches it, each fetch's rate
//!   with how its holders were connected (direct, hole-punched, relayed),
//!   beside raw TCP from dc1 to the cloud node over the same links.
//!
//! It needs root (network namespaces, nftables) and says why when it cannot run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::client;
use crate::local_cluster::{LocalCluster, LocalNode, NodeSpec};

/// How long the sites may take to find their reachability and links.
const REACHABILITY_TIMEOUT_MS: u64 = 120_000;
/// How long an experiment's trials may take to start, or a trial to recover.
const ROUND_TIMEOUT_MS: u64 = 120_000;
/// Poll period while a clock runs.
const POLL_MS: u64 = 5;
/// Fetches smaller than this say nothing about a link's rate (checkpoints
/// of the built-in trainer are a few KiB).
const RATE_MIN_BYTES: u64 = 1 << 20;
/// Trials per experiment: one per slot (dc1 1, dc2 1, cloud 2).
const TRIALS: usize = 4;

/// One blob fetch a node reported.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    /// The fetching node's site.
    pub to_site: String,
    /// Each holder's site and how it was connected ("direct",
    /// "hole-punched", "relayed").
    pub from: BTreeMap<String, String>,
    /// Chunks a relay carried.
    pub relayed_chunks: u64,
    /// The blob's size.
    pub bytes: u64,
    /// How long the fetch took, ms.
    pub ms: u64,
    /// bytes / ms, in MB/s.
    pub mb_s: f64,
}

/// The figures (JSON keys are an interface).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Whether the links had netem's latency and loss (20 ms, 0.5% a hop).
    pub netem: bool,
    /// How dc1 reached dc2 once the sites had settled.
    pub dc1_to_dc2: String,
    /// Submission on dc1 until a trial's process runs, p50 over every trial, ms.
    pub submit_to_start_ms_p50: f64,
    /// The same by the site the trial ran on.
    pub submit_to_start_ms_p50_by_site: BTreeMap<String, f64>,
    /// SIGKILL of dc2 under a trial until it runs on another site, ms.
    pub recovery_ms: f64,
    /// Where it ran again.
    pub recovered_on: String,
    /// The model directory's fetches (and any checkpoint of 1 MiB or more).
    pub transfers: Vec<Transfer>,
    /// The best rate of a fetch served over a direct link, MB/s.
    pub direct_mb_s: Option<f64>,
    /// The best rate of a fetch a relay carried, MB/s.
    pub relayed_mb_s: Option<f64>,
    /// The best rate of a fetch over a hole-punched link, MB/s.
    pub hole_punched_mb_s: Option<f64>,
    /// Raw TCP from dc1 to the cloud node through dc1's NAT, MB/s.
    pub raw_tcp_mb_s: f64,
    /// Rounds of submit-to-start.
    pub rounds: usize,
}

/// A trial waits this long for on-prem slots before it may run on the cloud
/// node: not at all, so that every slot is in use at once.
const BURST_AFTER_S: u64 = 0;

/// `trials` trials of the built-in trainer that train until stopped.
fn experiment(trials: usize) -> String {
    format!(
        "name: bench-wan-{trials}\n\
         entrypoint: resolute train\n\
         hyperparameters: {{lr: 0.01, hidden: 16, depth: 1, batch_size: 16, dropout: 0.0, weight_decay: 0.0001, validate_every: 200}}\n\
         searcher: {{name: random, metric: validation_loss, smaller_is_better: true, max_trials: {trials}, max_concurrent_trials: {trials}, time_metric: batches, max_time: 100000000}}\n\
         max_restarts: 0\n"
    )
}

/// Runs the benchmark under `dir` (which must not exist or be empty).
pub fn run(dir: &Path, rounds: usize, payload_mb: u64) -> anyhow::Result<Report> {
    if let Some(why) = resolute_netns::cannot_run() {
        bail!("bench wan builds network namespaces and cannot here: {why} (run it as root)");
    }
    let topo = resolute_netns::Topology::build().map_err(anyhow::Error::msg)?;
    if let Some(why) = topo.netem_missing() {
        eprintln!("bench wan: {why}");
    }
    let spec = |ns: &str, ip: &str, shipped: &str, site: &str| NodeSpec {
        ns: Some(ns.to_string()),
        api: "127.0.0.1:0".into(),
        listen: format!("/ip4/{ip}/tcp/0"),
        config: resolute_netns::node_config(shipped, site, BURST_AFTER_S),
    };
    let cloud = include_str!("../../../../config/cloud.toml");
    let onprem = include_str!("../../../../config/onprem.toml");
    let specs = [
        spec(topo.cloud(), resolute_netns::CLOUD_IP, cloud, "cloud"),
        spec(topo.site_a(), resolute_netns::SITE_A_IP, onprem, "dc1"),
        spec(topo.site_b(), resolute_netns::SITE_B_IP, onprem, "dc2"),
    ];
    eprintln!("bench wan: starting a node on each site ...");
    let mut cluster = LocalCluster::start_placed(dir, &specs)?;
    cluster.stop_on_signal();
    let sites: BTreeMap<String, String> = cluster
        .nodes
        .iter()
        .zip(["cloud", "dc1", "dc2"])
        .map(|(n, s)| (n.id.clone(), s.to_string()))
        .collect();
    let dc1_to_dc2 = settle(&cluster)?;
    eprintln!("bench wan: dc1 reaches dc2 {dc1_to_dc2}; submitting on dc1 ...");
    let mut starts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        let id = cluster.nodes[1].call(|t| {
            client::create_experiment(t, "bench-wan.yaml", &experiment(TRIALS), &[], None)
        })?;
        for (node, ms) in time_starts(&cluster.nodes[1], id, TRIALS)? {
            let site = sites.get(&node).cloned().unwrap_or(node);
            starts.entry(site).or_default().push(ms);
        }
        kill_and_wait(&cluster.nodes[1], id)?;
    }
    // The payload round: a model directory every node fetches, then the
    // kill; one slot fewer trials, so that the killed node's has somewhere
    // to go.
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    write_payload(&model.join("payload.bin"), payload_mb)?;
    let id = cluster.nodes[1].call(|t| {
        client::create_experiment(
            t,
            "bench-wan.yaml",
            &experiment(TRIALS - 1),
            &[],
            Some(&model),
        )
    })?;
    time_starts(&cluster.nodes[1], id, TRIALS - 1)?;
    let transfers = gather_transfers(&cluster, &sites)?;
    let (recovery_ms, recovered_on) = recover(&mut cluster, id, 2)?;
    let recovered_on = sites.get(&recovered_on).cloned().unwrap_or(recovered_on);
    let _ = cluster.nodes[0]
        .call(|t| client::post_json(t, &format!("/experiments/{id}/kill"), Value::Null));
    let raw_tcp_mb_s = raw_tcp(topo.site_a(), topo.cloud(), payload_mb)?;
    drop(cluster);
    let netem = topo.netem;
    drop(topo);
    let _ = std::fs::remove_dir_all(dir);
    let best = |kind: &str| {
        transfers
            .iter()
            .filter(|t| t.from.values().any(|v| v == kind))
            .map(|t| t.mb_s)
            .max_by(f64::total_cmp)
    };
    let mut all: Vec<f64> = starts.values().flatten().copied().collect();
    Ok(Report {
        netem,
        dc1_to_dc2,
        submit_to_start_ms_p50: super::quantile(&mut all, 0.5),
        submit_to_start_ms_p50_by_site: starts
            .iter_mut()
            .map(|(s, v)| (s.clone(), super::quantile(v, 0.5)))
            .collect(),
        recovery_ms,
        recovered_on,
        direct_mb_s: best("direct"),
        relayed_mb_s: best("relayed"),
        hole_punched_mb_s: best("hole-punched"),
        transfers,
        raw_tcp_mb_s,
        rounds,
    })
}

/// Waits until AutoNAT has told each node what it is and dc1 has a link to
/// dc2 (relayed or hole-punched); that link's kind.
fn settle(cluster: &LocalCluster) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_millis(REACHABILITY_TIMEOUT_MS);
    let dc2 = cluster.nodes[2].id.clone();
    loop {
        let status = cluster.nodes[1].call(|t| client::get_json(t, "/cluster"))?;
        let rows = status["nodes"].as_array().cloned().unwrap_or_default();
        let row = |id: &str| rows.iter().find(|n| n["id"] == id).cloned();
        let private =
            |k: usize| row(&cluster.nodes[k].id).is_some_and(|r| r["reachability"] == "private");
        let kind = row(&dc2)
            .and_then(|r| r["connection"]["kind"].as_str().map(str::to_string))
            .unwrap_or_default();
        if private(1) && private(2) && !kind.is_empty() {
            return Ok(kind);
        }
        if Instant::now() > deadline {
            bail!(
                "the sites did not settle within {} s (AutoNAT, relay reservations): {status}",
                REACHABILITY_TIMEOUT_MS / 1000
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// From now until each of the experiment's `trials` trials runs: (node, ms).
fn time_starts(on: &LocalNode, id: u64, trials: usize) -> anyhow::Result<Vec<(String, f64)>> {
    let started = Instant::now();
    let mut seen: BTreeMap<u64, (String, f64)> = BTreeMap::new();
    while seen.len() < trials {
        let listed = on.call(|t| client::get_json(t, &format!("/experiments/{id}/trials")))?;
        for t in listed.as_array().into_iter().flatten() {
            let (Some(trial), Some(node)) = (t["id"].as_u64(), t["node"].as_str()) else {
                continue;
            };
            if t["state"] == "Running" {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                seen.entry(trial).or_insert((node.to_string(), ms));
            }
        }
        if started.elapsed() > Duration::from_millis(ROUND_TIMEOUT_MS) {
            bail!(
                "experiment {id}: {} of {trials} trials started within {} s",
                seen.len(),
                ROUND_TIMEOUT_MS / 1000
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    Ok(seen.into_values().collect())
}

fn kill_and_wait(on: &LocalNode, id: u64) -> anyhow::Result<()> {
    on.call(|t| {
        client::post_json(t, &format!("/experiments/{id}/kill"), Value::Null)?;
        super::submit::wait_idle(t, id, ROUND_TIMEOUT_MS)
    })
}

/// Waits until every node has the payload experiment's model directory,
/// then reads the fetches each reported.
fn gather_transfers(
    cluster: &LocalCluster,
    sites: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<Transfer>> {
    let deadline = Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
    loop {
        let mut out = Vec::new();
        for n in &cluster.nodes {
            let status = n.call(|t| client::get_json(t, "/cluster"))?;
            let to_site = sites.get(&n.id).cloned().unwrap_or_default();
            for f in status["fetches"].as_array().into_iter().flatten() {
                let bytes = f["bytes"].as_u64().unwrap_or(0);
                if bytes < RATE_MIN_BYTES {
                    continue;
                }
                let ms = f["ms"].as_u64().unwrap_or(0).max(1);
                let from = f["from"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(node, h)| {
                        let site = sites.get(node).cloned().unwrap_or(node.clone());
                        (site, h["via"].as_str().unwrap_or("?").to_string())
                    })
                    .collect();
                out.push(Transfer {
                    to_site: to_site.clone(),
                    from,
                    relayed_chunks: f["relayed_chunks"].as_u64().unwrap_or(0),
                    bytes,
                    ms,
                    mb_s: bytes as f64 / 1e6 / (ms as f64 / 1000.0),
                });
            }
        }
        // The node it was submitted to uploaded it; the other two fetch it.
        if out.len() >= cluster.nodes.len() - 1 {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("the model directory did not reach every node: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILLs node `k` once a trial with a checkpoint runs there; from the
/// kill until that trial runs on another node: (ms, that node).
fn recover(cluster: &mut LocalCluster, id: u64, k: usize) -> anyhow::Result<(f64, String)> {
    let victim = cluster.nodes[k].id.clone();
    let deadline = Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
    let trial = loop {
        let trials =
            cluster.nodes[0].call(|t| client::get_json(t, &format!("/experiments/{id}/trials")))?;
        let found = trials.as_array().into_iter().flatten().find(|t| {
            t["state"] == "Running"
                && t["node"].as_str() == Some(victim.as_str())
                && !t["latest_checkpoint"].is_null()
        });
        if let Some(t) = found.and_then(|t| t["id"].as_u64()) {
            break t;
        }
        if Instant::now() > deadline {
            bail!("no trial with a checkpoint ran on dc2");
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let killed = Instant::now();
    cluster.kill(k);
    loop {
        let t = cluster.nodes[0].call(|t| client::get_json(t, &format!("/trials/{trial}")))?;
        let node = t["node"].as_str().unwrap_or("").to_string();
        if t["state"] == "Running" && !node.is_empty() && node != victim {
            return Ok((killed.elapsed().as_secs_f64() * 1000.0, node));
        }
        if killed.elapsed() > Duration::from_millis(ROUND_TIMEOUT_MS) {
            bail!(
                "trial {trial} did not run again within {} s",
                ROUND_TIMEOUT_MS / 1000
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

fn write_payload(path: &Path, mb: u64) -> anyhow::Result<()> {
    // Random bytes: a packed model directory is compressed.
    let mut rng = std::fs::File::open("/dev/urandom").context("/dev/urandom")?;
    let mut out = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mb {
        rng.read_exact(&mut buf)?;
        out.write_all(&buf)?;
    }
    Ok(())
}

/// `mb` MB sent over one TCP connection from namespace `from` to the cloud
/// address in namespace `to` (through `from`'s NAT), until the receiver has
/// read it all; MB/s.
fn raw_tcp(from: &str, to: &str, mb: u64) -> anyhow::Result<f64> {
    let total = mb << 20;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = s.spawn(move || -> anyhow::Result<()> {
            crate::local_cluster::enter_namespace(to)?;
            let listener = std::net::TcpListener::bind((resolute_netns::CLOUD_IP, 0))?;
            tx.send(listener.local_addr()?.port())?;
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0u64;
            while got < total {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    bail!("the sender stopped after {got} bytes");
                }
                got += n as u64;
            }
            conn.write_all(b"k")?;
            Ok(())
        });
        let port = rx
            .recv_timeout(Duration::from_millis(ROUND_TIMEOUT_MS))
            .context("the raw TCP receiver did not start")?;
        let client = s.spawn(move || -> anyhow::Result<f64> {
            crate::local_cluster::enter_namespace(from)?;
            let mut conn = std::net::TcpStream::connect((resolute_netns::CLOUD_IP, port))?;
            let buf = vec![7u8; 1 << 20];
            let started = Instant::now();
            for _ in 0..mb {
                conn.write_all(&buf)?;
            }
            let mut ack = [0u8; 1];
            conn.read_exact(&mut ack)?;
            Ok(total as f64 / 1e6 / started.elapsed().as_secs_f64())
        });
        let rate = client
            .join()
            .unwrap_or_else(|_| bail!("the raw TCP sender panicked"))?;
        server
            .join()
            .unwrap_or_else(|_| bail!("the raw TCP receiver panicked"))?;
        Ok(rate)
    })
}
