//! Real trial processes (Python and shell) under the real supervisor, trial
//! actors and report endpoint: every report call and malformed ones, kill and
//! resume from a checkpoint, the Determined shim end to end, a trial at its
//! target asking to go on, signals, logs that outlive the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::Addr;
use tokio::sync::mpsc;

use resolute_agent::{LaunchSpec, ProcessExit};
use resolute_core::command::MetricKind;
use resolute_storage::blob::BlobStore;
use resolute_trial::{
    Control, EarlyExit, Launch, ReportSink, RunAs, Signal, SupervisorConfig, TrialReport,
    TrialSupervisor,
};

fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../..")
}

/// Runs `f` in an actix system on a multi-threaded runtime, as a node does.
fn system<F: std::future::Future>(f: F) -> F::Output {
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .block_on(f)
}

/// A node's trials without the node: the supervisor, and its reports.
struct Trials {
    sup: Addr<TrialSupervisor>,
    reports: mpsc::Receiver<TrialReport>,
    work_root: PathBuf,
    store: BlobStore,
    _sink: Addr<ReportSink>,
}

async fn trials(dir: &Path) -> Trials {
    trials_as(dir, RunAs::Node).await
}

async fn trials_as(dir: &Path, run_as: RunAs) -> Trials {
    let (sink, reports) = ReportSink::start(1024);
    let cfg = SupervisorConfig {
        work_root: dir.join("work"),
        data_dir: dir.join("data"),
        run_as,
        cluster_key: None,
        best_validation: None,
    };
    let (sup, _) = TrialSupervisor::start(cfg, sink.clone().recipient())
        .await
        .expect("supervisor");
    Trials {
        sup,
        reports,
        work_root: dir.join("work"),
        store: BlobStore::open(&dir.join("data")).expect("store"),
        _sink: sink,
    }
}

impl Trials {
    /// Packs a model directory into the blob store (as an upload does).
    fn model(&self, dir: &Path, scratch: &Path) -> String {
        let packed = scratch.join("model.pack");
        resolute_trial::pack::pack_dir(dir, &packed).expect("pack");
        self.store.put_file(&packed).expect("store").digest()
    }

    async fn launch(&self, spec: LaunchSpec) {
        self.sup
            .send(Launch {
                spec,
                hosts: Vec::new(),
            })
            .await
            .expect("launch");
    }

    async fn signal(&self, trial: u64, incarnation: u64, control: Control) {
        self.sup
            .send(Signal {
                trial,
                incarnation,
                control,
            })
            .await
            .expect("signal");
    }

    /// Reports until the incarnation exits.
    async fn until_exit(&mut self, trial: u64, incarnation: u64) -> Vec<TrialReport> {
        let mut got = Vec::new();
        loop {
            let r = tokio::time::timeout(Duration::from_secs(60), self.reports.recv())
                .await
                .expect("trial finished in time")
                .expect("reports");
            let done = matches!(r, TrialReport::Exited { trial: t, incarnation: i, .. } if t == trial && i == incarnation);
            got.push(r);
            if done {
                return got;
            }
        }
    }

    /// The lines of a trial's log file.
    fn log(&self, trial: u64) -> Vec<String> {
        resolute_trial::read_logs(&resolute_trial::log_path(&self.work_root, trial), 0)
            .into_iter()
            .map(|l| l.line)
            .collect()
    }
}

fn spec(
    trial: u64,
    incarnation: u64,
    entrypoint: &str,
    model_digest: Option<String>,
) -> LaunchSpec {
    LaunchSpec {
        trial,
        incarnation,
        experiment: 1,
        entrypoint: entrypoint.to_string(),
        env: BTreeMap::from([(
            "PYTHONPATH".to_string(),
            repo().join("python").display().to_string(),
        )]),
        hparams: serde_json::from_value(
            serde_json::json!({"lr": 0.1, "checkpoint_every": 20, "width": 16}),
        )
        .expect("hparams"),
        seed: 7,
        model_digest,
        latest_checkpoint: None,
        target: Some(100),
        time_metric: "batches".into(),
        slots: vec![0],
        gpus: Vec::new(),
        slots_here: 1,
        gang: None,
        config: Box::new(
            resolute_types::config::parse_str(
                "experiment.yaml",
                "searcher: {name: single, metric: validation_loss, max_length: {batches: 100}}\ndata: {dataset: mnist, shards: [1, 2]}\n",
                &[],
            )
            .expect("config")
            .config,
        ),
    }
}

