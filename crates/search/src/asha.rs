//! `asha`: promotion-based ASHA (Li et al., "A System for Massively Parallel
//! Hyperparameter Tuning", MLSys 2020), a Resolute extension.
//!
//! Unlike `async_halving`, nothing is killed mid-rung: a trial trains to its rung's
//! length, reports, checkpoints and pauses. Whenever a slot is free, the searcher
//! promotes (resumes from its checkpoint) a paused trial that is in the top
//! `floor(n/divisor)` of its rung's `n` results and was not promoted yet, looking
//! from the top rung down; otherwise it starts a new trial while fewer than
//! `max_trials` exist. Once no more results can arrive at a rung, its best trial is
//! promoted even if `floor(n/divisor)` is 0, so the search always trains at least
//! one trial to `max_time`. When nothing is left to run, paused trials are stopped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::halving::make_rungs;
use crate::lifecycle::{exit_is_failure, lookup, set_status, Status, Tracked};
use crate::Report;
use crate::{Ctx, ExitedReason, Operation, RequestId, SearchError, EXITED_METRIC};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Entry {
    id: RequestId,
    metric: f64,
    promoted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Trial {
    rung: usize,
    status: Status,
}

impl Tracked for Trial {
    fn status(&self) -> Status {
        self.status
    }
    fn set_status(&mut self, status: Status) {
        self.status = status;
    }
}

/// State of a promotion-based ASHA search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AshaSearch {
    max_trials: u32,
    max_concurrent_trials: u32,
    divisor: f64,
    lengths: Vec<u64>,
    /// Per rung, results sorted best first (ties: earlier report first).
    rungs: Vec<Vec<Entry>>,
    trials: BTreeMap<RequestId, Trial>,
    /// Trials created, not counting those that exited with invalid hyperparameters.
    valid_created: u32,
    running: u32,
}

impl AshaSearch {
    pub fn new(
        num_rungs: u32,
        max_trials: u32,
        divisor: f64,
        max_concurrent_trials: u32,
        max_time: u64,
    ) -> Self {
        let lengths = make_rungs(num_rungs, divisor, max_time);
        let concurrency = if max_concurrent_trials > 0 {
            max_concurrent_trials
        } else {
            (divisor.powi(num_rungs as i32 - 1) as u64).clamp(1, u64::from(max_trials)) as u32
        };
        AshaSearch {
            max_trials,
            max_concurrent_trials: concurrency,
            divisor,
            rungs: vec![Vec::new(); lengths.len()],
            lengths,
            trials: BTreeMap::new(),
            valid_created: 0,
            running: 0,
        }
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut ops = Vec::new();
        self.fill(ctx, &mut ops);
        ops
    }

    fn no_more_trials(&self) -> bool {
        self.valid_created >= self.max_trials
    }

    /// For each rung, whether no further result can ever arrive there: no trials
    /// are left to create, none runs at or below it, and the rung below is final
    /// with nothing left to promote.
    fn finals(&self) -> Vec<bool> {
        let mut finals = vec![false; self.rungs.len()];
        if !self.no_more_trials() {
            return finals;
        }
        let lowest_running = self
            .trials
            .values()
            .filter(|t| t.status == Status::Running)
            .map(|t| t.rung)
            .min();
        for k in 0..self.rungs.len() {
            let quiet = lowest_running.is_none_or(|r| r > k);
            let below_done = k == 0 || (finals[k - 1] && self.promotable_in(k - 1, true).is_none());
            finals[k] = quiet && below_done;
        }
        finals
    }

    /// A paused, unpromoted trial in the top `floor(n/divisor)` of rung `k` (at least
    /// one when the rung is final). Never from the top rung.
    fn promotable_in(&self, k: usize, rung_final: bool) -> Option<RequestId> {
        if k + 1 >= self.rungs.len() {
            return None;
        }
        let rung = &self.rungs[k];
        let mut allow = (rung.len() as f64 / self.divisor) as usize;
        if allow == 0 && rung_final {
            allow = 1;
        }
        rung.iter()
            .take(allow)
            .find(|e| !e.promoted && self.status(e.id) == Some(Status::Paused))
            .map(|e| e.id)
    }

    /// The best promotion available, looking from the top rung down.
    fn next_promotion(&self) -> Option<(RequestId, usize)> {
        let finals = self.finals();
        (0..self.rungs.len())
            .rev()
            .find_map(|k| self.promotable_in(k, finals[k]).map(|id| (id, k)))
    }

    fn status(&self, id: RequestId) -> Option<Status> {
        self.trials.get(&id).map(|t| t.status)
    }

