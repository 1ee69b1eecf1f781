//! [`Searcher`]: one experiment's search method plus the bookkeeping every method
//! shares (Determined's `searcher.go`): which trials were requested, created and
//! closed, and when the search shuts down.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use resolute_types::config::{Hyperparameters, SearchMethod, SearcherConfig};

use crate::adaptive::{adaptive_brackets, AdaptiveSearch};
use crate::asha::AshaSearch;
use crate::grid::GridSearch;
use crate::halving::HalvingSearch;
use crate::hyperband::HyperbandSearch;
use crate::pbt::PbtSearch;
use crate::random::RandomSearch;
use crate::rng::{ExperimentRng, RngState};
use crate::{Ctx, ExitedReason, Operation, Report, RequestId, SearchError, SearchEvent};

/// The method-specific state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Method {
    Random(RandomSearch),
    Grid(GridSearch),
    Halving(HalvingSearch),
    Adaptive(AdaptiveSearch),
    Asha(AshaSearch),
    Hyperband(HyperbandSearch),
    Pbt(PbtSearch),
}

/// Bookkeeping shared by all methods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Common {
    trials_requested: u32,
    created: BTreeSet<RequestId>,
    closed: BTreeSet<RequestId>,
    exits: BTreeSet<RequestId>,
    cancels: BTreeSet<RequestId>,
    failures: BTreeSet<RequestId>,
    progress: BTreeMap<RequestId, f64>,
    shut_down: bool,
}

/// Everything needed to resume a searcher exactly, RNG included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearcherSnapshot {
    rng: RngState,
    next_id: u64,
    common: Common,
    method: Method,
}

/// A running search: feed it events, carry out its operations.
#[derive(Debug, Clone)]
pub struct Searcher {
    config: SearcherConfig,
    space: Hyperparameters,
    rng: ExperimentRng,
    next_id: u64,
    common: Common,
    method: Method,
}

impl Searcher {
    /// A fresh searcher for `config` over `space`, seeded with the experiment seed.
    pub fn new(config: &SearcherConfig, space: &Hyperparameters, seed: u64) -> Self {
        Searcher {
            config: config.clone(),
            space: space.clone(),
            rng: ExperimentRng::new(seed),
            next_id: 0,
            common: Common::default(),
            method: new_method(&config.method, space),
        }
    }

    /// The searcher's configuration.
    pub fn config(&self) -> &SearcherConfig {
        &self.config
    }

    /// The trials to create when the experiment starts. Call once.
    pub fn initial_operations(&mut self) -> Vec<Operation> {
        let mut ctx = Ctx {
            space: &self.space,
            rng: &mut self.rng,
            next_id: &mut self.next_id,
        };
        let ops = match &mut self.method {
            Method::Random(m) => m.initial(&mut ctx),
            Method::Grid(m) => m.initial(&mut ctx),
            Method::Halving(m) => m.initial(&mut ctx),
            Method::Adaptive(m) => m.initial(&mut ctx),
            Method::Asha(m) => m.initial(&mut ctx),
            Method::Hyperband(m) => m.initial(&mut ctx),
            Method::Pbt(m) => m.initial(&mut ctx),
        };
        self.record(ops)
    }

    /// Handles one event and returns the operations it causes.
    pub fn handle(&mut self, event: &SearchEvent) -> Result<Vec<Operation>, SearchError> {
        let id = match event {
            SearchEvent::TrialCreated { request_id }
            | SearchEvent::ValidationCompleted { request_id, .. }
            | SearchEvent::TrialExitedEarly { request_id, .. }
            | SearchEvent::TrialExited { request_id }
            | SearchEvent::Progress { request_id, .. } => *request_id,
        };
        if id.0 == 0 || id.0 > self.next_id {
            return Err(SearchError::UnknownTrial(id));
        }
        // Late events for a closed trial, and anything after shutdown, change nothing.
        if self.common.shut_down || self.common.closed.contains(&id) {
            return Ok(Vec::new());
        }
        match event {
            SearchEvent::TrialCreated { .. } => self.trial_created(id),
            SearchEvent::ValidationCompleted { metrics, .. } => {
                if matches!(self.method, Method::Random(_) | Method::Grid(_)) {
                    // These searchers do not look at metrics (as in Determined).
                    return Ok(Vec::new());
                }
                let time_metric = self.config.method.budget().map(|b| b.time_metric);
                let report = Report::parse(
                    metrics,
                    &self.config.metric,
                    self.config.smaller_is_better,
                    time_metric.as_deref().unwrap_or_default(),
                )?;
                let mut ctx = Ctx {
                    space: &self.space,
                    rng: &mut self.rng,
                    next_id: &mut self.next_id,
                };
                let ops = match &mut self.method {
                    Method::Random(_) | Method::Grid(_) => Vec::new(),
                    Method::Halving(m) => m.validated(&mut ctx, id, report),
                    Method::Adaptive(m) => m.validated(&mut ctx, id, report)?,
                    Method::Asha(m) => m.validated(&mut ctx, id, report)?,
                    Method::Hyperband(m) => m.validated(&mut ctx, id, report)?,
                    Method::Pbt(m) => m.validated(&mut ctx, id, report)?,
                };
                Ok(self.record(ops))
            }
            SearchEvent::TrialExitedEarly { reason, .. } => self.trial_exited_early(id, *reason),
            SearchEvent::TrialExited { .. } => self.trial_exited(id),
            SearchEvent::Progress { fraction, .. } => {
                self.common.progress.insert(id, fraction.clamp(0.0, 1.0));
                Ok(Vec::new())
            }
        }
    }

