//! What a run measures for its report: GPU goodput and work lost, recovery
//! times, queue waits, shares per team and pool, and the Chrome trace.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::TrialId;
use resolute_core::NodeId;

use super::World;
use crate::report::{quantile, Report};

/// The run's measurements.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// When each trial's process last died uncleanly, and on which site (for
    /// its recovery time).
    interrupted: BTreeMap<TrialId, (u64, String)>,
    recoveries: Vec<f64>,
    /// Recovery times by the sites a trial moved between (`from->to`).
    recoveries_by_sites: BTreeMap<String, Vec<f64>>,
    /// When each trial entered the queue (sampled).
    pub(super) queued_since: BTreeMap<TrialId, u64>,
    queue_waits: Vec<f64>,
    allocated_gpu_ms: f64,
    useful_gpu_ms: f64,
    best_loss: BTreeMap<u64, f64>,
    /// GPU time per group while every group had work waiting.
    pub(super) group_gpu_ms: BTreeMap<String, f64>,
    /// Slot-milliseconds placed per scenario pool (sampled).
    pub(super) pool_gpu_ms: BTreeMap<usize, f64>,
    /// Trials placed across more than one node (gang placements seen).
    pub(super) multi_node_placements: BTreeSet<(u64, u64)>,
    /// GPU failures injected so far.
    pub(super) gpu_failures: u64,
    /// The Chrome trace (None unless asked for).
    trace: Option<Vec<serde_json::Value>>,
}

impl Stats {
    pub(super) fn new(trace: bool) -> Stats {
        Stats {
            trace: trace.then(Vec::new),
            ..Default::default()
        }
    }

    /// A trial's process started: its queue wait and recovery end.
    /// A trial's process started on `site`: its queue wait and recovery end.
    pub(super) fn trial_started(&mut self, now: u64, trial: TrialId, site: &str) {
        if let Some(t) = self.queued_since.remove(&trial) {
            self.queue_waits.push((now - t) as f64 / 1000.0);
        }
        if let Some((t, from)) = self.interrupted.remove(&trial) {
            let s = (now - t) as f64 / 1000.0;
            self.recoveries.push(s);
            self.recoveries_by_sites
                .entry(format!("{from}->{site}"))
                .or_default()
                .push(s);
        }
    }

    /// A trial's process on `site` died without a clean exit.
    pub(super) fn interrupted(&mut self, now: u64, trial: TrialId, site: &str) {
        self.interrupted
            .entry(trial)
            .or_insert_with(|| (now, site.to_string()));
    }

    pub(super) fn validated(&mut self, experiment: u64, loss: f64) {
        let best = self.best_loss.entry(experiment).or_insert(f64::INFINITY);
        *best = best.min(loss);
    }

    /// A process ran on `slots` from `started` (training from `train_start`)
    /// until `now`, its work useful until `useful_until`.
    pub(super) fn ran(
        &mut self,
        now: u64,
        started: u64,
        train_start: u64,
        useful_until: u64,
        slots: u32,
    ) {
        let allocated = (now - started) as f64 * f64::from(slots);
        let useful = useful_until.saturating_sub(train_start) as f64 * f64::from(slots);
        self.allocated_gpu_ms += allocated;
        self.useful_gpu_ms += useful.min(allocated);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn span(
        &mut self,
        trial: TrialId,
        incarnation: u64,
        started: u64,
        now: u64,
        node: NodeId,
        gpu: usize,
        clean: bool,
        units: u64,
    ) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(serde_json::json!({
                "name": format!("trial {trial} #{incarnation}"),
                "ph": "X", "ts": started * 1000, "dur": (now - started) * 1000,
                "pid": node, "tid": gpu,
                "args": {"clean": clean, "units": units},
            }));
        }
    }

    pub(super) fn marker(&mut self, now: u64, node: NodeId, what: &str) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(serde_json::json!({"name": what, "ph": "i", "s": "p", "ts": now * 1000, "pid": node, "tid": 0}));
        }
    }

    /// The Chrome trace-event timeline (empty unless asked for).
    pub(super) fn trace_json(&self) -> serde_json::Value {
        serde_json::json!({ "traceEvents": self.trace.clone().unwrap_or_default(), "displayTimeUnit": "ms" })
    }
}

impl World<'_> {
    pub(super) fn report(&mut self) -> Report {
        let state = self.freshest();
        let unfinished_exits = state.map_or(0, |s| s.unfinished_exits);
        let (completed, trials, restarts) = state.map_or((0, 0, 0), |s| {
            let c = s
                .experiments
                .values()
                .filter(|e| e.state.is_finished())
                .count() as u64;
            let r = s.trials.values().map(|t| u64::from(t.restarts)).sum();
            (c, s.trials.len() as u64, r)
        });
        self.end_all_processes();
        let st = &self.stats;
        let mut rec = st.recoveries.clone();
        let mut rec2 = rec.clone();
        let mut qw = st.queue_waits.clone();
        let mut qw2 = qw.clone();
        Report {
            scenario: self.sc.name.clone(),
            seed: self.opts.seed,
            digest: format!("{:016x}", super::mix(self.digest, self.events)),
            violations: self.checks.violations.clone(),
            experiments_submitted: self.clients.submitted,
            experiments_completed: completed,
            trials,
            gpu_goodput: if st.allocated_gpu_ms > 0.0 {
                st.useful_gpu_ms / st.allocated_gpu_ms
            } else {
                1.0
            },
            work_lost_gpu_s: (st.allocated_gpu_ms - st.useful_gpu_ms) / 1000.0,
            recoveries: st.recoveries.len() as u64,
            recovery_s_p50: quantile(&mut rec, 0.5),
            recovery_s_p99: quantile(&mut rec2, 0.99),
            recovery_s_p50_by_sites: st
                .recoveries_by_sites
                .iter()
                .map(|(k, v)| (k.clone(), quantile(&mut v.clone(), 0.5)))
                .collect(),
            relayed_messages: self.net.relayed_messages,
            relayed_bytes: self.net.relayed_bytes,
            queue_wait_s_p50: quantile(&mut qw, 0.5),
            queue_wait_s_p99: quantile(&mut qw2, 0.99),
            messages: self.net.messages,
            bytes_moved: self.net.bytes_moved,
            simulated_s: self.now as f64 / 1000.0,
            wall_s: 0.0,
            sim_s_per_wall_s: 0.0,
            events: self.events,
            best_loss: st.best_loss.values().copied().collect(),
            group_share: {
                let total: f64 = st.group_gpu_ms.values().sum();
                st.group_gpu_ms
                    .iter()
                    .map(|(g, ms)| (g.clone(), if total > 0.0 { ms / total } else { 0.0 }))
                    .collect()
            },
            gpu_s_by_pool: st
                .pool_gpu_ms
                .iter()
                .map(|(p, ms)| (self.sc.pools[*p].name.clone(), ms / 1000.0))
                .collect(),
            gpu_cost: st
                .pool_gpu_ms
                .iter()
                .map(|(p, ms)| ms / 3_600_000.0 * self.sc.pools[*p].cost_per_gpu_hour)
                .sum(),
            multi_node_trials: st.multi_node_placements.len() as u64,
            gpu_failures: st.gpu_failures,
            restarts_charged: restarts,
            unfinished_exits,
        }
    }
}
