//! `resolute quickstart`: a 3-node cluster on loopback (separate processes, real
//! libp2p, real fsync) runs the quick-start search over the built-in trainer;
//! with chaos on (the default) one node is SIGKILLed midway and restarted later,
//! and its trials resume elsewhere from their checkpoints. Ends with the best
//! trials, the recoveries, and what to run next.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client;
use crate::local_cluster::LocalCluster;

/// The experiment it runs (examples/quickstart/experiment.yaml, built in).
const EXPERIMENT: &str = include_str!("../../../examples/quickstart/experiment.yaml");
/// Nodes in the local cluster.
const NODES: usize = 3;
/// The chaos kill waits until the experiment is this far along (and a trial on
/// the victim has a checkpoint).
const KILL_AT_PROGRESS: f64 = 0.25;
/// The killed node stays down at least this long (longer than the lease, so
/// that the cluster declares it lost and moves its trials).
const DOWN_AT_LEAST_MS: u64 = 6_000;
/// ... and at most this long, even if its trials have not all moved yet.
const DOWN_AT_MOST_MS: u64 = 30_000;
/// How long the whole run may take before it gives up.
const RUN_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// Poll period of the cluster's state.
const POLL_MS: u64 = 250;
/// Best trials shown.
const BEST_SHOWN: usize = 5;

