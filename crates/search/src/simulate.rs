//! Previews: how many trials stop at each length.
//!
//! [`plan`] computes Determined's `det preview-search` plan for its searchers (for
//! the ASHA variants, successive halving rung by rung: the top `1/divisor` of each
//! rung continues). [`run`] drives a real [`Searcher`] against a deterministic
//! [`MetricSource`] on a virtual clock, which is how the extensions are previewed
//! and how the searchers are tested end to end.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use resolute_types::config::{Hyperparameters, SearchMethod, SearcherConfig};
use resolute_types::Value;

use crate::adaptive::adaptive_brackets;
use crate::halving::make_rungs;
use crate::{sample, Operation, RequestId, SearchError, SearchEvent, Searcher};

/// Most searcher events one simulated run may take (a guard against a searcher bug
/// that would loop forever).
pub const EVENTS_MAX: usize = 2_000_000;

/// Trial counts by the length at which they stop (`None`: the training code's own
/// full length, for searchers without `max_time`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The time metric, when the searcher has one.
    pub unit: Option<String>,
    /// Length → number of trials that stop there.
    pub counts: BTreeMap<Option<u64>, usize>,
}

impl Preview {
    /// The `--json` form: `{"100": 5, "300": 3, "900": 2}` (`"max_length"` for `None`).
    pub fn to_json(&self) -> Vec<(String, usize)> {
        self.counts
            .iter()
            .map(|(len, n)| (len.map_or("max_length".to_string(), |l| l.to_string()), *n))
            .collect()
    }

    /// Total trials.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }
}

/// Determined's plan for `single`, `random`, `grid`, `async_halving` and
/// `adaptive_asha`; `None` for the extensions (use [`run`]).
pub fn plan(config: &SearcherConfig, space: &Hyperparameters) -> Option<Preview> {
    let budget = config.method.budget();
    let unit = budget.as_ref().map(|b| b.time_metric.clone());
    let full = budget.as_ref().map(|b| b.max_time);
    let mut counts = BTreeMap::new();
    match &config.method {
        SearchMethod::Single { .. } => {
            counts.insert(full, 1);
        }
        SearchMethod::Random { max_trials, .. } => {
            counts.insert(full, *max_trials as usize);
        }
        SearchMethod::Grid { .. } => {
            counts.insert(full, sample::grid(space).len());
        }
        SearchMethod::AsyncHalving {
            num_rungs,
            max_trials,
            divisor,
            budget,
            ..
        } => {
            halving_plan(
                *num_rungs,
                *max_trials,
                *divisor,
                budget.max_time,
                &mut counts,
            );
        }
        SearchMethod::AdaptiveAsha {
            divisor, budget, ..
        } => {
            for b in adaptive_brackets(&config.method) {
                halving_plan(
                    b.num_rungs,
                    b.max_trials,
                    *divisor,
                    budget.max_time,
                    &mut counts,
                );
            }
        }
        SearchMethod::Asha { .. } | SearchMethod::Hyperband { .. } | SearchMethod::Pbt { .. } => {
            return None
        }
    }
    counts.retain(|_, n| *n > 0);
    Some(Preview { unit, counts })
}

fn halving_plan(
    num_rungs: u32,
    max_trials: u32,
    divisor: f64,
    max_time: u64,
    counts: &mut BTreeMap<Option<u64>, usize>,
) {
    let rungs = make_rungs(num_rungs, divisor, max_time);
    let mut in_rung = max_trials as usize;
    for (i, length) in rungs.iter().enumerate() {
        let continued = ((in_rung as f64 / divisor) as usize).max(1);
        let stopped = if i + 1 == rungs.len() {
            in_rung
        } else {
            in_rung - continued.min(in_rung)
        };
        *counts.entry(Some(*length)).or_default() += stopped;
        in_rung = continued.min(in_rung);
    }
}

/// Produces validation metrics for simulated trials.
pub trait MetricSource {
    /// The searcher metric of trial `id` (with `hparams`) after `time` units.
    fn metric(&mut self, id: RequestId, hparams: &Value, time: u64) -> f64;
}

