//! Scripts written against Determined's Core API, run unchanged: off a
//! cluster (a laptop run: the local context), and on a real three-node
//! cluster with a node SIGKILLed under one of them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use resolute_tests::{get, repo, start, this_node, trials, until, NodeProc};

/// A script in the style of Determined's tutorials that touches every part of
/// the local context: logging in `det.LOG_FORMAT`, `pathlib` checkpoint paths
/// with metadata, upload, download, delete, numpy-like metric values, the
/// searcher's one operation, and `det.InvalidHP` ending the run cleanly.
const LOCAL_SCRIPT: &str = r#"
import json, logging, pathlib, sys
import determined as det

class Scalar:
    """What a numpy scalar or a 0-d tensor offers: `.item()`."""
    def __init__(self, v):
        self.v = v
    def item(self):
        return self.v

logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT, stream=sys.stdout)
assert det.get_cluster_info() is None
with det.core.init() as core:
    for op in core.searcher.operations():
        assert op.length == 1, op.length
        core.train.report_training_metrics(steps_completed=1, metrics={"loss": Scalar(0.25), "both": [Scalar(1), 2.5]})
        with core.checkpoint.store_path({"steps_completed": 1, "note": "first"}) as (path, storage_id):
            assert isinstance(path, pathlib.Path), type(path)
            (path / "weights").write_text("w=1")
        core.train.report_validation_metrics(steps_completed=1, metrics={"validation_loss": Scalar(0.5)})
        op.report_completed(0.5)
    assert core.checkpoint.get_metadata(storage_id) == {"steps_completed": 1, "note": "first"}
    with core.checkpoint.restore_path(storage_id) as path:
        assert (path / "weights").read_text() == "w=1"
        copy = core.checkpoint.upload(path, {"steps_completed": 2})
    core.checkpoint.download(copy, "downloaded")
    print("DOWNLOADED", sorted(p.name for p in pathlib.Path("downloaded").iterdir()))
    core.checkpoint.delete(copy)
    print("UNITS", core.searcher.get_configured_units())
    print("PREEMPT", core.preempt.should_preempt())
    print("KEPT", storage_id)
    raise det.InvalidHP("lr too large for this model")
print("NOT REACHED")
"#;

#[test]
fn a_determined_script_runs_off_a_cluster_with_the_local_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("train.py"), LOCAL_SCRIPT).expect("script");
    let out = Command::new("python3")
        .arg("train.py")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path().join("xdg"))
        .env("PYTHONPATH", repo().join("python"))
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "InvalidHP ends it cleanly: {stdout}\n{stderr}"
    );
    assert!(!stdout.contains("NOT REACHED"), "{stdout}");
    // Determined's log format, its logger's lines, numbers for the scalars.
    assert!(
        stdout.contains(
            "determined.core: report_training_metrics(steps_completed=1, metrics={\"both\": [1, 2.5], \"loss\": 0.25})"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("INFO: ["), "LOG_FORMAT: {stdout}");
    assert!(
        stdout.contains("report_early_exit(invalid_hyperparameters)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("DOWNLOADED ['metadata.json', 'weights']"),
        "{stdout}"
    );
    assert!(stdout.contains("UNITS None"), "{stdout}");
    assert!(stdout.contains("PREEMPT False"), "{stdout}");
    assert!(
        stderr.contains("FutureWarning"),
        "operations() is deprecated in 0.38: {stderr}"
    );
    // The kept checkpoint is where Determined keeps them off-cluster; the
    // deleted copy is gone.
    let kept = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KEPT "))
        .expect("kept id");
    let store = dir.path().join("xdg/determined");
    let entries: Vec<String> = std::fs::read_dir(&store)
        .expect("checkpoint store")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(entries, vec![kept.to_string()], "one checkpoint left");
    let metadata: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join(kept).join("metadata.json")).expect("metadata.json"),
    )
    .expect("json");
    assert_eq!(metadata["note"], "first");
}

