//! `resolute bench state`: a cluster history of years in minutes, through the
//! real apply path, and what it costs.
//!
//! Three real `core::Node`s in this process (`cluster`), each with its durable
//! log and its SQLite tracking store, apply a history as a cluster sees one:
//! waves of `WAVE_TRIALS` trials run at once (two per experiment), report
//! their metrics (reports of ten values, proposed by the node that runs them,
//! in batches as trials report them) and complete, until 10,000 experiments
//! (20,000 trials) are done; the last wave's trials then train on and report
//! the other half of the 20,000,000 points. Measured: the process's resident
//! memory and the leader's encoded control state before and after that last
//! half (the trials are the same; only points are added: the state must not
//! grow with them), the snapshot a joining node receives, how long a fresh
//! fourth node takes to reach the leader's applied index and digest and to
//! fill its store from the leader's copy, the p99 of the queries users make (a
//! trial's 1,000 latest validation points; a page of 100 experiments sorted by
//! best metric), and the rate reports apply at with the tracking store while
//! the last wave reports, against `bench log`'s rate without it, with records
//! of the same shape, in the same run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId, TrialOutcome};
use resolute_core::state::TrialState;
use resolute_core::Reply;
use resolute_tracking::{ExperimentFilter, ExperimentSort, MetricsQuery, Reader, SortOrder};
use resolute_types::Value;

use super::cluster::{Cluster, Shape};
use super::quantile;

/// Queries timed per kind.
const QUERIES: usize = 200;
/// Trials that run at once (node 1's slots): a wave.
const WAVE_TRIALS: u64 = 64;
/// Validation points each long trial gets (the metrics query reads them).
const LONG_TRIAL_VALIDATIONS: u64 = 1_000;
/// Experiment creations kept in flight.
const CREATES_IN_FLIGHT: usize = 64;
/// Seconds a phase may take before the run gives up.
const PHASE_LIMIT_S: u64 = 3_600;

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Experiments (two trials each).
    pub experiments: u64,
    /// Metric points (values) in all.
    pub points: u64,
    /// Values per report.
    pub values_per_report: u64,
    /// Trials that get `LONG_TRIAL_VALIDATIONS` validation points.
    pub long_trials: usize,
    /// Reports per log entry.
    pub records_per_entry: usize,
    /// Metric proposals in flight.
    pub outstanding: usize,
    /// Seconds of `bench log`'s measurement (the reference).
    pub log_seconds: f64,
    /// Where the temp dirs go.
    pub dir: PathBuf,
}

impl Options {
    /// The size: 20,000 trials, 20,000,000 points.
    pub fn full(dir: PathBuf) -> Options {
        Options {
            experiments: 10_000,
            points: 20_000_000,
            values_per_report: 10,
            long_trials: 20,
            records_per_entry: 256,
            outstanding: 4,
            log_seconds: 5.0,
            dir,
        }
    }

    /// A tenth of it, and fewer points: for `--quick`.
    pub fn quick(dir: PathBuf) -> Options {
        Options {
            experiments: 1_000,
            points: 1_000_000,
            long_trials: 5,
            log_seconds: 2.0,
            ..Options::full(dir)
        }
    }
}

