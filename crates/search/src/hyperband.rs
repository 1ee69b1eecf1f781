//! `hyperband`: synchronous Hyperband brackets (Li et al., JMLR 2018), a Resolute
//! extension.
//!
//! With `R = max_time` and `η = divisor`, `s_max = min(max_rungs - 1, floor(log_η R))`.
//! Bracket `s` (from `s_max` down to 0) starts `n = ceil((s_max+1)/(s+1) · η^s)`
//! trials at length `R·η^-s` and runs successive halving synchronously: a rung is
//! decided only when all of its trials have reported; the best `max(floor(n_i/η), 1)`
//! are resumed from their checkpoints at the next rung, the rest stopped. Trials pause
//! while they wait, so the slots go to other work. Brackets are started in order
//! and share `max_concurrent_trials`.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::halving::make_rungs;
use crate::lifecycle::{exit_is_failure, lookup, set_status, Status, Tracked};
use crate::Report;
use resolute_types::config::searcher::hyperband_bracket_trials;

use crate::{Ctx, ExitedReason, Operation, RequestId, SearchError};

/// The shape of one Hyperband bracket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HyperbandBracket {
    /// Trials started in the bracket's first rung.
    pub num_trials: u32,
    /// Rung lengths, in `time_metric` units.
    pub rung_lengths: Vec<u64>,
}