fn create(api: &str, config: &Path, model: &Path, overrides: &[String]) -> u64 {
    let mut args: Vec<String> = vec![
        "experiment".into(),
        "create".into(),
        config.display().to_string(),
        model.display().to_string(),
    ];
    for o in overrides {
        args.push("--config".into());
        args.push(o.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    get(api, &args)["id"].as_u64().expect("experiment id")
}

/// The PYTHONPATH to the repository's client, for the examples.
fn client_env() -> String {
    format!(
        "environment.environment_variables=[\"PYTHONPATH={}\"]",
        repo().join("python").display()
    )
}

/// What [`kill_under_a_trial`] leaves: the nodes' data (kept until the
/// end of the test), the first node, the other survivor, the trial that
/// moved and its description.
struct Moved {
    _dir: tempfile::TempDir,
    a: NodeProc,
    _survivor: Option<NodeProc>,
    trial: u64,
    described: serde_json::Value,
}

/// Three nodes on `hosts`; the example `model` with `overrides` submitted to
/// the first; once a trial with slots on the second or third node has a
/// checkpoint held by two nodes, that node is SIGKILLed. Waits until the
/// experiment completes, with every trial trained to `length`, and the
/// trial that was there on a later incarnation (resumed from its checkpoint,
/// not from the start).
fn kill_under_a_trial(hosts: [u8; 3], model: &str, overrides: &[String], length: u64) -> Moved {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), hosts[0], None);
    let b = start(&dir.path().join("b"), hosts[1], Some(&a.listen));
    let c = start(&dir.path().join("c"), hosts[2], Some(&a.listen));
    until("three voters", Duration::from_secs(30), || {
        let v = get(&c.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 3)
    });
    let model = repo().join(model);
    let mut all = vec![
        client_env(),
        format!("searcher.max_length.batches={length}"),
    ];
    all.extend_from_slice(overrides);
    let id = create(&a.api, &model.join("experiment.yaml"), &model, &all);
    let ids = [this_node(&b), this_node(&c)];
    let mut victim: Option<(u64, usize)> = None;
    let copied = |trial: &serde_json::Value| {
        let runs = get(&a.api, &["trial", "runs", &trial["id"].to_string()]);
        runs["checkpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["holders"].as_array().is_some_and(|h| h.len() >= 2))
    };
    let on = |trial: &serde_json::Value, node: &str| {
        trial["layout"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["node"].as_str() == Some(node))
    };
    until(
        "a trial on b or c with a copied checkpoint",
        Duration::from_secs(120),
        || {
            for t in trials(&a.api, id) {
                for (k, node) in ids.iter().enumerate() {
                    if on(&t, node) && copied(&t) {
                        victim = Some((t["id"].as_u64().unwrap_or(0), k));
                        return true;
                    }
                }
            }
            false
        },
    );
    let (trial, k) = victim.expect("victim");
    let mut others = [Some(b), Some(c)];
    drop(others[k].take());
    let survivor = others[1 - k].take();
    until("the experiment completes", Duration::from_secs(240), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    for t in trials(&a.api, id) {
        assert_eq!(t["state"], "Done(Completed)", "{t}");
        assert_eq!(t["steps_completed"], length, "{t}");
    }
    let described = get(&a.api, &["trial", "describe", &trial.to_string()]);
    assert!(
        described["incarnation"].as_u64().unwrap_or(0) >= 2,
        "it moved: {described}"
    );
    Moved {
        _dir: dir,
        a,
        _survivor: survivor,
        trial,
        described,
    }
}

/// The trial's metric reports and its last validation.
fn last_validation(api: &str, trial: u64) -> (serde_json::Value, serde_json::Value) {
    let m = get(api, &["trial", "metrics", &trial.to_string()]);
    let last = m
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|p| p["kind"] == "Validation")
        .cloned()
        .unwrap_or_default();
    (m, last)
}

#[test]
fn a_determined_tutorial_script_runs_unchanged_on_a_cluster_and_resumes_after_a_kill() {
    // Slow enough (data.pause_s, read from the config's `data` through
    // `ClusterInfo.user_data`) that a node dies while a trial runs on it;
    // the script checks the checkpoint's metadata against what it restored,
    // and fails the trial otherwise.
    // Bound in this order, dropped in the reverse: the nodes stop before
    // their data dir goes.
    let Moved {
        _dir,
        a,
        _survivor,
        trial,
        described,
    } = kill_under_a_trial(
        [81, 82, 83],
        "examples/core-api",
        &["data.pause_s=0.05".into()],
        300,
    );
    let logs = get(&a.api, &["trial", "logs", &trial.to_string()]);
    let text = logs.to_string();
    assert!(
        text.contains("core-api-example: resumed at batch"),
        "{text}"
    );
    // What Determined would report: x = step * batches at each validation.
    let step = described["hparams"]["step"].as_u64().expect("step");
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 300, "{m}");
    assert_eq!(
        last["metrics"]["x"].as_f64(),
        Some((step * 300) as f64),
        "{m}"
    );
}

