//! Determined's PyTorchTrial classes, run unchanged through the harness on a
//! real cluster (where `python3` imports torch; the torch-free loop is tested
//! always), the up-front check of a Trial-class entrypoint, and the
//! experiment's best validation served to trials.

use std::process::Command;
use std::time::Duration;

use resolute_tests::{
    client_env, create, experiment_create_in, get, has_torch, kill_under_a_trial, last_validation,
    repo, start, trials, until, Moved,
};

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
fn entrypoints_are_checked_up_front_and_a_trial_class_says_what_it_needs() {
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
    // A script the entrypoint names (after a launcher too) must be there.
    let script_config = model.join("script.yaml");
    std::fs::write(
        &script_config,
        "entrypoint: python3 -m determined.launch.torch_distributed -- python3 missing.py --lr=0.1\n\
         searcher: {name: single, metric: loss, max_length: {batches: 1}}\n",
    )
    .expect("config");
    let out = experiment_create_in(&a, &script_config, &model);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("entrypoint: missing.py is not in the model directory"),
        "{stderr}"
    );
    std::fs::remove_file(&script_config).expect("rm");
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
fn a_trial_reads_the_experiments_best_validation_and_reports_other_metric_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 93, None);
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    std::fs::write(
        model.join("best.py"),
        r#"
import time
import determined as det
from resolute.core import ReportError
with det.core.init() as core:
    assert core.train.get_experiment_best_validation() is None
    core.train.report_metrics("inference", steps_completed=7, metrics={"latency_ms": 3.5})
    try:
        core.train.report_metrics("no spaces", steps_completed=1, metrics={"x": 1})
        raise SystemExit("a bad group name was taken")
    except ReportError as e:
        assert e.status == 400 and "metric group" in str(e), e
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
    // The other group is kept beside the built-in ones, and did not move the
    // trial's steps (only training and validation say how far it is).
    let m = get(
        &a.api,
        &[
            "trial",
            "metrics",
            &trial.to_string(),
            "--group",
            "inference",
        ],
    );
    let reports = m.as_array().cloned().unwrap_or_default();
    assert_eq!(reports.len(), 1, "{m}");
    assert_eq!(reports[0]["metrics"]["latency_ms"], 3.5, "{m}");
    assert_eq!(reports[0]["steps_completed"], 7, "{m}");
    let described = get(&a.api, &["trial", "describe", &trial.to_string()]);
    assert_eq!(described["steps_completed"], 1, "{described}");
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
    // 0.1 s a batch: the searcher's stop (a commit, a signal, the trial's
    // poll) lands well before a trial it does not promote reaches 4 epochs,
    // even with the other tests loading both cores.
    let id = create(
        &a.api,
        &model.join("adaptive.yaml"),
        &model,
        &[client_env(), "data.pause_s=0.1".into()],
    );
    until("the search completes", Duration::from_secs(300), || {
        let s = get(&a.api, &["experiment", "describe", &id.to_string()])["state"].clone();
        assert_ne!(s, "Errored");
        s == "Completed"
    });
    // Rungs at 2 and 4 epochs (16 batches an epoch): every trial validated
    // at each epoch it trained and ended on an epoch's last batch, at 4 or
    // where the searcher stopped it (whether the stopping-based brackets stop
    // one depends on the draws and on who reaches a rung first: the first
    // arrival always goes on). The stop itself is proven deterministically
    // by the pause test below.
    let mut ends = Vec::new();
    for t in trials(&a.api, id) {
        let (m, last) = last_validation(&a.api, t["id"].as_u64().expect("id"));
        let epochs = last["metrics"]["epochs"].as_u64().unwrap_or(0);
        assert_eq!(last["steps_completed"], epochs * 16, "{m}");
        let validated: Vec<u64> = m
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["kind"] == "Validation")
            .filter_map(|p| p["metrics"]["epochs"].as_u64())
            .collect();
        assert_eq!(validated, (1..=epochs).collect::<Vec<_>>(), "{m}");
        ends.push(epochs);
    }
    ends.sort_unstable();
    assert_eq!(ends.len(), 4, "{ends:?}");
    assert!(ends[0] >= 2, "{ends:?}");
    assert_eq!(ends[3], 4, "{ends:?}");
}

#[test]
fn a_paused_pytorch_trial_checkpoints_stops_and_resumes_where_it_left_off() {
    if !has_torch() {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 107, None);
    let model = repo().join("examples/pytorch-trial");
    let id = create(
        &a.api,
        &model.join("experiment.yaml"),
        &model,
        &[client_env(), "data.pause_s=0.1".into()],
    );
    let trial_of = || trials(&a.api, id).first().and_then(|t| t["id"].as_u64());
    let trained = |trial: u64| {
        let (m, _) = last_validation(&a.api, trial);
        m.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["steps_completed"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let mut trial = 0;
    until(
        "the trial reports training",
        Duration::from_secs(120),
        || {
            trial = trial_of().unwrap_or(0);
            trial != 0 && trained(trial) >= 8
        },
    );
    // A pause reaches the harness as a preemption: it checkpoints at its
    // next period's end and exits, before the searcher's 48 batches.
    let (code, out) = resolute_tests::cli(&a.api, &["experiment", "pause", &id.to_string()]);
    assert_eq!(code, 0, "{out}");
    until("the trial is paused", Duration::from_secs(60), || {
        get(&a.api, &["trial", "describe", &trial.to_string()])["state"] == "Paused"
    });
    let at = trained(trial);
    assert!(at < 48, "it stopped early: at {at}");
    let (code, out) = resolute_tests::cli(&a.api, &["experiment", "activate", &id.to_string()]);
    assert_eq!(code, 0, "{out}");
    until("the experiment completes", Duration::from_secs(120), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    let text = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    assert!(text.contains("restored checkpoint"), "{text}");
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 48, "{m}");
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
        &["data.pause_s=0.1".into()],
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
fn a_pytorch_trial_across_two_nodes_trains_every_rank_under_torchrun() {
    if !has_torch() {
        eprintln!("skipped: torch is not importable here (pip install torch to run it)");
        return;
    }
    // Two nodes of two CPU slots; three slots for the trial: it spans both,
    // torchrun on each with the gang's rendezvous (rank 0's node first).
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 102, None);
    let b = start(&dir.path().join("b"), 103, Some(&a.listen));
    until("two voters", Duration::from_secs(30), || {
        let v = get(&b.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 2)
    });
    let model = repo().join("examples/pytorch-trial");
    let id = create(
        &a.api,
        &model.join("distributed.yaml"),
        &model,
        &[client_env(), "resources.slots_per_trial=3".into()],
    );
    until("the experiment completes", Duration::from_secs(240), || {
        let s = get(&a.api, &["experiment", "describe", &id.to_string()])["state"].clone();
        assert_ne!(s, "Errored");
        s == "Completed"
    });
    let t = &trials(&a.api, id)[0];
    let nodes = t["layout"].as_array().map_or(0, Vec::len);
    assert_eq!(nodes, 2, "the trial spans both nodes: {t}");
    let trial = t["id"].as_u64().expect("trial");
    let text = get(&a.api, &["trial", "logs", &trial.to_string()]).to_string();
    for rank in 0..3 {
        assert!(
            text.contains(&format!("[rank={rank}] ")),
            "rank {rank}: {text}"
        );
    }
    let (m, last) = last_validation(&a.api, trial);
    assert_eq!(last["steps_completed"], 32, "{m}");
    drop(b);
}