/// The figures (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Experiments in the history.
    pub experiments: u64,
    /// Trials in the history.
    pub trials: u64,
    /// Metric points (values) applied.
    pub metric_points: u64,
    /// Reports (records) applied.
    pub reports: u64,
    /// Resident memory of this process (three nodes) before the last wave's
    /// half of the points.
    pub rss_mib_before: f64,
    /// And after them.
    pub rss_mib_after: f64,
    /// The leader's encoded control state before the last wave's half of the
    /// points (every trial of the history exists by then).
    pub state_bytes_before: u64,
    /// And after them.
    pub state_bytes_after: u64,
    /// The snapshot a joining node receives through Raft (the control state;
    /// the tracking store follows as a blob, `tracking_db_bytes`).
    pub snapshot_bytes: u64,
    /// The leader's tracking store on disk.
    pub tracking_db_bytes: u64,
    /// A fresh node joins and reaches the leader's applied index and digest.
    pub join_catch_up_s: f64,
    /// Reports the joined node's store lacked after the snapshot (the
    /// snapshot carries the rows, not the reports).
    pub join_missing_reports: u64,
    /// Copying the leader's store and installing it on the joined node (what
    /// a node does to fill that gap, less the network transfer).
    pub tracking_copy_s: f64,
    /// Whether the joined node's store then equals the leader's, with no gap.
    pub join_store_agrees: bool,
    /// p99 of one trial's 1,000 latest validation points.
    pub metrics_query_ms_p99: f64,
    /// p99 of a page of 100 experiments sorted by best metric.
    pub experiments_list_ms_p99: f64,
    /// Reports applied per second with the tracking store (the last wave).
    pub apply_records_per_s: f64,
    /// `bench log`'s records per second, without it, in the same run.
    pub log_records_per_s: f64,
    /// `apply_records_per_s` over `log_records_per_s` (target: at least 0.8).
    pub apply_over_log: f64,
    /// Reports the leader's tracking writer wrote per second it was busy (on
    /// its own thread): what one store can take, whatever the log does.
    pub writer_records_per_s: f64,
    /// Reports a tracking writer wrote per second of its own CPU time in the
    /// last wave (the three writers' CPU time from the kernel's accounting):
    /// what one store takes on a core of its own. On a machine with fewer
    /// cores than this process's four busy threads (three writers and the
    /// nodes), `apply_records_per_s` is bounded by the CPU they share.
    pub writer_cpu_records_per_s: f64,
    /// Whether the three stores ended with the same rows (digest).
    pub stores_agree: bool,
    /// Seconds the whole history took to build.
    pub build_s: f64,
}