/// `resolute experiment create CONFIG` against `n`, its stderr kept apart.
fn experiment_create(n: &NodeProc, config: &Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(resolute_tests::bin());
    cmd.args(["experiment", "create"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.args(["-m", &n.api])
        .env("RESOLUTE_TOKEN", &n.token)
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli")
}

#[test]
fn experiment_create_prints_and_returns_the_configs_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 84, None);
    let config = dir.path().join("exp.yaml");
    std::fs::write(
        &config,
        "entrypoint: python3 -c pass\n\
         searcher: {name: single, metric: loss, max_length: {batches: 1}}\n\
         environment: {image: determinedai/pytorch-ngc:0.38.0}\n\
         checkpoint_storage: {type: s3, bucket: my-bucket}\n",
    )
    .expect("config");
    let out = experiment_create(&a, &config, true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str())
        .collect();
    // The ignored image, the replaced s3 storage (its type and its bucket),
    // and the deprecated max_length.
    assert_eq!(warnings.len(), 4, "{v}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("checkpoint_storage.bucket")),
        "{v}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("searcher.max_length")),
        "{v}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("environment.image")),
        "{v}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("checkpoint_storage.type")),
        "{v}"
    );
    for w in &warnings {
        assert!(stderr.contains(&format!("warning: {w}")), "{stderr}");
    }
    assert_eq!(
        get(&a.api, &["experiment", "list"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

/// Whether `python3` here imports torch (the PyTorchTrial tests need it).
fn has_torch() -> bool {
    Command::new("python3")
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_trial_harness_loop_passes_its_python_tests_without_torch() {
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(repo().join("python/tests"))
        .env("PYTHONPATH", repo().join("python"))
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Ran 10 tests") && text.contains("OK"),
        "{text}"
    );
}

#[test]
fn a_trial_class_entrypoint_is_checked_up_front_and_says_what_it_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 98, None);
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    let config = model.join("exp.yaml");
    std::fs::write(
        &config,
        "entrypoint: model_def:MyTrial\nmax_restarts: 0\n\
         hyperparameters: {global_batch_size: 8}\n\
         searcher: {name: single, metric: loss, max_length: {batches: 1}}\n",
    )
    .expect("config");
    // Its module is not in the model directory: refused before anything is sent.
    let out = experiment_create_in(&a, &config, &model);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("entrypoint model_def:MyTrial: neither model_def.py nor model_def/__init__.py is in the model directory"),
        "{stderr}"
    );
    // With it there, the submission warns that it runs through the harness.
    std::fs::write(model.join("model_def.py"), "import torch\n").expect("module");
    let out = experiment_create_in(&a, &config, &model);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("exp.yaml:1:13: entrypoint: \"model_def:MyTrial\" is a Trial class")
            && stderr.contains("needs torch on the nodes"),
        "{stderr}"
    );
    if has_torch() {
        eprintln!("the run without torch is skipped: python3 imports torch here");
        return;
    }
    // Without torch the trial fails with the harness's message, not a shell error.
    let id = get(&a.api, &["experiment", "list"])[0]["id"]
        .as_u64()
        .expect("id");
    until("the experiment errors", Duration::from_secs(60), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Errored"
    });
    let trial = trials(&a.api, id)[0]["id"].as_u64().expect("trial");
    let logs = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(
        logs.contains("entrypoint model_def:MyTrial: a Trial class runs on PyTorch, and torch is not importable"),
        "{logs}"
    );
}

