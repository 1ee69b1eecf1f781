//! `resolute bench search`: how fast do the searchers find a good model? A
//! budgeted, single-worker run over a lookup table of real (or realistic)
//! learning curves (`curves-v1`), so that it compares with other tools epoch for
//! epoch (benches/optuna_search.py runs Optuna on the same file and protocol).
//!
//! Protocol: the search space is the set of configs (one integer hyperparameter,
//! sampled uniformly); a trial's curve is `seeds[trial_seed % n_seeds][metric]`;
//! R = `n_epochs`, divisor 3, rungs down to 1 epoch. The worker trains one trial
//! at a time and the budget counts the epochs it trains (a promoted or resumed
//! trial continues from its checkpoint and costs only the new epochs). The
//! incumbent is the trial trained to R with the best observed final value; its
//! true value is the mean over seeds of its config's final value; regret is its
//! distance to the best true value in the table. A searcher that ends before the
//! budget is spent is started again with the next seed (as a user would), keeping
//! the incumbent.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use resolute_search::{Operation, RequestId, SearchEvent, Searcher};
use resolute_types::Value;

/// The curve file format this reads.
pub const CURVES_FORMAT: &str = "curves-v1";
/// The searchers `--searcher all` runs, in the order they are shown.
pub const SEARCHERS: [&str; 7] = [
    "random",
    "async_halving",
    "adaptive_asha_standard",
    "adaptive_asha_aggressive",
    "adaptive_asha_conservative",
    "asha_pause_resume",
    "hyperband",
];
/// The fraction of configs that counts as "top".
const TOP_FRACTION: f64 = 0.05;
/// Halving divisor of the protocol.
const DIVISOR: u64 = 3;
/// Restarts of a searcher within one budget (a searcher that creates nothing is
/// a bug, not a reason to spin).
const RESTARTS_MAX: u64 = 10_000;

/// A `curves-v1` file.
#[derive(Debug, Deserialize)]
pub struct Curves {
    /// Must be `curves-v1` when present.
    #[serde(default)]
    pub format: Option<String>,
    /// Epochs per curve (R).
    pub n_epochs: usize,
    /// Curves per config.
    pub n_seeds: usize,
    /// Metric name to "min" or "max".
    pub metrics: BTreeMap<String, String>,
    /// The configs.
    pub configs: Vec<CurveConfig>,
}

/// One configuration and its curves.
#[derive(Debug, Deserialize)]
pub struct CurveConfig {
    /// Its id.
    pub id: serde_json::Value,
    /// Its hyperparameters (not used: the searchers sample the config's index).
    #[serde(default, rename = "params")]
    pub _params: serde_json::Value,
    /// `n_seeds` maps of metric name to its values after epochs 1..=R.
    pub seeds: Vec<BTreeMap<String, Vec<f64>>>,
}

/// Reads and checks a curve file; errors name the file and what is wrong where.
pub fn load(path: &Path) -> anyhow::Result<Curves> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let curves: Curves =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let file = path.display();
    if let Some(f) = curves.format.as_deref().filter(|f| *f != CURVES_FORMAT) {
        bail!("{file}: format: {f:?} is not {CURVES_FORMAT:?}");
    }
    if curves.n_epochs == 0 || curves.n_seeds == 0 || curves.configs.is_empty() {
        bail!("{file}: n_epochs, n_seeds and configs must not be empty");
    }
    for (name, dir) in &curves.metrics {
        if dir != "min" && dir != "max" {
            bail!("{file}: metrics.{name}: {dir:?} is neither \"min\" nor \"max\"");
        }
    }
    for (k, c) in curves.configs.iter().enumerate() {
        if c.seeds.len() != curves.n_seeds {
            bail!(
                "{file}: configs[{k}] (id {}): {} seeds, n_seeds is {}",
                c.id,
                c.seeds.len(),
                curves.n_seeds
            );
        }
        for (s, seed) in c.seeds.iter().enumerate() {
            for name in curves.metrics.keys() {
                let len = seed.get(name).map_or(0, Vec::len);
                if len != curves.n_epochs {
                    bail!(
                        "{file}: configs[{k}].seeds[{s}].{name}: {len} values, n_epochs is {}",
                        curves.n_epochs
                    );
                }
                if seed[name].iter().any(|v| !v.is_finite()) {
                    bail!("{file}: configs[{k}].seeds[{s}].{name}: a value is not finite");
                }
            }
        }
    }
    Ok(curves)
}