/// Hyperband's bracket table.
pub fn hyperband_brackets(max_time: u64, divisor: f64, max_rungs: u32) -> Vec<HyperbandBracket> {
    let trials = hyperband_bracket_trials(max_time, divisor, max_rungs);
    let s_max = trials.len() as u32 - 1;
    trials
        .iter()
        .zip((0..=s_max).rev())
        .map(|(n, s)| HyperbandBracket {
            // The config caps the total at TRIALS_MAX, so this fits.
            num_trials: *n as u32,
            rung_lengths: make_rungs(s + 1, divisor, max_time),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Trial {
    bracket: usize,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BracketState {
    lengths: Vec<u64>,
    to_create: u32,
    /// Per rung: how many trials it will hold (known once the rung below is decided).
    expected: Vec<u32>,
    /// Per rung: results so far; `None` marks an early exit.
    results: Vec<Vec<(RequestId, Option<f64>)>>,
}

/// State of a Hyperband search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperbandSearch {
    divisor: f64,
    max_concurrent_trials: u32,
    brackets: Vec<BracketState>,
    trials: BTreeMap<RequestId, Trial>,
    resumes: VecDeque<(RequestId, u64)>,
    running: u32,
}

impl HyperbandSearch {
    pub fn new(max_time: u64, divisor: f64, max_rungs: u32, max_concurrent_trials: u32) -> Self {
        let brackets = hyperband_brackets(max_time, divisor, max_rungs)
            .into_iter()
            .map(|b| {
                let rungs = b.rung_lengths.len();
                let mut expected = vec![0; rungs];
                expected[0] = b.num_trials;
                BracketState {
                    lengths: b.rung_lengths,
                    to_create: b.num_trials,
                    expected,
                    results: vec![Vec::new(); rungs],
                }
            })
            .collect();
        HyperbandSearch {
            divisor,
            max_concurrent_trials,
            brackets,
            trials: BTreeMap::new(),
            resumes: VecDeque::new(),
            running: 0,
        }
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut ops = Vec::new();
        self.fill(ctx, &mut ops);
        ops
    }

    fn has_slot(&self) -> bool {
        self.max_concurrent_trials == 0 || self.running < self.max_concurrent_trials
    }

    /// Uses free slots: resumes first (to finish brackets), then new trials.
    fn fill(&mut self, ctx: &mut Ctx<'_>, ops: &mut Vec<Operation>) {
        while self.has_slot() {
            if let Some((id, length)) = self.resumes.pop_front() {
                set_status(&mut self.trials, id, Status::Running);
                self.running += 1;
                ops.push(Operation::Resume {
                    request_id: id,
                    length,
                });
            } else if let Some(b) = self.brackets.iter().position(|b| b.to_create > 0) {
                let (id, op) = ctx.create();
                let bracket = &mut self.brackets[b];
                bracket.to_create -= 1;
                ops.push(op);
                ops.push(Operation::RunUntil {
                    request_id: id,
                    length: bracket.lengths[0],
                });
                self.trials.insert(
                    id,
                    Trial {
                        bracket: b,
                        rung: 0,
                        status: Status::Running,
                    },
                );
                self.running += 1;
            } else {
                break;
            }
        }
    }

    pub fn validated(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        report: Report,
    ) -> Result<Vec<Operation>, SearchError> {
        let trial = lookup(&self.trials, id)?;
        if trial.status != Status::Running
            || report.time < self.brackets[trial.bracket].lengths[trial.rung]
        {
            return Ok(Vec::new());
        }
        self.running -= 1;
        self.brackets[trial.bracket].results[trial.rung].push((id, Some(report.value)));
        let mut ops = Vec::new();
        if trial.rung + 1 == self.brackets[trial.bracket].lengths.len() {
            set_status(&mut self.trials, id, Status::Done);
            ops.push(Operation::Stop { request_id: id });
        } else {
            set_status(&mut self.trials, id, Status::Paused);
            if !self.decide(trial.bracket, trial.rung, Some(id), &mut ops) {
                ops.push(Operation::Pause { request_id: id });
            }
        }
        self.fill(ctx, &mut ops);
        Ok(ops)
    }

    /// Decides rung `k` of bracket `b` if all its results are in. `reporter` is the
    /// trial whose report completed it (it is still running, not yet paused).
    /// Returns whether the reporter got its operation.
    fn decide(
        &mut self,
        b: usize,
        k: usize,
        reporter: Option<RequestId>,
        ops: &mut Vec<Operation>,
    ) -> bool {
        let bracket = &self.brackets[b];
        let expected = bracket.expected[k] as usize;
        if bracket.results[k].len() < expected || expected == 0 || k + 1 >= bracket.lengths.len() {
            return false;
        }
        let mut ranked: Vec<(f64, RequestId)> = bracket.results[k]
            .iter()
            .filter_map(|(id, m)| m.map(|m| (m, *id)))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let keep = ((expected as f64 / self.divisor) as usize)
            .max(1)
            .min(ranked.len());
        let next_length = bracket.lengths[k + 1];
        self.brackets[b].expected[k + 1] = keep as u32;
        let mut handled = false;
        for (rank, (_, id)) in ranked.iter().enumerate() {
            let is_reporter = reporter == Some(*id);
            if rank < keep {
                if let Some(t) = self.trials.get_mut(id) {
                    t.rung = k + 1;
                }
                if is_reporter {
                    set_status(&mut self.trials, *id, Status::Running);
                    self.running += 1;
                    ops.push(Operation::RunUntil {
                        request_id: *id,
                        length: next_length,
                    });
                } else {
                    self.resumes.push_back((*id, next_length));
                }
            } else {
                set_status(&mut self.trials, *id, Status::Done);
                ops.push(Operation::Stop { request_id: *id });
            }
            handled |= is_reporter;
        }
        if keep == 0 {
            // Every trial of the rung exited early: the bracket is over.
            self.brackets[b].expected[k + 1] = 0;
        }
        handled
    }

    pub fn exited_early(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        reason: ExitedReason,
    ) -> Result<Vec<Operation>, SearchError> {
        let trial = lookup(&self.trials, id)?;
        let mut ops = Vec::new();
        if trial.status == Status::Done {
            return Ok(ops);
        }
        if trial.status == Status::Running {
            self.running -= 1;
        }
        set_status(&mut self.trials, id, Status::Done);
        self.resumes.retain(|(r, _)| *r != id);
        let bracket = &mut self.brackets[trial.bracket];
        let reported = bracket.results[trial.rung].iter().any(|(r, _)| *r == id);
        if reason == ExitedReason::InvalidHp && trial.rung == 0 && !reported {
            // Replace it: invalid hyperparameters do not use up the bracket.
            bracket.to_create += 1;
        } else if !reported {
            bracket.results[trial.rung].push((id, None));
            self.decide(trial.bracket, trial.rung, None, &mut ops);
        }
        self.fill(ctx, &mut ops);
        Ok(ops)
    }

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
        let total: u32 = self.brackets.iter().map(|b| b.expected[0]).sum();
        let done = self
            .trials
            .values()
            .filter(|t| t.status == Status::Done)
            .count() as f64;
        (done / f64::from(total.max(1))).min(1.0)
    }
}