#[test]
fn a_trial_reads_the_experiments_best_validation_from_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 93, None);
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(
        model.join("best.py"),
        r#"
import time
import determined as det
with det.core.init() as core:
    assert core.train.get_experiment_best_validation() is None
    core.train.report_validation_metrics(steps_completed=1, metrics={"loss": 0.5})
    best, deadline = None, time.time() + 30
    while best is None and time.time() < deadline:
        time.sleep(0.2)
        best = core.train.get_experiment_best_validation()
    print("best validation:", best, flush=True)
    assert best == 0.5, best
"#,
    )
    .expect("script");
    let config = model.join("exp.yaml");
    std::fs::write(
        &config,
        "entrypoint: python3 best.py\nmax_restarts: 0\n\
         searcher: {name: single, metric: loss, max_length: {batches: 1}}\n",
    )
    .expect("config");
    let id = create(&a.api, &config, &model, &[]);
    until("the experiment completes", Duration::from_secs(60), || {
        let s = get(&a.api, &["experiment", "describe", &id.to_string()])["state"].clone();
        assert_ne!(s, "Errored");
        s == "Completed"
    });
    let trial = trials(&a.api, id)[0]["id"].as_u64().expect("trial");
    let logs = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(logs.contains("best validation: 0.5"), "{logs}");
}

#[test]
fn a_pytorch_trial_search_follows_the_searchers_lengths_in_epochs() {
    if !has_torch() {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 99, None);
    let model = repo().join("examples/pytorch-trial");
    let id = create(
        &a.api,
        &model.join("adaptive.yaml"),
        &model,
        &[client_env(), "data.pause_s=0.03".into()],
    );
    until("the search completes", Duration::from_secs(300), || {
        let s = get(&a.api, &["experiment", "describe", &id.to_string()])["state"].clone();
        assert_ne!(s, "Errored");
        s == "Completed"
    });
    // Rungs at 2 and 4 epochs (16 batches an epoch), a validation every
    // epoch: the trial of the two-rung bracket was stopped by the searcher
    // before 4 (checkpointed at its last batch), the others trained to 4.
    let mut ends = Vec::new();
    for t in trials(&a.api, id) {
        let (m, last) = last_validation(&a.api, t["id"].as_u64().expect("id"));
        let epochs = last["metrics"]["epochs"].as_u64().unwrap_or(0);
        assert_eq!(last["steps_completed"], epochs * 16, "{m}");
        ends.push(epochs);
    }
    ends.sort_unstable();
    assert_eq!(ends.len(), 4, "{ends:?}");
    assert!(ends[0] >= 2 && ends[0] < 4, "{ends:?}");
    assert_eq!(&ends[1..], &[4, 4, 4], "{ends:?}");
}

/// `resolute experiment create CONFIG MODEL_DIR` against `n`.
fn experiment_create_in(n: &NodeProc, config: &Path, model: &Path) -> std::process::Output {
    Command::new(resolute_tests::bin())
        .args(["experiment", "create"])
        .arg(config)
        .arg(model)
        .args(["-m", &n.api])
        .env("RESOLUTE_TOKEN", &n.token)
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli")
}

#[test]
fn a_pytorch_trial_runs_through_the_harness_and_resumes_after_a_kill() {
    if !has_torch() {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    let Moved {
        _dir,
        a,
        _survivor,
        trial,
        described: _,
    } = kill_under_a_trial(
        [94, 95, 96],
        "examples/pytorch-trial",
        &["data.pause_s=0.05".into()],
        64,
    );
    let text = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(text.contains("restored checkpoint"), "{text}");
    // What Determined's harness reports: the trial's metrics with the
    // batches and whole epochs (16 batches an epoch) trained.
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 64, "{m}");
    assert_eq!(last["metrics"]["batches"], 64, "{m}");
    assert_eq!(last["metrics"]["epochs"], 4, "{m}");
    let accuracy = last["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!((0.0..=1.0).contains(&accuracy), "{m}");
    let training: Vec<u64> = m
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "Training")
        .filter_map(|p| p["steps_completed"].as_u64())
        .collect();
    assert!(
        training.contains(&8) && training.contains(&64),
        "scheduling_unit 8: {m}"
    );
}

