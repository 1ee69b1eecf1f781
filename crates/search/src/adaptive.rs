//! `adaptive_asha` (Determined's `adaptive_asha.go` + `tournament.go`): several
//! stopping-based ASHA brackets with different rung counts, run side by side. Each
//! trial belongs to the bracket that created it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use resolute_types::config::{AdaptiveMode, SearchMethod};

use crate::halving::HalvingSearch;
use crate::Report;
use crate::{floor_log, Ctx, ExitedReason, Operation, RequestId, SearchError};

/// One bracket's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bracket {
    /// Rungs in this bracket.
    pub num_rungs: u32,
    /// Trials this bracket creates.
    pub max_trials: u32,
    /// Trials this bracket runs at once.
    pub max_concurrent_trials: u32,
}

/// Splits `max_trials` so that each bracket gets a roughly equal training budget:
/// weight `divisor^(r-1)/r`, `max(int(w/Σw × max_trials), 1)`, remainder to the first.
pub fn bracket_max_trials(max_trials: u32, divisor: f64, bracket_rungs: &[u32]) -> Vec<u32> {
    let weights: Vec<f64> = bracket_rungs
        .iter()
        .map(|&r| divisor.powi(r as i32 - 1) / f64::from(r))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut trials: Vec<u32> = weights
        .iter()
        .map(|w| ((w / total * f64::from(max_trials)) as u32).max(1))
        .collect();
    let allocated: u32 = trials.iter().sum();
    if let Some(first) = trials.first_mut() {
        *first += max_trials.saturating_sub(allocated);
    }
    trials
}

/// Splits `max_concurrent_trials` evenly (at least one each, remainder to the first
/// brackets); with 0, each bracket gets `max(trials of the last bracket, divisor)`.
pub fn bracket_max_concurrent_trials(
    max_concurrent_trials: u32,
    divisor: f64,
    max_trials: &[u32],
) -> Vec<u32> {
    let n = max_trials.len() as u32;
    if n == 0 {
        return Vec::new();
    }
    let (each, remainder) = if max_concurrent_trials == 0 {
        (max_trials[max_trials.len() - 1].max(divisor as u32), 0)
    } else {
        let mct = max_concurrent_trials.max(n);
        (mct / n, mct % n)
    };
    (0..n).map(|i| each + u32::from(i < remainder)).collect()
}

/// The brackets of an adaptive_asha config, most rungs first.
pub fn make_brackets(
    max_trials: u32,
    max_time: u64,
    divisor: f64,
    max_rungs: u32,
    mode: AdaptiveMode,
    bracket_rungs: &[u32],
    max_concurrent_trials: u32,
) -> Vec<Bracket> {
    let mut rungs = bracket_rungs.to_vec();
    if rungs.is_empty() {
        // Ensure the top rung can hold at least one trial.
        let max_rungs = max_rungs
            .min(floor_log(max_time, divisor) + 1)
            .min(floor_log(u64::from(max_trials), divisor) + 1);
        rungs = match mode {
            AdaptiveMode::Aggressive => vec![max_rungs],
            AdaptiveMode::Standard => ((max_rungs - 1) / 2 + 1..=max_rungs).collect(),
            AdaptiveMode::Conservative => (1..=max_rungs).collect(),
        };
    }
    // Brackets that stop more trials early come first, to find speedups early.
    rungs.sort_unstable_by(|a, b| b.cmp(a));
    let trials = bracket_max_trials(max_trials, divisor, &rungs);
    let concurrency = bracket_max_concurrent_trials(max_concurrent_trials, divisor, &trials);
    rungs
        .iter()
        .zip(trials.iter().zip(&concurrency))
        .map(
            |(&num_rungs, (&max_trials, &max_concurrent_trials))| Bracket {
                num_rungs,
                max_trials,
                max_concurrent_trials,
            },
        )
        .collect()
}

/// The brackets of an `adaptive_asha` search method (none for any other method).
pub fn adaptive_brackets(method: &SearchMethod) -> Vec<Bracket> {
    match method {
        SearchMethod::AdaptiveAsha {
            max_trials,
            mode,
            divisor,
            max_rungs,
            bracket_rungs,
            max_concurrent_trials,
            budget,
        } => make_brackets(
            *max_trials,
            budget.max_time,
            *divisor,
            *max_rungs,
            *mode,
            bracket_rungs,
            *max_concurrent_trials,
        ),
        _ => Vec::new(),
    }
}

/// State of an adaptive ASHA search: its brackets and which trial is whose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveSearch {
    pub brackets: Vec<HalvingSearch>,
    pub trial_table: BTreeMap<RequestId, usize>,
}

impl AdaptiveSearch {
    pub fn new(brackets: &[Bracket], divisor: f64, max_time: u64) -> Self {
        AdaptiveSearch {
            brackets: brackets
                .iter()
                .map(|b| {
                    HalvingSearch::new(
                        b.num_rungs,
                        b.max_trials,
                        divisor,
                        b.max_concurrent_trials,
                        max_time,
                    )
                })
                .collect(),
            trial_table: BTreeMap::new(),
        }
    }

    fn mark(&mut self, bracket: usize, ops: &[Operation]) {
        for op in ops {
            if let Operation::Create { request_id, .. } = op {
                self.trial_table.insert(*request_id, bracket);
            }
        }
    }

    fn bracket_of(&self, id: RequestId) -> Result<usize, SearchError> {
        self.trial_table
            .get(&id)
            .copied()
            .ok_or(SearchError::UnknownTrial(id))
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut all = Vec::new();
        for b in 0..self.brackets.len() {
            let ops = self.brackets[b].initial(ctx);
            self.mark(b, &ops);
            all.extend(ops);
        }
        all
    }

    pub fn created(&mut self, id: RequestId) -> Result<(), SearchError> {
        let b = self.bracket_of(id)?;
        self.brackets[b].created(id);
        Ok(())
    }

    pub fn validated(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        report: Report,
    ) -> Result<Vec<Operation>, SearchError> {
        let b = self.bracket_of(id)?;
        let ops = self.brackets[b].validated(ctx, id, report);
        self.mark(b, &ops);
        Ok(ops)
    }

    pub fn exited_early(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        reason: ExitedReason,
    ) -> Result<Vec<Operation>, SearchError> {
        let b = self.bracket_of(id)?;
        let ops = self.brackets[b].exited_early(ctx, id, reason);
        self.mark(b, &ops);
        Ok(ops)
    }

    pub fn exited(&mut self, id: RequestId) -> Result<(), SearchError> {
        let b = self.bracket_of(id)?;
        self.brackets[b].exited();
        Ok(())
    }

    pub fn progress(&self) -> f64 {
        let sum: f64 = self.brackets.iter().map(HalvingSearch::progress).sum();
        sum / self.brackets.len().max(1) as f64
    }
}