fn hparams(v: serde_json::Value) -> resolute_types::Value {
    serde_json::from_value(v).expect("hparams")
}

fn exit_of(reports: &[TrialReport]) -> ProcessExit {
    match reports.last() {
        Some(TrialReport::Exited { exit, .. }) => exit.clone(),
        other => panic!("no exit: {other:?}"),
    }
}

fn validation_steps(reports: &[TrialReport]) -> Vec<u64> {
    reports
        .iter()
        .filter_map(|r| match r {
            TrialReport::Metrics {
                kind: MetricKind::Validation,
                steps_completed,
                ..
            } => Some(*steps_completed),
            _ => None,
        })
        .collect()
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
results["too_many_metrics"] = call("POST", "/training", {"steps_completed": 1, "metrics": {f"m{i}": 1 for i in range(1001)}})
results["long_metric_name"] = call("POST", "/training", {"steps_completed": 1, "metrics": {"x" * 257: 1}})[0]
results["unknown_storage"] = call("POST", "/checkpoints/commit", {"storage_id": "x", "steps_completed": 1})[0]
results["hostile_restore"] = call("GET", "/checkpoints/..%2F..%2Fetc")[0]
stale = url.rsplit("/", 1)[0] + "/" + str(int(url.rsplit("/", 1)[1]) - 1)
results["stale"] = call("POST", "/training", {"steps_completed": 1, "metrics": {}}, base=stale)[0]
results["exit"] = call("POST", "/exit", {"reason": "invalid_hyperparameters"})[0]
results["searcher"] = call("GET", "/searcher")
results["env"] = {k: os.environ.get(k) for k in ["RESOLUTE_TRIAL_ID", "RESOLUTE_EXPERIMENT_ID", "RESOLUTE_TRIAL_SEED", "RESOLUTE_TARGET_LENGTH", "RESOLUTE_TIME_METRIC", "CUDA_VISIBLE_DEVICES", "MY_VAR"]}
results["hparams"] = json.loads(os.environ["RESOLUTE_HPARAMS"])
info = json.load(open(os.environ["RESOLUTE_INFO_FILE"]))
results["info"] = {k: info[k] for k in ["user_data", "slot_ids", "container_addrs", "container_rank"]}
results["config_searcher"] = info["config"]["searcher"]["name"]
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
"#;

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

#[test]
fn every_report_call_and_malformed_ones() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).expect("model dir");
        std::fs::write(model.join("fake.py"), FAKE).expect("script");
        let digest = t.model(&model, dir.path());
        let mut l = spec(3, 2, "python3 fake.py", Some(digest));
        l.env.insert("MY_VAR".into(), "hello".into());
        l.gpus = vec!["0".into(), "1".into()];
        t.launch(l).await;
        let got = t.until_exit(3, 2).await;
        let logs = t.log(3);
        let line = logs
            .iter()
            .find_map(|l| l.strip_prefix("RESULTS "))
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
        assert_eq!(r["searcher"], serde_json::json!([200, {"length": 100}]));
        assert_eq!(r["bad_token"], 401);
        assert_eq!(r["malformed"], 400);
        assert_eq!(r["wrong_field"], 400);
        assert_eq!(r["bad_progress"], 400);
        assert_eq!(r["too_many_metrics"][0], 400);
        assert!(
            r["too_many_metrics"][1]["error"]
                .as_str()
                .is_some_and(|e| e.contains("metrics") && e.contains("1000")),
            "{r}"
        );
        assert_eq!(r["long_metric_name"], 400);
        assert_eq!(r["unknown_storage"], 400);
        assert!(r["hostile_restore"]
            .as_u64()
            .is_some_and(|s| (400..500).contains(&s)));
        assert_eq!(r["stale"], 409);
        // What `det.get_cluster_info()` reads beyond the environment.
        assert_eq!(
            r["info"],
            serde_json::json!({
                "user_data": {"dataset": "mnist", "shards": [1, 2]},
                "slot_ids": [0],
                "container_addrs": ["127.0.0.1"],
                "container_rank": 0,
            })
        );
        assert_eq!(r["config_searcher"], "single");
        assert_eq!(
            r["env"],
            serde_json::json!({
                "RESOLUTE_TRIAL_ID": "3", "RESOLUTE_EXPERIMENT_ID": "1", "RESOLUTE_TRIAL_SEED": "7",
                "RESOLUTE_TARGET_LENGTH": "100", "RESOLUTE_TIME_METRIC": "batches",
                "CUDA_VISIBLE_DEVICES": "0,1", "MY_VAR": "hello"
            })
        );
        assert_eq!(r["hparams"]["lr"], 0.1);
        // The node heard exactly the accepted reports, in order.
        let kinds: Vec<MetricKind> = got
            .iter()
            .filter_map(|e| match e {
                TrialReport::Metrics { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, vec![MetricKind::Training, MetricKind::Validation]);
        let saved = got
            .iter()
            .find_map(|e| match e {
                TrialReport::CheckpointSaved {
                    uuid,
                    steps_completed,
                    ..
                } => Some((uuid.clone(), *steps_completed)),
                _ => None,
            })
            .expect("checkpoint report");
        assert_eq!(saved.1, 10);
        assert!(t.store.has(&saved.0), "the checkpoint is a local blob");
        assert!(got.iter().any(|e| matches!(
            e,
            TrialReport::EarlyExit {
                reason: EarlyExit::InvalidHyperparameters,
                ..
            }
        )));
        assert!(matches!(
            got[0],
            TrialReport::Launched {
                trial: 3,
                incarnation: 2
            }
        ));
        assert_eq!(exit_of(&got).code, Some(0));
    });
}

