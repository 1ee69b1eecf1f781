//! `resolute`: the command-line interface.
//!
//! Exit codes: 0 success, 1 user error (bad config, bad arguments).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

mod access;
mod bench;
mod client;
mod config_file;
mod local_cluster;
mod quickstart;
mod train;
use clap::{Parser, Subcommand};

use resolute_search::simulate::{plan, run, Preview, SyntheticCurves};
use resolute_search::{adaptive_brackets, make_rungs, Searcher};
use resolute_types::config::{self, ConfigErrors, ExperimentConfig, Loaded, SearchMethod};

/// Resolute: a masterless training platform for deep-learning experiments.
#[derive(Parser)]
#[command(name = "resolute", version, about)]
struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

/// The `resolute` subcommands.
#[derive(Subcommand)]
enum CliCommand {
    /// The quick start: a 3-node cluster on loopback runs an adaptive ASHA search
    /// over the built-in trainer; one node is SIGKILLed midway and its trials
    /// resume elsewhere from their checkpoints.
    Quickstart(quickstart::QuickstartArgs),
    /// Work with experiment configs (Determined's YAML format).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show how many trials a search creates and how long each trains.
    PreviewSearch(PreviewArgs),
    /// Run a simulation scenario (simulations/*.toml) on a virtual clock.
    Sim(SimArgs),
    /// Runs or controls a node of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Submits and controls experiments on the cluster.
    Experiment {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: client::ExperimentCommand,
    },
    /// Looks at trials.
    Trial {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: client::TrialCommand,
    },
    /// Downloads checkpoints.
    Checkpoint {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: client::CheckpointCommand,
    },
    /// The cluster as a node sees it; `cluster init` makes a new cluster's key
    /// and first administrator.
    Cluster {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Checks an API token against a node and saves it for this CLI (read from
    /// stdin unless --token or RESOLUTE_TOKEN gives it).
    Login {
        #[command(flatten)]
        target: client::Target,
    },
    /// Forgets the saved token.
    Logout,
    /// Who the token belongs to.
    Whoami {
        #[command(flatten)]
        target: client::Target,
    },
    /// Users and their roles.
    User {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: access::UserCommand,
    },
    /// API tokens.
    Token {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// The built-in trainer (an MLP on the wine quality dataset): a trial
    /// entrypoint that needs no Python.
    Train(train::TrainArgs),
    /// The GPUs this machine would offer (NVML discovery and a CUDA probe of
    /// each); without NVIDIA GPUs, the CPU slots it would offer instead.
    Gpus {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// List only; do not create a CUDA context on each GPU.
        #[arg(long)]
        no_probe: bool,
    },
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// The scenario file.
    file: PathBuf,
    /// Run this seed (replays a failing run exactly).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sweep seeds `A..B` (B exclusive) and list the failing ones.
    #[arg(long, value_name = "A..B")]
    seeds: Option<String>,
    /// Print the report as JSON (one object; a list with --seeds).
    #[arg(long)]
    json: bool,
    /// Write a Chrome trace-event timeline (open it in Perfetto).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Starts a node: it bootstraps a new cluster, or joins one through `--join`.
    Start {
        /// The node config (see config/*.toml).
        #[arg(long)]
        config: PathBuf,
        /// A member's multiaddr to join through (repeatable).
        #[arg(long)]
        join: Vec<String>,
        /// Where the node keeps its log, blobs and identity.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides api.listen.
        #[arg(long)]
        api: Option<String>,
        /// Overrides net.listen.
        #[arg(long)]
        listen: Option<String>,
        /// The join token an admin made (`resolute cluster join-token`): a
        /// cluster with users admits no new node without one.
        #[arg(long, env = "RESOLUTE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
    },
    /// Asks a node to drain: its trials checkpoint and move elsewhere.
    Drain {
        #[command(flatten)]
        target: client::Target,
        /// The node id (hex, as `cluster status` prints it).
        id: String,
    },
    /// Lets a node join without a join token (cluster admin): the id is the
    /// one a waiting node prints.
    Approve {
        #[command(flatten)]
        target: client::Target,
        /// The node id (hex).
        id: String,
    },
    /// Removes a node for good (cluster admin): its trials move elsewhere and
    /// no peer admits it again unless it is approved.
    Remove {
        #[command(flatten)]
        target: client::Target,
        /// The node id (hex, as `cluster status` prints it).
        id: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes, slots, leader, voters, queue.
    Status,
    /// What this node's tracking store holds: applied index, rows per table,
    /// a digest that is equal on every node at the same index (cluster admin).
    Tracking,
    /// Makes a new cluster's key and first administrator in the data dir of
    /// the node that will bootstrap it; saves the admin token for this CLI.
    Init(access::InitArgs),
    /// Makes a join token for new nodes (cluster admin); prints it once.
    JoinToken {
        /// Lifetime: `90s`, `30m`, `12h`, `7d`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// What it is for.
        #[arg(long, default_value = "")]
        label: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The experiment log: metric records per second through a 3-voter cluster with
    /// real fsyncs, and commit latency, against the disk's raw fsync rate.
    Log(LogBenchArgs),
    /// The scheduler: placements per second and the cost of one apply on 1,000
    /// nodes x 8 GPUs with 20,000 queued trials, and again with 10x the history.
    Sched {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Blob transfer: one blob between two local peers over libp2p (noise on),
    /// against the same bytes over a plain TCP connection, in interleaved rounds.
    Transfer {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Blob size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mb: u64,
    },
    /// Gossip: how long a node record takes to reach 10 local peers.
    Gossip {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A cluster history of years: 20,000 trials and 20,000,000 metric points
    /// through the real apply path (three nodes with their tracking stores);
    /// memory, snapshot size, a fresh node's catch-up, query latencies, and the
    /// apply rate against `bench log`'s in the same run.
    State {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// A tenth of the trials and a twentieth of the points.
        #[arg(long)]
        quick: bool,
    },
    /// Every benchmark: a table of figure, reference, ratio, target, pass.
    All {
        /// Print one JSON object keyed by benchmark.
        #[arg(long)]
        json: bool,
        /// Shorter runs (under 3 minutes on 2 cores).
        #[arg(long)]
        quick: bool,
    },
    /// Search efficiency: each searcher on a lookup table of learning curves
    /// (curves-v1), one worker, a budget of epochs; regret and epochs to the top 5%.
    Search(SearchBenchArgs),
    /// The simulator's large scenario: simulated seconds per wall second, GPU
    /// goodput, work lost, recovery p99.
    Sim {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// One simulated hour of faults instead of 24.
        #[arg(long)]
        quick: bool,
        /// The scenario.
        #[arg(long, default_value = "simulations/large.toml")]
        file: PathBuf,
        /// Its seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Recovery: 3 local node processes; SIGKILL of the node running a trial,
    /// until the cluster declares it lost and the trial runs elsewhere.
    Recovery {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Kills (each a round; the killed node restarts between them).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Submission latency: 3 local node processes; submit to a follower until
    /// the first trial's process has started, repeated.
    Submit {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Submissions measured.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
}

#[derive(clap::Args)]
struct SearchBenchArgs {
    /// The curves file (curves-v1 JSON).
    #[arg(long, default_value = "benches/curves/synthetic-v1.json")]
    curves: PathBuf,
    /// The metric to optimize (one of the file's `metrics`).
    #[arg(long, default_value = "validation_loss")]
    metric: String,
    /// Epochs the worker may train per run (default: 20 x n_epochs).
    #[arg(long)]
    budget: Option<u64>,
    /// Seeds `A..B` (B exclusive): one run each.
    #[arg(long, default_value = "0..50")]
    seeds: String,
    /// One searcher, or `all`.
    #[arg(long, default_value = "all")]
    searcher: String,
    /// Workers training at once (the parallel view: wall-clock time to the top 5%).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Print one JSON object keyed by searcher.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LogBenchArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Metric records per log entry.
    #[arg(long, default_value_t = 256)]
    records_per_entry: usize,
    /// Proposals kept in flight (concurrently reporting trials).
    #[arg(long, default_value_t = 4)]
    outstanding: usize,
    /// Metric values per record.
    #[arg(long, default_value_t = 2)]
    values_per_record: usize,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config; print it normalized (defaults filled, overrides applied).
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The experiment config (YAML).
    file: PathBuf,
    /// Override a field: `--config searcher.max_trials=20` (value parsed as YAML).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print JSON instead of YAML.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PreviewArgs {
    /// The experiment config (YAML).
    file: PathBuf,
    /// Override a field: `--config searcher.max_trials=20`.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print one JSON object mapping each stop length to its trial count.
    #[arg(long)]
    json: bool,
    /// Run the searcher against synthetic learning curves even where Determined's
    /// analytic plan exists (async_halving, adaptive_asha, random, grid, single).
    #[arg(long)]
    simulate: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        CliCommand::Config { .. }
            | CliCommand::PreviewSearch(_)
            | CliCommand::Sim(_)
            | CliCommand::Experiment { .. }
            | CliCommand::Trial { .. }
            | CliCommand::Checkpoint { .. }
            | CliCommand::Cluster { .. }
            | CliCommand::User { .. }
            | CliCommand::Token { .. }
            | CliCommand::Gpus { .. }
    ) {
        stop_quietly_when_stdout_closes();
    }
    let result = match cli.command {
        CliCommand::Config {
            command: ConfigCommand::Check(args),
        } => config_check(&args),
        CliCommand::PreviewSearch(args) => preview_search(&args),
        CliCommand::Train(args) => train::run(&args),
        CliCommand::Quickstart(args) => quickstart::run(&args),
        CliCommand::Node {
            command:
                NodeCommand::Start {
                    config,
                    join,
                    data_dir,
                    api,
                    listen,
                    join_token,
                },
        } => node_start(&config, &join, data_dir.as_deref(), api, listen, join_token),
        CliCommand::Node {
            command: NodeCommand::Drain { target, id },
        } => client::node_action(&target, &id, "drain"),
        CliCommand::Node {
            command: NodeCommand::Approve { target, id },
        } => client::node_action(&target, &id, "approve"),
        CliCommand::Node {
            command: NodeCommand::Remove { target, id },
        } => client::node_action(&target, &id, "remove"),
        CliCommand::Experiment { target, command } => client::experiment(&target, &command),
        CliCommand::Trial { target, command } => client::trial(&target, &command),
        CliCommand::Checkpoint { target, command } => client::checkpoint(&target, &command),
        CliCommand::Cluster {
            target,
            command: ClusterCommand::Status,
        } => client::cluster_status(&target),
        CliCommand::Cluster {
            target,
            command: ClusterCommand::Tracking,
        } => client::cluster_tracking(&target),
        CliCommand::Cluster {
            command: ClusterCommand::Init(args),
            ..
        } => access::init(&args),
        CliCommand::Cluster {
            target,
            command: ClusterCommand::JoinToken { ttl, uses, label },
        } => access::join_token(&target, &ttl, uses, &label),
        CliCommand::Login { target } => access::login(&target, target.token.as_deref()),
        CliCommand::Logout => access::logout(),
        CliCommand::Whoami { target } => access::whoami(&target),
        CliCommand::User { target, command } => access::user(&target, &command),
        CliCommand::Token { target, command } => access::token(&target, &command),
        CliCommand::Gpus { json, no_probe } => gpus(json, no_probe),
        CliCommand::Bench {
            command: BenchCommand::Log(args),
        } => bench_log(&args),
        CliCommand::Sim(args) => sim(&args),
        CliCommand::Bench {
            command: BenchCommand::Sched { json },
        } => bench_sched(json),
        CliCommand::Bench {
            command: BenchCommand::Transfer { json, size_mb },
        } => bench_transfer(json, size_mb),
        CliCommand::Bench {
            command: BenchCommand::Gossip { json },
        } => bench_gossip(json),
        CliCommand::Bench {
            command: BenchCommand::State { json, quick },
        } => bench_state(json, quick),
        CliCommand::Bench {
            command: BenchCommand::All { json, quick },
        } => bench_all(json, quick),
        CliCommand::Bench {
            command: BenchCommand::Search(args),
        } => bench_search(&args),
        CliCommand::Bench {
            command:
                BenchCommand::Sim {
                    json,
                    quick,
                    file,
                    seed,
                },
        } => bench_sim(json, quick, &file, seed),
        CliCommand::Bench {
            command: BenchCommand::Recovery { json, rounds },
        } => bench_recovery(json, rounds),
        CliCommand::Bench {
            command: BenchCommand::Submit { json, count },
        } => bench_submit(json, count),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Loads a config, printing warnings; on errors prints them and returns `None`.
fn load(file: &std::path::Path, overrides: &[String]) -> Option<ExperimentConfig> {
    match config_file::load(file, overrides) {
        Ok(Loaded { config, warnings }) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            Some(config)
        }
        Err(ConfigErrors { errors, warnings }) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for e in &errors {
                eprintln!("{e}");
            }
            None
        }
    }
}

fn config_check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let Some(config) = load(&args.file, &args.overrides) else {
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&config).context("rendering the config")?
        );
    } else {
        print!("{}", config::to_yaml(&config));
    }
    Ok(ExitCode::SUCCESS)
}

fn preview_search(args: &PreviewArgs) -> anyhow::Result<ExitCode> {
    let Some(config) = load(&args.file, &args.overrides) else {
        return Ok(ExitCode::from(1));
    };
    let seed = u64::from(config.reproducibility.experiment_seed.unwrap_or(0));
    let analytic = if args.simulate {
        None
    } else {
        plan(&config.searcher, &config.hyperparameters)
    };
    let (preview, how) = match analytic {
        Some(p) => (p, "planned as Determined's preview-search does"),
        None => (
            simulated(&config, seed)?,
            "simulated against synthetic learning curves",
        ),
    };
    if args.json {
        let object: serde_json::Map<String, serde_json::Value> = preview
            .to_json()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::from(v)))
            .collect();
        println!("{}", serde_json::Value::Object(object));
        return Ok(ExitCode::SUCCESS);
    }
    println!("Using search configuration:");
    print!("{}", indent(&config::to_yaml(&config.searcher)));
    println!(
        "This search will create a total of {} trials ({how}):",
        preview.total()
    );
    let unit = preview
        .unit
        .clone()
        .unwrap_or_else(|| "training length".to_string());
    let header = format!("Training Time ({unit})");
    println!("{:>6} | {header}", "Trials");
    println!("{}-+-{}", "-".repeat(6), "-".repeat(header.len()));
    for (length, count) in &preview.counts {
        let length = length.map_or("the training code's full length".to_string(), |l| {
            l.to_string()
        });
        println!("{count:>6} | {length}");
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_seeds(text: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = text
        .split_once("..")
        .context("--seeds takes A..B, e.g. 0..100")?;
    let a: u64 = a.trim().parse().context("--seeds: A is not a number")?;
    let b: u64 = b.trim().parse().context("--seeds: B is not a number")?;
    if b <= a {
        anyhow::bail!("--seeds {text}: B must be greater than A");
    }
    Ok(a..b)
}

fn sim(args: &SimArgs) -> anyhow::Result<ExitCode> {
    let scenario = resolute_sim::Scenario::load(&args.file)?;
    let seeds = match &args.seeds {
        Some(text) => parse_seeds(text)?,
        None => args.seed..args.seed + 1,
    };
    let mut failing = Vec::new();
    let mut reports = Vec::new();
    for seed in seeds.clone() {
        if !args.json {
            println!("seed {seed}");
        }
        let opts = resolute_sim::Options {
            seed,
            trace: args.trace.is_some(),
            ..Default::default()
        };
        let start = std::time::Instant::now();
        let (mut report, trace) = resolute_sim::run(&scenario, &opts);
        report.wall_s = start.elapsed().as_secs_f64();
        report.sim_s_per_wall_s = report.simulated_s / report.wall_s.max(1e-9);
        if let Some(path) = &args.trace {
            std::fs::write(path, serde_json::to_vec(&trace)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if !report.violations.is_empty() {
            failing.push(seed);
        }
        if !args.json {
            print_sim_report(&report);
        }
        reports.push(report);
    }
    if args.json {
        let text = if reports.len() == 1 {
            serde_json::to_string(&reports[0])?
        } else {
            serde_json::to_string(&reports)?
        };
        println!("{text}");
    } else if seeds.end - seeds.start > 1 {
        println!(
            "{} seeds, {} failing: {:?}",
            seeds.end - seeds.start,
            failing.len(),
            failing
        );
    }
    Ok(if failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_sim_report(r: &resolute_sim::Report) {
    println!(
        "scenario {} seed {}: {}",
        r.scenario,
        r.seed,
        if r.violations.is_empty() {
            "ok"
        } else {
            "VIOLATION"
        }
    );
    for v in &r.violations {
        println!("  violation {v}");
    }
    println!(
        "  experiments      {} submitted, {} finished, {} trials",
        r.experiments_submitted, r.experiments_completed, r.trials
    );
    println!(
        "  gpu goodput      {:.3} ({:.0} GPU-s of work lost)",
        r.gpu_goodput, r.work_lost_gpu_s
    );
    println!(
        "  recoveries       {} (p50 {:.1} s, p99 {:.1} s), {} restarts charged",
        r.recoveries, r.recovery_s_p50, r.recovery_s_p99, r.restarts_charged
    );
    if r.gpu_failures > 0 {
        println!("  gpu failures     {}", r.gpu_failures);
    }
    println!(
        "  queue wait       p50 {:.1} s, p99 {:.1} s",
        r.queue_wait_s_p50, r.queue_wait_s_p99
    );
    let pools: Vec<String> = r
        .gpu_s_by_pool
        .iter()
        .map(|(p, s)| format!("{p} {s:.0}"))
        .collect();
    println!(
        "  gpu time         {} GPU-s by pool, cost {:.2}, {} multi-node trials",
        pools.join(", "),
        r.gpu_cost,
        r.multi_node_trials
    );
    if !r.group_share.is_empty() {
        let shares: Vec<String> = r
            .group_share
            .iter()
            .map(|(g, s)| format!("{g} {s:.3}"))
            .collect();
        println!("  group share      {}", shares.join(", "));
    }
    println!(
        "  traffic          {} messages, {:.1} MB of checkpoints",
        r.messages,
        r.bytes_moved as f64 / 1e6
    );
    println!(
        "  time             {:.0} simulated s in {:.2} wall s ({:.0}x), {} events",
        r.simulated_s, r.wall_s, r.sim_s_per_wall_s, r.events
    );
    println!("  digest           {}", r.digest);
}

fn node_start(
    config: &std::path::Path,
    join: &[String],
    data_dir: Option<&std::path::Path>,
    api: Option<String>,
    listen: Option<String>,
    join_token: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut file = resolute_node::config::load(config).map_err(anyhow::Error::msg)?;
    if let Some(a) = api {
        file.api.listen = a;
    }
    if let Some(l) = listen {
        file.net.listen = vec![l];
    }
    let data_dir = resolute_node::data_dir(&file, data_dir);
    let join = join
        .iter()
        .map(|j| j.parse().with_context(|| format!("--join {j}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    resolute_node::block_on(async move {
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        resolute_node::serve(
            resolute_node::Options {
                config: file,
                data_dir,
                join,
                join_token,
            },
            stop,
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn gpus(json: bool, no_probe: bool) -> anyhow::Result<ExitCode> {
    let d = resolute_trial::gpu::discover(!no_probe);
    if json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    match (&d.nvml_error, &d.driver) {
        (Some(e), _) => {
            println!("no NVIDIA GPUs: NVML did not load ({e}); this node offers CPU slots");
            return Ok(ExitCode::SUCCESS);
        }
        (None, Some(v)) => println!("NVIDIA driver {v}, {} GPUs", d.gpus.len()),
        (None, None) => println!("{} GPUs", d.gpus.len()),
    }
    for g in &d.gpus {
        println!(
            "  {} {} {} {} MiB, compute {}.{}{}  {}",
            g.index,
            g.uuid,
            g.model,
            g.memory_mib,
            g.compute_capability.0,
            g.compute_capability.1,
            if g.mig { ", MIG on" } else { "" },
            match &g.reason {
                None if no_probe => "listed".to_string(),
                None => "usable (probe passed)".to_string(),
                Some(r) => format!("disabled: {r}"),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_transfer(json: bool, size_mb: u64) -> anyhow::Result<ExitCode> {
    if size_mb == 0 || size_mb > 64 * 1024 {
        anyhow::bail!("--size-mb must be between 1 and 65536");
    }
    let dir = std::env::temp_dir().join(format!("resolute-bench-transfer-{}", std::process::id()));
    let r = bench::transfer::run(size_mb, &dir)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "blob transfer between two local peers, {} MiB, {} interleaved rounds",
        r.size_mb,
        r.rounds.len()
    );
    println!("  {:<20} {:>10.0}", "libp2p_mb_s", r.libp2p_mb_s);
    println!(
        "  {:<20} {:>10.0}   (reference: memory to memory)",
        "raw_tcp_mb_s", r.raw_tcp_mb_s
    );
    println!(
        "  {:<20} {:>10.0}   (raw TCP, receiver writes and syncs)",
        "raw_tcp_to_disk_mb_s", r.raw_tcp_to_disk_mb_s
    );
    println!("  {:<20} {:>10.2}   target >= 0.5", "ratio", r.ratio);
    println!(
        "  cpu s per GiB (both peers, {} cores): libp2p {:.2}, raw TCP {:.2}",
        r.cores, r.libp2p_cpu_s_per_gib, r.raw_tcp_cpu_s_per_gib
    );
    Ok(ExitCode::SUCCESS)
}

fn bench_gossip(json: bool) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("resolute-bench-gossip-{}", std::process::id()));
    let r = bench::gossip::run(&dir)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("gossip propagation across {} local peers", r.peers);
    println!("  {:<16} {:>10.1}", "gossip_ms_p50", r.gossip_ms_p50);
    println!("  {:<16} {:>10.1}", "gossip_ms_p99", r.gossip_ms_p99);
    println!("  {:<16} {:>10.3}", "delivered", r.delivered);
    Ok(ExitCode::SUCCESS)
}

fn bench_all(json: bool, quick: bool) -> anyhow::Result<ExitCode> {
    let scratch = std::env::temp_dir().join(format!("resolute-bench-all-{}", std::process::id()));
    let started = std::time::Instant::now();
    let (rows, object) = bench::all::run(
        quick,
        &scratch,
        std::path::Path::new("benches/curves/synthetic-v1.json"),
    );
    if json {
        println!("{object}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "resolute bench all{} ({:.0} s)",
        if quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64()
    );
    println!(
        "  {:<9} {:<34} {:>12}  {:<26} {:>12} {:>7}  {:<30} pass",
        "bench", "figure", "value", "reference", "ref value", "ratio", "target"
    );
    for r in &rows {
        let (ref_name, ref_value) = r
            .reference
            .as_ref()
            .map_or((String::new(), String::new()), |(n, v)| {
                (n.clone(), format!("{v:.2}"))
            });
        println!(
            "  {:<9} {:<34} {:>12.2}  {:<26} {:>12} {:>7}  {:<30} {}",
            r.bench,
            r.figure,
            r.value,
            ref_name,
            ref_value,
            r.ratio.map_or(String::new(), |x| format!("{x:.2}")),
            r.target,
            match r.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_search(args: &SearchBenchArgs) -> anyhow::Result<ExitCode> {
    let curves = bench::search::load(&args.curves)?;
    let budget = args.budget.unwrap_or(20 * curves.n_epochs as u64);
    let seeds = parse_seeds(&args.seeds)?;
    let names: Vec<&str> = if args.searcher == "all" {
        bench::search::SEARCHERS.to_vec()
    } else {
        vec![args.searcher.as_str()]
    };
    let mut reports = serde_json::Map::new();
    for name in &names {
        let r = bench::search::run(
            &curves,
            &args.metric,
            name,
            budget,
            seeds.clone(),
            args.workers,
        )?;
        reports.insert(name.to_string(), serde_json::to_value(&r)?);
    }
    if args.json {
        println!("{}", serde_json::Value::Object(reports));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "search: {} ({} configs, R = {} epochs), metric {}, budget {budget} epochs, seeds {}, {} worker(s)",
        args.curves.display(),
        curves.configs.len(),
        curves.n_epochs,
        args.metric,
        args.seeds,
        args.workers
    );
    println!(
        "  {:<28} {:>12} {:>13} {:>9} {:>13} {:>8} {:>10}",
        "searcher",
        "mean_regret",
        "median_regret",
        "top5_hit",
        "top5_epochs",
        "trials",
        "top5_wall"
    );
    for (name, r) in &reports {
        println!(
            "  {:<28} {:>12.4} {:>13.4} {:>9.2} {:>13} {:>8.1} {:>10}",
            name,
            r["mean_regret"].as_f64().unwrap_or(0.0),
            r["median_regret"].as_f64().unwrap_or(0.0),
            r["top5_hit_rate"].as_f64().unwrap_or(0.0),
            r["top5_median_epochs"]
                .as_f64()
                .map_or("never".to_string(), |e| format!("{e:.0}")),
            r["trials"].as_f64().unwrap_or(0.0),
            r["top5_median_wall_epochs"]
                .as_f64()
                .map_or("never".to_string(), |e| format!("{e:.0}")),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_sim(
    json: bool,
    quick: bool,
    file: &std::path::Path,
    seed: u64,
) -> anyhow::Result<ExitCode> {
    let r = bench::sim::run(file, seed, quick)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "simulator: {} seed {} ({:.0} simulated s in {:.1} wall s)",
        r.scenario, r.seed, r.simulated_s, r.wall_s
    );
    println!(
        "  {:<18} {:>10.0}   target >= {:.0}: {}",
        "sim_s_per_wall_s",
        r.sim_s_per_wall_s,
        r.sim_s_per_wall_s_target,
        met(r.sim_s_per_wall_s >= r.sim_s_per_wall_s_target)
    );
    println!(
        "  {:<18} {:>10.3}   target >= {:.2}: {}",
        "gpu_goodput",
        r.gpu_goodput,
        r.gpu_goodput_target,
        met(r.gpu_goodput >= r.gpu_goodput_target)
    );
    println!("  {:<18} {:>10.0}", "work_lost_gpu_s", r.work_lost_gpu_s);
    println!("  {:<18} {:>10.1}", "recovery_s_p99", r.recovery_s_p99);
    println!("  {:<18} {:>10}", "violations", r.violations);
    Ok(ExitCode::SUCCESS)
}

fn bench_recovery(json: bool, rounds: usize) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    let dir = std::env::temp_dir().join(format!("resolute-bench-recovery-{}", std::process::id()));
    let r = bench::recovery::run(&dir, rounds)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "recovery: 3 local nodes, SIGKILL of the node running a trial ({} rounds; lease {} ms, disconnect grace {} ms)",
        r.rounds.len(),
        r.lease_timeout_ms,
        r.disconnect_grace_ms
    );
    println!("  {:<14} {:>8.0}", "detect_ms", r.detect_ms);
    println!(
        "  {:<14} {:>8.0}   target <= {:.0}: {}",
        "restart_ms",
        r.restart_ms,
        r.restart_target_ms,
        if r.pass { "met" } else { "NOT met" }
    );
    println!("  {:<14} {:>8.0}", "transfer_ms", r.transfer_ms);
    Ok(ExitCode::SUCCESS)
}

fn bench_submit(json: bool, count: usize) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(count >= 1, "--count must be at least 1");
    let dir = std::env::temp_dir().join(format!("resolute-bench-submit-{}", std::process::id()));
    let r = bench::submit::run(&dir, count)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "submission: submit to a follower -> first trial process started ({} submissions)",
        r.submissions
    );
    println!(
        "  {:<24} {:>8.1}   target <= {:.0}: {}",
        "submit_to_start_ms_p50",
        r.submit_to_start_ms_p50,
        r.p50_target_ms,
        if r.pass { "met" } else { "NOT met" }
    );
    println!(
        "  {:<24} {:>8.1}",
        "submit_to_start_ms_p99", r.submit_to_start_ms_p99
    );
    Ok(ExitCode::SUCCESS)
}

fn bench_sched(json: bool) -> anyhow::Result<ExitCode> {
    let r = bench::sched::run();
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("scheduler on apply: 1,000 nodes x 8 GPUs, 20,000 queued trials in 50 experiments");
    println!(
        "  {:<28} {:>12.0}   target >= 20000",
        "placements_per_s", r.placements_per_s
    );
    println!("  {:<28} {:>12.1}", "apply_us_p50", r.apply_us_p50);
    println!("  {:<28} {:>12.1}", "apply_us_p99", r.apply_us_p99);
    println!(
        "  {:<28} {:>12.1}   (10x finished history)",
        "apply_us_p50_10x_history", r.apply_us_p50_10x_history
    );
    println!(
        "  {:<28} {:>12.1}   (10x finished history)",
        "apply_us_p99_10x_history", r.apply_us_p99_10x_history
    );
    Ok(ExitCode::SUCCESS)
}

fn bench_state(json: bool, quick: bool) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("resolute-bench-state-{}", std::process::id()));
    let opts = if quick {
        bench::state::Options::quick(dir)
    } else {
        bench::state::Options::full(dir)
    };
    let r = bench::state::run(&opts)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).context("rendering the report")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "cluster state: {} experiments, {} trials, {} metric points ({} reports), 3 nodes, built in {:.0} s",
        r.experiments, r.trials, r.metric_points, r.reports, r.build_s
    );
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "rss_mib_before",
            format!("{:.0}", r.rss_mib_before),
            "three nodes, before the points",
        ),
        (
            "rss_mib_after",
            format!("{:.0}", r.rss_mib_after),
            "after them",
        ),
        (
            "state_bytes_before",
            r.state_bytes_before.to_string(),
            "the leader's control state",
        ),
        (
            "state_bytes_after",
            r.state_bytes_after.to_string(),
            "must not grow with the points",
        ),
        (
            "snapshot_bytes",
            r.snapshot_bytes.to_string(),
            "what a joining node receives by Raft",
        ),
        (
            "tracking_db_bytes",
            r.tracking_db_bytes.to_string(),
            "the leader's SQLite store",
        ),
        (
            "join_catch_up_s",
            format!("{:.2}", r.join_catch_up_s),
            "a fresh 4th node",
        ),
        (
            "join_missing_reports",
            r.join_missing_reports.to_string(),
            "reports the snapshot did not carry",
        ),
        (
            "tracking_copy_s",
            format!("{:.2}", r.tracking_copy_s),
            "the leader's store copied and installed",
        ),
        (
            "join_store_agrees",
            r.join_store_agrees.to_string(),
            "then the same rows as the leader",
        ),
        (
            "metrics_query_ms_p99",
            format!("{:.2}", r.metrics_query_ms_p99),
            "1,000 latest validation points",
        ),
        (
            "experiments_list_ms_p99",
            format!("{:.2}", r.experiments_list_ms_p99),
            "100 by best metric",
        ),
        (
            "apply_records_per_s",
            format!("{:.0}", r.apply_records_per_s),
            "with the tracking store",
        ),
        (
            "log_records_per_s",
            format!("{:.0}", r.log_records_per_s),
            "bench log, same run",
        ),
        (
            "apply_over_log",
            format!("{:.2}", r.apply_over_log),
            "target >= 0.8",
        ),
        (
            "writer_records_per_s",
            format!("{:.0}", r.writer_records_per_s),
            "one store's writer, per busy second",
        ),
        (
            "stores_agree",
            r.stores_agree.to_string(),
            "same rows on the three nodes",
        ),
    ];
    for (name, value, note) in rows {
        println!("  {name:<26} {value:>14}   {note}");
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_log(args: &LogBenchArgs) -> anyhow::Result<ExitCode> {
    if args.seconds <= 0.0 || args.records_per_entry == 0 || args.outstanding == 0 {
        anyhow::bail!("--seconds, --records-per-entry and --outstanding must be positive");
    }
    let dir = std::env::temp_dir().join(format!("resolute-bench-log-{}", std::process::id()));
    let opts = bench::log::Options {
        seconds: args.seconds,
        records_per_entry: args.records_per_entry,
        outstanding: args.outstanding,
        values_per_record: args.values_per_record.max(2),
        dir,
    };
    let r = bench::log::run(&opts)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&r).context("rendering the report")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "experiment log, 3 voters, real fsync ({:.1} s, {} records/entry, {} outstanding)",
        r.seconds, args.records_per_entry, args.outstanding
    );
    println!(
        "  {:<28} {:>14.0}   target >= 100000",
        "records_per_s", r.records_per_s
    );
    println!("  {:<28} {:>14.0}", "entries_per_s", r.entries_per_s);
    println!(
        "  {:<28} {:>14.1}",
        "records_per_fsync", r.records_per_fsync
    );
    println!(
        "  {:<28} {:>14.0}   (reference: raw append+fsync)",
        "fsyncs_per_s_raw", r.fsyncs_per_s_raw
    );
    println!(
        "  {:<28} {:>14.3}",
        "commit_latency_ms_p50", r.commit_latency_ms_p50
    );
    println!(
        "  {:<28} {:>14.3}",
        "commit_latency_ms_p99", r.commit_latency_ms_p99
    );
    println!(
        "  {:<28} {:>14.3}",
        "raw_fsync_latency_ms_p50", r.raw_fsync_latency_ms_p50
    );
    println!(
        "  {:<28} {:>14.2}   target <= 5",
        "p99_over_raw_fsync", r.p99_over_raw_fsync
    );
    Ok(ExitCode::SUCCESS)
}

fn simulated(config: &ExperimentConfig, seed: u64) -> anyhow::Result<Preview> {
    let method = &config.searcher.method;
    let max_time = method.budget().map_or(1, |b| b.max_time);
    // Stopping-based ASHA decides at rung boundaries, so trials must validate there.
    let period = match method {
        SearchMethod::AsyncHalving {
            num_rungs,
            divisor,
            budget,
            ..
        } => make_rungs(*num_rungs, *divisor, budget.max_time)
            .first()
            .copied(),
        SearchMethod::AdaptiveAsha {
            divisor, budget, ..
        } => adaptive_brackets(method)
            .iter()
            .filter_map(|b| {
                make_rungs(b.num_rungs, *divisor, budget.max_time)
                    .first()
                    .copied()
            })
            .min(),
        _ => None,
    };
    let mut searcher = Searcher::new(&config.searcher, &config.hyperparameters, seed);
    let mut curves = SyntheticCurves {
        seed,
        tau: (max_time as f64 / 10.0).max(1.0),
    };
    let report = run(&mut searcher, &mut curves, period).context("simulating the search")?;
    Ok(report.preview)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `resolute ... | head` ends like any Unix tool when `head` has read enough: Rust
/// ignores SIGPIPE, so `println!` would panic on the closed pipe instead. Only for
/// commands that print and exit; the daemon, the quick start and the benchmarks
/// keep SIGPIPE ignored (their sockets report EPIPE as an error, not a death).
#[allow(unsafe_code)]
fn stop_quietly_when_stdout_closes() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler code, and no other thread runs yet.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
