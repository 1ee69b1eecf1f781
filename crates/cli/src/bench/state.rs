//! `resolute bench state`: a cluster history of years in minutes, through the
//! real apply path, and what it costs.
//!
//! Three real `core::Node`s in this process (`cluster`), each with its durable
//! log and its SQLite tracking store, apply: 10,000 experiments of two trials
//! (20,000 trials, all placed), then 20,000,000 metric points (reports of ten
//! values, proposed by the node that runs each trial, in batches as trials
//! report them). Measured: the process's resident memory and the leader's
//! encoded control state before and after the points (the state must not grow
//! with them), the snapshot a joining node receives, how long a fresh fourth
//! node takes to reach the leader's applied index and digest, the p99 of the
//! queries users make (a trial's 1,000 latest validation points; a page of 100
//! experiments sorted by best metric), and the rate reports apply at with the
//! tracking store, against `bench log`'s rate without it measured in the same
//! run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId};
use resolute_core::state::TrialState;
use resolute_core::Reply;
use resolute_tracking::{ExperimentFilter, ExperimentSort, MetricsQuery, Reader, SortOrder};
use resolute_types::Value;

use super::cluster::{Cluster, Shape};
use super::quantile;

/// Queries timed per kind.
const QUERIES: usize = 200;
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
    /// Resident memory of this process (three nodes) before the points.
    pub rss_mib_before: f64,
    /// And after them.
    pub rss_mib_after: f64,
    /// The leader's encoded control state before the points.
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
    /// Reports applied per second with the tracking store.
    pub apply_records_per_s: f64,
    /// `bench log`'s records per second, without it, in the same run.
    pub log_records_per_s: f64,
    /// `apply_records_per_s` over `log_records_per_s` (target: at least 0.8).
    pub apply_over_log: f64,
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
            slots: [u32::try_from(trials).unwrap_or(u32::MAX), 0, 0],
            track: true,
            snapshot_entries: resolute_core::node::SNAPSHOT_ENTRIES_DEFAULT,
        },
    )?;
    c.form()?;
    create_experiments(&mut c, opts.experiments)?;
    let placed = placed_trials(&c)?;
    if (placed.len() as u64) < trials {
        bail!("{} of {trials} trials were placed", placed.len());
    }
    let leader = c.leader().context("no leader")?;
    let rss_mib_before = rss_mib();
    let state_bytes_before = encoded_state(&c, leader);
    let (reports, seconds) = report_points(&mut c, opts, &placed)?;
    let rss_mib_after = rss_mib();
    let leader = c.leader().context("no leader")?;
    let state_bytes_after = encoded_state(&c, leader);
    let build_s = build.elapsed().as_secs_f64();
    let file = c.tracking_file(leader);
    let tracking_db_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let long: Vec<u64> = placed.iter().take(opts.long_trials).map(|p| p.0).collect();
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
    let apply_records_per_s = reports as f64 / seconds;
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
        stores_agree,
        build_s,
    };
    drop(c);
    std::fs::remove_dir_all(&opts.dir).ok();
    Ok(report)
}

/// The experiment every history is made of: two trials that train "forever"
/// (the benchmark ends them by reporting, not by their length).
fn experiment(n: u64) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "name: history-{n}
hyperparameters:
  lr: {{type: log, minval: -4, maxval: -1, base: 10}}
  width: {{type: int, minval: 8, maxval: 512}}
searcher: {{name: random, metric: loss, max_trials: 2, max_concurrent_trials: 2, max_length: {{batches: 100000000}}}}
"
        ),
        overrides: Vec::new(),
        owner: "bench".into(),
        model_digest: String::new(),
        default_seed: 1,
    }
}

fn create_experiments(c: &mut Cluster, n: u64) -> anyhow::Result<()> {
    let mut next = 0u64;
    let mut in_flight: Vec<ProposalId> = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(PHASE_LIMIT_S);
    while next < n || !in_flight.is_empty() {
        while next < n && in_flight.len() < CREATES_IN_FLIGHT {
            next += 1;
            in_flight.push(c.propose(experiment(next))?);
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

/// Streams the points: each node proposes the reports of the trials it runs,
/// `records_per_entry` to an entry, the nodes taking turns. First the first
/// `long_trials` trials get `LONG_TRIAL_VALIDATIONS` validation reports each;
/// then the rest go round each node's trials, every tenth a validation.
/// Returns the reports applied and the seconds they took.
fn report_points(
    c: &mut Cluster,
    opts: &Options,
    placed: &[(u64, u64, u64)],
) -> anyhow::Result<(u64, f64)> {
    let total = opts.points / opts.values_per_report;
    let mut by_node: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for (trial, incarnation, node) in placed {
        by_node
            .entry(*node)
            .or_default()
            .push((*trial, *incarnation));
    }
    let mut long: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for (trial, incarnation, node) in placed.iter().take(opts.long_trials) {
        long.entry(*node).or_default().push((*trial, *incarnation));
    }
    let nodes: Vec<u64> = by_node.keys().copied().collect();
    let mut steps: BTreeMap<u64, u64> = BTreeMap::new();
    let mut cursor: BTreeMap<u64, usize> = BTreeMap::new();
    let mut long_left = (opts.long_trials as u64 * LONG_TRIAL_VALIDATIONS).min(total);
    let mut made = 0u64;
    let mut applied = 0u64;
    let mut turn = 0usize;
    let mut in_flight: BTreeMap<ProposalId, u64> = BTreeMap::new();
    let start = Instant::now();
    let deadline = start + std::time::Duration::from_secs(PHASE_LIMIT_S);
    while applied < total {
        while in_flight.len() < opts.outstanding && made < total {
            let node = nodes[turn % nodes.len()];
            turn += 1;
            let mut batch = Vec::with_capacity(opts.records_per_entry);
            while batch.len() < opts.records_per_entry && made < total {
                let at = cursor.entry(node).or_default();
                *at += 1;
                let long_here = long.get(&node).filter(|l| !l.is_empty() && long_left > 0);
                let ((trial, incarnation), validation) = match long_here {
                    Some(l) => {
                        long_left -= 1;
                        (l[*at % l.len()], true)
                    }
                    None => {
                        let mine = &by_node[&node];
                        (mine[*at % mine.len()], *at % 10 == 0)
                    }
                };
                let step = steps.entry(trial).or_default();
                *step += 1;
                batch.push(record(trial, incarnation, *step, validation, opts));
                made += 1;
            }
            let n = batch.len() as u64;
            let id = c.propose_on(node, Command::Metrics { records: batch });
            in_flight.insert(id, n);
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
