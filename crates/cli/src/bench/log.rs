//! `resolute bench log`: the experiment log's throughput and commit latency.
//!
//! A 3-voter cluster of real `core::Node`s runs in this process, each with a real
//! `DurableStore` in a temp dir (fsync for real). Clients propose metric batches as
//! trials would, keeping several proposals outstanding; each node writes every
//! pending Ready of a round and fsyncs once (group commit). In the same run the
//! disk's plain append + fsync rate is measured as the reference.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId};
use resolute_core::state::TrialState;
use resolute_core::{Input, Node, NodeConfig, NodeInfo, Output, Reply};
use resolute_storage::{DurableStore, LogStore};
use resolute_types::Value;

use super::quantile;

/// Bytes written before each fsync of the raw reference.
const RAW_WRITE_BYTES: usize = 4096;
/// Wall time between ticks, as a node would tick.
const TICK_EVERY: Duration = Duration::from_millis(100);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds of measurement (after the cluster forms).
    pub seconds: f64,
    /// Metric records per log entry (a trial's report batch).
    pub records_per_entry: usize,
    /// Proposals kept in flight by the clients.
    pub outstanding: usize,
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
    let mut cluster = Cluster::new(&opts.dir)?;
    cluster.form()?;
    let trials = cluster.start_trials()?;
    let measured = cluster.measure(opts, &trials)?;
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

struct Member {
    node: Node,
    store: DurableStore,
    persists: Vec<Output>,
    fsyncs: u64,
}

/// Carries out a node's pending writes with one fsync; returns what to acknowledge.
fn write_round(id: u64, m: &mut Member) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut seqs = Vec::new();
    for p in std::mem::take(&mut m.persists) {
        if let Output::Persist {
            seq,
            snapshot,
            entries,
            hard_state,
        } = p
        {
            if let Some(s) = &snapshot {
                m.store
                    .install_snapshot(s, &hard_state.unwrap_or_default())?;
            }
            m.store.append(&entries, hard_state.as_ref())?;
            seqs.push(seq);
        }
    }
    m.store.sync()?;
    m.fsyncs += 1;
    Ok((id, seqs))
}

struct Cluster {
    members: BTreeMap<u64, Member>,
    queue: VecDeque<(u64, u64, resolute_core::PeerMessage)>,
    start: Instant,
    last_tick: Instant,
    replies: BTreeMap<ProposalId, Reply>,
    next_id: u128,
}

