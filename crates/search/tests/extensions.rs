//! Resolute's own searchers (promotion-based ASHA, Hyperband, PBT), snapshots and
//! determinism, driven end to end through the simulator.

mod common;

use std::collections::BTreeMap;

use common::{config, searcher};
use resolute_search::simulate::{run, MetricSource, RunReport, SyntheticCurves};
use resolute_search::{hyperband_brackets, Operation, RequestId, Searcher, SearcherSnapshot};
use resolute_types::Value;

/// Learning curves from a table: trial `i` (1-based, creation order) has loss
/// `quality[i-1] + 1/(1+t)`, so the ranking is the same at every length.
struct Table(Vec<f64>);

impl MetricSource for Table {
    fn metric(&mut self, id: RequestId, _: &Value, time: u64) -> f64 {
        self.0[(id.0 - 1) as usize % self.0.len()] + 1.0 / (1.0 + time as f64)
    }
}

fn counts(report: &RunReport) -> Vec<(Option<u64>, usize)> {
    report
        .preview
        .counts
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect()
}

#[test]
fn asha_promotes_the_top_third_and_never_kills() {
    let mut s = searcher(
        "hyperparameters: {x: {type: int, minval: 0, maxval: 10}}
searcher: {name: asha, metric: loss, num_rungs: 3, max_trials: 9, divisor: 3,
           max_time: 9, time_metric: batches, max_concurrent_trials: 1}",
    );
    let mut table = Table(vec![5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 4.0, 6.0]);
    let report = run(&mut s, &mut table, None).expect("runs");
    // Worked by hand in the searcher's docs: T4 (best) reaches 9; T2 and T6 stop at
    // 3; the other six stop at rung 0.
    assert_eq!(
        counts(&report),
        vec![(Some(1), 6), (Some(3), 2), (Some(9), 1)]
    );
    assert_eq!(report.trials[&RequestId(4)].stopped_at, Some(9));
    for t in report.trials.values() {
        assert!(
            t.max_target.unwrap_or(0) <= 9,
            "no trial runs past max_time"
        );
        assert!(
            matches!(t.stopped_at, Some(1 | 3 | 9)),
            "stopped only at rung boundaries: {t:?}"
        );
    }
    // Promotions resume from a checkpoint; nothing is created beyond max_trials.
    let resumes = report
        .operations
        .iter()
        .filter(|o| matches!(o, Operation::Resume { .. }))
        .count();
    assert!(resumes >= 2, "paused trials were resumed: {resumes}");
    assert_eq!(report.trials.len(), 9);
}

#[test]
fn asha_with_concurrency_keeps_its_promises() {
    for seed in 0..20 {
        let mut s = searcher(
            "hyperparameters: {x: {type: double, minval: 0, maxval: 1}}
searcher: {name: asha, metric: loss, num_rungs: 4, max_trials: 40, divisor: 3,
           max_time: 270, time_metric: batches, max_concurrent_trials: 5}",
        );
        let report = run(&mut s, &mut SyntheticCurves { seed, tau: 30.0 }, None).expect("runs");
        assert_eq!(report.trials.len(), 40);
        assert!(
            report.preview.counts.get(&Some(270)).copied().unwrap_or(0) >= 1,
            "someone reaches the top"
        );
        for t in report.trials.values() {
            assert!(matches!(t.stopped_at, Some(10 | 30 | 90 | 270)), "{t:?}");
            // Each trial's reports are exactly its rung boundaries, in order.
            let times: Vec<u64> = t.reports.iter().map(|r| r.0).collect();
            assert_eq!(times, [10, 30, 90, 270][..times.len()].to_vec());
        }
    }
}

#[test]
fn hyperband_bracket_layout() {
    let layout: Vec<(u32, u64)> = hyperband_brackets(81, 3.0, 5)
        .iter()
        .map(|b| (b.num_trials, b.rung_lengths[0]))
        .collect();
    assert_eq!(layout, vec![(81, 1), (34, 3), (15, 9), (8, 27), (5, 81)]);
    assert_eq!(
        hyperband_brackets(81, 3.0, 5)[0].rung_lengths,
        vec![1, 3, 9, 27, 81]
    );
    // max_rungs caps the number of brackets.
    assert_eq!(hyperband_brackets(81, 3.0, 2).len(), 2);
}

