//! `resolute train` as a real trial process under the real trial supervisor:
//! killed with SIGKILL after a checkpoint and resumed from it, it reports
//! bit-identical metrics to a run that was never interrupted (same seed, CPU);
//! promoted at its target, it trains on in the same process exactly as a run
//! that had the longer target from the start.

use std::collections::BTreeMap;
use std::time::Duration;

use resolute_agent::{LaunchSpec, ProcessExit};
use resolute_core::command::MetricKind;
use resolute_trial::{
    Control, Launch, ReportSink, Signal, SupervisorConfig, TrialReport, TrialSupervisor,
};
use resolute_types::Value;

fn spec(trial: u64, incarnation: u64, checkpoint: Option<String>, target: u64) -> LaunchSpec {
    LaunchSpec {
        trial,
        incarnation,
        experiment: 1,
        entrypoint: format!("{} train", resolute_tests::bin().display()),
        env: BTreeMap::new(),
        hparams: serde_json::from_value(serde_json::json!({"lr": 0.004, "hidden": 32, "depth": 2, "dropout": 0.1, "validate_every": 100}))
            .expect("hparams"),
        seed: 5,
        model_digest: None,
        latest_checkpoint: checkpoint,
        target: Some(target),
        time_metric: "batches".into(),
        slots: vec![0],
        gpus: Vec::new(),
        slots_here: 1,
        gang: None,
        config: Box::new(
            resolute_types::config::parse_str(
                "experiment.yaml",
                "searcher: {name: single, metric: validation_loss, max_length: {batches: 100}}\n",
                &[],
            )
            .expect("config")
            .config,
        ),
    }
}

type Metric = (MetricKind, u64, u64);

/// What one incarnation reported.
#[derive(Default)]
struct Run {
    metrics: Vec<Metric>,
    exit: Option<ProcessExit>,
}

/// Reports of one incarnation until it exits; `on` may answer a report
/// (a control for the incarnation) and says when to stop listening early.
async fn collect(
    reports: &mut tokio::sync::mpsc::Receiver<TrialReport>,
    sup: &actix::Addr<TrialSupervisor>,
    key: (u64, u64),
    mut on: impl FnMut(&TrialReport) -> Option<Control>,
) -> Run {
    let mut run = Run::default();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(120), reports.recv())
            .await
            .expect("in time")
            .expect("reports");
        if let Some(control) = on(&r) {
            let (trial, incarnation) = key;
            sup.send(Signal {
                trial,
                incarnation,
                control,
            })
            .await
            .expect("signal");
        }
        match r {
            TrialReport::Metrics {
                incarnation,
                kind,
                steps_completed,
                metrics,
                ..
            } if incarnation == key.1 => {
                for v in metrics.values() {
                    if let Value::Float(f) = v {
                        run.metrics.push((kind, steps_completed, f.to_bits()));
                    }
                }
            }
            TrialReport::Exited {
                trial,
                incarnation,
                exit,
            } if (trial, incarnation) == key => {
                run.exit = Some(exit);
                return run;
            }
            _ => {}
        }
    }
}

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

async fn supervisor(
    dir: &std::path::Path,
) -> (
    actix::Addr<TrialSupervisor>,
    tokio::sync::mpsc::Receiver<TrialReport>,
    actix::Addr<ReportSink>,
) {
    let (sink, reports) = ReportSink::start(1024);
    let (sup, _) = TrialSupervisor::start(
        SupervisorConfig {
            work_root: dir.join("work"),
            data_dir: dir.join("data"),
            run_as: Default::default(),
            cluster_key: None,
            best_validation: None,
        },
        sink.clone().recipient(),
    )
    .await
    .expect("supervisor");
    (sup, reports, sink)
}

async fn launch(sup: &actix::Addr<TrialSupervisor>, spec: LaunchSpec) {
    sup.send(Launch {
        spec,
        hosts: Vec::new(),
    })
    .await
    .expect("launch");
}

#[test]
fn killed_and_resumed_the_trainer_reports_what_an_uninterrupted_run_does() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut reports, _sink) = supervisor(dir.path()).await;
        // The reference: trial 1, never interrupted. At its target it asks to
        // go on and is told to finish.
        launch(&sup, spec(1, 1, None, 800)).await;
        let finish = |r: &TrialReport| {
            matches!(r, TrialReport::Reached { .. }).then_some(Control::Proceed(None))
        };
        let reference = collect(&mut reports, &sup, (1, 1), finish).await;
        assert_eq!(reference.exit.as_ref().and_then(|e| e.code), Some(0));
        // Trial 2, same seed: SIGKILL right after the checkpoint at batch 300.
        launch(&sup, spec(2, 1, None, 800)).await;
        let mut at: Option<String> = None;
        let before = collect(&mut reports, &sup, (2, 1), |r| match r {
            TrialReport::CheckpointSaved {
                steps_completed: 300,
                uuid,
                ..
            } if at.is_none() => {
                at = Some(uuid.clone());
                Some(Control::Kill)
            }
            _ => None,
        })
        .await;
        assert_eq!(before.exit.as_ref().and_then(|e| e.signal), Some(9));
        let uuid = at.expect("a checkpoint at 300");
        launch(&sup, spec(2, 2, Some(uuid), 800)).await;
        let after = collect(&mut reports, &sup, (2, 2), finish).await;
        assert_eq!(after.exit.as_ref().and_then(|e| e.code), Some(0));
        // Up to the checkpoint, the killed run matched the reference; after it,
        // the resumed run does, bit for bit.
        let upto: Vec<Metric> = reference
            .metrics
            .iter()
            .filter(|m| m.1 <= 300)
            .copied()
            .collect();
        let from: Vec<Metric> = reference
            .metrics
            .iter()
            .filter(|m| m.1 > 300)
            .copied()
            .collect();
        let before: Vec<Metric> = before.metrics.into_iter().filter(|m| m.1 <= 300).collect();
        assert_eq!(before, upto);
        assert_eq!(after.metrics, from);
        assert!(from.len() >= 50, "{}", from.len());
    });
}

#[test]
fn promoted_at_its_target_the_trainer_trains_on_as_if_the_target_were_longer() {
    system(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sup, mut reports, _sink) = supervisor(dir.path()).await;
        let finish = |r: &TrialReport| {
            matches!(r, TrialReport::Reached { .. }).then_some(Control::Proceed(None))
        };
        launch(&sup, spec(1, 1, None, 800)).await;
        let reference = collect(&mut reports, &sup, (1, 1), finish).await;
        // Same seed, target 400; at 400 the node raises it to 800.
        launch(&sup, spec(2, 1, None, 400)).await;
        let promoted = collect(&mut reports, &sup, (2, 1), |r| match r {
            TrialReport::Reached { steps: 400, .. } => Some(Control::Proceed(Some(800))),
            TrialReport::Reached { .. } => Some(Control::Proceed(None)),
            _ => None,
        })
        .await;
        assert_eq!(promoted.exit.as_ref().and_then(|e| e.code), Some(0));
        assert_eq!(
            promoted.metrics, reference.metrics,
            "one process, the same run"
        );
    });
}
