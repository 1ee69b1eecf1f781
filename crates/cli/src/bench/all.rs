//! `resolute bench all`: every benchmark in one run, one table (figure, reference
//! measured in the same run where there is one, ratio, target, pass) and, with
//! `--json`, one object keyed by benchmark. `--quick` shortens each (under three
//! minutes on a 2-core machine); a target that only a full run measures shows as
//! "full run only" there. A benchmark that fails is reported and the rest go on.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::{gossip, log, recovery, sched, search, sim, submit, transfer};

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The benchmark (`resolute bench NAME`).
    pub bench: String,
    /// The figure's JSON key.
    pub figure: String,
    /// Its value.
    pub value: f64,
    /// The reference it is measured against, and its value.
    pub reference: Option<(String, f64)>,
    /// value / reference.
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (None: no target, or not measured by this run).
    pub pass: Option<bool>,
}

/// Sizes of each benchmark for a full or a quick run.
struct Plan {
    log_seconds: f64,
    transfer_mb: u64,
    submit_count: usize,
    recovery_rounds: usize,
    sim_quick: bool,
    search_seeds: u64,
    state_quick: bool,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                log_seconds: 2.0,
                transfer_mb: 128,
                submit_count: 5,
                recovery_rounds: 1,
                sim_quick: true,
                search_seeds: 10,
                state_quick: true,
            }
        } else {
            Plan {
                log_seconds: 5.0,
                transfer_mb: 1024,
                submit_count: 20,
                recovery_rounds: 3,
                sim_quick: false,
                search_seeds: 50,
                state_quick: false,
            }
        }
    }
}

fn row(bench: &str, figure: &str, value: f64) -> Row {
    Row {
        bench: bench.to_string(),
        figure: figure.to_string(),
        value,
        reference: None,
        ratio: None,
        target: String::new(),
        pass: None,
    }
}

impl Row {
    fn against(mut self, reference: &str, value: f64) -> Row {
        self.ratio = (value != 0.0).then(|| self.value / value);
        self.reference = Some((reference.to_string(), value));
        self
    }

    fn target(mut self, words: &str, pass: Option<bool>) -> Row {
        self.target = words.to_string();
        self.pass = pass;
        self
    }
}