/// One searcher's figures over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct SearcherReport {
    /// Mean regret at the end of the budget.
    pub mean_regret: f64,
    /// Median regret.
    pub median_regret: f64,
    /// Fraction of seeds whose incumbent reached the top 5%.
    pub top5_hit_rate: f64,
    /// Median epochs until the incumbent first was in the top 5% (`null` when
    /// more than half the seeds never got there).
    pub top5_median_epochs: Option<f64>,
    /// Mean trials created per run.
    pub trials: f64,
    /// Median wall-clock time until the incumbent first was in the top 5%, in
    /// epoch durations (`workers` train at once; equals the epochs with one).
    pub top5_median_wall_epochs: Option<f64>,
    /// Workers training at once.
    pub workers: usize,
}

/// What one run (one seed) ended with.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    regret: f64,
    top5_epochs: Option<u64>,
    /// Wall clock (in epoch durations) when the incumbent first was in the top 5%.
    top5_wall: Option<u64>,
    trials: u64,
}

/// The table's view for one metric: true values and what "top" means.
struct Truth {
    smaller: bool,
    /// Mean over seeds of each config's final value.
    true_final: Vec<f64>,
    best: f64,
    worst: f64,
    /// A true value at least this good is in the top 5%.
    top_threshold: f64,
}

impl Truth {
    fn new(curves: &Curves, metric: &str) -> anyhow::Result<Truth> {
        let dir = curves.metrics.get(metric).with_context(|| {
            format!(
                "--metric {metric}: the file has {:?}",
                curves.metrics.keys().collect::<Vec<_>>()
            )
        })?;
        let smaller = dir == "min";
        let r = curves.n_epochs - 1;
        let true_final: Vec<f64> = curves
            .configs
            .iter()
            .map(|c| c.seeds.iter().map(|s| s[metric][r]).sum::<f64>() / c.seeds.len() as f64)
            .collect();
        let mut ranked = true_final.clone();
        ranked.sort_by(|a, b| {
            if smaller {
                a.total_cmp(b)
            } else {
                b.total_cmp(a)
            }
        });
        let top_n = ((ranked.len() as f64 * TOP_FRACTION).ceil() as usize).max(1);
        Ok(Truth {
            smaller,
            best: ranked[0],
            worst: ranked[ranked.len() - 1],
            top_threshold: ranked[top_n - 1],
            true_final,
        })
    }

    fn better(&self, a: f64, b: f64) -> bool {
        if self.smaller {
            a < b
        } else {
            a > b
        }
    }

    fn in_top(&self, v: f64) -> bool {
        !self.better(self.top_threshold, v)
    }
}

/// The searcher section for `name` under the protocol (R epochs, divisor 3).
fn searcher_yaml(
    name: &str,
    r: u64,
    metric: &str,
    smaller: bool,
    max_trials: u64,
    workers: usize,
) -> anyhow::Result<String> {
    // Rungs down to one epoch: R / 3^(k-1) >= 1.
    let mut rungs = 1;
    while r / DIVISOR.pow(rungs) >= 1 && rungs < 10 {
        rungs += 1;
    }
    let common = format!(
        "metric: {metric}, smaller_is_better: {smaller}, time_metric: epochs, max_time: {r}, max_concurrent_trials: {workers}"
    );
    let method = match name {
        "random" => format!("name: random, max_trials: {max_trials}"),
        "async_halving" => {
            format!("name: async_halving, num_rungs: {rungs}, divisor: {DIVISOR}, max_trials: {max_trials}")
        }
        "adaptive_asha_standard" | "adaptive_asha_aggressive" | "adaptive_asha_conservative" => {
            let mode = name.trim_start_matches("adaptive_asha_");
            format!("name: adaptive_asha, mode: {mode}, max_rungs: {rungs}, divisor: {DIVISOR}, max_trials: {max_trials}")
        }
        "asha_pause_resume" => {
            format!("name: asha, num_rungs: {rungs}, divisor: {DIVISOR}, max_trials: {max_trials}")
        }
        "hyperband" => format!("name: hyperband, max_rungs: {rungs}, divisor: {DIVISOR}"),
        other => bail!("--searcher {other}: not one of {}", SEARCHERS.join(", ")),
    };
    Ok(format!("{{{method}, {common}}}"))
}

/// A trial as the single worker sees it.
struct Trial {
    config: usize,
    seed: usize,
    /// Epochs trained so far (its checkpoint).
    time: u64,
    target: Option<u64>,
    status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    Paused,
    Stopping,
    Closed,
}