    fn trial_created(&mut self, id: RequestId) -> Result<Vec<Operation>, SearchError> {
        if !self.common.created.insert(id) {
            return Ok(Vec::new());
        }
        self.common.progress.insert(id, 0.0);
        match &mut self.method {
            Method::Halving(m) => m.created(id),
            Method::Adaptive(m) => m.created(id)?,
            _ => {}
        }
        Ok(Vec::new())
    }

    fn trial_exited_early(
        &mut self,
        id: RequestId,
        reason: ExitedReason,
    ) -> Result<Vec<Operation>, SearchError> {
        if self.common.exits.contains(&id) {
            // Each rank of a multi-slot trial may report the same early exit.
            return Ok(Vec::new());
        }
        match reason {
            ExitedReason::InvalidHp => {
                self.common.progress.remove(&id);
            }
            ExitedReason::UserCanceled => {
                self.common.cancels.insert(id);
            }
            ExitedReason::Errored => {
                self.common.failures.insert(id);
            }
        }
        let mut ctx = Ctx {
            space: &self.space,
            rng: &mut self.rng,
            next_id: &mut self.next_id,
        };
        let ops = match &mut self.method {
            Method::Random(m) => m.exited_early(reason),
            Method::Grid(_) => Vec::new(),
            Method::Halving(m) => m.exited_early(&mut ctx, id, reason),
            Method::Adaptive(m) => m.exited_early(&mut ctx, id, reason)?,
            Method::Asha(m) => m.exited_early(&mut ctx, id, reason)?,
            Method::Hyperband(m) => m.exited_early(&mut ctx, id, reason)?,
            Method::Pbt(m) => m.exited_early(&mut ctx, id)?,
        };
        self.common.exits.insert(id);
        let mut ops = self.record(ops);
        self.maybe_shutdown(&mut ops);
        Ok(ops)
    }

    fn trial_exited(&mut self, id: RequestId) -> Result<Vec<Operation>, SearchError> {
        self.common.closed.insert(id);
        let mut ctx = Ctx {
            space: &self.space,
            rng: &mut self.rng,
            next_id: &mut self.next_id,
        };
        let ops = match &mut self.method {
            Method::Random(m) => m.exited(&mut ctx),
            Method::Grid(m) => m.exited(&mut ctx),
            Method::Halving(m) => {
                m.exited();
                Vec::new()
            }
            Method::Adaptive(m) => {
                m.exited(id)?;
                Vec::new()
            }
            Method::Asha(m) => m.exited(&mut ctx, id)?,
            Method::Hyperband(m) => m.exited(&mut ctx, id)?,
            Method::Pbt(m) => m.exited(&mut ctx, id)?,
        };
        let mut ops = self.record(ops);
        self.maybe_shutdown(&mut ops);
        Ok(ops)
    }

    /// The search is over once every requested trial is closed.
    fn maybe_shutdown(&mut self, ops: &mut Vec<Operation>) {
        let requested = self.common.trials_requested as usize;
        if self.common.shut_down || requested != self.common.closed.len() {
            return;
        }
        self.common.shut_down = true;
        ops.push(Operation::Shutdown {
            cancel: self.common.cancels.len() >= requested,
            failure: self.common.failures.len() >= requested,
        });
    }

    fn record(&mut self, ops: Vec<Operation>) -> Vec<Operation> {
        let creates = ops
            .iter()
            .filter(|op| matches!(op, Operation::Create { .. }))
            .count();
        self.common.trials_requested += creates as u32;
        ops
    }

