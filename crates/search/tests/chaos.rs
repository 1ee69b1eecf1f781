//! Random configurations and random event orders: the searchers must never panic,
//! whatever a (possibly buggy or malicious) trial reports, in whatever order.

mod common;

use std::collections::BTreeMap;

use resolute_search::{ExitedReason, Operation, RequestId, SearchEvent, Searcher};
use resolute_types::config::parse_str;
use resolute_types::Value;

struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn random_searcher(g: &mut Gen) -> String {
    let max_time = 1 + g.below(200);
    let time = format!("time_metric: t, max_time: {max_time}");
    let divisor = [1.5, 2.0, 3.0, 4.0, 7.5][g.below(5) as usize];
    let mct = g.below(6);
    let trials = 1 + g.below(20);
    let rungs = 1 + g.below(5);
    let smaller = g.below(2) == 0;
    let body = match g.below(8) {
        0 => format!("name: single, {time}"),
        1 => format!("name: random, max_trials: {trials}, max_concurrent_trials: {mct}"),
        2 => format!("name: grid, max_concurrent_trials: {mct}, {time}"),
        3 => format!("name: async_halving, num_rungs: {rungs}, max_trials: {trials}, divisor: {divisor}, max_concurrent_trials: {mct}, {time}"),
        4 => format!("name: adaptive_asha, max_trials: {trials}, divisor: {divisor}, max_rungs: {rungs}, max_concurrent_trials: {mct}, mode: {}, {time}", ["aggressive", "standard", "conservative"][g.below(3) as usize]),
        5 => format!("name: asha, num_rungs: {rungs}, max_trials: {trials}, divisor: {divisor}, max_concurrent_trials: {mct}, {time}"),
        6 => format!("name: hyperband, max_rungs: {rungs}, divisor: {divisor}, max_concurrent_trials: {mct}, {time}"),
        _ => format!(
            "name: pbt, population_size: {}, num_rounds: {}, length_per_round: {}, time_metric: t, replace_function: {{truncate_fraction: {}}}, explore_function: {{resample_probability: {}, perturb_factor: {}}}",
            1 + g.below(8), 1 + g.below(4), 1 + g.below(50), g.below(6) as f64 / 10.0, g.below(11) as f64 / 10.0, g.below(11) as f64 / 10.0
        ),
    };
    format!(
        "hyperparameters:
  a: {{type: int, minval: -3, maxval: 3, count: 2}}
  b: {{type: double, minval: 0, maxval: 1, count: 2}}
  c: {{type: categorical, vals: [x, 1, null]}}
  n: {{d: {{type: log, minval: -2, maxval: 2, base: 2, count: 2}}}}
searcher: {{metric: m, smaller_is_better: {smaller}, {body}}}\n"
    )
}

fn random_metrics(g: &mut Gen) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    let values = [
        Value::Float(f64::NAN),
        Value::Float(f64::INFINITY),
        Value::Float(-1e300),
        Value::Int(3),
        Value::Null,
        Value::from("x"),
    ];
    if g.below(10) > 0 {
        let v = if g.below(4) == 0 {
            values[g.below(6) as usize].clone()
        } else {
            Value::Float(g.below(1000) as f64 / 100.0)
        };
        m.insert("m".to_string(), v);
    }
    if g.below(10) > 0 {
        let v = if g.below(6) == 0 {
            values[g.below(6) as usize].clone()
        } else {
            Value::Int(g.below(260) as i64)
        };
        m.insert("t".to_string(), v);
    }
    m
}

#[test]
fn random_configs_and_events_never_panic() {
    let mut g = Gen(0x0dd_ba11_c0ff_ee00);
    for _ in 0..400 {
        let yaml = random_searcher(&mut g);
        let c = match parse_str("chaos.yaml", &yaml, &[]) {
            Ok(l) => l.config,
            Err(e) => panic!("generated config invalid: {e}\n{yaml}"),
        };
        let mut s = Searcher::new(&c.searcher, &c.hyperparameters, g.next());
        let mut known: Vec<RequestId> = Vec::new();
        let collect = |ops: &[Operation], known: &mut Vec<RequestId>| {
            for op in ops {
                if let Operation::Create { request_id, .. } = op {
                    known.push(*request_id);
                }
            }
        };
        let ops = s.initial_operations();
        collect(&ops, &mut known);
        for _ in 0..300 {
            let id = if known.is_empty() || g.below(20) == 0 {
                RequestId(g.below(100))
            } else {
                known[g.below(known.len() as u64) as usize]
            };
            let event = match g.below(10) {
                0 | 1 => SearchEvent::TrialCreated { request_id: id },
                2..=5 => SearchEvent::ValidationCompleted {
                    request_id: id,
                    metrics: random_metrics(&mut g),
                },
                6 => SearchEvent::TrialExitedEarly {
                    request_id: id,
                    reason: [
                        ExitedReason::Errored,
                        ExitedReason::UserCanceled,
                        ExitedReason::InvalidHp,
                    ][g.below(3) as usize],
                },
                7 | 8 => SearchEvent::TrialExited { request_id: id },
                _ => SearchEvent::Progress {
                    request_id: id,
                    fraction: g.below(300) as f64 / 100.0 - 1.0,
                },
            };
            if let Ok(ops) = s.handle(&event) {
                collect(&ops, &mut known);
            }
            let p = s.progress();
            assert!((0.0..=1.0).contains(&p), "progress {p}");
        }
        // The state still snapshots and restores after all that.
        let snap = s.snapshot();
        let bytes = resolute_types::codec::encode(&snap).expect("encode");
        let back = resolute_types::codec::decode(&bytes).expect("decode");
        Searcher::restore(&c.searcher, &c.hyperparameters, back).expect("restore");
    }
}

#[test]
fn well_behaved_random_searches_finish() {
    let mut g = Gen(0xfeed_face_1234_5678);
    for _ in 0..300 {
        let yaml = random_searcher(&mut g);
        let c = parse_str("chaos.yaml", &yaml, &[]).expect("valid").config;
        let mut s = Searcher::new(&c.searcher, &c.hyperparameters, g.next());
        let budget = c.searcher.method.budget().map(|b| b.max_time).unwrap_or(1);
        let period = Some(1 + g.below(budget));
        let mut curves = resolute_search::simulate::SyntheticCurves {
            seed: g.next(),
            tau: 5.0,
        };
        let report = resolute_search::simulate::run(&mut s, &mut curves, period)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert!(s.is_shut_down(), "search ended:\n{yaml}");
        for t in report.trials.values() {
            assert!(
                t.reports.iter().all(|r| r.0 <= budget.max(1)),
                "no trial past max_time:\n{yaml}"
            );
        }
    }
}
