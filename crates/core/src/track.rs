//! What the experiment-tracking store learns from each applied batch.
//!
//! The replicated state keeps only what decisions need; the metric series, the
//! run history and the full rows users query live in the tracking store (an
//! SQLite database in the data dir, `crates/tracking`). After each batch of
//! applied entries the node hands its shell one [`TrackBatch`]: the reports
//! accepted, the runs that started and ended, the ids whose rows may have
//! changed. The shell writes it in one transaction, with `applied_index`, before
//! it carries out anything emitted after it (a snapshot that compacts the log
//! among them), so the store is never ahead of the index it records and never
//! behind a snapshot the node took itself.
//!
//! Everything here comes from the entries themselves (their `Change`s), never
//! from where a batch happened to end, so every replica writes the same rows.

use std::collections::BTreeSet;

use crate::command::{ExperimentId, MetricRecord, NodeId, TrialId};

/// One accepted metrics report and the entry that carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Index of the entry.
    pub index: u64,
    /// The report.
    pub record: MetricRecord,
}

/// A change in a trial's run history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// An incarnation was placed.
    Started {
        /// Index of the entry that placed it.
        index: u64,
        /// The trial.
        trial: TrialId,
        /// The new incarnation.
        incarnation: u64,
        /// Its rank-0 node.
        node: NodeId,
        /// The state clock then (milliseconds).
        at_ms: u64,
    },
    /// An incarnation ended.
    Ended {
        /// Index of the entry that ended it.
        index: u64,
        /// The trial.
        trial: TrialId,
        /// The incarnation.
        incarnation: u64,
        /// Why.
        why: String,
        /// The state clock then (milliseconds).
        at_ms: u64,
    },
}

/// What one batch of applied entries means to the tracking store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackBatch {
    /// Index of the last entry applied: the store records it with the rows.
    pub applied_index: u64,
    /// The state was replaced by a snapshot at `applied_index` (a follower that
    /// fell behind, or a new member): every row may have changed, and reports
    /// between the store's index and the snapshot's never came as entries.
    pub replaced: bool,
    /// Reports the state had accepted, ever, once this batch applied
    /// (`ClusterState::reports_applied`): a store that caught up from a
    /// snapshot knows from it how many it lacks.
    pub reports_applied: u64,
    /// Accepted reports, in log order.
    pub reports: Vec<Report>,
    /// Run history, in log order.
    pub runs: Vec<RunEvent>,
    /// Trials whose rows may have changed (beyond the live ones, which the store
    /// rewrites when they differ).
    pub trials: BTreeSet<TrialId>,
    /// Experiments whose rows may have changed.
    pub experiments: BTreeSet<ExperimentId>,
    /// Checkpoints recorded or copied.
    pub checkpoints: BTreeSet<String>,
}

impl TrackBatch {
    /// Whether there is nothing to write but the index.
    pub fn is_empty(&self) -> bool {
        !self.replaced
            && self.reports.is_empty()
            && self.runs.is_empty()
            && self.trials.is_empty()
            && self.experiments.is_empty()
            && self.checkpoints.is_empty()
    }
}
