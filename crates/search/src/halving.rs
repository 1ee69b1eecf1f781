//! `async_halving`: Determined 0.38's stopping-based ASHA (`asha_stopping.go`).
//!
//! Every trial is asked to train to `max_time`. Each validation is inserted into
//! every rung whose length the trial has reached; at a non-top rung the trial keeps
//! going only while its position is within the top `max(floor(len/divisor), 1)`.
//! A trial that reaches the top rung, or falls out of the top, is stopped, and each
//! stop (or early exit) starts a new trial while fewer than `max_trials` exist.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Report;
use crate::{Ctx, ExitedReason, Operation, RequestId, EXITED_METRIC};

/// Rung lengths: `max(floor(max_time / divisor^(num_rungs - i - 1)), 1)`.
pub fn make_rungs(num_rungs: u32, divisor: f64, max_time: u64) -> Vec<u64> {
    (0..num_rungs)
        .map(|i| {
            let rate = divisor.powi((num_rungs - i - 1) as i32);
            ((max_time as f64 / rate) as u64).max(1)
        })
        .collect()
}

/// One rung: its length and the (signed) metrics recorded there, sorted ascending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rung {
    pub units_needed: u64,
    pub metrics: Vec<(RequestId, f64)>,
}

impl Rung {
    /// Inserts before the first metric `>= metric` (ties go first, as in Determined)
    /// and returns the position.
    pub fn insert(&mut self, id: RequestId, metric: f64) -> usize {
        let index = self.metrics.partition_point(|(_, m)| *m < metric);
        self.metrics.insert(index, (id, metric));
        index
    }
}

/// State of one stopping-based ASHA bracket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HalvingSearch {
    pub max_trials: u32,
    pub max_concurrent_trials: u32,
    pub divisor: f64,
    pub max_time: u64,
    pub rungs: Vec<Rung>,
    pub trial_rungs: BTreeMap<RequestId, usize>,
    pub early_exit_trials: BTreeSet<RequestId>,
    pub trials_completed: u32,
    pub invalid_trials: u32,
}

impl HalvingSearch {
    pub fn new(
        num_rungs: u32,
        max_trials: u32,
        divisor: f64,
        max_concurrent_trials: u32,
        max_time: u64,
    ) -> Self {
        let rungs = make_rungs(num_rungs, divisor, max_time)
            .into_iter()
            .map(|units_needed| Rung {
                units_needed,
                metrics: Vec::new(),
            })
            .collect();
        HalvingSearch {
            max_trials,
            max_concurrent_trials,
            divisor,
            max_time,
            rungs,
            trial_rungs: BTreeMap::new(),
            early_exit_trials: BTreeSet::new(),
            trials_completed: 0,
            invalid_trials: 0,
        }
    }

    fn create(&self, ctx: &mut Ctx<'_>, ops: &mut Vec<Operation>) {
        let (id, op) = ctx.create();
        ops.push(op);
        ops.push(Operation::RunUntil {
            request_id: id,
            length: self.max_time,
        });
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let n = if self.max_concurrent_trials > 0 {
            self.max_concurrent_trials.min(self.max_trials)
        } else {
            // Enough trials that at least one can reach the top rung.
            let top = self.divisor.powi(self.rungs.len() as i32 - 1) as u64;
            top.clamp(1, u64::from(self.max_trials)) as u32
        };
        let mut ops = Vec::new();
        for _ in 0..n {
            self.create(ctx, &mut ops);
        }
        ops
    }

    pub fn created(&mut self, id: RequestId) {
        self.trial_rungs.insert(id, 0);
    }

    fn live_trials(&self) -> usize {
        self.trial_rungs
            .len()
            .saturating_sub(self.invalid_trials as usize)
    }

    pub fn validated(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        report: Report,
    ) -> Vec<Operation> {
        let mut ops = self.early_stopping(id, report.time, report.value);
        if !ops.is_empty() && self.live_trials() < self.max_trials as usize {
            self.create(ctx, &mut ops);
        }
        ops
    }

    /// Inserts the metric into every rung the trial has reached, from its current
    /// rung up, and says whether it stops.
    fn early_stopping(&mut self, id: RequestId, time: u64, metric: f64) -> Vec<Operation> {
        let start = self.trial_rungs.get(&id).copied().unwrap_or(0);
        let top = self.rungs.len() - 1;
        for r in start..self.rungs.len() {
            self.trial_rungs.insert(id, r);
            let rung = &mut self.rungs[r];
            if time < rung.units_needed {
                return Vec::new();
            }
            let index = rung.insert(id, metric);
            if r == top {
                return vec![Operation::Stop { request_id: id }];
            }
            let keep = ((rung.metrics.len() as f64 / self.divisor) as usize).max(1);
            if index >= keep {
                return vec![Operation::Stop { request_id: id }];
            }
        }
        Vec::new()
    }

    pub fn exited_early(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        reason: ExitedReason,
    ) -> Vec<Operation> {
        self.early_exit_trials.insert(id);
        let mut ops = Vec::new();
        let current = self.trial_rungs.get(&id).copied().unwrap_or(0);
        if reason == ExitedReason::InvalidHp {
            ops.push(Operation::Stop { request_id: id });
            self.invalid_trials += 1;
            for rung in &mut self.rungs[..=current] {
                if let Some(i) = rung.metrics.iter().position(|(t, _)| *t == id) {
                    rung.metrics.remove(i);
                }
            }
            self.create(ctx, &mut ops);
            return ops;
        }
        self.rungs[current].insert(id, EXITED_METRIC);
        if self.live_trials() < self.max_trials as usize {
            self.create(ctx, &mut ops);
        }
        ops
    }

    pub fn exited(&mut self) {
        self.trials_completed += 1;
    }

    /// Determined's progress estimate: rung-0 entries over 1.2 × max_trials.
    pub fn progress(&self) -> f64 {
        let seen = self.rungs[0].metrics.len() as f64;
        let mut progress = seen / (1.2 * f64::from(self.max_trials));
        if self.rungs[0].metrics.len() == self.max_trials as usize {
            let valid = f64::from(self.trials_completed) - f64::from(self.invalid_trials);
            progress = progress.max(valid / f64::from(self.max_trials));
        }
        progress.min(1.0)
    }
}