/// Runs `searcher` on the table for one seed within `budget` epochs.
fn run_one(
    curves: &Curves,
    truth: &Truth,
    metric: &str,
    searcher: &str,
    budget: u64,
    seed: u64,
    workers: usize,
) -> anyhow::Result<RunResult> {
    let r = curves.n_epochs as u64;
    let n = curves.configs.len();
    let mut spent = 0u64;
    let mut trials_total = 0u64;
    let mut incumbent: Option<(f64, usize)> = None; // (observed final, config)
                                                    // (epochs spent, wall clock) when the incumbent first was in the top 5%.
    let mut top5: Option<(u64, u64)> = None;
    // Wall clock in epoch durations: each worker trains one epoch per unit.
    let mut clock = 0u64;
    let mut exhausted = false;
    for restart in 0..RESTARTS_MAX {
        let mut busy: BTreeMap<RequestId, u64> = BTreeMap::new();
        let yaml = format!(
            "name: bench-search\nentrypoint: \"true\"\nhyperparameters:\n  config: {{type: int, minval: 0, maxval: {}}}\nsearcher: {}\nreproducibility: {{experiment_seed: {}}}\n",
            n - 1,
            searcher_yaml(searcher, r, metric, truth.smaller, budget.max(1), workers)?,
            (seed + restart * 1_000_003) % (1 << 31)
        );
        let loaded = resolute_types::config::parse_str("bench-search.yaml", &yaml, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = loaded.config;
        let mut s = Searcher::new(&c.searcher, &c.hyperparameters, seed + restart * 1_000_003);
        let before = trials_total;
        let mut trials: BTreeMap<RequestId, Trial> = BTreeMap::new();
        let mut ops: std::collections::VecDeque<Operation> = s.initial_operations().into();
        let mut last: Option<RequestId> = None;
        'run: loop {
            while let Some(op) = ops.pop_front() {
                let events = carry_out(op, &mut trials, n, curves.n_seeds, &mut trials_total);
                for ev in events {
                    ops.extend(s.handle(&ev)?);
                }
            }
            if s.is_shut_down() {
                break 'run;
            }
            // A trial that reached its target and got no new one is done.
            if let Some(id) = last.take() {
                if let Some(t) = trials.get_mut(&id) {
                    if t.status == Status::Running && t.target.is_some_and(|x| t.time >= x) {
                        t.status = Status::Closed;
                        ops.extend(s.handle(&SearchEvent::TrialExited { request_id: id })?);
                        continue 'run;
                    }
                }
            }
            if let Some((&id, t)) = trials
                .iter_mut()
                .find(|(_, t)| t.status == Status::Stopping)
            {
                t.status = Status::Closed;
                busy.remove(&id);
                ops.extend(s.handle(&SearchEvent::TrialExited { request_id: id })?);
                continue 'run;
            }
            // Idle workers take the least-advanced runnable trials, one epoch
            // each, validating after it (as Optuna's objective reports every
            // epoch): a searcher that stops trials at rungs sees every rung.
            while busy.len() < workers {
                let next = trials
                    .iter()
                    .filter(|(id, t)| {
                        t.status == Status::Running
                            && t.target.is_some_and(|x| x > t.time && t.time < r)
                            && !busy.contains_key(id)
                    })
                    .min_by_key(|(id, t)| (t.time, **id))
                    .map(|(id, _)| *id);
                let Some(id) = next else {
                    break;
                };
                if spent + 1 > budget {
                    exhausted = true;
                    break;
                }
                spent += 1;
                busy.insert(id, clock + 1);
            }
            // The epoch that ends first (ties by trial id) is reported.
            let Some((id, at)) = busy
                .iter()
                .map(|(id, at)| (*id, *at))
                .min_by_key(|(id, at)| (*at, *id))
            else {
                if exhausted {
                    return Ok(finish(truth, incumbent, top5, trials_total));
                }
                break 'run; // Nothing to train: the searcher waits on nothing.
            };
            busy.remove(&id);
            clock = at;
            let t = trials.get_mut(&id).expect("a busy trial exists");
            if t.status != Status::Running {
                continue 'run; // Paused or stopped meanwhile: the epoch is lost.
            }
            t.time += 1;
            let target = t.time;
            let value = curves.configs[t.config].seeds[t.seed][metric][target as usize - 1];
            if target == r {
                let improves = incumbent.is_none_or(|(best, _)| truth.better(value, best));
                if improves {
                    incumbent = Some((value, t.config));
                    if top5.is_none() && truth.in_top(truth.true_final[t.config]) {
                        top5 = Some((spent, clock));
                    }
                }
            }
            let metrics = BTreeMap::from([
                (metric.to_string(), Value::Float(value)),
                ("epochs".to_string(), Value::Int(target as i64)),
            ]);
            ops.extend(s.handle(&SearchEvent::ValidationCompleted {
                request_id: id,
                metrics,
            })?);
            last = Some(id);
        }
        if exhausted || spent >= budget || trials_total == before {
            break;
        }
    }
    Ok(finish(truth, incumbent, top5, trials_total))
}

