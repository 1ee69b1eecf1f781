//! `grid` (Determined's `grid.go`): one trial per grid point, at most
//! `max_concurrent_trials` at once; each exit starts the next point. Points are
//! created in grid order (first sorted key outermost).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use resolute_types::config::Hyperparameters;
use resolute_types::Value;

use crate::random::push_length;
use crate::{sample, Ctx, Operation};

/// State of a grid search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridSearch {
    max_concurrent_trials: u32,
    length: Option<u64>,
    remaining: VecDeque<Value>,
    pending_trials: u32,
    total: u64,
}

impl GridSearch {
    pub fn new(space: &Hyperparameters, max_concurrent_trials: u32, length: Option<u64>) -> Self {
        let remaining: VecDeque<Value> = sample::grid(space).into();
        let total = remaining.len() as u64;
        GridSearch {
            max_concurrent_trials,
            length,
            remaining,
            pending_trials: 0,
            total,
        }
    }

    fn create_next(&mut self, ctx: &mut Ctx<'_>, ops: &mut Vec<Operation>) {
        if let Some(point) = self.remaining.pop_front() {
            let (id, op) = ctx.create_with(point, None);
            ops.push(op);
            push_length(ops, id, self.length);
            self.pending_trials += 1;
        }
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut n = self.remaining.len();
        if self.max_concurrent_trials > 0 {
            n = n.min(self.max_concurrent_trials as usize);
        }
        let mut ops = Vec::new();
        for _ in 0..n {
            self.create_next(ctx, &mut ops);
        }
        ops
    }

    pub fn exited(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        self.pending_trials = self.pending_trials.saturating_sub(1);
        let mut ops = Vec::new();
        self.create_next(ctx, &mut ops);
        ops
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}