#[test]
fn a_trial_killed_mid_run_resumes_from_its_checkpoint() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let model = t.model(&repo().join("examples/python-core"), dir.path());
        let mut first = spec(1, 1, "python3 train.py", Some(model.clone()));
        first.target = Some(100_000);
        first.hparams = hparams(serde_json::json!({"lr": 0.05, "checkpoint_every": 2000}));
        t.launch(first).await;
        // Kill it right after its first checkpoint.
        let uuid = loop {
            let r = tokio::time::timeout(Duration::from_secs(60), t.reports.recv())
                .await
                .expect("a checkpoint in time")
                .expect("reports");
            if let TrialReport::CheckpointSaved {
                uuid,
                steps_completed,
                ..
            } = r
            {
                assert_eq!(steps_completed, 2000);
                break uuid;
            }
        };
        t.signal(1, 1, Control::Kill).await;
        let rest = t.until_exit(1, 1).await;
        assert_eq!(exit_of(&rest).signal, Some(9), "SIGKILLed");
        // What the incarnation ran in is gone; its log stays.
        let trial_dir = resolute_trial::trial_dir(&t.work_root, 1);
        let left = |name: &str| trial_dir.join(name).exists();
        assert!(!left("work-1"), "the working copy is removed");
        assert!(!left("checkpoints"), "the unpacked checkpoints are removed");
        assert!(left("trial.log"), "the log stays");
        // The next incarnation starts from that checkpoint.
        let mut second = spec(1, 2, "python3 train.py", Some(model));
        second.target = Some(6000);
        second.hparams = hparams(serde_json::json!({"lr": 0.05, "checkpoint_every": 2000}));
        second.latest_checkpoint = Some(uuid);
        t.launch(second).await;
        let got = t.until_exit(1, 2).await;
        assert_eq!(
            validation_steps(&got),
            vec![4000, 6000],
            "resumed after step 2000"
        );
        assert_eq!(exit_of(&got).code, Some(0));
        assert!(!left("work-2") && !left("checkpoints"), "tidied again");
    });
}

