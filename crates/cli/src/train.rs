//! `resolute train`: the built-in trainer (`resolute_trial::trainer`) as a trial
//! entrypoint. Inside a trial it reads its hyperparameters, seed, target and
//! latest checkpoint from the environment the node sets and reports through the
//! trial's endpoint; run by hand it prints its metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use resolute_trial::trainer::{self, Data, Ended, Hparams, Reporter, State};

/// Batches trained when neither the searcher nor `--target` says.
pub const TARGET_DEFAULT_BATCHES: u64 = 1000;
/// Seconds one ask for the next target waits for the node's answer.
const NEXT_POLL_S: u64 = 30;
/// Seconds a report may take (longer than a long poll).
const REPORT_TIMEOUT_S: u64 = 60;

/// Options of `resolute train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// `cpu` (the default) or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Hyperparameters as JSON (default: the trial's RESOLUTE_HPARAMS).
    #[arg(long)]
    hparams: Option<String>,
    /// Batches to train (default: the trial's target, else 1000).
    #[arg(long)]
    target: Option<u64>,
    /// Seed (default: the trial's seed, else 0).
    #[arg(long)]
    seed: Option<u32>,
    /// Outside a trial: where to write checkpoints.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
}

/// The trial's report endpoint.
struct Endpoint {
    agent: ureq::Agent,
    url: String,
    token: String,
}

impl Endpoint {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.url, path);
        let auth = format!("Bearer {}", self.token);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body.unwrap_or_else(|| json!({}))),
        };
        let mut response = response.map_err(|e| format!("{path}: {e}"))?;
        let status = response.status().as_u16();
        let value: Value = response
            .body_mut()
            .read_json()
            .map_err(|e| format!("{path}: {e}"))?;
        if status >= 300 {
            return Err(format!("{path}: {status} {}", value["error"]));
        }
        Ok(value)
    }
}

impl Reporter for Endpoint {
    fn training(&mut self, step: u64, loss: f64) -> Result<(), String> {
        let body = json!({"steps_completed": step, "metrics": {"loss": loss}});
        self.call("POST", "/training", Some(body)).map(|_| ())
    }

    fn validation(&mut self, step: u64, loss: f64) -> Result<(), String> {
        // `batches` too: a searcher with `time_metric: batches` reads the trial's
        // progress from its validation metrics (Determined's contract).
        let body =
            json!({"steps_completed": step, "metrics": {"validation_loss": loss, "batches": step}});
        self.call("POST", "/validation", Some(body)).map(|_| ())
    }

    fn checkpoint(
        &mut self,
        step: u64,
        write: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let meta = json!({"steps_completed": step, "trainer": "resolute-mlp"});
        let begun = self.call("POST", "/checkpoints", Some(json!({"metadata": meta})))?;
        let path = begun["path"].as_str().ok_or("no checkpoint path")?;
        write(Path::new(path))?;
        let commit =
            json!({"storage_id": begun["storage_id"], "steps_completed": step, "metadata": meta});
        self.call("POST", "/checkpoints/commit", Some(commit))
            .map(|_| ())
    }

    fn next_target(&mut self, reached: u64) -> Result<Option<u64>, String> {
        // The node answers once this run's last validation is in (a searcher
        // may promote the trial on arrival); ask again while it is pending.
        let path = format!("/searcher/next?steps={reached}&timeout_s={NEXT_POLL_S}");
        loop {
            let answer = self.call("GET", &path, None)?;
            if answer["pending"] != json!(true) {
                return Ok(answer["length"].as_u64());
            }
        }
    }

    fn should_stop(&mut self) -> bool {
        let asked = self
            .call("GET", "/preemption?timeout_s=0", None)
            .is_ok_and(|v| v["preempt"] == json!(true));
        if asked {
            let _ = self.call("POST", "/preemption/ack", None);
        }
        asked
    }
}

/// Prints metrics; writes checkpoints into a directory (outside a trial).
struct Console {
    dir: Option<PathBuf>,
}

impl Reporter for Console {
    fn training(&mut self, step: u64, loss: f64) -> Result<(), String> {
        if step % 100 == 0 {
            println!("batch {step:>6}  loss {loss:.5}");
        }
        Ok(())
    }

    fn validation(&mut self, step: u64, loss: f64) -> Result<(), String> {
        println!("batch {step:>6}  validation_loss {loss:.5}");
        Ok(())
    }

    fn checkpoint(
        &mut self,
        _step: u64,
        write: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                write(d)
            }
            None => Ok(()),
        }
    }

    fn should_stop(&mut self) -> bool {
        false
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Runs the trainer; exit 0 when it completed or stopped when asked.
pub fn run(args: &TrainArgs) -> anyhow::Result<std::process::ExitCode> {
    let cuda = match args.device.as_str() {
        "cpu" => false,
        "cuda" => {
            let d = resolute_trial::gpu::discover(false);
            if d.usable().next().is_none() {
                bail!(
                    "--device cuda: no usable NVIDIA GPU ({})",
                    d.nvml_error.unwrap_or_else(|| "NVML lists none".into())
                );
            }
            true
        }
        other => bail!("--device {other:?}: expected cpu or cuda"),
    };
    let run = |data: &Data, state: State, target: u64, r: &mut dyn Reporter| {
        if cuda {
            resolute_trial::trainer_cuda::train(data, state, target, r)
        } else {
            trainer::train(data, state, target, r)
        }
    };
    let hparams_text = args
        .hparams
        .clone()
        .or_else(|| env("RESOLUTE_HPARAMS"))
        .unwrap_or_else(|| "{}".into());
    let hparams_json: Value =
        serde_json::from_str(&hparams_text).context("hyperparameters are not JSON")?;
    let hparams = Hparams::from_json(&hparams_json).map_err(anyhow::Error::msg)?;
    let seed = match args.seed {
        Some(s) => s,
        None => env("RESOLUTE_TRIAL_SEED")
            .map(|s| s.parse())
            .transpose()
            .context("RESOLUTE_TRIAL_SEED")?
            .unwrap_or(0),
    };
    let target = match args.target {
        Some(t) => t,
        None => env("RESOLUTE_TARGET_LENGTH")
            .map(|s| s.parse())
            .transpose()
            .context("RESOLUTE_TARGET_LENGTH")?
            .unwrap_or(TARGET_DEFAULT_BATCHES),
    };
    let data = Data::wine();
    let state = match env("RESOLUTE_LATEST_CHECKPOINT") {
        Some(dir) => State::load(Path::new(&dir)).map_err(anyhow::Error::msg)?,
        None => State::new(&hparams, data.features, seed),
    };
    let ended = match (env("RESOLUTE_REPORT_URL"), env("RESOLUTE_TOKEN")) {
        (Some(url), Some(token)) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(REPORT_TIMEOUT_S)))
                .build()
                .into();
            let mut endpoint = Endpoint { agent, url, token };
            run(&data, state, target, &mut endpoint)
        }
        _ => run(
            &data,
            state,
            target,
            &mut Console {
                dir: args.checkpoint_dir.clone(),
            },
        ),
    }
    .map_err(anyhow::Error::msg)?;
    match ended {
        Ended::Completed => println!("completed {target} batches"),
        Ended::Stopped => println!("stopped when asked"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