/// Synthetic learning curves: `loss = quality + 2 / (1 + time / tau)`, where each
/// trial's quality is a fixed pseudo-random number derived from the seed and its id.
#[derive(Debug, Clone)]
pub struct SyntheticCurves {
    /// Seed of the per-trial qualities.
    pub seed: u64,
    /// Time constant of the curves, in time-metric units.
    pub tau: f64,
}

impl MetricSource for SyntheticCurves {
    fn metric(&mut self, id: RequestId, _hparams: &Value, time: u64) -> f64 {
        let quality = (splitmix64(self.seed ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 11)
            as f64
            / (1u64 << 53) as f64;
        quality + 2.0 / (1.0 + time as f64 / self.tau.max(1.0))
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What happened to one simulated trial.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialRecord {
    /// The trial.
    pub id: RequestId,
    /// Its hyperparameters.
    pub hparams: Value,
    /// Whose checkpoint it started from.
    pub warm_start: Option<RequestId>,
    /// Where it stopped (`None`: full length of a budgetless trial).
    pub stopped_at: Option<u64>,
    /// Every (time, metric) it reported.
    pub reports: Vec<(u64, f64)>,
    /// How often it was paused.
    pub pauses: u32,
    /// The highest target it was given.
    pub max_target: Option<u64>,
}

/// The result of a simulated run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Stop-length counts.
    pub preview: Preview,
    /// Every trial, by id.
    pub trials: BTreeMap<RequestId, TrialRecord>,
    /// Every operation, in order.
    pub operations: Vec<Operation>,
    /// Every event fed to the searcher, in order.
    pub events: Vec<SearchEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimStatus {
    Running,
    Paused,
    Stopping,
    Closed,
}

struct SimTrial {
    record: TrialRecord,
    time: u64,
    target: Option<u64>,
    status: SimStatus,
}

/// Drives `searcher` until it shuts down. Running trials advance in lockstep (the
/// least-advanced first, ties by id) and report every `period` units and at their
/// target. Stopped trials close at once.
pub fn run(
    searcher: &mut Searcher,
    source: &mut dyn MetricSource,
    period: Option<u64>,
) -> Result<RunReport, SearchError> {
    let metric = searcher.config().metric.clone();
    let smaller = searcher.config().smaller_is_better;
    let budget = searcher.config().method.budget();
    let time_metric = budget
        .as_ref()
        .map(|b| b.time_metric.clone())
        .unwrap_or_else(|| "batches".to_string());
    let mut trials: BTreeMap<RequestId, SimTrial> = BTreeMap::new();
    let mut log = Vec::new();
    let mut queue: VecDeque<Operation> = searcher.initial_operations().into();
    let mut events = 0usize;
    let mut last_reported: Option<RequestId> = None;
    let mut event_log = Vec::new();
    let mut feed = |searcher: &mut Searcher,
                    ev: SearchEvent,
                    queue: &mut VecDeque<Operation>|
     -> Result<(), SearchError> {
        events += 1;
        event_log.push(ev.clone());
        if events > EVENTS_MAX {
            return Err(SearchError::Snapshot(format!(
                "simulation exceeded {EVENTS_MAX} events"
            )));
        }
        queue.extend(searcher.handle(&ev)?);
        Ok(())
    };
    loop {
        // Carry out every pending operation first.
        while let Some(op) = queue.pop_front() {
            log.push(op.clone());
            match op {
                Operation::Create {
                    request_id,
                    hparams,
                    warm_start,
                    ..
                } => {
                    let start = warm_start
                        .and_then(|p| trials.get(&p))
                        .map_or(0, |p| p.time);
                    trials.insert(
                        request_id,
                        SimTrial {
                            record: TrialRecord {
                                id: request_id,
                                hparams,
                                warm_start,
                                stopped_at: None,
                                reports: Vec::new(),
                                pauses: 0,
                                max_target: None,
                            },
                            time: start,
                            target: None,
                            status: SimStatus::Running,
                        },
                    );
                    feed(
                        searcher,
                        SearchEvent::TrialCreated { request_id },
                        &mut queue,
                    )?;
                }
                Operation::RunUntil { request_id, length }
                | Operation::Resume { request_id, length } => {
                    if let Some(t) = trials.get_mut(&request_id) {
                        if t.status != SimStatus::Closed && t.status != SimStatus::Stopping {
                            t.status = SimStatus::Running;
                            t.target = Some(length);
                            t.record.max_target = t.record.max_target.max(Some(length));
                        }
                    }
                }
                Operation::Pause { request_id } => {
                    if let Some(t) = trials.get_mut(&request_id) {
                        t.status = SimStatus::Paused;
                        t.record.pauses += 1;
                    }
                }
                Operation::Stop { request_id } => {
                    if let Some(t) = trials.get_mut(&request_id) {
                        if t.status != SimStatus::Closed {
                            t.status = SimStatus::Stopping;
                        }
                    }
                }
                Operation::Shutdown { .. } => {}
            }
        }
        if searcher.is_shut_down() {
            break;
        }
        // A trial that reached its target (and was given no new one) finishes.
        if let Some(id) = last_reported.take() {
            if let Some(t) = trials.get_mut(&id) {
                if t.status == SimStatus::Running && t.target.is_some_and(|target| t.time >= target)
                {
                    t.status = SimStatus::Closed;
                    t.record.stopped_at = Some(t.time);
                    feed(
                        searcher,
                        SearchEvent::TrialExited { request_id: id },
                        &mut queue,
                    )?;
                    continue;
                }
            }
        }
        // A stopped trial checkpoints and exits.
        if let Some((&id, t)) = trials
            .iter_mut()
            .find(|(_, t)| t.status == SimStatus::Stopping)
        {
            t.status = SimStatus::Closed;
            t.record.stopped_at = Some(t.time).filter(|_| budget.is_some());
            feed(
                searcher,
                SearchEvent::TrialExited { request_id: id },
                &mut queue,
            )?;
            continue;
        }
        // Advance the least-advanced running trial to its next report.
        let next = trials
            .iter()
            .filter(|(_, t)| t.status == SimStatus::Running)
            .min_by_key(|(id, t)| (t.time, **id))
            .map(|(id, _)| *id);
        let Some(id) = next else {
            break;
        };
        let t = trials.get_mut(&id).expect("chosen from the map");
        let Some(target) = t.target else {
            // No length from the searcher: the training code runs to its own end.
            let value = source.metric(id, &t.record.hparams, 1);
            t.record.reports.push((1, value));
            t.status = SimStatus::Closed;
            let metrics = report(&metric, value, None);
            feed(
                searcher,
                SearchEvent::ValidationCompleted {
                    request_id: id,
                    metrics,
                },
                &mut queue,
            )?;
            feed(
                searcher,
                SearchEvent::TrialExited { request_id: id },
                &mut queue,
            )?;
            continue;
        };
        let step = period
            .filter(|p| *p > 0)
            .map_or(target, |p| (t.time / p + 1) * p);
        t.time = step.min(target).max(t.time);
        let value = source.metric(id, &t.record.hparams, t.time);
        t.record.reports.push((t.time, value));
        let metrics = report(
            &metric,
            if smaller { value } else { -value },
            Some((&time_metric, t.time)),
        );
        feed(
            searcher,
            SearchEvent::ValidationCompleted {
                request_id: id,
                metrics,
            },
            &mut queue,
        )?;
        last_reported = Some(id);
    }
    let stalled = trials
        .values()
        .filter(|t| t.status == SimStatus::Paused)
        .count();
    if !searcher.is_shut_down() && stalled > 0 {
        return Err(SearchError::Snapshot(format!(
            "search stalled with {stalled} paused trials"
        )));
    }
    let mut counts = BTreeMap::new();
    for t in trials.values() {
        *counts.entry(t.record.stopped_at).or_default() += 1;
    }
    Ok(RunReport {
        preview: Preview {
            unit: budget.map(|b| b.time_metric),
            counts,
        },
        trials: trials.into_iter().map(|(id, t)| (id, t.record)).collect(),
        operations: log,
        events: event_log,
    })
}

fn report(metric: &str, value: f64, time: Option<(&str, u64)>) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    m.insert(metric.to_string(), Value::Float(value));
    if let Some((name, t)) = time {
        m.insert(name.to_string(), Value::Int(t as i64));
    }
    m
}