struct Measured {
    records: u64,
    entries: u64,
    seconds: f64,
    leader_fsyncs: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Cluster {
    fn new(dir: &Path) -> anyhow::Result<Cluster> {
        let mut c = Cluster {
            members: BTreeMap::new(),
            queue: VecDeque::new(),
            start: Instant::now(),
            last_tick: Instant::now(),
            replies: BTreeMap::new(),
            next_id: 1,
        };
        for id in 1..=3u64 {
            let (store, rec) = DurableStore::open(&dir.join(format!("node-{id}")))?;
            let info = NodeInfo {
                site: format!("site-{id}"),
                slots: 16,
                ..Default::default()
            };
            let mut cfg = NodeConfig::new(id, info);
            // Keep snapshots out of the measurement window's way.
            cfg.snapshot_entries = 1_000_000;
            cfg.snapshot_log_bytes = u64::MAX;
            // The log alone: `bench state` measures the tracking store.
            cfg.track = false;
            let (node, outs) =
                Node::new(cfg, &rec, id == 1).map_err(|e| anyhow::anyhow!("node {id}: {e}"))?;
            c.members.insert(
                id,
                Member {
                    node,
                    store,
                    persists: Vec::new(),
                    fsyncs: 0,
                },
            );
            c.handle(id, outs);
        }
        Ok(c)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn input(&mut self, id: u64, input: Input) {
        let now = self.now_ms();
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        let outs = m.node.step(now, input);
        self.handle(id, outs);
    }

    fn handle(&mut self, id: u64, outs: Vec<Output>) {
        for out in outs {
            match out {
                Output::Send { to, msg } => self.queue.push_back((id, to, msg)),
                p @ Output::Persist { .. } => {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.persists.push(p);
                    }
                }
                Output::Reply {
                    id: pid,
                    result: Ok(reply),
                } => {
                    self.replies.insert(pid, reply);
                }
                // Failed proposals stay in flight and fail the run's accounting
                // visibly (they are never counted as committed).
                Output::Reply { result: Err(_), .. } | Output::Effect(_) | Output::Track(_) => {}
            }
        }
    }

    /// One round: deliver messages, then per node write everything pending with one
    /// fsync, then acknowledge; tick when due.
    fn round(&mut self) -> anyhow::Result<()> {
        while let Some((from, to, msg)) = self.queue.pop_front() {
            self.input(to, Input::Peer { from, msg });
        }
        // Each node writes on its own thread, as separate machines would: the three
        // fsyncs of a round overlap instead of queueing behind one another.
        let acks: Vec<(u64, Vec<u64>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .members
                .iter_mut()
                .filter(|(_, m)| !m.persists.is_empty())
                .map(|(id, m)| {
                    let id = *id;
                    scope.spawn(move || write_round(id, m))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a writer thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        for (id, seqs) in acks {
            for seq in seqs.into_iter().filter(|s| *s > 0) {
                self.input(id, Input::Persisted { seq });
            }
        }
        if self.last_tick.elapsed() >= TICK_EVERY {
            self.last_tick = Instant::now();
            for id in 1..=3u64 {
                self.input(id, Input::Tick);
                for other in 1..=3u64 {
                    if other != id {
                        self.input(other, Input::Heartbeat { node: id });
                    }
                }
            }
        }
        Ok(())
    }

    fn leader(&self) -> Option<u64> {
        self.members
            .values()
            .find(|m| m.node.is_leader())
            .map(|m| m.node.id())
    }

    fn form(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        self.input(2, Input::Join { via: 1 });
        self.input(3, Input::Join { via: 1 });
        while self.members[&1].node.membership().0.len() < 3 || self.leader().is_none() {
            if Instant::now() > deadline {
                bail!("the 3-node cluster did not form in 30 s");
            }
            self.round()?;
        }
        Ok(())
    }

    fn propose(&mut self, command: Command) -> anyhow::Result<ProposalId> {
        let leader = self.leader().context("no leader")?;
        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.input(
            leader,
            Input::Propose {
                id,
                command,
                user: None,
            },
        );
        Ok(id)
    }

    fn start_trials(&mut self) -> anyhow::Result<Vec<(u64, u64)>> {
        let yaml = "hyperparameters: {lr: {type: double, minval: 0.0001, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 32, max_concurrent_trials: 32}\n";
        let id = self.propose(Command::ExperimentCreated {
            config_yaml: yaml.into(),
            overrides: Vec::new(),
            owner: "bench".into(),
            model_digest: String::new(),
            default_seed: 1,
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.replies.contains_key(&id) {
            if Instant::now() > deadline {
                bail!("the experiment was not created in 10 s");
            }
            self.round()?;
        }
        let leader = self.leader().context("no leader")?;
        let trials: Vec<(u64, u64)> = self.members[&leader]
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

    fn measure(&mut self, opts: &Options, trials: &[(u64, u64)]) -> anyhow::Result<Measured> {
        let leader = self.leader().context("no leader")?;
        let fsyncs_before = self.members[&leader].fsyncs;
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
                        MetricRecord {
                            trial,
                            incarnation,
                            kind: MetricKind::Training,
                            steps_completed: step,
                            metrics,
                        }
                    })
                    .collect();
                let id = self.propose(Command::Metrics { records: batch })?;
                in_flight.insert(id, Instant::now());
            }
            self.round()?;
            let done: Vec<ProposalId> = in_flight
                .keys()
                .filter(|id| self.replies.contains_key(id))
                .copied()
                .collect();
            for id in done {
                if let (Some(t), Some(reply)) = (in_flight.remove(&id), self.replies.remove(&id)) {
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
        let leader_fsyncs = self.members[&leader].fsyncs - fsyncs_before;
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
}
