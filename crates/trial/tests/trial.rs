//! Real trial processes (Python and shell) against the real report endpoint:
//! every report call and malformed ones, kill and resume from a checkpoint, the
//! Determined shim end to end, and stop paths including a process that ignores
//! the signal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use resolute_core::command::{MetricKind, TrialOutcome};
use resolute_trial::{EarlyExit, Launch, ServiceConfig, TrialEvent, TrialService};

fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../..")
}

async fn service(dir: &Path, kill_grace_ms: u64) -> (TrialService, mpsc::Receiver<TrialEvent>) {
    TrialService::start(ServiceConfig {
        work_root: dir.join("work"),
        data_dir: dir.join("data"),
        kill_grace_ms,
    })
    .await
    .expect("service")
}

fn launch(trial: u64, incarnation: u64, entrypoint: &str, model_dir: Option<PathBuf>) -> Launch {
    Launch {
        trial,
        incarnation,
        experiment: 1,
        entrypoint: entrypoint.to_string(),
        model_dir,
        model_digest: None,
        hparams: serde_json::json!({"lr": 0.1, "checkpoint_every": 20, "width": 16}),
        seed: 7,
        latest_checkpoint: None,
        target: Some(100),
        time_metric: "batches".into(),
        gpus: Vec::new(),
        distributed: None,
        env: BTreeMap::from([(
            "PYTHONPATH".to_string(),
            repo().join("python").display().to_string(),
        )]),
    }
}

/// Collects events until the incarnation exits.
async fn until_exit(
    events: &mut mpsc::Receiver<TrialEvent>,
    trial: u64,
    incarnation: u64,
) -> Vec<TrialEvent> {
    let mut got = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("trial finished in time")
            .expect("events");
        let done = matches!(e, TrialEvent::Exited { trial: t, incarnation: i, .. } if t == trial && i == incarnation);
        got.push(e);
        if done {
            return got;
        }
    }
}

fn outcome(events: &[TrialEvent]) -> (TrialOutcome, Option<i32>) {
    match events.last() {
        Some(TrialEvent::Exited {
            outcome, exit_code, ..
        }) => (outcome.clone(), *exit_code),
        other => panic!("no exit: {other:?}"),
    }
}