#[test]
fn the_determined_shim_runs_a_core_api_script_end_to_end() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).expect("model dir");
        std::fs::write(model.join("train.py"), DETERMINED_SCRIPT).expect("script");
        let digest = t.model(&model, dir.path());
        let mut l = spec(5, 1, "python3 train.py", Some(digest));
        l.target = Some(10_000);
        t.launch(l).await;
        // A few steps, then the preemption signal.
        let mut seen = 0;
        while seen < 3 {
            if let Some(TrialReport::CheckpointSaved { .. }) = t.reports.recv().await {
                seen += 1;
            }
        }
        t.signal(5, 1, Control::Preempt).await;
        let got = t.until_exit(5, 1).await;
        assert_eq!(exit_of(&got).code, Some(0));
        assert!(t.log(5).iter().any(|l| l == "preempted"));
    });
}

/// A Core API script that trains through `searcher.operations()`.
const OPERATIONS_SCRIPT: &str = r#"
import determined as det
with det.core.init() as core:
    steps = 0
    for op in core.searcher.operations():
        while steps < op.length:
            steps += 1
            core.train.report_validation_metrics(steps_completed=steps, metrics={"validation_loss": 1.0 / steps})
        print("op done at", steps, flush=True)
        op.report_completed(1.0 / steps)
    print("finished at", steps, flush=True)
"#;

#[test]
fn a_trial_at_its_target_asks_to_go_on_and_the_answer_is_the_nodes() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).expect("model dir");
        std::fs::write(model.join("train.py"), OPERATIONS_SCRIPT).expect("script");
        let digest = t.model(&model, dir.path());
        let mut l = spec(8, 1, "python3 train.py", Some(digest));
        l.target = Some(3);
        t.launch(l).await;
        // At 3 it asks: the node (here, the test) raises the target to 5; at 5
        // it asks again and is told to finish.
        let mut answers = vec![None, Some(5)];
        let mut got = Vec::new();
        loop {
            let r = tokio::time::timeout(Duration::from_secs(60), t.reports.recv())
                .await
                .expect("in time")
                .expect("reports");
            match &r {
                TrialReport::Reached { steps, .. } => {
                    let answer = answers.pop().expect("asked at most twice");
                    assert_eq!(*steps, if answer.is_some() { 3 } else { 5 });
                    t.signal(8, 1, Control::Proceed(answer)).await;
                }
                TrialReport::Exited { .. } => {
                    got.push(r);
                    break;
                }
                _ => {}
            }
            got.push(r);
        }
        assert!(answers.is_empty());
        assert_eq!(validation_steps(&got), vec![1, 2, 3, 4, 5]);
        assert_eq!(exit_of(&got).code, Some(0));
        let log = t.log(8);
        assert!(log.iter().any(|l| l == "op done at 3"), "{log:?}");
        assert!(log.iter().any(|l| l == "finished at 5"), "{log:?}");
    });
}

#[test]
fn sigterm_and_sigkill_reach_the_whole_process_group() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        // Ignores SIGTERM (and has a child in its process group that does too).
        let script = "trap '' TERM; sh -c \"trap '' TERM; sleep 60\" & echo started; while true; do sleep 1; done";
        t.launch(spec(9, 1, script, None)).await;
        while !t.log(9).iter().any(|l| l == "started") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.signal(9, 1, Control::Terminate).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                t.reports.try_recv(),
                Err(_) | Ok(TrialReport::Launched { .. })
            ),
            "it ignores SIGTERM"
        );
        t.signal(9, 1, Control::Kill).await;
        let got = t.until_exit(9, 1).await;
        assert_eq!(exit_of(&got).signal, Some(9), "SIGKILLed");
    });
}

