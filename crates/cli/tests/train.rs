//! `resolute train` as a real trial process: killed with SIGKILL after a
//! checkpoint and resumed from it, it reports bit-identical metrics to a run that
//! was never interrupted (same seed, CPU).

use std::collections::BTreeMap;
use std::time::Duration;

use resolute_core::command::{MetricKind, TrialOutcome};
use resolute_trial::{Launch, ServiceConfig, TrialEvent, TrialService};
use resolute_types::Value;

fn launch(trial: u64, incarnation: u64, checkpoint: Option<String>) -> Launch {
    Launch {
        trial,
        incarnation,
        experiment: 1,
        entrypoint: format!("{} train", env!("CARGO_BIN_EXE_resolute")),
        model_dir: None,
        model_digest: None,
        hparams: serde_json::json!({"lr": 0.004, "hidden": 32, "depth": 2, "dropout": 0.1, "validate_every": 100}),
        seed: 5,
        latest_checkpoint: checkpoint,
        target: Some(800),
        time_metric: "batches".into(),
        gpus: Vec::new(),
        distributed: None,
        env: BTreeMap::new(),
    }
}

type Metric = (MetricKind, u64, u64);

/// Metrics of one incarnation until it exits, as (kind, step, f64 bits).
async fn collect(
    events: &mut tokio::sync::mpsc::Receiver<TrialEvent>,
    incarnation: u64,
    mut on_checkpoint: impl FnMut(u64, &str),
) -> (Vec<Metric>, TrialOutcome) {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(120), events.recv())
            .await
            .expect("in time")
            .expect("events");
        match e {
            TrialEvent::Metrics {
                incarnation: i,
                kind,
                steps_completed,
                metrics,
                ..
            } if i == incarnation => {
                for v in metrics.values() {
                    if let Value::Float(f) = v {
                        out.push((kind, steps_completed, f.to_bits()));
                    }
                }
            }
            TrialEvent::CheckpointSaved {
                incarnation: i,
                steps_completed,
                uuid,
                ..
            } if i == incarnation => {
                on_checkpoint(steps_completed, &uuid);
            }
            TrialEvent::Exited {
                incarnation: i,
                outcome,
                ..
            } if i == incarnation => return (out, outcome),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_resumed_the_trainer_reports_what_an_uninterrupted_run_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, mut events) = TrialService::start(ServiceConfig {
        work_root: dir.path().join("work"),
        data_dir: dir.path().join("data"),
        kill_grace_ms: 1_000,
    })
    .await
    .expect("service");
    // The reference: trial 1, never interrupted.
    svc.launch(launch(1, 1, None)).await.expect("launch");
    let (reference, outcome) = collect(&mut events, 1, |_, _| {}).await;
    assert_eq!(outcome, TrialOutcome::Completed);
    // Trial 2, same seed: SIGKILL right after the checkpoint at batch 300.
    svc.launch(launch(2, 1, None)).await.expect("launch");
    let mut at: Option<String> = None;
    let svc2 = svc.clone();
    let (before, outcome) = collect(&mut events, 1, |step, uuid| {
        if step == 300 && at.is_none() {
            at = Some(uuid.to_string());
            svc2.kill(2, 1);
        }
    })
    .await;
    assert!(
        matches!(
            outcome,
            TrialOutcome::Errored {
                exit_code: None,
                ..
            }
        ),
        "{outcome:?}"
    );
    let uuid = at.expect("a checkpoint at 300");
    svc.launch(launch(2, 2, Some(uuid))).await.expect("resume");
    let (after, outcome) = collect(&mut events, 2, |_, _| {}).await;
    assert_eq!(outcome, TrialOutcome::Completed);
    // Up to the checkpoint, the killed run matched the reference; after it, the
    // resumed run does, bit for bit.
    let upto: Vec<Metric> = reference.iter().filter(|m| m.1 <= 300).copied().collect();
    let from: Vec<Metric> = reference.iter().filter(|m| m.1 > 300).copied().collect();
    let before: Vec<Metric> = before.into_iter().filter(|m| m.1 <= 300).collect();
    assert_eq!(before, upto);
    assert_eq!(after, from);
    assert!(from.len() >= 50, "{}", from.len());
}
