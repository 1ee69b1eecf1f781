//! Hyperparameter searchers as pure, deterministic state machines.
//!
//! The node drives a [`Searcher`] from its replicated log: every replica feeds it the
//! same [`SearchEvent`]s in the same order and gets the same [`Operation`]s back, so
//! trial creations and stops "fall out" of the log instead of being proposed.
//! Nothing here reads a clock, the OS random source or a hash map's order
//! (`clippy.toml` forbids them); randomness comes from the experiment seed.
//!
//! Searchers with Determined's semantics: `single`, `random`, `grid`,
//! `async_halving` (stopping-based ASHA) and `adaptive_asha` (brackets of it).
//! Resolute's extensions: promotion-based `asha`, synchronous `hyperband`, and `pbt`.

mod adaptive;
mod asha;
mod grid;
mod halving;
mod hyperband;
mod lifecycle;
mod pbt;
mod random;
pub mod rng;
pub mod sample;
mod searcher;
pub mod simulate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use resolute_types::Value;

pub use adaptive::{
    adaptive_brackets, bracket_max_concurrent_trials, bracket_max_trials, make_brackets, Bracket,
};
pub use halving::make_rungs;
pub use hyperband::{hyperband_brackets, HyperbandBracket};
pub use searcher::{Searcher, SearcherSnapshot};

/// Identifies a trial within its experiment, in creation order from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a trial ended before the searcher closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitedReason {
    /// The training code failed (after its restarts).
    Errored,
    /// A user stopped the trial.
    UserCanceled,
    /// The training code said its hyperparameters are invalid; the trial does not
    /// count toward `max_trials` and is replaced.
    InvalidHp,
}

/// What happened to a trial; the searcher's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SearchEvent {
    /// The trial requested by a `Create` now exists.
    TrialCreated {
        /// The trial.
        request_id: RequestId,
    },
    /// The trial reported validation metrics. The map must contain the searcher's
    /// `metric` and, for searchers with a budget, its `time_metric`.
    ValidationCompleted {
        /// The trial.
        request_id: RequestId,
        /// Metric name to value.
        metrics: BTreeMap<String, Value>,
    },
    /// The trial ended early.
    TrialExitedEarly {
        /// The trial.
        request_id: RequestId,
        /// Why.
        reason: ExitedReason,
    },
    /// The trial is closed for good (its process ended after a stop or after reaching
    /// its length). A paused trial is not exited.
    TrialExited {
        /// The trial.
        request_id: RequestId,
    },
    /// The trial reports how far it is, as a fraction of its target.
    Progress {
        /// The trial.
        request_id: RequestId,
        /// 0.0 to 1.0.
        fraction: f64,
    },
}

/// What the searcher asks the node to do; the searcher's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Operation {
    /// Create a trial.
    Create {
        /// Its id.
        request_id: RequestId,
        /// Its hyperparameters (a map).
        hparams: Value,
        /// Its seed, in `0..2^31`.
        trial_seed: u32,
        /// Start from this trial's latest checkpoint instead of from scratch (PBT).
        warm_start: Option<RequestId>,
    },
    /// Train until `time_metric` reaches `length`, validate, checkpoint and report.
    RunUntil {
        /// The trial.
        request_id: RequestId,
        /// Target, in `time_metric` units.
        length: u64,
    },
    /// Checkpoint, give the slots back and wait (the trial may be resumed).
    Pause {
        /// The trial.
        request_id: RequestId,
    },
    /// Restart a paused trial from its own latest checkpoint and train until `length`.
    Resume {
        /// The trial.
        request_id: RequestId,
        /// Target, in `time_metric` units.
        length: u64,
    },
    /// Checkpoint and stop the trial for good (delivered as a preemption signal).
    Stop {
        /// The trial.
        request_id: RequestId,
    },
    /// The search is over.
    Shutdown {
        /// Every trial was canceled by a user.
        cancel: bool,
        /// Every trial errored.
        failure: bool,
    },
}

