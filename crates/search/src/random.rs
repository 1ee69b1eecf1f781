//! `random` and `single` (Determined's `random.go`): `max_trials` independent samples,
//! at most `max_concurrent_trials` at once; every exit starts the next trial.

use serde::{Deserialize, Serialize};

use crate::{Ctx, ExitedReason, Operation, RequestId};

/// State of a random (or single) search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomSearch {
    max_trials: u32,
    max_concurrent_trials: u32,
    length: Option<u64>,
    /// `single` never replaces an invalid-hyperparameter trial.
    single: bool,
    created_trials: u32,
    pending_trials: u32,
}

impl RandomSearch {
    pub fn new(
        max_trials: u32,
        max_concurrent_trials: u32,
        length: Option<u64>,
        single: bool,
    ) -> Self {
        RandomSearch {
            max_trials,
            max_concurrent_trials,
            length,
            single,
            created_trials: 0,
            pending_trials: 0,
        }
    }

    fn create(&mut self, ctx: &mut Ctx<'_>, ops: &mut Vec<Operation>) {
        let (id, op) = ctx.create();
        ops.push(op);
        push_length(ops, id, self.length);
        self.created_trials += 1;
        self.pending_trials += 1;
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut n = self.max_trials;
        if self.max_concurrent_trials > 0 {
            n = n.min(self.max_concurrent_trials);
        }
        let mut ops = Vec::new();
        for _ in 0..n {
            self.create(ctx, &mut ops);
        }
        ops
    }

    pub fn exited_early(&mut self, reason: ExitedReason) -> Vec<Operation> {
        if !self.single && reason == ExitedReason::InvalidHp {
            // The replacement is created when this trial's exit arrives.
            self.created_trials = self.created_trials.saturating_sub(1);
        }
        Vec::new()
    }

    pub fn exited(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        self.pending_trials = self.pending_trials.saturating_sub(1);
        let mut ops = Vec::new();
        if self.created_trials < self.max_trials {
            self.create(ctx, &mut ops);
        }
        ops
    }

    pub fn max_trials(&self) -> u32 {
        self.max_trials
    }
}

/// Appends `RunUntil(length)` for searchers that train every trial to one length.
pub(crate) fn push_length(ops: &mut Vec<Operation>, request_id: RequestId, length: Option<u64>) {
    if let Some(length) = length {
        ops.push(Operation::RunUntil { request_id, length });
    }
}