    fn promote(&mut self, id: RequestId, k: usize) {
        if let Some(e) = self.rungs[k].iter_mut().find(|e| e.id == id) {
            e.promoted = true;
        }
        if let Some(t) = self.trials.get_mut(&id) {
            t.rung = k + 1;
            t.status = Status::Running;
        }
        self.running += 1;
    }

    /// Uses free slots: promotions first (top rung down), then new trials.
    fn fill(&mut self, ctx: &mut Ctx<'_>, ops: &mut Vec<Operation>) {
        while self.running < self.max_concurrent_trials {
            if let Some((id, k)) = self.next_promotion() {
                self.promote(id, k);
                ops.push(Operation::Resume {
                    request_id: id,
                    length: self.lengths[k + 1],
                });
            } else if !self.no_more_trials() {
                let (id, op) = ctx.create();
                ops.push(op);
                ops.push(Operation::RunUntil {
                    request_id: id,
                    length: self.lengths[0],
                });
                self.trials.insert(
                    id,
                    Trial {
                        rung: 0,
                        status: Status::Running,
                    },
                );
                self.valid_created += 1;
                self.running += 1;
            } else {
                break;
            }
        }
        self.close_out(ops);
    }

    /// When nothing runs and nothing can be promoted, stop the paused trials.
    fn close_out(&mut self, ops: &mut Vec<Operation>) {
        let idle = self.running == 0 && self.no_more_trials();
        if !idle || self.next_promotion().is_some() {
            return;
        }
        for (id, t) in self.trials.iter_mut() {
            if t.status == Status::Paused {
                t.status = Status::Done;
                ops.push(Operation::Stop { request_id: *id });
            }
        }
    }

    fn record(&mut self, k: usize, id: RequestId, metric: f64) {
        let rung = &mut self.rungs[k];
        let index = rung.partition_point(|e| e.metric <= metric);
        rung.insert(
            index,
            Entry {
                id,
                metric,
                promoted: false,
            },
        );
    }

    pub fn validated(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        report: Report,
    ) -> Result<Vec<Operation>, SearchError> {
        let trial = lookup(&self.trials, id)?;
        // Intermediate validations (before the rung's length) and reports from a
        // paused or finished trial do not change the search.
        if trial.status != Status::Running || report.time < self.lengths[trial.rung] {
            return Ok(Vec::new());
        }
        let k = trial.rung;
        self.record(k, id, report.value);
        self.running -= 1;
        let mut ops = Vec::new();
        if k + 1 == self.rungs.len() {
            set_status(&mut self.trials, id, Status::Done);
            ops.push(Operation::Stop { request_id: id });
        } else {
            set_status(&mut self.trials, id, Status::Paused);
            let rung_final = self.finals()[k];
            if self.promotable_in(k, rung_final) == Some(id) {
                // Promoted on arrival: keep training without a pause.
                self.promote(id, k);
                ops.push(Operation::RunUntil {
                    request_id: id,
                    length: self.lengths[k + 1],
                });
            } else {
                ops.push(Operation::Pause { request_id: id });
            }
        }
        self.fill(ctx, &mut ops);
        Ok(ops)
    }

    pub fn exited_early(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        reason: ExitedReason,
    ) -> Result<Vec<Operation>, SearchError> {
        let trial = lookup(&self.trials, id)?;
        if trial.status == Status::Done {
            return Ok(Vec::new());
        }
        if trial.status == Status::Running {
            self.running -= 1;
        }
        if reason == ExitedReason::InvalidHp {
            for rung in &mut self.rungs {
                rung.retain(|e| e.id != id);
            }
            self.valid_created -= 1;
        } else if trial.status == Status::Running {
            // The trial never reported at its current rung: count it as the worst.
            self.record(trial.rung, id, EXITED_METRIC);
        }
        set_status(&mut self.trials, id, Status::Done);
        let mut ops = Vec::new();
        self.fill(ctx, &mut ops);
        Ok(ops)
    }

    /// A trial closed; if it was still expected to report, treat it as errored.
    pub fn exited(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
    ) -> Result<Vec<Operation>, SearchError> {
        if exit_is_failure(&self.trials, id)? {
            self.exited_early(ctx, id, ExitedReason::Errored)
        } else {
            Ok(Vec::new())
        }
    }

    pub fn progress(&self) -> f64 {
        let seen = self.rungs[0].len() as f64;
        let done = self
            .trials
            .values()
            .filter(|t| t.status == Status::Done)
            .count() as f64;
        (0.5 * seen / f64::from(self.max_trials) + 0.5 * done / f64::from(self.max_trials)).min(1.0)
    }
}
