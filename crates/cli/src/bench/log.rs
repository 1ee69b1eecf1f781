//! `resolute bench log`: the experiment log's throughput and commit latency.
//!
//! A 3-voter cluster of real `core::Node`s runs in this process (`cluster`),
//! each with a real `DurableStore` in a temp dir (fsync for real). Clients propose metric batches as
//! trials would, keeping several proposals outstanding; each node writes every
//! pending Ready of a round and fsyncs once (group commit). In the same run the
//! disk's plain append + fsync rate is measured as the reference.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId};
use resolute_core::state::TrialState;
use resolute_core::Reply;
use resolute_types::Value;

use super::cluster::{Cluster, Shape};
use super::quantile;

/// Bytes written before each fsync of the raw reference.
const RAW_WRITE_BYTES: usize = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds of measurement (after the cluster forms).
    pub seconds: f64,
    /// Metric records per log entry (a trial's report batch).
    pub records_per_entry: usize,
    /// Proposals kept in flight by the clients.
    pub outstanding: usize,
    /// Values per record (`loss`, `batches`, then `m2`, `m3`, ...).
    pub values_per_record: usize,
    /// Where the temp dirs go.
    pub dir: PathBuf,
}

/// The figures (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Metric records committed and applied per second.
    pub records_per_s: f64,
    /// Log entries committed per second.
    pub entries_per_s: f64,
    /// The disk's plain append + fsync rate (the reference).
    pub fsyncs_per_s_raw: f64,
    /// Records per leader fsync (group commit).
    pub records_per_fsync: f64,
    /// Median proposal-to-applied latency.
    pub commit_latency_ms_p50: f64,
    /// 99th percentile proposal-to-applied latency.
    pub commit_latency_ms_p99: f64,
    /// Median latency of one raw append + fsync.
    pub raw_fsync_latency_ms_p50: f64,
    /// p99 commit latency over median raw fsync latency (target ≤ 5).
    pub p99_over_raw_fsync: f64,
    /// Records committed in the measurement.
    pub records: u64,
    /// Seconds measured.
    pub seconds: f64,
}

/// Runs the benchmark.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let (raw_rate, raw_p50) = raw_fsync(&opts.dir.join("raw.bin"), opts.seconds.min(2.0))?;
    let mut cluster = Cluster::new(
        &opts.dir,
        Shape {
            slots: [16; 3],
            // The log alone: `bench state` measures it with the tracking store.
            track: false,
            // Keep snapshots out of the measurement window's way.
            snapshot_entries: 1_000_000,
            snapshot_log_bytes: u64::MAX,
        },
    )?;
    cluster.form()?;
    let trials = start_trials(&mut cluster)?;
    let measured = measure(&mut cluster, opts, &trials)?;
    let report = Report {
        records_per_s: measured.records as f64 / measured.seconds,
        entries_per_s: measured.entries as f64 / measured.seconds,
        fsyncs_per_s_raw: raw_rate,
        records_per_fsync: measured.records as f64 / measured.leader_fsyncs.max(1) as f64,
        commit_latency_ms_p50: measured.p50_ms,
        commit_latency_ms_p99: measured.p99_ms,
        raw_fsync_latency_ms_p50: raw_p50,
        p99_over_raw_fsync: measured.p99_ms / raw_p50.max(1e-6),
        records: measured.records,
        seconds: measured.seconds,
    };
    drop(cluster);
    std::fs::remove_dir_all(&opts.dir).ok();
    Ok(report)
}

/// Appends 4 KiB and fsyncs, for `seconds`; returns (fsyncs per second, p50 ms).
fn raw_fsync(path: &Path, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let block = vec![0xa5u8; RAW_WRITE_BYTES];
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    Ok((rate, quantile(&mut lat, 0.5)))
}

struct Measured {
    records: u64,
    entries: u64,
    seconds: f64,
    leader_fsyncs: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Creates an experiment of 32 trials; the ones placed on the leader (which
/// proposes their reports, as the node running a trial does).
pub(super) fn start_trials(c: &mut Cluster) -> anyhow::Result<Vec<(u64, u64)>> {
    let yaml = "hyperparameters: {lr: {type: double, minval: 0.0001, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 32, max_concurrent_trials: 32}\n";
    let id = c.propose(Command::ExperimentCreated {
        config_yaml: yaml.into(),
        overrides: Vec::new(),
        owner: "bench".into(),
        model_digest: String::new(),
        default_seed: 1,
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.replies.contains_key(&id) {
        if Instant::now() > deadline {
            bail!("the experiment was not created in 10 s");
        }
        c.round()?;
    }
    let leader = c.leader().context("no leader")?;
    let trials: Vec<(u64, u64)> = c.members[&leader]
        .node
        .state()
        .trials
        .iter()
        // The leader proposes the reports, and a node reports only for
        // trials it runs (others' records would be refused on apply).
        .filter(|(_, t)| {
            matches!(
                t.state,
                TrialState::Assigned { .. } | TrialState::Running { .. }
            ) && t.is_placed_on(leader)
        })
        .map(|(id, t)| (*id, t.incarnation))
        .collect();
    if trials.is_empty() {
        bail!("no trial was placed");
    }
    Ok(trials)
}

fn measure(c: &mut Cluster, opts: &Options, trials: &[(u64, u64)]) -> anyhow::Result<Measured> {
    let leader = c.leader().context("no leader")?;
    let fsyncs_before = c.members[&leader].fsyncs;
    let mut in_flight: BTreeMap<ProposalId, Instant> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut records = 0u64;
    let mut entries = 0u64;
    let mut step = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(opts.seconds);
    while Instant::now() < end {
        while in_flight.len() < opts.outstanding {
            step += 1;
            let batch: Vec<MetricRecord> = (0..opts.records_per_entry)
                .map(|i| {
                    let (trial, incarnation) = trials[(step as usize + i) % trials.len()];
                    let mut metrics = BTreeMap::new();
                    metrics.insert("loss".to_string(), Value::Float(1.0 / (1.0 + step as f64)));
                    metrics.insert("batches".to_string(), Value::Int(step as i64));
                    for v in 2..opts.values_per_record {
                        metrics.insert(
                            format!("m{v}"),
                            Value::Float(v as f64 / (1.0 + step as f64)),
                        );
                    }
                    MetricRecord {
                        trial,
                        incarnation,
                        kind: MetricKind::Training,
                        steps_completed: step,
                        metrics,
                    }
                })
                .collect();
            let id = c.propose(Command::Metrics { records: batch })?;
            in_flight.insert(id, Instant::now());
        }
        c.round()?;
        let done: Vec<ProposalId> = in_flight
            .keys()
            .filter(|id| c.replies.contains_key(id))
            .copied()
            .collect();
        for id in done {
            if let (Some(t), Some(reply)) = (in_flight.remove(&id), c.replies.remove(&id)) {
                if !matches!(reply, Reply::Ok) {
                    bail!("a metrics batch was refused: {reply:?}");
                }
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                records += opts.records_per_entry as u64;
                entries += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let leader_fsyncs = c.members[&leader].fsyncs - fsyncs_before;
    let mut l2 = latencies.clone();
    Ok(Measured {
        records,
        entries,
        seconds,
        leader_fsyncs,
        p50_ms: quantile(&mut latencies, 0.5),
        p99_ms: quantile(&mut l2, 0.99),
    })
}
