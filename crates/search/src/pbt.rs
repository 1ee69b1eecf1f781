//! `pbt`: Population Based Training (Jaderberg et al. 2017), a Resolute extension
//! with the field names of Determined's former PBT searcher.
//!
//! `population_size` trials train for `length_per_round` units of `time_metric`,
//! report and pause. When the whole population has reported, the round ends: the
//! worst `truncate_fraction` are stopped; for each of the best `truncate_fraction`
//! a new trial starts from that trial's checkpoint (exploit) with perturbed or
//! resampled hyperparameters (explore); everyone else resumes. After `num_rounds`
//! rounds every trial is stopped.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use resolute_types::Value;

use crate::Report;
use crate::{sample, Ctx, Operation, RequestId, SearchError, EXITED_METRIC};

/// State of a PBT search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PbtSearch {
    population_size: u32,
    num_rounds: u32,
    length_per_round: u64,
    truncate_fraction: f64,
    resample_probability: f64,
    perturb_factor: f64,
    /// Rounds finished so far.
    round: u32,
    /// The current population, in creation order.
    population: Vec<RequestId>,
    /// This round's results (signed: smaller is better).
    results: BTreeMap<RequestId, f64>,
    params: BTreeMap<RequestId, Value>,
    exited: BTreeSet<RequestId>,
    paused: BTreeSet<RequestId>,
    finished: bool,
}

impl PbtSearch {
    pub fn new(
        population_size: u32,
        num_rounds: u32,
        length_per_round: u64,
        truncate_fraction: f64,
        resample_probability: f64,
        perturb_factor: f64,
    ) -> Self {
        PbtSearch {
            population_size,
            num_rounds,
            length_per_round,
            truncate_fraction,
            resample_probability,
            perturb_factor,
            round: 0,
            population: Vec::new(),
            results: BTreeMap::new(),
            params: BTreeMap::new(),
            exited: BTreeSet::new(),
            paused: BTreeSet::new(),
            finished: false,
        }
    }

    fn target(&self) -> u64 {
        self.length_per_round
            .saturating_mul(u64::from(self.round) + 1)
    }

    pub fn initial(&mut self, ctx: &mut Ctx<'_>) -> Vec<Operation> {
        let mut ops = Vec::new();
        for _ in 0..self.population_size {
            let (id, op) = ctx.create();
            if let Operation::Create { hparams, .. } = &op {
                self.params.insert(id, hparams.clone());
            }
            ops.push(op);
            ops.push(Operation::RunUntil {
                request_id: id,
                length: self.target(),
            });
            self.population.push(id);
        }
        ops
    }

    pub fn validated(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
        report: Report,
    ) -> Result<Vec<Operation>, SearchError> {
        if !self.params.contains_key(&id) {
            return Err(SearchError::UnknownTrial(id));
        }
        let expected =
            !self.finished && self.population.contains(&id) && !self.exited.contains(&id);
        if !expected || self.results.contains_key(&id) || report.time < self.target() {
            return Ok(Vec::new());
        }
        self.results.insert(id, report.value);
        let mut ops = Vec::new();
        if self.results.len() < self.population.len() {
            self.paused.insert(id);
            ops.push(Operation::Pause { request_id: id });
        } else {
            self.end_rounds(ctx, Some(id), &mut ops);
        }
        Ok(ops)
    }

    /// Ends the round (and any following round in which no live trial is left to
    /// report). `reporter` is the trial whose report ended it: it is running, not paused.
    fn end_rounds(
        &mut self,
        ctx: &mut Ctx<'_>,
        reporter: Option<RequestId>,
        ops: &mut Vec<Operation>,
    ) {
        while !self.finished && self.results.len() >= self.population.len() {
            self.round += 1;
            if self.round >= self.num_rounds {
                self.finished = true;
                for id in &self.population {
                    if !self.exited.contains(id) {
                        ops.push(Operation::Stop { request_id: *id });
                    }
                }
                return;
            }
            self.exploit_and_explore(ctx, reporter, ops);
        }
    }

    fn exploit_and_explore(
        &mut self,
        ctx: &mut Ctx<'_>,
        reporter: Option<RequestId>,
        ops: &mut Vec<Operation>,
    ) {
        let mut ranked: Vec<(f64, RequestId)> =
            self.results.iter().map(|(id, m)| (*m, *id)).collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let truncate = (self.truncate_fraction * f64::from(self.population_size)) as usize;
        let truncate = truncate.min(ranked.len() / 2);
        let target = self.target();
        let mut next_population = Vec::new();
        let mut next_results = BTreeMap::new();
        // Survivors (all but the worst `truncate`) continue.
        for (_, id) in &ranked[..ranked.len() - truncate] {
            if self.exited.contains(id) {
                next_results.insert(*id, EXITED_METRIC);
            } else if self.paused.remove(id) {
                ops.push(Operation::Resume {
                    request_id: *id,
                    length: target,
                });
            } else if reporter == Some(*id) {
                ops.push(Operation::RunUntil {
                    request_id: *id,
                    length: target,
                });
            }
            next_population.push(*id);
        }
        for (_, id) in &ranked[ranked.len() - truncate..] {
            self.paused.remove(id);
            if !self.exited.contains(id) {
                ops.push(Operation::Stop { request_id: *id });
            }
        }
        // The best `truncate` are copied with explored hyperparameters.
        for (_, parent) in &ranked[..truncate] {
            if self.exited.contains(parent) {
                continue;
            }
            let old = self.params.get(parent).cloned().unwrap_or(Value::Null);
            let new = sample::explore(
                ctx.space,
                &old,
                self.resample_probability,
                self.perturb_factor,
                ctx.rng,
            );
            let (id, op) = ctx.create_with(new.clone(), Some(*parent));
            self.params.insert(id, new);
            ops.push(op);
            ops.push(Operation::RunUntil {
                request_id: id,
                length: target,
            });
            next_population.push(id);
        }
        self.population = next_population;
        self.results = next_results;
    }

    pub fn exited_early(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
    ) -> Result<Vec<Operation>, SearchError> {
        if !self.params.contains_key(&id) {
            return Err(SearchError::UnknownTrial(id));
        }
        let mut ops = Vec::new();
        if !self.exited.insert(id) || !self.population.contains(&id) || self.finished {
            return Ok(ops);
        }
        self.paused.remove(&id);
        self.results.entry(id).or_insert(EXITED_METRIC);
        self.end_rounds(ctx, None, &mut ops);
        Ok(ops)
    }

    /// A trial closed; a population member that never reported counts as errored.
    pub fn exited(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: RequestId,
    ) -> Result<Vec<Operation>, SearchError> {
        if self.finished || !self.population.contains(&id) || self.exited.contains(&id) {
            return Ok(Vec::new());
        }
        self.exited_early(ctx, id)
    }

    pub fn progress(&self) -> f64 {
        if self.finished {
            return 1.0;
        }
        let per_round = self.results.len() as f64 / self.population.len().max(1) as f64;
        ((f64::from(self.round) + per_round) / f64::from(self.num_rounds)).min(1.0)
    }
}