/// Runs every benchmark; the table rows and the JSON object.
pub fn run(quick: bool, scratch: &Path, curves: &Path) -> (Vec<Row>, Value) {
    let plan = Plan::new(quick);
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    let dir = |name: &str| -> PathBuf { scratch.join(name) };
    let mut record = |name: &str, result: anyhow::Result<(Value, Vec<Row>)>| match result {
        Ok((v, mut r)) => {
            out.insert(name.to_string(), v);
            rows.append(&mut r);
        }
        Err(e) => {
            eprintln!("bench {name} failed: {e:#}");
            out.insert(name.to_string(), json!({"error": format!("{e:#}")}));
            rows.push(row(name, "error", f64::NAN).target(&format!("{e:#}"), Some(false)));
        }
    };

    eprintln!("bench all: log ...");
    record(
        "log",
        (|| {
            let r = log::run(&log::Options {
                seconds: plan.log_seconds,
                records_per_entry: 256,
                outstanding: 4,
                values_per_record: 2,
                dir: dir("log"),
            })?;
            let rows = vec![
                row("log", "records_per_s", r.records_per_s)
                    .target(">= 100000", Some(r.records_per_s >= 100_000.0)),
                row("log", "commit_latency_ms_p99", r.commit_latency_ms_p99)
                    .against("raw_fsync_latency_ms_p50", r.raw_fsync_latency_ms_p50)
                    .target("ratio <= 5", Some(r.p99_over_raw_fsync <= 5.0)),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: sched ...");
    record(
        "sched",
        (|| {
            let r = sched::run();
            let rows = vec![
                row("sched", "placements_per_s", r.placements_per_s)
                    .target(">= 20000", Some(r.placements_per_s >= 20_000.0)),
                row(
                    "sched",
                    "apply_us_p99_10x_history",
                    r.apply_us_p99_10x_history,
                )
                .against("apply_us_p99", r.apply_us_p99)
                .target("", None),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: state ...");
    record(
        "state",
        (|| {
            let opts = if plan.state_quick {
                super::state::Options::quick(dir("state"))
            } else {
                super::state::Options::full(dir("state"))
            };
            let r = super::state::run(&opts)?;
            let rows = vec![
                row("state", "apply_records_per_s", r.apply_records_per_s)
                    .against("log_records_per_s", r.log_records_per_s)
                    .target("ratio >= 0.8", Some(r.apply_over_log >= 0.8)),
                row("state", "state_bytes_after", r.state_bytes_after as f64)
                    .against("state_bytes_before", r.state_bytes_before as f64)
                    .target(
                        "ratio <= 1.05",
                        Some(r.state_bytes_after as f64 <= 1.05 * r.state_bytes_before as f64),
                    ),
                row("state", "metrics_query_ms_p99", r.metrics_query_ms_p99).target("", None),
                row(
                    "state",
                    "experiments_list_ms_p99",
                    r.experiments_list_ms_p99,
                )
                .target("", None),
                row("state", "join_catch_up_s", r.join_catch_up_s).target(
                    "same rows after the copy",
                    Some(r.join_store_agrees && r.stores_agree),
                ),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: transfer ...");
    record(
        "transfer",
        (|| {
            let r = transfer::run(plan.transfer_mb, &dir("transfer"))?;
            let rows = vec![row("transfer", "libp2p_mb_s", r.libp2p_mb_s)
                .against("raw_tcp_mb_s", r.raw_tcp_mb_s)
                .target("ratio >= 0.5", Some(r.ratio >= 0.5))];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: gossip ...");
    record(
        "gossip",
        (|| {
            let r = gossip::run(&dir("gossip"))?;
            let rows = vec![
                row("gossip", "gossip_ms_p99", r.gossip_ms_p99)
                    .against("gossip_ms_p50", r.gossip_ms_p50),
                row("gossip", "delivered", r.delivered).target("1.0", Some(r.delivered >= 1.0)),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: submit ...");
    record(
        "submit",
        (|| {
            let r = submit::run(&dir("submit"), plan.submit_count)?;
            let rows = vec![
                row("submit", "submit_to_start_ms_p50", r.submit_to_start_ms_p50)
                    .target("<= 100", Some(r.pass)),
                row("submit", "submit_to_start_ms_p99", r.submit_to_start_ms_p99),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: recovery ...");
    record(
        "recovery",
        (|| {
            let r = recovery::run(&dir("recovery"), plan.recovery_rounds)?;
            let rows = vec![
                row("recovery", "detect_ms", r.detect_ms)
                    .against("lease_timeout_ms", r.lease_timeout_ms as f64),
                row("recovery", "restart_ms", r.restart_ms).target("<= 3000", Some(r.pass)),
                row("recovery", "transfer_ms", r.transfer_ms),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: sim ...");
    record(
        "sim",
        (|| {
            let r = sim::run(Path::new("simulations/large.toml"), 0, plan.sim_quick)?;
            let full = !plan.sim_quick;
            let rows = vec![
                row("sim", "sim_s_per_wall_s", r.sim_s_per_wall_s).target(
                    if full {
                        ">= 1440 (24 h in 60 s)"
                    } else {
                        ">= 1440: full run only"
                    },
                    full.then_some(r.sim_s_per_wall_s >= sim::SIM_S_PER_WALL_S_TARGET),
                ),
                row("sim", "gpu_goodput", r.gpu_goodput)
                    .target(">= 0.95", Some(r.gpu_goodput >= sim::GOODPUT_TARGET)),
                row("sim", "work_lost_gpu_s", r.work_lost_gpu_s),
                row("sim", "recovery_s_p99", r.recovery_s_p99),
                row("sim", "violations", r.violations as f64).target("0", Some(r.violations == 0)),
            ];
            Ok((serde_json::to_value(&r)?, rows))
        })(),
    );

    eprintln!("bench all: search ...");
    record(
        "search",
        (|| {
            let table = search::load(curves)?;
            let budget = 20 * table.n_epochs as u64;
            let mut reports = serde_json::Map::new();
            for name in search::SEARCHERS {
                let r = search::run(
                    &table,
                    "validation_loss",
                    name,
                    budget,
                    0..plan.search_seeds,
                    1,
                )?;
                reports.insert(name.to_string(), serde_json::to_value(&r)?);
            }
            let regret = |k: &str| reports[k]["mean_regret"].as_f64().unwrap_or(f64::NAN);
            let (best, best_regret) = search::SEARCHERS
                .iter()
                .map(|k| (*k, regret(k)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or(("random", f64::NAN));
            let rows = vec![row("search", &format!("mean_regret ({best})"), best_regret)
                .against("mean_regret (random)", regret("random"))
                .target("vs Optuna: benches/optuna_search.py --compare", None)];
            reports.insert("budget_epochs".into(), json!(budget));
            Ok((Value::Object(reports), rows))
        })(),
    );

    let _ = std::fs::remove_dir_all(scratch);
    (rows, Value::Object(out))
}
