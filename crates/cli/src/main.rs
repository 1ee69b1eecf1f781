//! `resolute`: the command-line interface.
//!
//! Exit codes: 0 success, 1 user error (bad config, bad arguments, a usage
//! error), 2 the cluster unavailable (no node reached, no quorum).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

mod access;
mod bench;
mod client;
mod config_file;
mod deploy;
mod local_cluster;
mod quickstart;
mod table;
mod train;
use clap::{Parser, Subcommand};

use crate::bench::command::BenchCommand;

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
    #[command(
        visible_alias = "e",
        after_help = "Examples:\n  resolute e create exp.yaml ./model_dir --follow\n  \
                      DET_MASTER=host:8080 resolute e list --limit 10 --csv"
    )]
    Experiment {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: client::ExperimentCommand,
    },
    /// Looks at trials.
    #[command(
        visible_alias = "t",
        after_help = "Examples:\n  resolute t logs 7 -f\n  resolute t metrics 7 --group validation --json"
    )]
    Trial {
        #[command(flatten)]
        target: client::Target,
        #[command(subcommand)]
        command: client::TrialCommand,
    },
    /// Lists and downloads checkpoints.
    #[command(visible_alias = "cp")]
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
    /// The Python client (`determined`, `resolute`) for running training code
    /// off a cluster; a node gives it to its trials by itself.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Prints a shell completion script: `resolute completions bash >
    /// ~/.local/share/bash-completion/completions/resolute`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
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
    /// Writes a node's config for its role (the shipped config/ROLE.toml with
    /// the data dir and the peers to join), and puts the cluster key and the
    /// join token in its data dir (readable by their owner only).
    #[command(
        after_help = "Examples:\n  resolute node init --role onprem --data-dir /var/lib/resolute \\\n      --join /ip4/203.0.113.10/tcp/4001 --cluster-key cluster.key --join-token \"$(resolute cluster join-token)\"\n  resolute node init --role laptop --data-dir n1"
    )]
    Init {
        /// onprem, cloud or laptop.
        #[arg(long, value_enum)]
        role: deploy::Role,
        /// The node's data dir (made if missing).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the config (default DATA_DIR/node.toml; never replaced).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A member's multiaddr to join through (repeatable).
        #[arg(long)]
        join: Vec<String>,
        /// The cluster's key file (from the bootstrap node's data dir).
        #[arg(long)]
        cluster_key: Option<PathBuf>,
        /// A join token (`resolute cluster join-token`), kept for the service.
        #[arg(long, env = "RESOLUTE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
    },
    /// Prints the systemd unit that runs a node on a server (restart on
    /// failure; SIGTERM drains it).
    #[command(
        after_help = "Example:\n  resolute node systemd --config /etc/resolute/node.toml --data-dir /var/lib/resolute \\\n      > /etc/systemd/system/resolute.service && systemctl enable --now resolute"
    )]
    Systemd {
        /// The node's config.
        #[arg(long)]
        config: PathBuf,
        /// The node's data dir (default /var/lib/resolute).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The resolute binary (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The user the node runs as (default: root, which trial isolation needs).
        #[arg(long)]
        user: Option<String>,
    },
    /// Prints cloud-init user-data that installs and starts a node on a fresh VM:
    /// its config, the cluster key, the join token, the binary, the systemd unit.
    #[command(
        after_help = "Example:\n  resolute node cloud-init --role cloud --join /ip4/203.0.113.10/tcp/4001 \\\n      --cluster-key n1/cluster.key --join-token \"$(resolute cluster join-token)\" \\\n      --binary-url https://example.org/resolute > user-data.yaml"
    )]
    CloudInit {
        /// onprem, cloud or laptop (default cloud).
        #[arg(long, value_enum, default_value = "cloud")]
        role: deploy::Role,
        /// A member's multiaddr to join through (repeatable).
        #[arg(long)]
        join: Vec<String>,
        /// The cluster's key file.
        #[arg(long)]
        cluster_key: PathBuf,
        /// A join token (`resolute cluster join-token`).
        #[arg(long, env = "RESOLUTE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
        /// Where the VM downloads the resolute binary from (http or https).
        #[arg(long)]
        binary_url: String,
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
enum ClientCommand {
    /// Writes the client this binary carries into a directory and prints it,
    /// for `PYTHONPATH`: `PYTHONPATH=$(resolute client path) python3 train.py`.
    /// Nothing is installed into Python, so a real `determined` stays as it is.
    Path {
        /// Where to write it (default: ~/.cache/resolute/client-VERSION).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on a usage error; here 2 means "cluster unavailable".
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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
            | CliCommand::Completions { .. }
            | CliCommand::Client { .. }
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
            command:
                NodeCommand::Init {
                    role,
                    data_dir,
                    config,
                    join,
                    cluster_key,
                    join_token,
                },
        } => deploy::init(&deploy::Init {
            role,
            data_dir: &data_dir,
            config: config.as_deref(),
            join: &join,
            cluster_key: cluster_key.as_deref(),
            join_token: join_token.as_deref(),
        })
        .map(|()| ExitCode::SUCCESS),
        CliCommand::Node {
            command:
                NodeCommand::Systemd {
                    config,
                    data_dir,
                    binary,
                    user,
                },
        } => deploy::systemd(
            &config,
            &data_dir.unwrap_or_else(deploy::default_data_dir),
            binary.as_deref(),
            user.as_deref(),
        )
        .map(|()| ExitCode::SUCCESS),
        CliCommand::Node {
            command:
                NodeCommand::CloudInit {
                    role,
                    join,
                    cluster_key,
                    join_token,
                    binary_url,
                },
        } => deploy::cloud_init(&deploy::CloudInit {
            role,
            join: &join,
            cluster_key: &cluster_key,
            join_token: join_token.as_deref(),
            binary_url: &binary_url,
        })
        .map(|()| ExitCode::SUCCESS),
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
        CliCommand::Client {
            command: ClientCommand::Path { dir },
        } => client_path(dir),
        CliCommand::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "resolute",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        CliCommand::Bench { command } => bench::command::run(command),
        CliCommand::Sim(args) => sim(&args),
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

pub(crate) fn parse_seeds(text: &str) -> anyhow::Result<std::ops::Range<u64>> {
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
    if r.recovery_s_p50_by_sites
        .keys()
        .any(|k| k.split_once("->").is_some_and(|(a, b)| a != b))
    {
        let by: Vec<String> = r
            .recovery_s_p50_by_sites
            .iter()
            .map(|(k, s)| format!("{k} {s:.1} s"))
            .collect();
        println!("  recovery p50     {}", by.join(", "));
    }
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
    if r.relayed_messages > 0 {
        println!(
            "  relayed          {} messages, {:.1} MB of checkpoints",
            r.relayed_messages,
            r.relayed_bytes as f64 / 1e6
        );
    }
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

fn client_path(dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = match dir {
        Some(d) => d,
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set: pass --dir")?;
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map_or_else(|| PathBuf::from(home).join(".cache"), PathBuf::from);
            cache
                .join("resolute")
                .join(format!("client-{}", env!("CARGO_PKG_VERSION")))
        }
    };
    resolute_trial::client::install(&dir).with_context(|| format!("writing {}", dir.display()))?;
    println!("{}", dir.display());
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
