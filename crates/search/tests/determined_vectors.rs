//! Behaviour vectors ported from Determined's own searcher tests
//! (`master/pkg/searcher/*_test.go`, release 0.38.1). They define the semantics.

mod common;

use common::{config, searcher, TestRunner};
use resolute_search::simulate::plan;
use resolute_search::{
    bracket_max_concurrent_trials, bracket_max_trials, make_brackets, make_rungs, sample, Bracket,
    Operation,
};
use resolute_types::config::AdaptiveMode;
use resolute_types::Value;

#[test]
fn rung_lengths() {
    let cases: &[(u32, u64, f64, &[u64])] = &[
        (3, 9, 3.0, &[1, 3, 9]),
        (4, 10, 2.0, &[1, 2, 5, 10]),
        (1, 9, 3.0, &[9]),
        (3, 900, 3.0, &[100, 300, 900]),
    ];
    for (num_rungs, max_time, divisor, want) in cases {
        assert_eq!(
            make_rungs(*num_rungs, *divisor, *max_time),
            *want,
            "({num_rungs}, {max_time}, {divisor})"
        );
    }
}

#[test]
fn async_halving_stops_all_but_the_first_when_metrics_get_worse() {
    let mut runner = TestRunner::new(
        "hyperparameters: {x: {type: int, minval: 0, maxval: 10, count: 3}}
searcher: {name: async_halving, metric: val_loss, max_trials: 10, max_concurrent_trials: 3,
           divisor: 3, num_rungs: 3, time_metric: batches, max_time: 900}",
    );
    runner.run(900, 100, true);
    assert_eq!(runner.trials.len(), 10);
    assert_eq!(runner.count_stopped_at(900, |_| true), 1);
    assert_eq!(runner.count_stopped_at(100, |_| true), 9);
}

#[test]
fn adaptive_bracket_max_trials() {
    let cases: &[(u32, f64, &[u32], &[u32])] = &[
        (20, 3.0, &[3, 2, 1], &[12, 5, 3]),
        (50, 3.0, &[4, 3], &[35, 15]),
        (50, 4.0, &[3, 2], &[37, 13]),
        (100, 4.0, &[4, 3, 2], &[70, 22, 8]),
    ];
    for (max_trials, divisor, rungs, want) in cases {
        assert_eq!(bracket_max_trials(*max_trials, *divisor, rungs), *want);
    }
}

#[test]
fn adaptive_bracket_concurrency() {
    let cases: &[(u32, f64, &[u32], &[u32])] = &[
        (0, 3.0, &[9, 3, 1], &[3, 3, 3]),
        (11, 3.0, &[9, 3, 1], &[4, 4, 3]),
        (0, 4.0, &[40, 10], &[10, 10]),
    ];
    for (mct, divisor, trials, want) in cases {
        assert_eq!(bracket_max_concurrent_trials(*mct, *divisor, trials), *want);
    }
}

#[test]
fn adaptive_brackets() {
    let b = |num_rungs, max_trials, max_concurrent_trials| Bracket {
        num_rungs,
        max_trials,
        max_concurrent_trials,
    };
    assert_eq!(
        make_brackets(10, 100, 4.0, 5, AdaptiveMode::Standard, &[], 2),
        vec![b(2, 7, 1), b(1, 3, 1)]
    );
    assert_eq!(
        make_brackets(10, 1000, 3.0, 5, AdaptiveMode::Conservative, &[], 5),
        vec![b(3, 7, 2), b(2, 2, 2), b(1, 1, 1)]
    );
    // Exact powers: log(1000)/log(10) is 2.9999999999999996 in floating point.
    assert_eq!(
        make_brackets(1000, 1000, 10.0, 10, AdaptiveMode::Aggressive, &[], 0)[0].num_rungs,
        4
    );
}

#[test]
fn adaptive_asha_search_method() {
    let mut runner = TestRunner::new(
        "hyperparameters: {x: {type: int, minval: 0, maxval: 10, count: 3}}
searcher: {name: adaptive_asha, metric: loss, max_trials: 9, max_rungs: 5, divisor: 3,
           max_time: 90, time_metric: batches, max_concurrent_trials: 3, mode: standard}",
    );
    runner.run(90, 10, true);
    assert_eq!(runner.trials.len(), 9);
    let s = &runner.searcher;
    let in_bracket = |b: usize| move |t: &common::TestTrial| s.bracket_of(t.id) == Some(b);
    assert_eq!(runner.trials.iter().filter(|t| in_bracket(0)(t)).count(), 6);
    assert_eq!(runner.count_stopped_at(10, in_bracket(0)), 5);
    assert_eq!(runner.count_stopped_at(90, in_bracket(0)), 1);
    assert_eq!(runner.trials.iter().filter(|t| in_bracket(1)(t)).count(), 3);
    assert_eq!(runner.count_stopped_at(30, in_bracket(1)), 2);
    assert_eq!(runner.count_stopped_at(90, in_bracket(1)), 1);
}

fn ints(points: &[Value], key: &str) -> Vec<i64> {
    points
        .iter()
        .map(|p| {
            p.as_map()
                .and_then(|m| m.get(key))
                .and_then(Value::as_i64)
                .expect("int")
        })
        .collect()
}

#[test]
fn grid_int_axes_in_order() {
    let c = config(
        "hyperparameters:
  x: {type: int, minval: 0, maxval: 20, count: 3}
  y: {type: int, minval: 0, maxval: 10, count: 3}
searcher: {name: grid, metric: loss}",
    );
    let points = sample::grid(&c.hyperparameters);
    assert_eq!(ints(&points, "x"), vec![0, 0, 0, 10, 10, 10, 20, 20, 20]);
    assert_eq!(ints(&points, "y"), vec![0, 5, 10, 0, 5, 10, 0, 5, 10]);
}