#[test]
fn a_failing_trial_reports_its_exit_code_and_last_lines() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        t.launch(spec(4, 1, "echo one; echo two >&2; exit 3", None))
            .await;
        let got = t.until_exit(4, 1).await;
        let exit = exit_of(&got);
        assert_eq!(exit.code, Some(3));
        assert!(
            exit.last_lines.contains(&"one".to_string())
                && exit.last_lines.contains(&"two".to_string()),
            "{exit:?}"
        );
        let log =
            std::fs::read_to_string(resolute_trial::log_path(&t.work_root, 4)).expect("log file");
        assert!(
            log.contains(" stdout one") && log.contains(" stderr two"),
            "{log}"
        );
    });
}

#[test]
fn a_launch_whose_checkpoint_is_not_here_fails_with_the_reason() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let mut l = spec(2, 1, "true", None);
        l.latest_checkpoint = Some("ab".repeat(32));
        t.launch(l).await;
        let r = tokio::time::timeout(Duration::from_secs(30), t.reports.recv())
            .await
            .expect("in time")
            .expect("reports");
        match r {
            TrialReport::LaunchFailed { reason, .. } => {
                assert!(reason.contains("is not on this node"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn the_pytorch_example_runs_when_torch_is_importable() {
    let has_torch = std::process::Command::new("python3")
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let model = t.model(&repo().join("examples/pytorch-determined"), dir.path());
        let mut l = spec(6, 1, "python3 train.py", Some(model));
        l.target = Some(30);
        t.launch(l).await;
        let got = t.until_exit(6, 1).await;
        assert_eq!(exit_of(&got).code, Some(0), "{:?}", t.log(6));
        assert_eq!(validation_steps(&got), vec![10, 20, 30]);
    });
}

#[test]
fn a_model_directory_stored_once_as_a_blob_serves_every_trial() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = trials(dir.path()).await;
        let digest = t.model(&repo().join("examples/python-core"), dir.path());
        for trial in [21, 22] {
            let mut l = spec(trial, 1, "python3 train.py", Some(digest.clone()));
            l.target = Some(40);
            t.launch(l).await;
            let got = t.until_exit(trial, 1).await;
            assert_eq!(exit_of(&got).code, Some(0), "{:?}", t.log(trial));
            assert_eq!(validation_steps(&got), vec![20, 40]);
        }
    });
}

#[test]
fn a_trials_whole_log_is_served_after_the_node_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    system(async {
        let mut t = trials(dir.path()).await;
        t.launch(spec(7, 1, "echo first; echo oops >&2", None))
            .await;
        t.until_exit(7, 1).await;
        t.launch(spec(7, 2, "echo second", None)).await;
        t.until_exit(7, 2).await;
    });
    // A new life of the node: nothing in memory, everything on disk.
    let path = resolute_trial::log_path(&dir.path().join("work"), 7);
    let lines = resolute_trial::read_logs(&path, 0);
    let text: Vec<(&str, &str)> = lines.iter().map(|l| (l.stream, l.line.as_str())).collect();
    assert!(text.contains(&("stdout", "first")), "{text:?}");
    assert!(text.contains(&("stderr", "oops")), "{text:?}");
    assert!(text.contains(&("stdout", "second")), "{text:?}");
    assert!(lines.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    let later = lines.iter().map(|l| l.time_ms).max().expect("lines") + 1;
    assert!(resolute_trial::read_logs(&path, later).is_empty());
}

/// What a trial can see of its neighbours and of the node: other trials'
/// processes (their command lines are public), their tokens (in their
/// environment), the node's cluster key, another trial's files; and that its
/// own checkpoint round trip works.
const PROBE: &str = r#"
import json, os, time, urllib.error, urllib.request
url, token = os.environ["RESOLUTE_REPORT_URL"], os.environ["RESOLUTE_TOKEN"]
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {e.read()}")
def readable(path):
    try:
        open(path, "rb").read()
        return True
    except OSError:
        return False
def listable(path):
    try:
        os.listdir(path)
        return True
    except OSError:
        return False
seen, tokens = set(), set()
deadline = time.time() + 4
while time.time() < deadline:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            if b"isolation-probe" in open(f"/proc/{pid}/cmdline", "rb").read():
                seen.add(pid)
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RESOLUTE_TOKEN=") and kv != b"RESOLUTE_TOKEN=" + token.encode():
                tokens.add(kv)
    time.sleep(0.2)
