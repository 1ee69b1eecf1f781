//! Helpers shared by the searcher tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use resolute_search::{Operation, RequestId, SearchEvent, Searcher};
use resolute_types::config::{parse_str, ExperimentConfig};
use resolute_types::Value;

/// Parses a whole experiment config (panics with the diagnostics if invalid).
pub fn config(yaml: &str) -> ExperimentConfig {
    match parse_str("test.yaml", yaml, &[]) {
        Ok(loaded) => loaded.config,
        Err(e) => panic!("config did not parse:\n{e}"),
    }
}

/// A searcher for a config, with the seed Determined's tests use.
pub fn searcher(yaml: &str) -> Searcher {
    let c = config(yaml);
    Searcher::new(&c.searcher, &c.hyperparameters, 102_932_948)
}

/// Validation metrics with the searcher metric and (optionally) a time metric.
pub fn metrics(metric: &str, value: f64, time: Option<(&str, u64)>) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    m.insert(metric.to_string(), Value::Float(value));
    if let Some((name, t)) = time {
        m.insert(name.to_string(), Value::Float(t as f64));
    }
    m
}

/// A trial as Determined's `TestSearchRunner` sees it.
#[derive(Debug, Clone)]
pub struct TestTrial {
    pub id: RequestId,
    pub hparams: Value,
    pub stopped: bool,
    pub stopped_at: u64,
}

/// A port of Determined's `TestSearchRunner`: trials run one after another; each
/// validates every `period` units from 0 to `max_units`, with a metric that gets
/// steadily worse (`increasing`) or better; a stopped trial closes at once.
pub struct TestRunner {
    pub searcher: Searcher,
    pub trials: Vec<TestTrial>,
    pub metric: String,
    pub time_metric: String,
}

impl TestRunner {
    pub fn new(yaml: &str) -> Self {
        let searcher = searcher(yaml);
        let metric = searcher.config().metric.clone();
        let time_metric = searcher
            .config()
            .method
            .budget()
            .map(|b| b.time_metric)
            .unwrap_or_default();
        TestRunner {
            searcher,
            trials: Vec::new(),
            metric,
            time_metric,
        }
    }

    fn handle(&mut self, ops: Vec<Operation>) {
        for op in ops {
            match op {
                Operation::Create {
                    request_id,
                    hparams,
                    ..
                } => {
                    self.trials.push(TestTrial {
                        id: request_id,
                        hparams,
                        stopped: false,
                        stopped_at: 0,
                    });
                    let more = self
                        .searcher
                        .handle(&SearchEvent::TrialCreated { request_id })
                        .expect("created");
                    self.handle(more);
                }
                Operation::Stop { request_id } => {
                    if let Some(t) = self.trials.iter_mut().find(|t| t.id == request_id) {
                        t.stopped = true;
                    }
                }
                _ => {}
            }
        }
    }

    pub fn run(&mut self, max_units: u64, period: u64, increasing: bool) {
        let mut metric = 0.0;
        let ops = self.searcher.initial_operations();
        self.handle(ops);
        let mut i = 0;
        while i < self.trials.len() {
            let id = self.trials[i].id;
            let mut j = 0;
            while j <= max_units {
                metric += if increasing { 1.0 } else { -1.0 };
                let ev = SearchEvent::ValidationCompleted {
                    request_id: id,
                    metrics: metrics(&self.metric, metric, Some((&self.time_metric, j))),
                };
                let ops = self.searcher.handle(&ev).expect("validation");
                self.handle(ops);
                if self.trials[i].stopped {
                    self.trials[i].stopped_at = j;
                    break;
                }
                j += period;
            }
            let ops = self
                .searcher
                .handle(&SearchEvent::TrialExited { request_id: id })
                .expect("exit");
            self.handle(ops);
            i += 1;
        }
    }

    pub fn count_stopped_at(&self, at: u64, filter: impl Fn(&TestTrial) -> bool) -> usize {
        self.trials
            .iter()
            .filter(|t| filter(t) && t.stopped_at == at)
            .count()
    }
}
