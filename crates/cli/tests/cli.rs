//! The `resolute` binary, run as a user would: real files, real process, exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn resolute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resolute"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("runs")
}

fn root() -> PathBuf {
    // At run time: a test binary reused from another checkout's build must not
    // look in that checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_example_checks_and_previews() {
    let dir = root().join("examples/searchers");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("examples") {
        let path = entry.expect("entry").path();
        let file = path.to_str().expect("utf-8 path");
        let out = resolute(&["config", "check", file]);
        assert!(
            out.status.success(),
            "config check {file}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("searcher:"),
            "normalized config printed"
        );
        let out = resolute(&["preview-search", file, "--json"]);
        assert!(
            out.status.success(),
            "preview-search {file}: {}",
            text(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert!(json.as_object().is_some_and(|o| !o.is_empty()), "{json}");
        seen += 1;
    }
    assert!(seen >= 8, "one example per searcher");
}

#[test]
fn preview_matches_determined() {
    let out = resolute(&[
        "preview-search",
        "examples/searchers/adaptive_asha.yaml",
        "--json",
    ]);
    assert_eq!(text(&out.stdout).trim(), r#"{"100":5,"300":3,"900":2}"#);
    let out = resolute(&["preview-search", "examples/searchers/adaptive_asha.yaml"]);
    let human = text(&out.stdout);
    assert!(
        human.contains("This search will create a total of 10 trials"),
        "{human}"
    );
}

#[test]
fn overrides_change_the_preview() {
    let out = resolute(&[
        "preview-search",
        "examples/searchers/random.yaml",
        "--json",
        "--config",
        "searcher.max_trials=3",
    ]);
    assert_eq!(text(&out.stdout).trim(), r#"{"max_length":3}"#);
}

#[test]
fn bad_configs_exit_1_with_the_message() {
    let dir = std::env::temp_dir().join(format!("resolute-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("exp.yaml");
    std::fs::write(
        &bad,
        "hyperparameters: {}\nsearcher:\n  name: random\n  metric: loss\n  max_trails: 3\n",
    )
    .expect("write");
    let out = resolute(&["config", "check", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "exp.yaml:5:3: searcher.max_trails: unknown field (did you mean max_trials?)"
        ),
        "{stderr}"
    );
    std::fs::write(&bad, [0xffu8, 0x00, 0x12, 0x80]).expect("write");
    let out = resolute(&["preview-search", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not UTF-8"));
    let out = resolute(&["config", "check", "/nonexistent/exp.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_log_prints_its_figures_as_json() {
    let out = resolute(&[
        "bench",
        "log",
        "--json",
        "--seconds",
        "0.3",
        "--outstanding",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "records_per_s",
        "entries_per_s",
        "fsyncs_per_s_raw",
        "records_per_fsync",
        "commit_latency_ms_p50",
        "commit_latency_ms_p99",
    ] {
        let v = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {json}"));
        assert!(v > 0.0, "{key} = {v}");
    }
}

#[test]
fn sim_prints_its_report_as_json_and_exits_0_when_clean() {
    let out = resolute(&["sim", "simulations/steady.toml", "--json", "--seed", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "seed",
        "digest",
        "violations",
        "experiments_submitted",
        "experiments_completed",
        "trials",
        "gpu_goodput",
        "work_lost_gpu_s",
        "recoveries",
        "recovery_s_p50",
        "recovery_s_p99",
        "queue_wait_s_p50",
        "queue_wait_s_p99",
        "messages",
        "bytes_moved",
        "simulated_s",
        "wall_s",
        "group_share",
    ] {
        assert!(json.get(key).is_some(), "{key} missing");
    }
    assert_eq!(json["seed"], 1);
    assert_eq!(json["violations"].as_array().map(Vec::len), Some(0));
}

#[test]
fn bench_search_reports_every_searcher_on_the_shipped_curves() {
    let out = resolute(&["bench", "search", "--seeds", "0..4", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for name in [
        "random",
        "async_halving",
        "adaptive_asha_standard",
        "adaptive_asha_aggressive",
        "adaptive_asha_conservative",
        "asha_pause_resume",
        "hyperband",
    ] {
        let r = &v[name];
        for key in [
            "mean_regret",
            "median_regret",
            "top5_hit_rate",
            "top5_median_epochs",
            "trials",
        ] {
            assert!(r.get(key).is_some(), "{name}.{key} missing: {r}");
        }
        let regret = r["mean_regret"].as_f64().expect("regret");
        assert!((0.0..3.0).contains(&regret), "{name}: {regret}");
    }
    // Halving trains many short trials where random trains few long ones.
    assert!(v["asha_pause_resume"]["trials"].as_f64() > v["random"]["trials"].as_f64());
}

#[test]
fn bench_search_is_deterministic_for_a_seed() {
    let args = [
        "bench",
        "search",
        "--seeds",
        "3..5",
        "--searcher",
        "adaptive_asha_standard",
        "--json",
    ];
    let a = resolute(&args);
    let b = resolute(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn a_malformed_curves_file_is_refused_with_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.json");
    let bad = r#"{"format": "curves-v1", "n_epochs": 3, "n_seeds": 1,
        "metrics": {"loss": "min"},
        "configs": [{"id": 0, "params": {}, "seeds": [{"loss": [1.0, 0.5, 0.2]}]},
                    {"id": 1, "params": {}, "seeds": [{"loss": [1.0, 0.5]}]}]}"#;
    std::fs::write(&file, bad).expect("write");
    let path = file.to_str().expect("utf-8");
    let out = resolute(&["bench", "search", "--curves", path, "--metric", "loss"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("configs[1].seeds[0].loss: 2 values"), "{err}");
}

#[test]
fn a_tiny_table_is_searched_to_its_best_config() {
    // Two configs, one clearly better at the end although worse early (the
    // curves cross): with enough budget every searcher ends on it.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tiny.json");
    let slow: Vec<f64> = (1..=9).map(|e| 2.0 - 0.2 * e as f64).collect();
    let fast: Vec<f64> = (1..=9).map(|e| 0.9 - 0.01 * e as f64).collect();
    let table = serde_json::json!({
        "format": "curves-v1", "n_epochs": 9, "n_seeds": 1,
        "metrics": {"loss": "min"},
        "configs": [{"id": "fast", "params": {}, "seeds": [{"loss": fast}]},
                    {"id": "slow", "params": {}, "seeds": [{"loss": slow}]}]
    });
    std::fs::write(&file, table.to_string()).expect("write");
    let path = file.to_str().expect("utf-8");
    let out = resolute(&[
        "bench",
        "search",
        "--curves",
        path,
        "--metric",
        "loss",
        "--budget",
        "200",
        "--seeds",
        "0..5",
        "--searcher",
        "random",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["random"]["mean_regret"], 0.0, "{v}");
    assert_eq!(v["random"]["top5_hit_rate"], 1.0, "{v}");
    let out = resolute(&["bench", "search", "--curves", path, "--metric", "accuracy"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("--metric accuracy"), "{err}");
}