/// Runs the benchmark.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let log = super::log::run(&super::log::Options {
        seconds: opts.log_seconds,
        records_per_entry: opts.records_per_entry,
        outstanding: opts.outstanding,
        // Records of the same shape: the difference is the tracking store.
        values_per_record: opts.values_per_report as usize,
        dir: opts.dir.join("log-reference"),
    })?;
    let build = Instant::now();
    let trials = opts.experiments * 2;
    let mut c = Cluster::new(
        &opts.dir.join("cluster"),
        Shape {
            // Every trial on node 1, which bootstraps and leads: its reports
            // are proposed on the leader, as `bench log`'s are.
            slots: [WAVE_TRIALS as u32, 0, 0],
            track: true,
            // A node's defaults: the log is compacted as in production (its
            // entries are what fills the memory between snapshots).
            snapshot_entries: resolute_core::node::SNAPSHOT_ENTRIES_DEFAULT,
            snapshot_log_bytes: resolute_core::node::SNAPSHOT_LOG_BYTES_DEFAULT,
        },
    )?;
    c.form()?;
    let total = opts.points / opts.values_per_report;
    let waves = trials.div_ceil(WAVE_TRIALS);
    // Half the reports over every wave but the last, the other half to it.
    let per_trial = (total / 2 / trials.saturating_sub(WAVE_TRIALS).max(1)).max(1);
    let mut created = 0u64;
    let mut reports = 0u64;
    let mut last: Vec<(u64, u64, u64)> = Vec::new();
    for wave in 0..waves {
        let n = (opts.experiments - created).min(WAVE_TRIALS / 2);
        create_experiments(&mut c, created, n)?;
        created += n;
        let placed = placed_trials(&c)?;
        if wave + 1 == waves {
            last = placed;
            break;
        }
        let plan = Plan::even(&placed, per_trial);
        reports += report_points(&mut c, opts, &plan)?.0;
        complete(&mut c, &placed)?;
    }
    let leader = c.leader().context("no leader")?;
    let rss_mib_before = rss_mib();
    let state_bytes_before = encoded_state(&c, leader);
    let long: Vec<u64> = last.iter().take(opts.long_trials).map(|p| p.0).collect();
    let plan = Plan::last(&last, total.saturating_sub(reports), opts.long_trials);
    let load_before = c.writer_load(leader).unwrap_or_default();
    let writers_cpu_before = writers_cpu_s();
    let (last_reports, seconds) = report_points(&mut c, opts, &plan)?;
    reports += last_reports;
    c.flush_tracking()?;
    // The three writers' CPU time for the phase's reports, the flush included.
    let writers_cpu = writers_cpu_s() - writers_cpu_before;
    let writer_cpu_records_per_s = 3.0 * last_reports as f64 / writers_cpu.max(1e-9);
    let load_after = c.writer_load(leader).unwrap_or_default();
    let writer_records_per_s =
        (load_after.1 - load_before.1) as f64 / (load_after.0 - load_before.0).max(1e-9);
    let rss_mib_after = rss_mib();
    let leader = c.leader().context("no leader")?;
    let state_bytes_after = encoded_state(&c, leader);
    let build_s = build.elapsed().as_secs_f64();
    let file = c.tracking_file(leader);
    let tracking_db_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let (metrics_query_ms_p99, experiments_list_ms_p99) =
        time_queries(&file, &long, opts.experiments)?;
    let digests: Vec<String> = (1..=3)
        .map(|id| {
            Reader::open(&c.tracking_file(id))
                .and_then(|r| r.summary())
                .map(|s| s.digest)
        })
        .collect::<Result<_, _>>()?;
    let stores_agree = digests.windows(2).all(|w| w[0] == w[1]);
    let snapshot_bytes = encoded_state(&c, leader);
    let join_catch_up_s = c.join_fresh(4)?;
    c.flush_tracking()?;
    let join_missing_reports = Reader::open(&c.tracking_file(4))?
        .summary()?
        .gaps
        .iter()
        .map(|g| g.reports)
        .sum();
    let copied = Instant::now();
    if !c.fill_gap_from(4, leader)? && join_missing_reports > 0 {
        bail!("node 4 lacks {join_missing_reports} reports and took no copy");
    }
    let tracking_copy_s = copied.elapsed().as_secs_f64();
    let after_copy = Reader::open(&c.tracking_file(4))?.summary()?;
    let leader_summary = Reader::open(&c.tracking_file(leader))?.summary()?;
    let join_store_agrees =
        after_copy.digest == leader_summary.digest && after_copy.gaps.is_empty();
    let apply_records_per_s = last_reports as f64 / seconds;
    let report = Report {
        experiments: opts.experiments,
        trials,
        metric_points: reports * opts.values_per_report,
        reports,
        rss_mib_before,
        rss_mib_after,
        state_bytes_before,
        state_bytes_after,
        snapshot_bytes,
        tracking_db_bytes,
        join_catch_up_s,
        join_missing_reports,
        tracking_copy_s,
        join_store_agrees,
        metrics_query_ms_p99,
        experiments_list_ms_p99,
        apply_records_per_s,
        log_records_per_s: log.records_per_s,
        apply_over_log: apply_records_per_s / log.records_per_s.max(1e-9),
        writer_records_per_s,
        writer_cpu_records_per_s,
        stores_agree,
        build_s,
    };
    drop(c);
    std::fs::remove_dir_all(&opts.dir).ok();
    Ok(report)
}

/// The experiment every history is made of: two trials, done once they have
/// reported and exited (their length is one batch: any report reaches it).
fn experiment(n: u64) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "name: history-{n}
hyperparameters:
  lr: {{type: log, minval: -4, maxval: -1, base: 10}}
  width: {{type: int, minval: 8, maxval: 512}}
searcher: {{name: random, metric: loss, max_trials: 2, max_concurrent_trials: 2, max_length: {{batches: 1}}}}
"
        ),
        overrides: Vec::new(),
        owner: "bench".into(),
        model_digest: String::new(),
        default_seed: 1,
    }
}