#[test]
fn a_two_slot_pytorch_trial_trains_both_processes_under_the_launcher() {
    if !has_torch() {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 97, None);
    let model = repo().join("examples/pytorch-trial");
    let id = create(
        &a.api,
        &model.join("distributed.yaml"),
        &model,
        &[client_env()],
    );
    until("the experiment completes", Duration::from_secs(180), || {
        let s = get(&a.api, &["experiment", "describe", &id.to_string()])["state"].clone();
        assert_ne!(
            s,
            "Errored",
            "{}",
            resolute_tests::cli(&a.api, &["experiment", "logs", &id.to_string()]).1
        );
        s == "Completed"
    });
    let trial = trials(&a.api, id)[0]["id"].as_u64().expect("trial");
    let text = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(
        text.contains("[rank=0] ") && text.contains("[rank=1] "),
        "{text}"
    );
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 32, "{m}");
    // Two processes of 16 records a batch: 16 batches an epoch each.
    assert_eq!(last["metrics"]["epochs"], 2, "{m}");
}

#[test]
fn a_three_slot_trial_gathers_and_saves_sharded_checkpoints_across_nodes_and_resumes_after_a_kill()
{
    let Moved {
        _dir,
        a,
        _survivor,
        trial,
        described,
    } = kill_under_a_trial(
        [85, 86, 87],
        "examples/core-api-distributed",
        &["data.pause_s=0.05".into()],
        200,
    );
    // Every rank read its own shard back (the script checks the shard's
    // batch against the checkpoint's metadata and fails otherwise), and the
    // launcher told the ranks' lines apart.
    let text = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    for rank in 0..3 {
        assert!(
            text.contains(&format!("[rank={rank}] "))
                && text.contains(&format!("rank {rank} resumed at batch")),
            "rank {rank}: {text}"
        );
    }
    // What Determined would report: the ranks' shares summed by allgather,
    // step * (1 + 2 + 3) per batch.
    let step = described["hparams"]["step"].as_u64().expect("step");
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 200, "{m}");
    assert_eq!(
        last["metrics"]["x"].as_f64(),
        Some((step * 6 * 200) as f64),
        "{m}"
    );
}

