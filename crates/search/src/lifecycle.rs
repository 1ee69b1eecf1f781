//! The life of a trial in the searchers that pause (`asha`, `hyperband`): it runs
//! to its rung, then is paused (slots given back, checkpoint kept) until it is
//! resumed or stopped for good.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{RequestId, SearchError};

/// Where a trial is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Training toward its current target.
    Running,
    /// Reported at its rung, checkpointed, waiting for a decision.
    Paused,
    /// Stopped, finished or exited: it will not run again.
    Done,
}

/// A searcher's per-trial record with a [`Status`].
pub trait Tracked: Clone {
    /// The trial's status.
    fn status(&self) -> Status;
    /// Changes the trial's status.
    fn set_status(&mut self, status: Status);
}

/// The record of trial `id`, or `UnknownTrial`.
pub fn lookup<T: Tracked>(
    trials: &BTreeMap<RequestId, T>,
    id: RequestId,
) -> Result<T, SearchError> {
    trials
        .get(&id)
        .cloned()
        .ok_or(SearchError::UnknownTrial(id))
}

/// Sets the status of trial `id`, if it exists.
pub fn set_status<T: Tracked>(trials: &mut BTreeMap<RequestId, T>, id: RequestId, status: Status) {
    if let Some(t) = trials.get_mut(&id) {
        t.set_status(status);
    }
}

/// What a trial's exit means: a running or paused trial that closes without the
/// searcher's say-so has failed; a done one changes nothing.
pub fn exit_is_failure<T: Tracked>(
    trials: &BTreeMap<RequestId, T>,
    id: RequestId,
) -> Result<bool, SearchError> {
    Ok(lookup(trials, id)?.status() != Status::Done)
}