#[test]
fn grid_int_counts() {
    let c = config("hyperparameters: {x: {type: int, minval: -4, maxval: -2, count: 3}}\nsearcher: {name: grid, metric: l}");
    assert_eq!(
        ints(&sample::grid(&c.hyperparameters), "x"),
        vec![-4, -3, -2]
    );
    // Count is clamped to the number of integers; count 1 is the rounded midpoint.
    let c = config("hyperparameters: {x: {type: int, minval: 1, maxval: 3, count: 10}}\nsearcher: {name: grid, metric: l}");
    assert_eq!(ints(&sample::grid(&c.hyperparameters), "x"), vec![1, 2, 3]);
    let c = config("hyperparameters: {x: {type: int, minval: 1, maxval: 4, count: 1}}\nsearcher: {name: grid, metric: l}");
    assert_eq!(ints(&sample::grid(&c.hyperparameters), "x"), vec![3]);
}

#[test]
fn grid_trial_count_is_the_product_of_counts_with_nesting() {
    let c = config(
        "hyperparameters:
  c: 5
  cat: {type: categorical, vals: [a, b]}
  lr: {type: log, minval: -4, maxval: -1, base: 10, count: 4}
  opt:
    beta: {type: double, minval: 0.5, maxval: 0.9, count: 2}
    deeper: {m: {type: int, minval: 1, maxval: 2, count: 2}, empty: {}}
searcher: {name: grid, metric: loss, max_concurrent_trials: 2}",
    );
    let points = sample::grid(&c.hyperparameters);
    assert_eq!(points.len(), 2 * 4 * 2 * 2);
    let first = points[0].to_string();
    assert_eq!(
        first,
        r#"{"c":5,"cat":"a","lr":0.0001,"opt":{"beta":0.5,"deeper":{"empty":{},"m":1}}}"#
    );
    // The grid searcher runs every point, two at a time.
    let yaml = "hyperparameters: {a: {type: int, minval: 0, maxval: 10, count: 4}}
searcher: {name: grid, metric: loss, max_concurrent_trials: 2}";
    let ops = searcher(yaml).initial_operations();
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Operation::Create { .. }))
            .count(),
        2
    );
    let mut s = searcher(yaml);
    let report = resolute_search::simulate::run(&mut s, &mut curves(), None).expect("runs");
    assert_eq!(report.trials.len(), 4);
}

fn curves() -> resolute_search::simulate::SyntheticCurves {
    resolute_search::simulate::SyntheticCurves { seed: 1, tau: 10.0 }
}

#[test]
fn random_samples_within_bounds_and_single_makes_one_trial() {
    let mut s = searcher(
        "hyperparameters: {x: {type: int, minval: 0, maxval: 10}, y: {type: double, minval: 0, maxval: 10}}
searcher: {name: random, metric: loss, max_trials: 4, max_concurrent_trials: 2}",
    );
    let report = resolute_search::simulate::run(&mut s, &mut curves(), None).expect("runs");
    assert_eq!(report.trials.len(), 4);
    for t in report.trials.values() {
        let m = t.hparams.as_map().expect("map");
        let x = m["x"].as_i64().expect("int");
        let y = m["y"].as_f64().expect("float");
        assert!(
            (0..=10).contains(&x) && (0.0..10.0).contains(&y),
            "{}",
            t.hparams
        );
    }
    let mut s = searcher("hyperparameters: {x: 1}\nsearcher: {name: single, metric: loss}");
    let report = resolute_search::simulate::run(&mut s, &mut curves(), None).expect("runs");
    assert_eq!(report.trials.len(), 1);
}

#[test]
fn same_seed_same_samples() {
    let c = config(
        "hyperparameters:
  a: {type: int, minval: -5, maxval: 5}
  b: {type: double, minval: 0, maxval: 1}
  c: {type: log, minval: -3, maxval: 0, base: 10}
  d: {type: categorical, vals: [1, two, {three: 3}]}
  n: {z: {type: int, minval: 0, maxval: 100}, a: {type: double, minval: 1, maxval: 2}}
searcher: {name: random, metric: loss, max_trials: 5}",
    );
    for seed in 0..50 {
        let mut r1 = resolute_search::rng::ExperimentRng::new(seed);
        let mut r2 = resolute_search::rng::ExperimentRng::new(seed);
        for _ in 0..5 {
            assert_eq!(
                sample::sample_all(&c.hyperparameters, &mut r1),
                sample::sample_all(&c.hyperparameters, &mut r2)
            );
        }
        assert_eq!(r1.state(), r2.state());
    }
}

#[test]
fn preview_plans() {
    let c = config(
        "hyperparameters: {x: {type: int, minval: 0, maxval: 10, count: 3}}
searcher: {name: adaptive_asha, metric: loss, max_trials: 10, max_rungs: 10, divisor: 3,
           max_time: 900, time_metric: batches, max_concurrent_trials: 5, mode: standard}",
    );
    let p = plan(&c.searcher, &c.hyperparameters).expect("plan");
    assert_eq!(
        p.to_json(),
        vec![
            ("100".to_string(), 5),
            ("300".to_string(), 3),
            ("900".to_string(), 2)
        ]
    );
    let c = config(
        "hyperparameters: {a: {type: int, minval: 0, maxval: 10, count: 4}}
searcher: {name: grid, metric: loss, max_concurrent_trials: 2}",
    );
    let p = plan(&c.searcher, &c.hyperparameters).expect("plan");
    assert_eq!(p.to_json(), vec![("max_length".to_string(), 4)]);
}