/// Creates experiments `first + 1 ..= first + n`.
fn create_experiments(c: &mut Cluster, first: u64, n: u64) -> anyhow::Result<()> {
    let mut next = 0u64;
    let mut in_flight: Vec<ProposalId> = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(PHASE_LIMIT_S);
    while next < n || !in_flight.is_empty() {
        while next < n && in_flight.len() < CREATES_IN_FLIGHT {
            next += 1;
            in_flight.push(c.propose(experiment(first + next))?);
        }
        c.round()?;
        let mut refused = None;
        in_flight.retain(|id| match c.replies.remove(id) {
            Some(Reply::ExperimentCreated { .. }) | Some(Reply::Ok) => false,
            Some(other) => {
                refused = Some(other);
                false
            }
            None => true,
        });
        if let Some(r) = refused {
            bail!("an experiment was refused: {r:?}");
        }
        if Instant::now() > deadline {
            bail!("creating {n} experiments took over {PHASE_LIMIT_S} s");
        }
    }
    Ok(())
}

/// Every placed trial: (trial, incarnation, node).
fn placed_trials(c: &Cluster) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let leader = c.leader().context("no leader")?;
    let node = c.node(leader).context("no leader")?;
    Ok(node
        .state()
        .trials
        .iter()
        .filter_map(|(id, t)| match t.state {
            TrialState::Assigned { node } | TrialState::Running { node } => {
                Some((*id, t.incarnation, node))
            }
            _ => None,
        })
        .collect())
}

/// Which trial each report of a stream is for, and whether it is a
/// validation: the reports go round the trials.
struct Plan {
    /// (trial, incarnation, node, reports, validations first).
    trials: Vec<(u64, u64, u64, u64, u64)>,
}

impl Plan {
    /// `per_trial` reports for each trial, every tenth a validation.
    fn even(placed: &[(u64, u64, u64)], per_trial: u64) -> Plan {
        Plan {
            trials: placed
                .iter()
                .map(|(t, i, n)| (*t, *i, *n, per_trial, 0))
                .collect(),
        }
    }

    /// `total` reports over the last wave; its first `long` trials report
    /// `LONG_TRIAL_VALIDATIONS` validations first.
    fn last(placed: &[(u64, u64, u64)], total: u64, long: usize) -> Plan {
        let per_trial = (total / placed.len().max(1) as u64).max(1);
        Plan {
            trials: placed
                .iter()
                .enumerate()
                .map(|(k, (t, i, n))| {
                    let validations = if k < long { LONG_TRIAL_VALIDATIONS } else { 0 };
                    (*t, *i, *n, per_trial.max(validations), validations)
                })
                .collect(),
        }
    }
}

/// Streams a plan's reports: each node proposes the reports of the trials it
/// runs, `records_per_entry` to an entry, `outstanding` entries in flight, the
/// trials taking turns. Returns the reports applied and the seconds taken.
fn report_points(c: &mut Cluster, opts: &Options, plan: &Plan) -> anyhow::Result<(u64, f64)> {
    let total: u64 = plan.trials.iter().map(|t| t.3).sum();
    let mut sent: Vec<u64> = vec![0; plan.trials.len()];
    let mut turn = 0usize;
    let mut made = 0u64;
    let mut applied = 0u64;
    let mut in_flight: BTreeMap<ProposalId, u64> = BTreeMap::new();
    let start = Instant::now();
    let deadline = start + std::time::Duration::from_secs(PHASE_LIMIT_S);
    while applied < total {
        while in_flight.len() < opts.outstanding && made < total {
            let mut batches: BTreeMap<u64, Vec<MetricRecord>> = BTreeMap::new();
            let mut in_batch = 0usize;
            while in_batch < opts.records_per_entry && made < total {
                let k = turn % plan.trials.len();
                turn += 1;
                let (trial, incarnation, node, reports, validations) = plan.trials[k];
                if sent[k] >= reports {
                    continue;
                }
                sent[k] += 1;
                let step = sent[k];
                let validation = step <= validations || step % 10 == 0;
                batches.entry(node).or_default().push(record(
                    trial,
                    incarnation,
                    step,
                    validation,
                    opts,
                ));
                in_batch += 1;
                made += 1;
            }
            for (node, batch) in batches {
                let n = batch.len() as u64;
                let id = c.propose_on(node, Command::Metrics { records: batch });
                in_flight.insert(id, n);
            }
        }
        c.round()?;
        let done: Vec<ProposalId> = in_flight
            .keys()
            .filter(|id| c.replies.contains_key(id))
            .copied()
            .collect();
        for id in done {
            let n = in_flight.remove(&id).unwrap_or(0);
            match c.replies.remove(&id) {
                Some(Reply::Ok) => applied += n,
                other => bail!("a metrics batch was refused: {other:?}"),
            }
        }
        if Instant::now() > deadline {
            bail!("reporting took over {PHASE_LIMIT_S} s ({applied} of {total})");
        }
    }
    Ok((applied, start.elapsed().as_secs_f64()))
}

