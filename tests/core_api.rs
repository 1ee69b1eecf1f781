//! Scripts written against Determined's Core API, run unchanged: off a
//! cluster (a laptop run: the local context), and on a real three-node
//! cluster with a node SIGKILLed under one of them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use resolute_tests::{
    create, get, kill_under_a_trial, last_validation, repo, start, trials, until, Moved, NodeProc,
};

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

/// `resolute trial kill` (Determined's `det trial kill`): the running trial
/// ends at once, stopped, without a restart; the search goes on with the
/// next trial; an ended trial cannot be killed again.
#[test]
fn trial_kill_ends_one_trial_and_the_search_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 101, None);
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(model.join("sleep.py"), "import time\ntime.sleep(600)\n").expect("script");
    let config = model.join("exp.yaml");
    std::fs::write(
        &config,
        "entrypoint: python3 sleep.py\n\
         hyperparameters: {x: {type: int, minval: 1, maxval: 9}}\n\
         searcher: {name: random, metric: loss, max_trials: 2, max_concurrent_trials: 1, max_length: {batches: 1}}\n",
    )
    .expect("config");
    let id = create(&a.api, &config, &model, &[]);
    let running = |n: usize| {
        let ts = trials(&a.api, id);
        (ts.len() == n
            && ts[n - 1]["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("Running")))
        .then(|| ts[n - 1]["id"].as_u64().unwrap_or(0))
    };
    let mut first = 0;
    until("the first trial runs", Duration::from_secs(60), || {
        first = running(1).unwrap_or(0);
        first != 0
    });
    let kill = |trial: u64| {
        Command::new(resolute_tests::bin())
            .args(["t", "kill", &trial.to_string(), "-m", &a.api])
            .env("RESOLUTE_TOKEN", &a.token)
            .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
            .output()
            .expect("cli")
    };
    let out = kill(first);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("trial {first} killed")
    );
    let mut second = 0;
    until("the second trial runs", Duration::from_secs(60), || {
        second = running(2).unwrap_or(0);
        second != 0
    });
    let described = get(&a.api, &["trial", "describe", &first.to_string()]);
    assert_eq!(described["state"], "Done(Stopped)", "{described}");
    assert_eq!(described["restarts"], 0, "{described}");
    let runs = get(&a.api, &["trial", "runs", &first.to_string()]).to_string();
    assert!(runs.contains("killed by its user"), "{runs}");
    // Killing it again is the user's error (exit 1), and says why.
    let out = kill(first);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("has ended"), "{stderr}");
    // The last trial killed, the search has nothing left to run.
    assert_eq!(kill(second).status.code(), Some(0));
    until("the experiment ends", Duration::from_secs(60), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] != "Active"
    });
}
