//! The built-in trainer learns, rejects bad hyperparameters by name, and resumes
//! exactly: stopped after a checkpoint and resumed, it reports bit-identical
//! metrics to a run that never stopped.

use std::path::{Path, PathBuf};

use resolute_trial::trainer::{train, Data, Ended, Hparams, Reporter, State};

#[derive(Default)]
struct Record {
    metrics: Vec<(u64, &'static str, f64)>,
    dir: PathBuf,
    checkpoints: Vec<u64>,
    stop_at: Option<u64>,
    last_step: u64,
}

impl Reporter for Record {
    fn training(&mut self, step: u64, loss: f64) -> Result<(), String> {
        self.metrics.push((step, "loss", loss));
        Ok(())
    }
    fn validation(&mut self, step: u64, loss: f64) -> Result<(), String> {
        self.metrics.push((step, "validation_loss", loss));
        self.last_step = step;
        Ok(())
    }
    fn checkpoint(
        &mut self,
        step: u64,
        write: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let dir = self.dir.join(step.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        self.checkpoints.push(step);
        write(&dir)
    }
    fn should_stop(&mut self) -> bool {
        self.stop_at == Some(self.last_step)
    }
}

fn hparams() -> Hparams {
    Hparams::from_json(&serde_json::json!({
        "lr": 0.005, "hidden": 24, "depth": 2, "batch_size": 16,
        "dropout": 0.2, "weight_decay": 0.001, "validate_every": 100
    }))
    .expect("hparams")
}

#[test]
fn stopping_and_resuming_gives_bit_identical_metrics() {
    let data = Data::wine();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut straight = Record {
        dir: dir.path().join("a"),
        ..Record::default()
    };
    let ended = train(
        &data,
        State::new(&hparams(), data.features, 11),
        600,
        &mut straight,
    );
    assert_eq!(ended, Ok(Ended::Completed));
    let mut first = Record {
        dir: dir.path().join("b"),
        stop_at: Some(300),
        ..Record::default()
    };
    let ended = train(
        &data,
        State::new(&hparams(), data.features, 11),
        600,
        &mut first,
    );
    assert_eq!(ended, Ok(Ended::Stopped));
    let resumed_state = State::load(&dir.path().join("b/300")).expect("checkpoint");
    assert_eq!(resumed_state.step, 300);
    let mut second = Record {
        dir: dir.path().join("c"),
        ..Record::default()
    };
    let ended = train(&data, resumed_state, 600, &mut second);
    assert_eq!(ended, Ok(Ended::Completed));
    let mut joined = first.metrics.clone();
    joined.extend(second.metrics.iter().copied());
    assert_eq!(joined.len(), straight.metrics.len());
    for (a, b) in joined.iter().zip(&straight.metrics) {
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2.to_bits(), b.2.to_bits(), "step {} {}", a.0, a.1);
    }
}

#[test]
fn it_learns_and_different_seeds_differ() {
    let data = Data::wine();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |seed: u32| {
        let mut r = Record {
            dir: dir.path().join(seed.to_string()),
            ..Record::default()
        };
        train(
            &data,
            State::new(&hparams(), data.features, seed),
            800,
            &mut r,
        )
        .expect("train");
        r.metrics
            .iter()
            .filter(|m| m.1 == "validation_loss")
            .map(|m| m.2)
            .collect::<Vec<f64>>()
    };
    let a = run(1);
    let b = run(2);
    assert!(a[a.len() - 1] < a[0] * 0.9, "validation loss fell: {a:?}");
    assert!(a[a.len() - 1] < 0.8, "{a:?}");
    assert_ne!(a, b);
}

#[test]
fn bad_hyperparameters_are_named() {
    for (json, field) in [
        (serde_json::json!({"lr": 0}), "hyperparameters.lr"),
        (serde_json::json!({"depth": 0}), "hyperparameters.depth"),
        (
            serde_json::json!({"hidden": 5000}),
            "hyperparameters.hidden",
        ),
        (
            serde_json::json!({"dropout": 1.0}),
            "hyperparameters.dropout",
        ),
        (serde_json::json!({"lr": "fast"}), "hyperparameters"),
        (serde_json::json!({"learning_rate": 0.1}), "learning_rate"),
    ] {
        let err = Hparams::from_json(&json).expect_err("bad");
        assert!(err.contains(field), "{json}: {err}");
    }
}

#[test]
fn on_a_gpu_the_cuda_path_matches_the_cpu_bit_for_bit() {
    if resolute_trial::gpu::discover(false)
        .usable()
        .next()
        .is_none()
    {
        eprintln!("skipped: no usable NVIDIA GPU here");
        return;
    }
    let data = Data::wine();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cpu = Record {
        dir: dir.path().join("cpu"),
        ..Record::default()
    };
    train(
        &data,
        State::new(&hparams(), data.features, 3),
        300,
        &mut cpu,
    )
    .expect("cpu");
    let mut gpu = Record {
        dir: dir.path().join("gpu"),
        ..Record::default()
    };
    let ended = resolute_trial::trainer_cuda::train(
        &data,
        State::new(&hparams(), data.features, 3),
        300,
        &mut gpu,
    );
    assert_eq!(ended, Ok(Ended::Completed));
    assert_eq!(gpu.metrics.len(), cpu.metrics.len());
    for (g, c) in gpu.metrics.iter().zip(&cpu.metrics) {
        assert_eq!((g.0, g.1), (c.0, c.1));
        assert_eq!(
            g.2.to_bits(),
            c.2.to_bits(),
            "step {} {}: gpu {} cpu {}",
            g.0,
            g.1,
            g.2,
            c.2
        );
    }
    // A GPU checkpoint resumes on the CPU and gives the same numbers.
    let state = State::load(&dir.path().join("gpu/200")).expect("gpu checkpoint");
    let mut resumed = Record {
        dir: dir.path().join("resumed"),
        ..Record::default()
    };
    train(&data, state, 300, &mut resumed).expect("resume on cpu");
    let tail: Vec<_> = cpu.metrics.iter().filter(|m| m.0 > 200).copied().collect();
    assert_eq!(resumed.metrics.len(), tail.len());
    for (r, c) in resumed.metrics.iter().zip(&tail) {
        assert_eq!(r.2.to_bits(), c.2.to_bits());
    }
}