/// The launcher and the collectives off a cluster: an info file that gives
/// this "node" three slots, and the variables a node would set.
#[test]
fn the_launcher_runs_one_process_per_slot_off_a_cluster_and_a_peer_without_the_secret_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info = dir.path().join("info.json");
    std::fs::write(
        &info,
        r#"{"slot_ids": [0, 1, 2], "container_addrs": ["127.0.0.1"], "container_rank": 0,
            "first_rank": 0, "world_size": 3}"#,
    )
    .expect("info");
    let python = |args: &[&str], secret: &str| {
        Command::new("python3")
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path().join("xdg"))
            .env("PYTHONPATH", repo().join("python"))
            .env("RESOLUTE_INFO_FILE", &info)
            .env("RESOLUTE_COLLECTIVES_PORT", "29731")
            .env("RESOLUTE_COLLECTIVES_SECRET", secret)
            .env("MASTER_PORT", "29730")
            .output()
            .expect("python3")
    };
    let script = repo().join("examples/core-api-distributed/train.py");
    let out = python(
        &[
            "-m",
            "determined.launch.torch_distributed",
            "python3",
            &script.display().to_string(),
        ],
        "launcher-test",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for rank in 0..3 {
        assert!(
            stderr.contains(&format!("[rank={rank}] INFO: "))
                && stderr.contains(&format!("rank {rank} of 3")),
            "{stderr}"
        );
    }
    // The searcher's one local operation, summed over the three ranks.
    assert!(
        stderr.contains("report_validation_metrics(steps_completed=1, metrics={\"x\": 6})"),
        "{stderr}"
    );

    // A process that fails stops the others, and the launcher exits with its code.
    let failing = dir.path().join("fail.py");
    std::fs::write(
        &failing,
        "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(7)\ntime.sleep(60)\n",
    )
    .expect("script");
    let started = std::time::Instant::now();
    let out = python(
        &[
            "-m",
            "determined.launch.torch_distributed",
            "python3",
            "fail.py",
        ],
        "launcher-test",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the others were stopped"
    );

    // A connection without the secret is dropped; the real member still gets in.
    let check = r#"
import logging, sys, threading
from resolute import _collectives as c
logging.basicConfig(level=logging.WARNING)
server = c.Server("127.0.0.1", 0, [1], b"right")
t = threading.Thread(target=server.accept_all)
t.start()
try:
    c.CONNECT_WAIT_S = 2
    c.connect("127.0.0.1", server.port, 1, b"wrong")
    print("INTRUDER ACCEPTED")
except c.CollectivesError as e:
    print("INTRUDER REFUSED", e)
c.CONNECT_WAIT_S = 600
member = c.connect("127.0.0.1", server.port, 1, b"right")
t.join()
member.send({"from": 1})
print("GATHERED", server.gather())
server.close()
member.close()
"#;
    std::fs::write(dir.path().join("check.py"), check).expect("check");
    let out = python(&["check.py"], "unused");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("INTRUDER REFUSED"), "{stdout}");
    assert!(stdout.contains("GATHERED [{'from': 1}]"), "{stdout}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
}