    /// For adaptive_asha, the bracket (0 = most rungs) that created trial `id`.
    pub fn bracket_of(&self, id: RequestId) -> Option<usize> {
        match &self.method {
            Method::Adaptive(m) => m.trial_table.get(&id).copied(),
            _ => None,
        }
    }

    /// Whether the search has shut down.
    pub fn is_shut_down(&self) -> bool {
        self.common.shut_down
    }

    /// How many trials the searcher has asked for so far.
    pub fn trials_requested(&self) -> u32 {
        self.common.trials_requested
    }

    /// Progress of the whole search, 0.0 to 1.0.
    pub fn progress(&self) -> f64 {
        if self.common.shut_down {
            return 1.0;
        }
        let p = match &self.method {
            Method::Random(_) | Method::Grid(_) => {
                let total = match &self.method {
                    Method::Random(m) => u64::from(m.max_trials()),
                    Method::Grid(m) => m.total(),
                    _ => 1,
                };
                let sum: f64 = self
                    .common
                    .progress
                    .iter()
                    .map(|(id, p)| {
                        if self.common.closed.contains(id) {
                            1.0
                        } else {
                            *p
                        }
                    })
                    .sum();
                sum / total.max(1) as f64
            }
            Method::Halving(m) => m.progress(),
            Method::Adaptive(m) => m.progress(),
            Method::Asha(m) => m.progress(),
            Method::Hyperband(m) => m.progress(),
            Method::Pbt(m) => m.progress(),
        };
        if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// The full state, RNG included.
    pub fn snapshot(&self) -> SearcherSnapshot {
        SearcherSnapshot {
            rng: self.rng.state(),
            next_id: self.next_id,
            common: self.common.clone(),
            method: self.method.clone(),
        }
    }

    /// A searcher in exactly the state of `snapshot`, for the same config and space.
    pub fn restore(
        config: &SearcherConfig,
        space: &Hyperparameters,
        snapshot: SearcherSnapshot,
    ) -> Result<Self, SearchError> {
        let fresh = new_method(&config.method, space);
        if std::mem::discriminant(&fresh) != std::mem::discriminant(&snapshot.method) {
            return Err(SearchError::Snapshot(format!(
                "the config's searcher is {}",
                config.method.name()
            )));
        }
        Ok(Searcher {
            config: config.clone(),
            space: space.clone(),
            rng: ExperimentRng::from_state(snapshot.rng),
            next_id: snapshot.next_id,
            common: snapshot.common,
            method: snapshot.method,
        })
    }
}

fn new_method(method: &SearchMethod, space: &Hyperparameters) -> Method {
    let length = method.budget().map(|b| b.max_time);
    match method {
        SearchMethod::Single { .. } => Method::Random(RandomSearch::new(1, 1, length, true)),
        SearchMethod::Random {
            max_trials,
            max_concurrent_trials,
            ..
        } => Method::Random(RandomSearch::new(
            *max_trials,
            *max_concurrent_trials,
            length,
            false,
        )),
        SearchMethod::Grid {
            max_concurrent_trials,
            ..
        } => Method::Grid(GridSearch::new(space, *max_concurrent_trials, length)),
        SearchMethod::AsyncHalving {
            num_rungs,
            max_trials,
            divisor,
            max_concurrent_trials,
            budget,
        } => Method::Halving(HalvingSearch::new(
            *num_rungs,
            *max_trials,
            *divisor,
            *max_concurrent_trials,
            budget.max_time,
        )),
        SearchMethod::AdaptiveAsha {
            divisor, budget, ..
        } => Method::Adaptive(AdaptiveSearch::new(
            &adaptive_brackets(method),
            *divisor,
            budget.max_time,
        )),
        SearchMethod::Asha {
            num_rungs,
            max_trials,
            divisor,
            max_concurrent_trials,
            budget,
        } => Method::Asha(AshaSearch::new(
            *num_rungs,
            *max_trials,
            *divisor,
            *max_concurrent_trials,
            budget.max_time,
        )),
        SearchMethod::Hyperband {
            max_rungs,
            divisor,
            max_concurrent_trials,
            budget,
        } => Method::Hyperband(HyperbandSearch::new(
            budget.max_time,
            *divisor,
            *max_rungs,
            *max_concurrent_trials,
        )),
        SearchMethod::Pbt {
            population_size,
            num_rounds,
            length_per_round,
            replace_function,
            explore_function,
            ..
        } => Method::Pbt(PbtSearch::new(
            *population_size,
            *num_rounds,
            *length_per_round,
            replace_function.truncate_fraction,
            explore_function.resample_probability,
            explore_function.perturb_factor,
        )),
    }
}