begun = call("POST", "/checkpoints", {"metadata": {}})
open(os.path.join(begun["path"], "w.bin"), "wb").write(b"weights")
call("POST", "/checkpoints/commit", {"storage_id": begun["storage_id"], "steps_completed": 1})
restored = call("GET", "/checkpoints/" + begun["storage_id"])
results = {
    "uid": os.getuid(),
    "others_seen": len(seen),
    "foreign_tokens": len(tokens),
    "cluster_key": readable(os.environ["NODE_KEY"]),
    "data_dir_listable": listable(os.environ["NODE_DATA"]),
    "other_trial_listable": listable(os.environ["OTHER_WORK"]),
    "restored": open(os.path.join(restored["path"], "w.bin"), "rb").read().decode(),
}
print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
"#;

/// Two probes at once under `run_as`; their results.
async fn probe_pair(dir: &Path, run_as: RunAs) -> Vec<serde_json::Value> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("cluster.key"), "secret").expect("key");
    let mut t = trials_as(dir, run_as).await;
    let model = dir.join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(model.join("probe.py"), PROBE).expect("script");
    let digest = t.model(&model, dir);
    for (trial, other) in [(1, 2), (2, 1)] {
        // Debian's python: the machine's own may live under root's home.
        let mut l = spec(
            trial,
            1,
            "/usr/bin/python3 probe.py isolation-probe",
            Some(digest.clone()),
        );
        l.env.insert(
            "NODE_KEY".into(),
            data.join("cluster.key").display().to_string(),
        );
        l.env.insert("NODE_DATA".into(), data.display().to_string());
        let other = resolute_trial::trial_dir(&t.work_root, other).join("work-1");
        l.env
            .insert("OTHER_WORK".into(), other.display().to_string());
        t.launch(l).await;
    }
    let mut exits = BTreeMap::new();
    while exits.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(60), t.reports.recv())
            .await
            .expect("the probes finished in time")
            .expect("reports");
        if let TrialReport::Exited { trial, exit, .. } = r {
            exits.insert(trial, exit);
        }
    }
    let mut results = Vec::new();
    for trial in [1, 2] {
        let logs = t.log(trial);
        assert_eq!(exits[&trial].code, Some(0), "{logs:?}");
        let line = logs
            .iter()
            .find_map(|l| l.strip_prefix("RESULTS "))
            .unwrap_or_else(|| panic!("no results in {logs:?}"));
        results.push(serde_json::from_str(line).expect("json"));
    }
    results
}

#[test]
fn trials_with_uids_of_their_own_cannot_read_each_other_or_the_node() {
    if nix_euid() != 0 {
        eprintln!(
            "skipped: switching users needs root, and this test runs as uid {}",
            nix_euid()
        );
        return;
    }
    system(async {
        // As the node's user, a trial reads its neighbour's token: what the
        // range below prevents (and proof that the probe can see it).
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = probe_pair(dir.path(), RunAs::Node).await;
        assert!(
            shared
                .iter()
                .any(|r| r["foreign_tokens"].as_u64() > Some(0)),
            "{shared:?}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let range = RunAs::parse(None, Some("61000-61007")).expect("range");
        let apart = probe_pair(dir.path(), range).await;
        let uids: Vec<u64> = apart.iter().filter_map(|r| r["uid"].as_u64()).collect();
        assert!(
            uids.iter().all(|u| (61_000..=61_007).contains(u)),
            "{apart:?}"
        );
        assert_ne!(uids[0], uids[1], "a uid each");
        for r in &apart {
            assert!(r["others_seen"].as_u64() > Some(0), "ran side by side: {r}");
            assert_eq!(r["foreign_tokens"], 0, "{r}");
            assert_eq!(r["cluster_key"], false, "{r}");
            assert_eq!(r["data_dir_listable"], false, "{r}");
            assert_eq!(r["other_trial_listable"], false, "{r}");
            assert_eq!(
                r["restored"], "weights",
                "its own checkpoint round trip works: {r}"
            );
        }
    });
}

fn nix_euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}
