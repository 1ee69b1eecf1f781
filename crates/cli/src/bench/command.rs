//! `resolute bench ...`: the subcommands, their arguments, and the printing of
//! each benchmark's figures (the measuring is in the sibling modules).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::bench;
use crate::parse_seeds;

#[derive(Subcommand)]
pub enum BenchCommand {
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
    /// Across sites: a cloud node and two on-prem nodes behind NATs, in
    /// network namespaces (needs root): submit-to-start by site, recovery
    /// after SIGKILL of an on-prem node, relayed and direct transfer rates
    /// beside raw TCP.
    Wan {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Experiments of four trials timed from submission to start.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Size of the model directory's payload, in MiB.
        #[arg(long, default_value_t = 64)]
        payload_mb: u64,
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
pub struct SearchBenchArgs {
    /// The curves file (curves-v1 JSON).
    #[arg(long, default_value = "benches/curves/synthetic-v1.json")]
    pub curves: PathBuf,
    /// The metric to optimize (one of the file's `metrics`).
    #[arg(long, default_value = "validation_loss")]
    pub metric: String,
    /// Epochs the worker may train per run (default: 20 x n_epochs).
    #[arg(long)]
    pub budget: Option<u64>,
    /// Seeds `A..B` (B exclusive): one run each.
    #[arg(long, default_value = "0..50")]
    pub seeds: String,
    /// One searcher, or `all`.
    #[arg(long, default_value = "all")]
    pub searcher: String,
    /// Workers training at once (the parallel view: wall-clock time to the top 5%).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Print one JSON object keyed by searcher.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct LogBenchArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Metric records per log entry.
    #[arg(long, default_value_t = 256)]
    pub records_per_entry: usize,
    /// Proposals kept in flight (concurrently reporting trials).
    #[arg(long, default_value_t = 4)]
    pub outstanding: usize,
    /// Metric values per record.
    #[arg(long, default_value_t = 2)]
    pub values_per_record: usize,
}

/// Runs one `resolute bench` command.
pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Log(args) => bench_log(&args),
        BenchCommand::Sched { json } => bench_sched(json),
        BenchCommand::Transfer { json, size_mb } => bench_transfer(json, size_mb),
        BenchCommand::Gossip { json } => bench_gossip(json),
        BenchCommand::State { json, quick } => bench_state(json, quick),
        BenchCommand::All { json, quick } => bench_all(json, quick),
        BenchCommand::Search(args) => bench_search(&args),
        BenchCommand::Sim {
            json,
            quick,
            file,
            seed,
        } => bench_sim(json, quick, &file, seed),
        BenchCommand::Recovery { json, rounds } => bench_recovery(json, rounds),
        BenchCommand::Submit { json, count } => bench_submit(json, count),
        BenchCommand::Wan {
            json,
            rounds,
            payload_mb,
        } => bench_wan(json, rounds, payload_mb),
    }
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

fn bench_wan(json: bool, rounds: usize, payload_mb: u64) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        (1..=512).contains(&payload_mb),
        "--payload-mb must be between 1 and 512"
    );
    let dir = std::env::temp_dir().join(format!("resolute-bench-wan-{}", std::process::id()));
    let r = bench::wan::run(&dir, rounds, payload_mb)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "wan: a cloud node and two NATed on-prem nodes (dc1, dc2) in network namespaces; \
         netem {}; dc1 reaches dc2 {}",
        if r.netem {
            "20 ms + 0.5% loss a hop"
        } else {
            "unavailable (no added latency)"
        },
        r.dc1_to_dc2
    );
    println!(
        "  submit on dc1 -> start   p50 {:.0} ms over {} rounds of 4 trials",
        r.submit_to_start_ms_p50, r.rounds
    );
    for (site, ms) in &r.submit_to_start_ms_p50_by_site {
        println!("    on {site:<8}             p50 {ms:.0} ms");
    }
    println!(
        "  SIGKILL dc2 -> running   {:.0} ms (on {})",
        r.recovery_ms, r.recovered_on
    );
    for t in &r.transfers {
        let from: Vec<String> = t.from.iter().map(|(s, v)| format!("{s} {v}")).collect();
        println!(
            "  fetch to {:<6} {:>6.1} MB in {:>6} ms = {:>7.1} MB/s from {} ({} chunks relayed)",
            t.to_site,
            t.bytes as f64 / 1e6,
            t.ms,
            t.mb_s,
            from.join(", "),
            t.relayed_chunks
        );
    }
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} MB/s"));
    println!(
        "  direct {}, hole-punched {}, relayed {}; raw TCP dc1 -> cloud {:.1} MB/s",
        rate(r.direct_mb_s),
        rate(r.hole_punched_mb_s),
        rate(r.relayed_mb_s),
        r.raw_tcp_mb_s
    );
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
            "writer_cpu_records_per_s",
            format!("{:.0}", r.writer_cpu_records_per_s),
            "one store's writer, per second of its CPU",
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