const FAKE: &str = r#"
import json, os, urllib.request, urllib.error
url, token = os.environ["RESOLUTE_REPORT_URL"], os.environ["RESOLUTE_TOKEN"]
def call(method, path, body=None, tok=token, raw=None, base=url):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + tok)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
results = {}
results["training"] = call("POST", "/training", {"steps_completed": 5, "metrics": {"loss": 1.5}})[0]
results["validation"] = call("POST", "/validation", {"steps_completed": 10, "metrics": {"validation_loss": 0.5}})[0]
results["progress"] = call("POST", "/progress", {"progress": 0.25})[0]
status, begun = call("POST", "/checkpoints", {"metadata": {"steps_completed": 10}})
open(os.path.join(begun["path"], "weights.bin"), "wb").write(b"\x01\x02\x03")
os.makedirs(os.path.join(begun["path"], "sub"))
open(os.path.join(begun["path"], "sub", "opt.json"), "w").write("{}")
status, done = call("POST", "/checkpoints/commit", {"storage_id": begun["storage_id"], "steps_completed": 10})
results["commit"] = status
status, restored = call("GET", "/checkpoints/" + begun["storage_id"])
results["restore"] = status
results["restored_files"] = sorted(os.listdir(restored["path"]))
results["poll"] = call("GET", "/preemption?timeout_s=0")
results["ack"] = call("POST", "/preemption/ack", {})[0]
results["bad_token"] = call("POST", "/training", {"steps_completed": 1, "metrics": {}}, tok="nope")[0]
results["malformed"] = call("POST", "/training", raw=b"{not json")[0]
results["wrong_field"] = call("POST", "/validation", {"steps": 1})[0]
results["bad_progress"] = call("POST", "/progress", {"progress": 7})[0]
results["unknown_storage"] = call("POST", "/checkpoints/commit", {"storage_id": "x", "steps_completed": 1})[0]
results["hostile_restore"] = call("GET", "/checkpoints/..%2F..%2Fetc")[0]
stale = url.rsplit("/", 1)[0] + "/" + str(int(url.rsplit("/", 1)[1]) - 1)
results["stale"] = call("POST", "/training", {"steps_completed": 1, "metrics": {}}, base=stale)[0]
results["exit"] = call("POST", "/exit", {"reason": "invalid_hyperparameters"})[0]
results["env"] = {k: os.environ.get(k) for k in ["RESOLUTE_TRIAL_ID", "RESOLUTE_EXPERIMENT_ID", "RESOLUTE_TRIAL_SEED", "RESOLUTE_TARGET_LENGTH", "RESOLUTE_TIME_METRIC", "CUDA_VISIBLE_DEVICES", "MY_VAR"]}
results["hparams"] = json.loads(os.environ["RESOLUTE_HPARAMS"])
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_call_and_malformed_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(model.join("fake.py"), FAKE).expect("script");
    let mut l = launch(3, 2, "python3 fake.py", Some(model));
    l.env.insert("MY_VAR".into(), "hello".into());
    l.gpus = vec!["0".into(), "1".into()];
    svc.launch(l).await.expect("launch");
    let got = until_exit(&mut events, 3, 2).await;
    let logs = svc.logs(3);
    let line = logs
        .iter()
        .find_map(|l| l.line.strip_prefix("RESULTS "))
        .unwrap_or_else(|| panic!("no results in {logs:?}"));
    let r: serde_json::Value = serde_json::from_str(line).expect("json");
    for ok in [
        "training",
        "validation",
        "progress",
        "commit",
        "restore",
        "ack",
        "exit",
    ] {
        assert_eq!(r[ok], 200, "{ok}: {r}");
    }
    assert_eq!(
        r["restored_files"],
        serde_json::json!(["sub", "weights.bin"])
    );
    assert_eq!(r["poll"], serde_json::json!([200, {"preempt": false}]));
    assert_eq!(r["bad_token"], 401);
    assert_eq!(r["malformed"], 400);
    assert_eq!(r["wrong_field"], 400);
    assert_eq!(r["bad_progress"], 400);
    assert_eq!(r["unknown_storage"], 400);
    assert!(r["hostile_restore"]
        .as_u64()
        .is_some_and(|s| (400..500).contains(&s)));
    assert_eq!(r["stale"], 409);
    assert_eq!(
        r["env"],
        serde_json::json!({
            "RESOLUTE_TRIAL_ID": "3", "RESOLUTE_EXPERIMENT_ID": "1", "RESOLUTE_TRIAL_SEED": "7",
            "RESOLUTE_TARGET_LENGTH": "100", "RESOLUTE_TIME_METRIC": "batches",
            "CUDA_VISIBLE_DEVICES": "0,1", "MY_VAR": "hello"
        })
    );
    assert_eq!(r["hparams"]["lr"], 0.1);
    // The node heard exactly the accepted reports.
    let kinds: Vec<MetricKind> = got
        .iter()
        .filter_map(|e| match e {
            TrialEvent::Metrics { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec![MetricKind::Training, MetricKind::Validation]);
    let saved = got
        .iter()
        .find_map(|e| match e {
            TrialEvent::CheckpointSaved {
                uuid,
                steps_completed,
                ..
            } => Some((uuid.clone(), *steps_completed)),
            _ => None,
        })
        .expect("checkpoint event");
    assert_eq!(saved.1, 10);
    assert!(svc.store().has(&saved.0), "the checkpoint is a local blob");
    assert!(got.iter().any(|e| matches!(
        e,
        TrialEvent::EarlyExit {
            reason: EarlyExit::InvalidHyperparameters,
            ..
        }
    )));
    assert_eq!(outcome(&got).0, TrialOutcome::InvalidHyperparameters);
}

fn validation_steps(events: &[TrialEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrialEvent::Metrics {
                kind: MetricKind::Validation,
                steps_completed,
                ..
            } => Some(*steps_completed),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_killed_mid_run_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    let model = repo().join("examples/python-core");
    let mut first = launch(1, 1, "python3 train.py", Some(model.clone()));
    first.target = Some(100_000);
    first.hparams = serde_json::json!({"lr": 0.05, "checkpoint_every": 2000});
    svc.launch(first).await.expect("launch");
    // Kill it right after its first checkpoint.
    let uuid = loop {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("a checkpoint in time")
            .expect("events");
        if let TrialEvent::CheckpointSaved {
            uuid,
            steps_completed,
            ..
        } = e
        {
            assert_eq!(steps_completed, 2000);
            break uuid;
        }
    };
    svc.kill(1, 1);
    let rest = until_exit(&mut events, 1, 1).await;
    assert!(
        matches!(outcome(&rest), (TrialOutcome::Errored { .. }, None)),
        "killed by a signal: {:?}",
        outcome(&rest)
    );
    // The next incarnation starts from that checkpoint.
    let mut second = launch(1, 2, "python3 train.py", Some(model));
    second.target = Some(6000);
    second.hparams = serde_json::json!({"lr": 0.05, "checkpoint_every": 2000});
    second.latest_checkpoint = Some(uuid);
    svc.launch(second).await.expect("relaunch");
    let got = until_exit(&mut events, 1, 2).await;
    assert_eq!(
        validation_steps(&got),
        vec![4000, 6000],
        "resumed after step 2000"
    );
    assert_eq!(outcome(&got).0, TrialOutcome::Completed);
}

const DETERMINED_SCRIPT: &str = r#"
import json, os, time
import determined as det

def main(core_context):
    info = det.get_cluster_info()
    assert info.trial.hparams["lr"] == 0.1, info.trial.hparams
    steps = 0
    if info.latest_checkpoint is not None:
        with core_context.checkpoint.restore_path(info.latest_checkpoint) as path:
            steps = json.load(open(os.path.join(path, "s.json")))["steps"]
    for op in core_context.searcher.operations():
        while steps < op.length:
            steps += 1
            core_context.train.report_training_metrics(steps_completed=steps, metrics={"loss": 1.0 / steps})
            with core_context.checkpoint.store_path({"steps_completed": steps}) as (path, storage_id):
                json.dump({"steps": steps}, open(os.path.join(path, "s.json"), "w"))
            core_context.train.report_validation_metrics(steps_completed=steps, metrics={"validation_loss": 1.0 / steps})
            op.report_progress(steps)
            if core_context.preempt.should_preempt():
                print("preempted", flush=True)
                return
            time.sleep(0.05)
        op.report_completed(1.0 / steps)

with det.core.init() as core_context:
    main(core_context)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_determined_shim_runs_a_core_api_script_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(model.join("train.py"), DETERMINED_SCRIPT).expect("script");
    let mut l = launch(5, 1, "python3 train.py", Some(model));
    l.target = Some(10_000);
    svc.launch(l).await.expect("launch");
    // Wait for a few steps, then ask it to stop (a preemption).
    let mut seen = 0;
    while seen < 3 {
        if let Some(TrialEvent::CheckpointSaved { .. }) = events.recv().await {
            seen += 1;
        }
    }
    svc.stop(5, 1, 30_000);
    let got = until_exit(&mut events, 5, 1).await;
    assert!(got
        .iter()
        .any(|e| matches!(e, TrialEvent::PreemptAcked { .. })));
    assert!(got.iter().any(|e| matches!(e, TrialEvent::Progress { .. })));
    assert_eq!(outcome(&got), (TrialOutcome::Stopped, Some(0)));
    assert!(svc.logs(5).iter().any(|l| l.line == "preempted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_ignores_the_stop_signal_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 300).await;
    // Ignores SIGTERM (and has a child in its process group that does too).
    let script = "trap '' TERM; sh -c \"trap '' TERM; sleep 60\" & echo started; while true; do sleep 1; done";
    svc.launch(launch(9, 1, script, None))
        .await
        .expect("launch");
    while !svc.logs(9).iter().any(|l| l.line == "started") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = std::time::Instant::now();
    svc.stop(9, 1, 300);
    let got = until_exit(&mut events, 9, 1).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "not before timeout + grace: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(outcome(&got), (TrialOutcome::Stopped, None), "SIGKILLed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_trial_reports_its_exit_code_and_last_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 300).await;
    svc.launch(launch(4, 1, "echo one; echo two >&2; exit 3", None))
        .await
        .expect("launch");
    let got = until_exit(&mut events, 4, 1).await;
    match outcome(&got) {
        (TrialOutcome::Errored { message, exit_code }, Some(3)) => {
            assert_eq!(exit_code, Some(3));
            assert!(
                message.contains("one") && message.contains("two"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let log = std::fs::read_to_string(svc.log_path(4)).expect("log file");
    assert!(
        log.contains(" stdout one") && log.contains(" stderr two"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pytorch_example_runs_when_torch_is_importable() {
    let has_torch = std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    let mut l = launch(
        6,
        1,
        "python3 train.py",
        Some(repo().join("examples/pytorch-determined")),
    );
    l.target = Some(30);
    svc.launch(l).await.expect("launch");
    let got = until_exit(&mut events, 6, 1).await;
    assert_eq!(
        outcome(&got).0,
        TrialOutcome::Completed,
        "{:?}",
        svc.logs(6)
    );
    assert_eq!(validation_steps(&got), vec![10, 20, 30]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_directory_stored_once_as_a_blob_serves_every_trial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    let packed = dir.path().join("model.pack");
    resolute_trial::pack::pack_dir(&repo().join("examples/python-core"), &packed).expect("pack");
    let digest = svc.store().put_file(&packed).expect("store").digest();
    for trial in [21, 22] {
        let mut l = launch(trial, 1, "python3 train.py", None);
        l.model_digest = Some(digest.clone());
        l.target = Some(40);
        svc.launch(l).await.expect("launch");
        let got = until_exit(&mut events, trial, 1).await;
        assert_eq!(
            outcome(&got).0,
            TrialOutcome::Completed,
            "{:?}",
            svc.logs(trial)
        );
        assert_eq!(validation_steps(&got), vec![20, 40]);
    }
}

/// Whether a process runs (a zombie waiting to be reaped does not).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_kills_the_trials_its_previous_life_left_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _events) = service(dir.path(), 1_000).await;
    first
        .launch(launch(1, 1, "sleep 60", None))
        .await
        .expect("launch");
    let file = dir.path().join("work/trial-1/running-1.pgid");
    let text = std::fs::read_to_string(&file).expect("the group is remembered");
    let pgid: i32 = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pgid");
    assert!(runs(pgid), "the trial runs");
    // The node dies without stopping its trials (as with SIGKILL) and starts again.
    drop(first);
    let (_second, _events2) = service(dir.path(), 1_000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while runs(pgid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the leftover still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!file.exists(), "the record is gone with the process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trials_whole_log_is_served_after_the_node_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = service(dir.path(), 1_000).await;
    svc.launch(launch(7, 1, "echo first; echo oops >&2", None))
        .await
        .expect("launch 1");
    until_exit(&mut events, 7, 1).await;
    svc.launch(launch(7, 2, "echo second", None))
        .await
        .expect("launch 2");
    until_exit(&mut events, 7, 2).await;
    drop(svc);
    // A new life of the node: nothing in memory, everything on disk.
    let (again, _events) = service(dir.path(), 1_000).await;
    let lines = again.logs_since(7, 0);
    let text: Vec<(&str, &str)> = lines.iter().map(|l| (l.stream, l.line.as_str())).collect();
    assert!(text.contains(&("stdout", "first")), "{text:?}");
    assert!(text.contains(&("stderr", "oops")), "{text:?}");
    assert!(text.contains(&("stdout", "second")), "{text:?}");
    assert!(lines.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    let later = lines.iter().map(|l| l.time_ms).max().expect("lines") + 1;
    assert!(again.logs_since(7, later).is_empty());
}