#[test]
fn hyperband_runs_successive_halving_in_every_bracket() {
    let mut s = searcher(
        "hyperparameters: {x: {type: double, minval: 0, maxval: 1}}
searcher: {name: hyperband, metric: loss, max_rungs: 5, divisor: 3, max_time: 81,
           time_metric: batches, max_concurrent_trials: 8}",
    );
    let report = run(&mut s, &mut SyntheticCurves { seed: 3, tau: 10.0 }, None).expect("runs");
    // Expected from the table: each rung keeps max(floor(n/3), 1).
    let mut want: BTreeMap<Option<u64>, usize> = BTreeMap::new();
    for b in hyperband_brackets(81, 3.0, 5) {
        let mut n = b.num_trials as usize;
        for (i, len) in b.rung_lengths.iter().enumerate() {
            let keep = if i + 1 == b.rung_lengths.len() {
                0
            } else {
                (n / 3).max(1)
            };
            *want.entry(Some(*len)).or_default() += n - keep;
            n = keep;
        }
    }
    assert_eq!(report.preview.counts, want);
    assert_eq!(report.trials.len(), 81 + 34 + 15 + 8 + 5);
}

const PBT: &str = "hyperparameters:
  lr: {type: double, minval: 0.001, maxval: 0.1}
  layers: {type: int, minval: 1, maxval: 8}
  act: {type: categorical, vals: [relu, tanh]}
searcher:
  name: pbt
  metric: loss
  population_size: 10
  num_rounds: 4
  length_per_round: 100
  time_metric: batches
  replace_function: {truncate_fraction: 0.2}
  explore_function: {resample_probability: 0.0, perturb_factor: 0.2}
";