/// `resolute quickstart` arguments.
#[derive(clap::Args)]
pub struct QuickstartArgs {
    /// Kill one node with SIGKILL midway and restart it later (the default).
    #[arg(long, overrides_with = "no_chaos")]
    chaos: bool,
    /// Run without the node kill.
    #[arg(long)]
    no_chaos: bool,
    /// Print one JSON summary (`experiment_state`, `trials`, `best_metric`,
    /// `recoveries`, `wall_s`).
    #[arg(long)]
    json: bool,
    /// Where the nodes keep their data and logs (must be empty; default: a new
    /// directory under the system's temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// A trial on the killed node when it died, and where it went.
struct Recovery {
    trial: u64,
    checkpoint: Option<String>,
    steps_at_kill: u64,
    to_node: Option<String>,
    running_after_ms: Option<u64>,
}

/// The chaos kill: when, which node, what it ran.
struct Chaos {
    node: usize,
    killed_at: Instant,
    killed_at_s: f64,
    restarted_at_s: Option<f64>,
    recoveries: Vec<Recovery>,
}

/// Runs the quick start.
pub fn run(args: &QuickstartArgs) -> anyhow::Result<ExitCode> {
    let chaos_on = !args.no_chaos;
    let dir = args.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("resolute-quickstart-{}", std::process::id()))
    });
    let started = Instant::now();
    say(
        args,
        &format!(
            "starting {NODES} nodes on loopback (data and logs in {})",
            dir.display()
        ),
    );
    let mut cluster = LocalCluster::start(&dir, NODES)?;
    cluster.stop_on_signal();
    for n in &cluster.nodes {
        say(
            args,
            &format!("  node {} {} api {}", n.name, &n.id[..8], n.api),
        );
    }
    // Submit to a follower: any node accepts any request.
    let leader = cluster.leader(0).unwrap_or(0);
    let entry = (leader + 1) % NODES;
    let target = cluster.nodes[entry].target();
    let id = client::create_experiment(
        &target,
        "examples/quickstart/experiment.yaml",
        EXPERIMENT,
        &[],
        None,
    )
    .context("submitting the quick-start experiment")?;
    say(
        args,
        &format!("submitted experiment {id} (adaptive ASHA, 16 trials of the built-in trainer) to node {}", cluster.nodes[entry].name),
    );
    let mut chaos: Option<Chaos> = None;
    let deadline = started + Duration::from_millis(RUN_TIMEOUT_MS);
    let experiment = loop {
        let exp = client::get_json(&target, &format!("/experiments/{id}"))?;
        let trials = client::get_json(&target, &format!("/experiments/{id}/trials"))?;
        let trials = trials.as_array().cloned().unwrap_or_default();
        let progress = exp["progress"].as_f64().unwrap_or(0.0);
        let state = exp["state"].as_str().unwrap_or("").to_string();
        progress_line(
            args,
            id,
            progress,
            &state,
            &trials,
            chaos.as_ref(),
            &cluster,
        );
        if matches!(state.as_str(), "Completed" | "Canceled" | "Errored") {
            break exp;
        }
        if chaos_on && chaos.is_none() && progress >= KILL_AT_PROGRESS {
            chaos = pick_victim(&cluster, entry, &trials).map(|node| {
                let victim_id = cluster.nodes[node].id.clone();
                let recoveries = trials
                    .iter()
                    .filter(|t| t["node"].as_str() == Some(&victim_id))
                    .map(|t| Recovery {
                        trial: t["id"].as_u64().unwrap_or(0),
                        checkpoint: t["latest_checkpoint"].as_str().map(str::to_string),
                        steps_at_kill: t["steps_completed"].as_u64().unwrap_or(0),
                        to_node: None,
                        running_after_ms: None,
                    })
                    .collect();
                cluster.kill(node);
                let c = Chaos {
                    node,
                    killed_at: Instant::now(),
                    killed_at_s: started.elapsed().as_secs_f64(),
                    restarted_at_s: None,
                    recoveries,
                };
                say(
                    args,
                    &format!(
                        "chaos: SIGKILL node {} with trials {:?} running",
                        cluster.nodes[node].name,
                        c.recoveries.iter().map(|r| r.trial).collect::<Vec<_>>()
                    ),
                );
                c
            });
        }
        if let Some(c) = chaos.as_mut() {
            track_recoveries(c, &trials, &cluster);
            let down_ms = c.killed_at.elapsed().as_millis() as u64;
            let moved = c.recoveries.iter().all(|r| r.running_after_ms.is_some());
            if c.restarted_at_s.is_none()
                && down_ms >= DOWN_AT_LEAST_MS
                && (moved || down_ms >= DOWN_AT_MOST_MS)
            {
                cluster.restart(c.node)?;
                c.restarted_at_s = Some(started.elapsed().as_secs_f64());
                say(
                    args,
                    &format!(
                        "chaos: node {} restarted from its data dir",
                        cluster.nodes[c.node].name
                    ),
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the quick start did not finish in {} minutes; node logs are in {}",
                RUN_TIMEOUT_MS / 60_000,
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let trials = trial_rows(&target, id)?;
    let wall_s = started.elapsed().as_secs_f64();
    let summary = summarize(&experiment, &trials, chaos.as_ref(), &cluster, wall_s, &dir);
    cluster.stop();
    if args.json {
        println!("{summary}");
    } else {
        eprintln!();
        print_report(&summary, &experiment);
    }
    Ok(if experiment["state"] == "Completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn say(args: &QuickstartArgs, line: &str) {
    if !args.json {
        eprintln!("{line}");
    }
}

/// The node to kill: not the one we talk to, running a trial that has a
/// checkpoint (so that its resume from the checkpoint shows).
fn pick_victim(cluster: &LocalCluster, entry: usize, trials: &[Value]) -> Option<usize> {
    cluster.nodes.iter().enumerate().position(|(k, n)| {
        k != entry
            && n.is_running()
            && trials.iter().any(|t| {
                t["node"].as_str() == Some(&n.id)
                    && t["state"] == "Running"
                    && !t["latest_checkpoint"].is_null()
            })
    })
}

fn track_recoveries(c: &mut Chaos, trials: &[Value], cluster: &LocalCluster) {
    let victim = &cluster.nodes[c.node].id;
    for r in c
        .recoveries
        .iter_mut()
        .filter(|r| r.running_after_ms.is_none())
    {
        let Some(t) = trials.iter().find(|t| t["id"].as_u64() == Some(r.trial)) else {
            continue;
        };
        let elsewhere = t["node"].as_str().filter(|n| *n != victim);
        if t["state"] == "Running" && elsewhere.is_some() {
            r.to_node = elsewhere.map(|n| name_of(cluster, n));
            r.running_after_ms = Some(c.killed_at.elapsed().as_millis() as u64);
        }
    }
}

fn name_of(cluster: &LocalCluster, id: &str) -> String {
    cluster
        .nodes
        .iter()
        .find(|n| n.id == id)
        .map_or_else(|| id.to_string(), |n| n.name.clone())
}

/// Every trial with its best validation metric.
fn trial_rows(target: &client::Target, id: u64) -> anyhow::Result<Vec<Value>> {
    let smaller = resolute_types::config::parse_str("quickstart.yaml", EXPERIMENT, &[])
        .map_or(true, |l| l.config.searcher.smaller_is_better);
    let trials = client::get_json(target, &format!("/experiments/{id}/trials"))?;
    let mut rows: Vec<Value> = trials
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            json!({
                "id": t["id"],
                "state": t["state"],
                "steps_completed": t["steps_completed"],
                "restarts": t["restarts"],
                "incarnation": t["incarnation"],
                "hparams": t["hparams"],
                "best_metric": t["best_metric"],
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        let key = |r: &Value| {
            r["best_metric"]
                .as_f64()
                .map(|v| if smaller { v } else { -v })
        };
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    });
    Ok(rows)
}

fn summarize(
    experiment: &Value,
    trials: &[Value],
    chaos: Option<&Chaos>,
    cluster: &LocalCluster,
    wall_s: f64,
    dir: &std::path::Path,
) -> Value {
    let recoveries: Vec<Value> = chaos
        .map(|c| {
            c.recoveries
                .iter()
                .map(|r| {
                    let t = trials.iter().find(|t| t["id"].as_u64() == Some(r.trial));
                    json!({
                        "trial": r.trial,
                        "from_node": cluster.nodes[c.node].name,
                        "to_node": r.to_node,
                        "checkpoint": r.checkpoint,
                        "steps_at_kill": r.steps_at_kill,
                        "running_again_after_ms": r.running_after_ms,
                        "restarts_charged": t.map(|t| t["restarts"].clone()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "experiment": experiment["id"],
        "experiment_state": experiment["state"],
        "searcher_metric": experiment["searcher_metric"],
        "best_metric": experiment["best_metric"],
        "trials": trials,
        "recoveries": recoveries,
        "chaos": chaos.map(|c| json!({
            "killed_node": cluster.nodes[c.node].name,
            "killed_at_s": c.killed_at_s,
            "restarted_at_s": c.restarted_at_s,
        })),
        "wall_s": wall_s,
        "data_dir": dir.display().to_string(),
    })
}

fn progress_line(
    args: &QuickstartArgs,
    id: u64,
    progress: f64,
    state: &str,
    trials: &[Value],
    chaos: Option<&Chaos>,
    cluster: &LocalCluster,
) {
    if args.json {
        return;
    }
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for t in trials.iter().filter(|t| t["state"] == "Running") {
        if let Some(n) = t["node"].as_str() {
            *by_node.entry(name_of(cluster, n)).or_default() += 1;
        }
    }
    let running: Vec<String> = by_node.iter().map(|(n, c)| format!("{n}:{c}")).collect();
    let width = 30;
    let filled = ((progress * width as f64).round() as usize).min(width);
    let down = chaos
        .filter(|c| c.restarted_at_s.is_none())
        .map(|c| format!(", node {} down", cluster.nodes[c.node].name))
        .unwrap_or_default();
    eprint!(
        "\r\x1b[2Kexperiment {id} [{}{}] {:>5.1}% {state:<9} {} trials, running {}{down}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        progress * 100.0,
        trials.len(),
        if running.is_empty() {
            "-".to_string()
        } else {
            running.join(" ")
        },
    );
}

fn print_report(s: &Value, experiment: &Value) {
    let metric = s["searcher_metric"].as_str().unwrap_or("metric");
    println!(
        "Experiment {} {} in {:.1} s: {} trials, best {metric} {}",
        s["experiment"],
        s["experiment_state"].as_str().unwrap_or(""),
        s["wall_s"].as_f64().unwrap_or(0.0),
        s["trials"].as_array().map_or(0, Vec::len),
        experiment["best_metric"]
    );
    println!();
    println!("Best trials:");
    println!(
        "  {:>5}  {:>15}  {:>7}  {:>9}  {:>6}  {:>5}  {:>5}  {:>7}",
        "trial", metric, "batches", "lr", "hidden", "depth", "batch", "dropout"
    );
    for t in s["trials"]
        .as_array()
        .into_iter()
        .flatten()
        .take(BEST_SHOWN)
    {
        let h = &t["hparams"];
        println!(
            "  {:>5}  {:>15}  {:>7}  {:>9.2e}  {:>6}  {:>5}  {:>5}  {:>7.3}",
            t["id"].to_string(),
            t["best_metric"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.5}")),
            t["steps_completed"].to_string(),
            h["lr"].as_f64().unwrap_or(0.0),
            h["hidden"].to_string(),
            h["depth"].to_string(),
            h["batch_size"].to_string(),
            h["dropout"].as_f64().unwrap_or(0.0),
        );
    }
    println!();
    match s["chaos"].as_object() {
        None => println!("Recoveries: none (run without --no-chaos to see one)."),
        Some(c) => {
            println!(
                "Recoveries: node {} was SIGKILLed at {:.1} s{}.",
                c["killed_node"].as_str().unwrap_or("?"),
                c["killed_at_s"].as_f64().unwrap_or(0.0),
                c["restarted_at_s"]
                    .as_f64()
                    .map_or(String::new(), |t| format!(
                        " and restarted from its data dir at {t:.1} s"
                    ))
            );
            for r in s["recoveries"].as_array().into_iter().flatten() {
                let ck = r["checkpoint"]
                    .as_str()
                    .map_or("no checkpoint (from the start)".to_string(), |c| {
                        format!("checkpoint {}", &c[..c.len().min(12)])
                    });
                match r["running_again_after_ms"].as_u64() {
                    Some(ms) => println!(
                        "  trial {}: node {} -> node {}, resumed from {ck}, running again {:.1} s after the kill, restarts charged {}",
                        r["trial"],
                        r["from_node"].as_str().unwrap_or("?"),
                        r["to_node"].as_str().unwrap_or("?"),
                        ms as f64 / 1000.0,
                        r["restarts_charged"]
                    ),
                    None => println!(
                        "  trial {}: finished or was stopped by the searcher before it needed to move",
                        r["trial"]
                    ),
                }
            }
        }
    }
    println!();
    println!("What next:");
    println!(
        "  node logs and data:    {}",
        s["data_dir"].as_str().unwrap_or("")
    );
    println!("  your own cluster:      resolute cluster init --data-dir data-a && resolute node start --config config/laptop.toml --data-dir data-a");
    println!("                         mkdir data-b && cp data-a/cluster.key data-b/ && resolute node start --config config/laptop.toml --api 127.0.0.1:8081 --data-dir data-b --join <first node's listen address> --join-token \"$(resolute cluster join-token)\"");
    println!("  submit and watch:      resolute experiment create examples/quickstart/experiment.yaml --follow");
    println!("  a Python trial:        resolute experiment create examples/python-core/experiment.yaml examples/python-core");
    println!("  chaos in simulation:   resolute sim simulations/churn.toml --seeds 0..100");
}