/// Why the searcher could not handle an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    /// The validation metrics lack the searcher metric, or it is not a number.
    #[error("error parsing searcher metric ({metric}) from validation metrics: {metrics}")]
    Metric {
        /// The configured metric.
        metric: String,
        /// What was reported.
        metrics: String,
    },
    /// The validation metrics lack the time metric, or it is not a number.
    #[error("error parsing searcher time metric ({time_metric}) in validation metrics: {metrics}")]
    TimeMetric {
        /// The configured time metric.
        time_metric: String,
        /// What was reported.
        metrics: String,
    },
    /// The event names a trial this searcher never created.
    #[error("unknown trial request id {0}")]
    UnknownTrial(RequestId),
    /// The snapshot does not belong to this searcher configuration.
    #[error("searcher snapshot does not match the config: {0}")]
    Snapshot(String),
}

/// A validation report reduced to what the searchers compare: the signed metric
/// (smaller is better) and the training progress in `time_metric` units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Report {
    pub value: f64,
    pub time: u64,
}

impl Report {
    /// Reads the searcher metric and the time metric from a validation's metrics.
    pub fn parse(
        metrics: &BTreeMap<String, Value>,
        metric: &str,
        smaller_is_better: bool,
        time_metric: &str,
    ) -> Result<Self, SearchError> {
        Ok(Report {
            value: read_metric(metrics, metric, smaller_is_better)?,
            time: read_time(metrics, time_metric)?,
        })
    }
}

/// Reads the metric the searcher optimizes, as "smaller is better" (negated
/// otherwise). NaN counts as the worst possible value.
pub(crate) fn read_metric(
    metrics: &BTreeMap<String, Value>,
    metric: &str,
    smaller_is_better: bool,
) -> Result<f64, SearchError> {
    let value = metrics
        .get(metric)
        .and_then(Value::as_f64)
        .ok_or_else(|| SearchError::Metric {
            metric: metric.to_string(),
            metrics: Value::Map(metrics.clone()).to_string(),
        })?;
    let signed = if smaller_is_better { value } else { -value };
    Ok(if signed.is_nan() {
        f64::INFINITY
    } else {
        signed
    })
}

/// Reads the time metric (training progress) as whole units.
pub(crate) fn read_time(
    metrics: &BTreeMap<String, Value>,
    time_metric: &str,
) -> Result<u64, SearchError> {
    metrics
        .get(time_metric)
        .and_then(Value::as_f64)
        .filter(|t| t.is_finite())
        .map(|t| if t <= 0.0 { 0 } else { t as u64 })
        .ok_or_else(|| SearchError::TimeMetric {
            time_metric: time_metric.to_string(),
            metrics: Value::Map(metrics.clone()).to_string(),
        })
}

/// The worst metric a trial can have; early exits are recorded with it.
pub(crate) const EXITED_METRIC: f64 = f64::MAX;

pub use resolute_types::config::searcher::floor_log;

/// Context the methods share: the space, the RNG and the request-id counter.
pub(crate) struct Ctx<'a> {
    pub space: &'a resolute_types::config::Hyperparameters,
    pub rng: &'a mut rng::ExperimentRng,
    pub next_id: &'a mut u64,
}

impl Ctx<'_> {
    /// A new trial with freshly sampled hyperparameters.
    pub fn create(&mut self) -> (RequestId, Operation) {
        let hparams = sample::sample_all(self.space, self.rng);
        self.create_with(hparams, None)
    }

    /// A new trial with the given hyperparameters.
    pub fn create_with(
        &mut self,
        hparams: Value,
        warm_start: Option<RequestId>,
    ) -> (RequestId, Operation) {
        *self.next_id += 1;
        let request_id = RequestId(*self.next_id);
        let trial_seed = self.rng.trial_seed();
        (
            request_id,
            Operation::Create {
                request_id,
                hparams,
                trial_seed,
                warm_start,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_log_is_exact_at_powers() {
        assert_eq!(floor_log(1000, 10.0), 3);
        assert_eq!(floor_log(999, 10.0), 2);
        assert_eq!(floor_log(9, 3.0), 2);
        assert_eq!(floor_log(900, 3.0), 6);
        assert_eq!(floor_log(1, 4.0), 0);
        assert_eq!(floor_log(243, 3.0), 5);
        assert_eq!(floor_log(1 << 40, 2.0), 40);
    }
}