#[test]
fn pbt_exploits_the_best_checkpoints_and_perturbs_within_bounds() {
    let mut s = searcher(PBT);
    let report = run(&mut s, &mut SyntheticCurves { seed: 9, tau: 50.0 }, None).expect("runs");
    assert_eq!(
        report.trials.len(),
        10 + 2 * 3,
        "two copies in each of the three exploit steps"
    );
    for child in report.trials.values() {
        let Some(parent_id) = child.warm_start else {
            continue;
        };
        let parent = &report.trials[&parent_id];
        // The parent was among the best two of the round it was copied at.
        let round_time = parent
            .reports
            .iter()
            .map(|r| r.0)
            .filter(|t| *t < child.reports[0].0)
            .max()
            .expect("parent reported");
        let mut ranked: Vec<(f64, RequestId)> = report
            .trials
            .values()
            .filter_map(|t| {
                t.reports
                    .iter()
                    .find(|r| r.0 == round_time)
                    .map(|r| (r.1, t.id))
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        assert!(
            ranked[..2].iter().any(|(_, id)| *id == parent_id),
            "parent {parent_id} not in the top two at {round_time}"
        );
        // It continues from the parent's checkpoint: its first report is one round later.
        assert_eq!(child.reports[0].0, round_time + 100);
        // Exploration: with resample_probability 0, every value is perturbed by ±20%.
        let (p, c) = (
            parent.hparams.as_map().expect("map"),
            child.hparams.as_map().expect("map"),
        );
        let (plr, clr) = (p["lr"].as_f64().expect("lr"), c["lr"].as_f64().expect("lr"));
        let options = [(plr * 0.8).clamp(0.001, 0.1), (plr * 1.2).clamp(0.001, 0.1)];
        assert!(options.contains(&clr), "lr {clr} from {plr}");
        let (pl, cl) = (
            p["layers"].as_i64().expect("int"),
            c["layers"].as_i64().expect("int"),
        );
        let options = [
            ((pl as f64 * 0.8).floor() as i64).clamp(1, 8),
            ((pl as f64 * 1.2).ceil() as i64).clamp(1, 8),
        ];
        assert!(options.contains(&cl), "layers {cl} from {pl}");
        assert_eq!(p["act"], c["act"], "categoricals are kept unless resampled");
    }
    // Nobody trains past num_rounds × length_per_round.
    assert!(report
        .trials
        .values()
        .all(|t| t.reports.iter().all(|r| r.0 <= 400)));
}

#[test]
fn pbt_resampling_stays_in_bounds() {
    let yaml = PBT
        .replace("resample_probability: 0.0", "resample_probability: 0.5")
        .replace("perturb_factor: 0.2", "perturb_factor: 0.9");
    let mut s = searcher(&yaml);
    let report = run(&mut s, &mut SyntheticCurves { seed: 4, tau: 50.0 }, None).expect("runs");
    for t in report.trials.values() {
        let m = t.hparams.as_map().expect("map");
        assert!((0.001..=0.1).contains(&m["lr"].as_f64().expect("lr")));
        assert!((1..=8).contains(&m["layers"].as_i64().expect("layers")));
    }
}

const EVERY_SEARCHER: [&str; 8] = [
    "searcher: {name: single, metric: loss, time_metric: batches, max_time: 50}",
    "searcher: {name: random, metric: loss, max_trials: 7, max_concurrent_trials: 3}",
    "searcher: {name: grid, metric: loss, max_concurrent_trials: 2}",
    "searcher: {name: async_halving, metric: loss, num_rungs: 3, max_trials: 12, divisor: 3, max_time: 90, time_metric: batches, max_concurrent_trials: 4}",
    "searcher: {name: adaptive_asha, metric: acc, smaller_is_better: false, max_trials: 16, divisor: 3, max_time: 90, time_metric: batches, max_concurrent_trials: 4}",
    "searcher: {name: asha, metric: loss, num_rungs: 3, max_trials: 12, divisor: 3, max_time: 90, time_metric: batches, max_concurrent_trials: 3}",
    "searcher: {name: hyperband, metric: loss, max_rungs: 3, divisor: 3, max_time: 27, time_metric: batches, max_concurrent_trials: 4}",
    "searcher: {name: pbt, metric: loss, population_size: 6, num_rounds: 3, length_per_round: 10, time_metric: batches, replace_function: {truncate_fraction: 0.3}, explore_function: {resample_probability: 0.3, perturb_factor: 0.2}}",
];

fn full(searcher_yaml: &str) -> String {
    format!(
        "hyperparameters:
  lr: {{type: log, minval: -4, maxval: -1, base: 10, count: 3}}
  units: {{type: int, minval: 8, maxval: 64, count: 2}}
  opt: {{type: categorical, vals: [sgd, adam]}}
{searcher_yaml}\n"
    )
}

#[test]
fn snapshot_restores_exactly_mid_search() {
    for yaml in EVERY_SEARCHER.map(full) {
        let c = config(&yaml);
        let period = Some(10);
        let reference = run(
            &mut Searcher::new(&c.searcher, &c.hyperparameters, 7),
            &mut SyntheticCurves { seed: 2, tau: 20.0 },
            period,
        )
        .expect("runs");
        let events = &reference.events;
        for cut in [
            0,
            events.len() / 3,
            events.len() / 2,
            events.len().saturating_sub(1),
        ] {
            let mut original = Searcher::new(&c.searcher, &c.hyperparameters, 7);
            let mut ops = original.initial_operations();
            for ev in &events[..cut] {
                ops.extend(original.handle(ev).expect("event"));
            }
            let bytes = resolute_types::codec::encode(&original.snapshot()).expect("encode");
            let snapshot: SearcherSnapshot = resolute_types::codec::decode(&bytes).expect("decode");
            assert_eq!(snapshot, original.snapshot());
            let mut restored =
                Searcher::restore(&c.searcher, &c.hyperparameters, snapshot).expect("restore");
            for ev in &events[cut..] {
                let a = original.handle(ev).expect("event");
                let b = restored.handle(ev).expect("event");
                assert_eq!(
                    a,
                    b,
                    "{} diverged after restoring at event {cut}",
                    c.searcher.method.name()
                );
                ops.extend(a);
            }
            assert_eq!(
                ops,
                reference.operations,
                "{}: replay differs from the run",
                c.searcher.method.name()
            );
            assert!(
                restored.is_shut_down(),
                "{} shut down",
                c.searcher.method.name()
            );
        }
    }
}

#[test]
fn same_seed_same_search_different_seed_different_trials() {
    for yaml in EVERY_SEARCHER.map(full) {
        let c = config(&yaml);
        let go = |seed| {
            run(
                &mut Searcher::new(&c.searcher, &c.hyperparameters, seed),
                &mut SyntheticCurves { seed: 5, tau: 20.0 },
                Some(10),
            )
            .expect("runs")
        };
        let (a, b) = (go(1), go(1));
        assert_eq!(a.operations, b.operations);
        if !matches!(c.searcher.method.name(), "grid" | "single") {
            assert_ne!(
                a.operations,
                go(2).operations,
                "{}",
                c.searcher.method.name()
            );
        }
    }
}

#[test]
fn early_exits_are_replaced_and_the_search_ends() {
    use resolute_search::{ExitedReason, SearchEvent};
    for yaml in EVERY_SEARCHER.map(full) {
        let c = config(&yaml);
        let mut s = Searcher::new(&c.searcher, &c.hyperparameters, 11);
        let mut queue: std::collections::VecDeque<Operation> = s.initial_operations().into();
        let mut live: Vec<RequestId> = Vec::new();
        let mut steps = 0;
        // Every trial fails: alternate invalid hyperparameters and errors.
        while !s.is_shut_down() {
            steps += 1;
            assert!(
                steps < 10_000,
                "{} never shut down",
                c.searcher.method.name()
            );
            while let Some(op) = queue.pop_front() {
                if let Operation::Create { request_id, .. } = op {
                    queue.extend(
                        s.handle(&SearchEvent::TrialCreated { request_id })
                            .expect("created"),
                    );
                    live.push(request_id);
                }
            }
            let Some(id) = live.pop() else { break };
            let reason = if id.0 % 2 == 0 && id.0 < 6 {
                ExitedReason::InvalidHp
            } else {
                ExitedReason::Errored
            };
            queue.extend(
                s.handle(&SearchEvent::TrialExitedEarly {
                    request_id: id,
                    reason,
                })
                .expect("early exit"),
            );
            queue.extend(
                s.handle(&SearchEvent::TrialExited { request_id: id })
                    .expect("exit"),
            );
        }
        assert!(s.is_shut_down(), "{}", c.searcher.method.name());
    }
}

#[test]
fn bad_events_are_errors_not_panics() {
    use resolute_search::{SearchError, SearchEvent};
    let c = config(&full(EVERY_SEARCHER[3]));
    let mut s = Searcher::new(&c.searcher, &c.hyperparameters, 1);
    s.initial_operations();
    let unknown = SearchEvent::TrialExited {
        request_id: RequestId(999),
    };
    assert_eq!(
        s.handle(&unknown),
        Err(SearchError::UnknownTrial(RequestId(999)))
    );
    s.handle(&SearchEvent::TrialCreated {
        request_id: RequestId(1),
    })
    .expect("created");
    let no_metric = SearchEvent::ValidationCompleted {
        request_id: RequestId(1),
        metrics: BTreeMap::new(),
    };
    assert!(matches!(
        s.handle(&no_metric),
        Err(SearchError::Metric { .. })
    ));
    let mut m = BTreeMap::new();
    m.insert("loss".to_string(), Value::Float(1.0));
    let no_time = SearchEvent::ValidationCompleted {
        request_id: RequestId(1),
        metrics: m,
    };
    assert!(matches!(
        s.handle(&no_time),
        Err(SearchError::TimeMetric { .. })
    ));
}
