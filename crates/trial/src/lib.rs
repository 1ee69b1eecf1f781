//! Trials on a node: how a node runs training code, learns its progress, takes
//! its checkpoints and tells it to stop.
//!
//! [`TrialService`] launches each trial incarnation as a process group running the
//! experiment's `entrypoint` (through `/bin/sh -c`, as Determined does) in a
//! working copy of the model directory, with the trial's hyperparameters, seed,
//! latest checkpoint and a loopback report endpoint in its environment. The
//! endpoint has Determined's Core API shape (training and validation metrics,
//! checkpoints, progress, early exit, the preemption long-poll and its
//! acknowledgement); every request carries the incarnation's secret token, and a
//! report from an older incarnation is refused. What the trial reports becomes a
//! [`TrialEvent`] for the node, which turns it into log commands.
//!
//! Checkpoints: the trial writes files into a staging directory the endpoint gives
//! it; on commit the service packs the directory ([`pack`]) into a content-addressed
//! blob whose digest is the checkpoint's uuid.

pub mod gpu;
pub mod pack;
mod service;
pub mod trainer;
pub mod trainer_cuda;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use resolute_core::command::{MetricKind, TrialOutcome};
use resolute_types::Value;

pub use service::{read_logs, LogLine, ServiceConfig, TrialService, KILL_GRACE_DEFAULT_MS};

/// Why a trial operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrialError {
    /// A file or process operation failed.
    #[error("{0}")]
    Io(String),
    /// The checkpoint to resume from is not in this node's blob store (fetch it
    /// from a holder first).
    #[error("checkpoint {0} is not on this node")]
    MissingCheckpoint(String),
    /// A newer incarnation of the trial already runs here.
    #[error("incarnation {incarnation} of trial {trial} is stale")]
    Stale {
        /// The trial.
        trial: u64,
        /// The refused incarnation.
        incarnation: u64,
    },
}

/// Why training code ended early on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyExit {
    /// The hyperparameters cannot be trained (Determined's `InvalidHP`).
    InvalidHyperparameters,
    /// The user's code decided to stop.
    UserCanceled,
    /// The code hit an error it reported before exiting.
    Errored,
}

/// Where a multi-node trial's ranks are (the torchrun contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distributed {
    /// Global rank of this node's first process.
    pub rank: u32,
    /// Slots in the whole gang.
    pub world_size: u32,
    /// Slots on this node.
    pub local_world_size: u32,
    /// This node's rank in the gang (0 runs the chief).
    pub group_rank: u32,
    /// The rank-0 node's address.
    pub master_addr: String,
    /// The port the rank-0 node listens on for the rendezvous.
    pub master_port: u16,
}

/// Everything needed to start one incarnation of a trial on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The trial.
    pub trial: u64,
    /// Its incarnation (reports must carry it).
    pub incarnation: u64,
    /// Its experiment.
    pub experiment: u64,
    /// The shell command to run (the config's `entrypoint`).
    pub entrypoint: String,
    /// The model directory (copied per trial incarnation), if any.
    pub model_dir: Option<PathBuf>,
    /// Or the model directory as a packed blob in the local store (unpacked once
    /// per node, then copied per incarnation; the node fetches it from a peer
    /// first when it is missing).
    pub model_digest: Option<String>,
    /// Hyperparameters, as JSON.
    pub hparams: serde_json::Value,
    /// The trial seed.
    pub seed: u32,
    /// Digest of the checkpoint blob to resume from (must be in the local store).
    pub latest_checkpoint: Option<String>,
    /// Train until this many `time_metric` units.
    pub target: Option<u64>,
    /// The unit of `target` (batches, epochs, ...).
    pub time_metric: String,
    /// GPU indices or uuids for `CUDA_VISIBLE_DEVICES` (empty: none).
    pub gpus: Vec<String>,
    /// Rank layout of a multi-node trial.
    pub distributed: Option<Distributed>,
    /// The config's `environment_variables`.
    pub env: BTreeMap<String, String>,
}

/// What a trial did, for the node.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialEvent {
    /// Training or validation metrics.
    Metrics {
        /// The trial.
        trial: u64,
        /// The reporting incarnation.
        incarnation: u64,
        /// Training or validation.
        kind: MetricKind,
        /// Progress when reported.
        steps_completed: u64,
        /// The values.
        metrics: BTreeMap<String, Value>,
    },
    /// Progress toward the target (0 to 1).
    Progress {
        /// The trial.
        trial: u64,
        /// The reporting incarnation.
        incarnation: u64,
        /// Fraction done.
        progress: f64,
    },
    /// A checkpoint was packed into the local blob store.
    CheckpointSaved {
        /// The trial.
        trial: u64,
        /// The reporting incarnation.
        incarnation: u64,
        /// The blob digest (the checkpoint's uuid).
        uuid: String,
        /// Progress it captures.
        steps_completed: u64,
        /// Packed bytes.
        size: u64,
        /// The trial's metadata.
        metadata: serde_json::Value,
    },
    /// The code said it is ending early, and why.
    EarlyExit {
        /// The trial.
        trial: u64,
        /// The reporting incarnation.
        incarnation: u64,
        /// Why.
        reason: EarlyExit,
    },
    /// The code acknowledged the preemption signal.
    PreemptAcked {
        /// The trial.
        trial: u64,
        /// The reporting incarnation.
        incarnation: u64,
    },
    /// The process ended.
    Exited {
        /// The trial.
        trial: u64,
        /// The incarnation that ended.
        incarnation: u64,
        /// How, for the trial-exited record.
        outcome: TrialOutcome,
        /// Its exit code (None: killed by a signal).
        exit_code: Option<i32>,
        /// Its last output lines.
        last_lines: Vec<String>,
    },
}
