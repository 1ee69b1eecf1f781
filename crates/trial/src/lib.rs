//! Trials on a node: how a node runs training code, learns its progress, takes
//! its checkpoints and tells it to stop. The actix actors of the node shell
//! that touch trial processes live here.
//!
//! - [`TrialSupervisor`] serves the report endpoint (HTTP on loopback, one
//!   secret token per incarnation) and starts a [`TrialActor`] per launched
//!   incarnation; the node's agent decides what to launch and signal
//!   (`crates/agent`), the supervisor and its actors carry it out.
//! - [`TrialActor`] runs the experiment's `entrypoint` (through `/bin/sh -c`,
//!   as Determined does) as a process group in a working copy of the model
//!   directory, with the trial's hyperparameters, seed, latest checkpoint and
//!   report endpoint in its environment; captures its log; packs its
//!   checkpoints into content-addressed blobs (the digest is the checkpoint's
//!   uuid); and reports what the trial did to the node.
//! - `process`: the process group, its files, its environment.
//! - [`client`]: the Python client compiled in, put first on every trial's
//!   `PYTHONPATH`.
//! - [`isolation`]: who a trial runs as and what it can reach on disk.
//! - `endpoint`: the report API (Determined's Core API shape).
//! - [`trainer`], [`trainer_cuda`]: the built-in trainer; [`gpu`]: NVML.

mod actor;
pub mod client;
mod endpoint;
pub mod gpu;
pub mod isolation;
pub mod pack;
mod process;
mod supervisor;
pub mod trainer;
pub mod trainer_cuda;

use actix::Message;

pub use actor::{Control, TrialActor};
pub use endpoint::{LONG_POLL_MAX_S, REPORT_BODY_MAX_BYTES};
pub use isolation::RunAs;
pub use process::{
    forget_model, log_path, read_logs, tidy_models, trial_dir, LogLine, EXIT_MESSAGE_LINES,
    LOG_FILE_MAX_BYTES, LOG_LINES_SERVED_MAX, LOG_TAIL_LINES,
};
pub use resolute_agent::{EarlyExit, TrialReport};
pub use supervisor::{
    collectives_secret, KillAll, Launch, ReportSink, Signal, SupervisorConfig, TrialSupervisor,
};

/// Mailbox of a trial actor (its trial's calls and the node's controls).
pub const TRIAL_MAILBOX: usize = 64;
/// Mailbox of the supervisor (launches and controls from the node).
pub const SUPERVISOR_MAILBOX: usize = 256;

/// What a trial did, for the node (its agent decides what it means).
#[derive(Debug, Clone, PartialEq)]
pub struct Report(pub TrialReport);

impl Message for Report {
    type Result = ();
}

/// The trial endpoint asks the node for the best validation of the searcher's
/// metric among an experiment's trials (the Core API's
/// `get_experiment_best_validation`); None when there is none yet. A read of
/// the replicated state, answered by the node actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BestValidation {
    /// The experiment asked about.
    pub experiment: u64,
}

impl Message for BestValidation {
    type Result = Option<f64>;
}

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
}