/// Applies one searcher operation to the worker's trials; the events it causes.
fn carry_out(
    op: Operation,
    trials: &mut BTreeMap<RequestId, Trial>,
    configs: usize,
    seeds: usize,
    created: &mut u64,
) -> Vec<SearchEvent> {
    match op {
        Operation::Create {
            request_id,
            hparams,
            trial_seed,
            warm_start,
        } => {
            let config = match &hparams {
                Value::Map(m) => m.get("config").and_then(|v| match v {
                    Value::Int(i) => usize::try_from(*i).ok(),
                    _ => None,
                }),
                _ => None,
            }
            .unwrap_or(0)
            .min(configs - 1);
            // A warm start (PBT) continues its parent's checkpoint.
            let time = warm_start
                .and_then(|p| trials.get(&p))
                .map_or(0, |p| p.time);
            *created += 1;
            trials.insert(
                request_id,
                Trial {
                    config,
                    seed: trial_seed as usize % seeds,
                    time,
                    target: None,
                    status: Status::Running,
                },
            );
            vec![SearchEvent::TrialCreated { request_id }]
        }
        Operation::RunUntil { request_id, length } | Operation::Resume { request_id, length } => {
            if let Some(t) = trials.get_mut(&request_id) {
                if t.status != Status::Closed && t.status != Status::Stopping {
                    t.status = Status::Running;
                    t.target = Some(length);
                }
            }
            Vec::new()
        }
        Operation::Pause { request_id } => {
            if let Some(t) = trials.get_mut(&request_id) {
                t.status = Status::Paused;
            }
            Vec::new()
        }
        Operation::Stop { request_id } => {
            if let Some(t) = trials
                .get_mut(&request_id)
                .filter(|t| t.status != Status::Closed)
            {
                t.status = Status::Stopping;
            }
            Vec::new()
        }
        Operation::Shutdown { .. } => Vec::new(),
    }
}

fn finish(
    truth: &Truth,
    incumbent: Option<(f64, usize)>,
    top5: Option<(u64, u64)>,
    trials: u64,
) -> RunResult {
    // No trial reached R within the budget: the worst regret the table allows.
    let regret = incumbent.map_or((truth.worst - truth.best).abs(), |(_, c)| {
        (truth.true_final[c] - truth.best).abs()
    });
    RunResult {
        regret,
        top5_epochs: top5.map(|t| t.0),
        top5_wall: top5.map(|t| t.1),
        trials,
    }
}

/// Runs `searcher` for each seed and sums up.
pub fn run(
    curves: &Curves,
    metric: &str,
    searcher: &str,
    budget: u64,
    seeds: std::ops::Range<u64>,
    workers: usize,
) -> anyhow::Result<SearcherReport> {
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    let truth = Truth::new(curves, metric)?;
    let mut results = Vec::new();
    for seed in seeds {
        results.push(run_one(
            curves, &truth, metric, searcher, budget, seed, workers,
        )?);
    }
    anyhow::ensure!(!results.is_empty(), "--seeds is empty");
    let runs = results.len() as f64;
    let mut regrets: Vec<f64> = results.iter().map(|r| r.regret).collect();
    let mut epochs: Vec<f64> = results
        .iter()
        .map(|r| r.top5_epochs.map_or(f64::INFINITY, |e| e as f64))
        .collect();
    let median_epochs = super::quantile(&mut epochs, 0.5);
    let mut walls: Vec<f64> = results
        .iter()
        .map(|r| r.top5_wall.map_or(f64::INFINITY, |e| e as f64))
        .collect();
    let median_wall = super::quantile(&mut walls, 0.5);
    Ok(SearcherReport {
        mean_regret: regrets.iter().sum::<f64>() / runs,
        median_regret: super::quantile(&mut regrets, 0.5),
        top5_hit_rate: results.iter().filter(|r| r.top5_epochs.is_some()).count() as f64 / runs,
        top5_median_epochs: median_epochs.is_finite().then_some(median_epochs),
        trials: results.iter().map(|r| r.trials as f64).sum::<f64>() / runs,
        top5_median_wall_epochs: median_wall.is_finite().then_some(median_wall),
        workers,
    })
}