/// The CLI the way a `det` user drives it, against one real node: aliases,
/// `DET_MASTER` and `--master`, tables as CSV, timestamps on log lines,
/// `checkpoint list`, completions, the exit codes; and a trial that finds
/// the node's own client without any PYTHONPATH in its config.
#[test]
fn the_cli_takes_det_habits_and_trials_find_the_nodes_client_by_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 88, None);
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(resolute_tests::bin());
        cmd.args(args)
            .env_remove("RESOLUTE_NODE")
            .env_remove("DET_MASTER")
            .env("RESOLUTE_TOKEN", &a.token)
            .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No PYTHONPATH here: `import determined` works because the node puts
    // its client first on every trial's PYTHONPATH.
    let model = repo().join("examples/core-api");
    let (code, out, err) = run(
        &[
            "e",
            "create",
            &model.join("experiment.yaml").display().to_string(),
            &model.display().to_string(),
            "--config",
            "searcher.max_trials=1",
            "--config",
            "searcher.max_length.batches=20",
            "--config",
            "data.pause_s=0",
            "--master",
            &a.api,
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).expect("json")["id"]
        .as_u64()
        .expect("id");
    until("the experiment completes", Duration::from_secs(90), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    // DET_MASTER as Determined's users export it: host:port, no scheme.
    let host_port = a.api.trim_start_matches("http://").to_string();
    let (code, out, err) = run(&["e", "list", "--csv"], &[("DET_MASTER", &host_port)]);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("ID,Name,Owner,State,Progress,Best"),
        "{out}"
    );
    let row = lines.next().unwrap_or_default();
    assert!(
        row.starts_with(&format!("{id},core-api,")) && row.contains(",Completed,100.0%,"),
        "{out}"
    );
    // The aligned table: a header and a row whose columns line up.
    let (code, out, _) = run(&["experiment", "list", "--all", "-m", &host_port], &[]);
    assert_eq!(code, 0);
    let header = out.lines().next().unwrap_or_default();
    let row = out.lines().nth(1).unwrap_or_default();
    let state_at = header.find("State").expect("State column");
    assert_eq!(row.get(state_at..state_at + 9), Some("Completed"), "{out}");
    // checkpoint list (alias cp): the trial's checkpoints, JSON and CSV.
    let (code, out, err) = run(
        &["cp", "list", &id.to_string(), "-m", &a.api, "--json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let cps: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(cps.as_array().is_some_and(|c| !c.is_empty()), "{cps}");
    let (_, out, _) = run(&["cp", "list", &id.to_string(), "-m", &a.api, "--csv"], &[]);
    assert!(out.starts_with("UUID,Trial,Steps,Bytes,Holders\n"), "{out}");
    // Log lines carry their time (UTC, to the millisecond).
    let trial = trials(&a.api, id)[0]["id"].as_u64().expect("trial");
    let (code, out, _) = run(&["t", "logs", &trial.to_string(), "-m", &a.api], &[]);
    assert_eq!(code, 0);
    let first = out.lines().next().unwrap_or_default();
    let stamp = first.split(' ').next().unwrap_or_default();
    assert!(
        stamp.len() == 24 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{first}"
    );
    // Completions for the three shells.
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(
            out.contains("resolute") && out.contains("experiment"),
            "{shell}"
        );
    }
    // Exit codes: a usage error 1, a missing experiment 1, no node 2.
    assert_eq!(run(&["e", "list", "--no-such-flag"], &[]).0, 1);
    assert_eq!(run(&["e", "describe", "999", "-m", &a.api], &[]).0, 1);
    assert_eq!(run(&["e", "list", "-m", "127.0.0.1:1"], &[]).0, 2);
    assert_eq!(run(&["--help"], &[]).0, 0);
    // `.detignore` keeps files out of the uploaded model directory.
    let model = dir.path().join("model");
    std::fs::create_dir_all(model.join("data/raw")).expect("model dir");
    std::fs::create_dir_all(model.join("src")).expect("src");
    std::fs::write(model.join(".detignore"), "data/\n*.ckpt\n!keep.ckpt\n").expect("detignore");
    std::fs::write(model.join("data/raw/big.bin"), vec![0u8; 1 << 20]).expect("data");
    std::fs::write(model.join("old.ckpt"), "x").expect("ckpt");
    std::fs::write(model.join("keep.ckpt"), "x").expect("kept ckpt");
    std::fs::write(model.join("src/util.py"), "X = 1\n").expect("src");
    std::fs::write(
        model.join("train.py"),
        "import os\nimport determined as det\n\
         files = sorted(os.path.relpath(os.path.join(r, f)) for r, _, fs in os.walk('.') for f in fs)\n\
         print('FILES', files, flush=True)\n\
         with det.core.init() as core:\n\
         \x20   for op in core.searcher.operations():\n\
         \x20       core.train.report_validation_metrics(steps_completed=op.length, metrics={'loss': 1.0})\n\
         \x20       op.report_completed(1.0)\n",
    )
    .expect("train.py");
    std::fs::write(
        model.join("exp.yaml"),
        "name: ignored\nentrypoint: python3 train.py\n\
         searcher: {name: single, metric: loss, max_length: {batches: 1}}\n",
    )
    .expect("config");
    let (code, out, err) = run(
        &[
            "e",
            "create",
            &model.join("exp.yaml").display().to_string(),
            &model.display().to_string(),
            "-m",
            &a.api,
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let second = serde_json::from_str::<serde_json::Value>(&out).expect("json")["id"]
        .as_u64()
        .expect("id");
    until(
        "the second experiment completes",
        Duration::from_secs(90),
        || get(&a.api, &["experiment", "describe", &second.to_string()])["state"] == "Completed",
    );
    let trial = trials(&a.api, second)[0]["id"].as_u64().expect("trial");
    let logs = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(
        logs.contains("FILES ['.detignore', 'exp.yaml', 'keep.ckpt', 'src/util.py', 'train.py']"),
        "{logs}"
    );
    // The client for a run off a cluster, without installing anything.
    let client = dir.path().join("client");
    let (code, out, err) = run(
        &["client", "path", "--dir", &client.display().to_string()],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (0, client.display().to_string().as_str()),
        "{err}"
    );
    let py = Command::new("python3")
        .args(["-c", "import determined as det; print(det.LOG_FORMAT)"])
        .env("PYTHONPATH", &client)
        .output()
        .expect("python3");
    assert!(String::from_utf8_lossy(&py.stdout).contains("%(levelname)s"));
}