/// The wave's trials exit, completed: their experiments end.
fn complete(c: &mut Cluster, placed: &[(u64, u64, u64)]) -> anyhow::Result<()> {
    let ids: Vec<ProposalId> = placed
        .iter()
        .map(|(trial, incarnation, node)| {
            c.propose_on(
                *node,
                Command::TrialExited {
                    trial: *trial,
                    incarnation: *incarnation,
                    outcome: TrialOutcome::Completed,
                },
            )
        })
        .collect();
    let deadline = Instant::now() + std::time::Duration::from_secs(PHASE_LIMIT_S);
    while !ids.iter().all(|id| c.replies.contains_key(id)) {
        if Instant::now() > deadline {
            bail!("trial exits unanswered after {PHASE_LIMIT_S} s");
        }
        c.round()?;
    }
    for id in ids {
        if let Some(r @ (Reply::Rejected { .. } | Reply::Forbidden { .. })) = c.replies.remove(&id)
        {
            bail!("a trial's exit was refused: {r:?}");
        }
    }
    Ok(())
}

fn record(
    trial: u64,
    incarnation: u64,
    step: u64,
    validation: bool,
    opts: &Options,
) -> MetricRecord {
    let loss = 1.0 / (1.0 + step as f64 / 100.0) + (trial % 97) as f64 / 1000.0;
    let mut metrics = BTreeMap::new();
    metrics.insert("loss".to_string(), Value::Float(loss));
    for i in 1..opts.values_per_report {
        metrics.insert(format!("m{i}"), Value::Float(loss * i as f64));
    }
    MetricRecord {
        trial,
        incarnation,
        kind: if validation {
            MetricKind::Validation
        } else {
            MetricKind::Training
        },
        steps_completed: step,
        metrics,
    }
}

/// p99 milliseconds of the two queries: the latest 1,000 validation points of
/// a long trial; a page of 100 experiments sorted by best metric.
fn time_queries(
    file: &std::path::Path,
    long: &[u64],
    experiments: u64,
) -> anyhow::Result<(f64, f64)> {
    let reader = Reader::open(file)?;
    let mut metrics = Vec::new();
    for i in 0..QUERIES {
        let trial = long[i % long.len().max(1)];
        let t = Instant::now();
        let page = reader.trial_metrics(
            trial,
            &MetricsQuery {
                group: Some("validation".into()),
                limit: Some(LONG_TRIAL_VALIDATIONS as usize),
                order: SortOrder::Desc,
                ..Default::default()
            },
        )?;
        metrics.push(t.elapsed().as_secs_f64() * 1e3);
        if page.items.len() < LONG_TRIAL_VALIDATIONS as usize {
            bail!("trial {trial} has {} validation points", page.items.len());
        }
    }
    let pages = (experiments / 100).max(1);
    let mut lists = Vec::new();
    for i in 0..QUERIES {
        let t = Instant::now();
        let page = reader.experiments(&ExperimentFilter {
            sort: ExperimentSort::BestMetric,
            limit: Some(100),
            offset: (i as u64 * 37 % pages) * 100,
            ..Default::default()
        })?;
        lists.push(t.elapsed().as_secs_f64() * 1e3);
        if page.items.is_empty() {
            bail!("an empty page of experiments");
        }
    }
    Ok((quantile(&mut metrics, 0.99), quantile(&mut lists, 0.99)))
}

fn encoded_state(c: &Cluster, id: u64) -> u64 {
    c.node(id).map_or(0, |n| n.state().encode().len() as u64)
}

/// This process's resident memory (Linux), MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds the tracking writer threads of this process have used, in all
/// (Linux: each thread's `schedstat`; 0 elsewhere).
fn writers_cpu_s() -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "tracking" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}
