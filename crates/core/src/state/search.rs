//! Experiments and their searchers: creation, the searcher's operations turned
//! into trials and signals, metric reports and trial exits.

use super::*;

impl ClusterState {
    pub(super) fn create_experiment(
        &mut self,
        config_yaml: String,
        overrides: Vec<String>,
        owner: String,
        model_digest: String,
        default_seed: u32,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let loaded = match config::parse_str("experiment.yaml", &config_yaml, &overrides) {
            Ok(l) => l,
            Err(e) => return rejected(e.to_string()),
        };
        let config = loaded.config;
        let workspace = super::auth::workspace_or_default(&config.workspace);
        if !self.may(Some(owner.as_str()), workspace, crate::command::Role::User) {
            self.forbidden += 1;
            return Reply::Forbidden {
                reason: format!("{owner} may not create experiments in workspace {workspace:?}"),
            };
        }
        let seed = config
            .reproducibility
            .experiment_seed
            .unwrap_or(default_seed);
        let id = self.experiments.keys().next_back().map_or(1, |k| k + 1);
        let mut searcher =
            Searcher::new(&config.searcher, &config.hyperparameters, u64::from(seed));
        let ops = searcher.initial_operations();
        self.touched.experiment(id);
        self.experiments.insert(
            id,
            Experiment {
                config_yaml,
                overrides,
                owner,
                model_digest,
                seed,
                state: ExperimentState::Active,
                last_error: None,
                trials: BTreeMap::new(),
                created_ms: self.now_ms,
                ended_ms: None,
                archived: false,
                collected: false,
                config: Some(config),
                searcher: Some(searcher),
            },
        );
        self.run_ops(id, ops, changes);
        Reply::ExperimentCreated { experiment: id }
    }

    /// Feeds an event to an experiment's searcher and carries out its operations.
    pub(super) fn search_event(
        &mut self,
        experiment: ExperimentId,
        event: SearchEvent,
        changes: &mut Vec<Change>,
    ) {
        let Some(exp) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) else {
            return;
        };
        let Some(searcher) = exp.searcher.as_mut() else {
            return;
        };
        match searcher.handle(&event) {
            Ok(ops) => self.run_ops(experiment, ops, changes),
            Err(e) => exp.last_error = Some(e.to_string()),
        }
    }

    pub(super) fn run_ops(
        &mut self,
        experiment: ExperimentId,
        ops: Vec<Operation>,
        changes: &mut Vec<Change>,
    ) {
        // A searcher's operations can queue, resume or stop trials.
        if !ops.is_empty() {
            self.placement_dirty = true;
        }
        let mut queue: VecDeque<Operation> = ops.into();
        while let Some(op) = queue.pop_front() {
            let follow_up = self.run_op(experiment, op, changes);
            queue.extend(follow_up);
        }
    }

    pub(super) fn trial_of(&self, experiment: ExperimentId, request: RequestId) -> Option<TrialId> {
        self.experiments
            .get(&experiment)
            .and_then(|e| e.trials.get(&request))
            .copied()
    }

    pub(super) fn run_op(
        &mut self,
        experiment: ExperimentId,
        op: Operation,
        changes: &mut Vec<Change>,
    ) -> Vec<Operation> {
        let mut follow_up = Vec::new();
        match op {
            Operation::Create {
                request_id,
                hparams,
                trial_seed,
                warm_start,
            } => {
                let config = self
                    .experiments
                    .get(&experiment)
                    .and_then(Experiment::config);
                let slots = config.map_or(1, |c| c.resources.slots_per_trial);
                let preemption_timeout_s = config
                    .map_or(resolute_types::config::PREEMPTION_TIMEOUT_DEFAULT_S, |c| {
                        c.preemption_timeout
                    });
                let warm = warm_start.and_then(|r| self.trial_of(experiment, r));
                let id = self.trials.keys().next_back().map_or(1, |k| k + 1);
                let latest_checkpoint = warm
                    .and_then(|w| self.trials.get(&w))
                    .and_then(|t| t.latest_checkpoint.clone());
                self.touched.trial(id);
                self.trials.insert(
                    id,
                    Trial {
                        experiment,
                        request_id,
                        hparams,
                        seed: trial_seed,
                        warm_start: warm,
                        state: TrialState::Queued,
                        incarnation: 0,
                        restarts: 0,
                        target: None,
                        steps_completed: 0,
                        latest_checkpoint,
                        slots,
                        pending: Pending::None,
                        user_paused: false,
                        preempting: false,
                        layout: Vec::new(),
                        queued_ms: Some(self.now_ms),
                        started_ms: 0,
                        preemption_timeout_s,
                        stop_deadline_ms: None,
                        latest_validation: None,
                        best_validation: None,
                        latest_validation_step: None,
                        reports: 0,
                    },
                );
                self.live.insert(id);
                self.refresh_replication(id);
                if let Some(e) =
                    experiment_mut(&mut self.experiments, &mut self.touched, experiment)
                {
                    e.trials.insert(request_id, id);
                    if let Some(s) = e.searcher.as_mut() {
                        match s.handle(&SearchEvent::TrialCreated { request_id }) {
                            Ok(ops) => follow_up.extend(ops),
                            Err(err) => e.last_error = Some(err.to_string()),
                        }
                    }
                }
            }
            Operation::RunUntil { request_id, length }
            | Operation::Resume { request_id, length } => {
                let now = self.now_ms;
                if let Some(t) = self.trial_of(experiment, request_id).and_then(|id| {
                    trial_mut(&mut self.trials, &mut self.touched, id).map(|t| (id, t))
                }) {
                    let (id, t) = t;
                    t.target = Some(length);
                    t.pending = Pending::None;
                    match t.state {
                        TrialState::Paused => {
                            t.state = TrialState::Queued;
                            t.queued_ms = Some(now);
                        }
                        TrialState::Assigned { .. } | TrialState::Running { .. } => {
                            signal_trial(id, t, Signal::Target(length), now, changes);
                        }
                        _ => {}
                    }
                }
            }
            Operation::Pause { request_id } => self.request(
                experiment,
                request_id,
                Pending::Pause,
                changes,
                &mut follow_up,
            ),
            Operation::Stop { request_id } => self.request(
                experiment,
                request_id,
                Pending::Stop,
                changes,
                &mut follow_up,
            ),
            Operation::Shutdown { failure, .. } => {
                if let Some(e) =
                    experiment_mut(&mut self.experiments, &mut self.touched, experiment)
                {
                    if e.state != ExperimentState::Canceled {
                        e.state = if failure {
                            ExperimentState::Errored
                        } else {
                            ExperimentState::Completed
                        };
                    }
                    e.ended_ms.get_or_insert(self.now_ms);
                }
            }
        }
        follow_up
    }

    /// A searcher's pause or stop: signal a running trial, or act at once on one
    /// that is not running.
    pub(super) fn request(
        &mut self,
        experiment: ExperimentId,
        request_id: RequestId,
        what: Pending,
        changes: &mut Vec<Change>,
        follow_up: &mut Vec<Operation>,
    ) {
        let Some(id) = self.trial_of(experiment, request_id) else {
            return;
        };
        let Some(t) = trial_mut(&mut self.trials, &mut self.touched, id) else {
            return;
        };
        let now = self.now_ms;
        match t.state {
            // A trial its user killed stays killed.
            TrialState::Assigned { .. } | TrialState::Running { .. }
                if t.pending == Pending::Kill => {}
            TrialState::Assigned { .. } | TrialState::Running { .. } => {
                t.pending = what;
                let signal = if what == Pending::Pause {
                    Signal::Pause
                } else {
                    Signal::Stop
                };
                signal_trial(id, t, signal, now, changes);
            }
            TrialState::Queued | TrialState::Paused => {
                if what == Pending::Pause {
                    t.state = TrialState::Paused;
                } else {
                    t.state = TrialState::Done(TrialOutcome::Stopped);
                }
                self.settle(id);
                if what != Pending::Pause {
                    follow_up.extend(self.close(experiment, request_id));
                }
            }
            TrialState::Done(_) => {}
        }
    }

    /// Tells the searcher a trial is closed for good.
    pub(super) fn close(
        &mut self,
        experiment: ExperimentId,
        request_id: RequestId,
    ) -> Vec<Operation> {
        let Some(e) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) else {
            return Vec::new();
        };
        let Some(s) = e.searcher.as_mut() else {
            return Vec::new();
        };
        match s.handle(&SearchEvent::TrialExited { request_id }) {
            Ok(ops) => ops,
            Err(err) => {
                e.last_error = Some(err.to_string());
                Vec::new()
            }
        }
    }

    pub(super) fn metrics(
        &mut self,
        records: Vec<MetricRecord>,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let mut refused = 0usize;
        let mut oversized = 0usize;
        for record in records {
            if MetricRecord::check_metrics(&record.metrics).is_err() {
                // Past the limits the endpoint holds: only a hostile or broken
                // node proposes it.
                oversized += 1;
                continue;
            }
            let validation = record.kind == MetricKind::Validation;
            let searcher_metric = validation
                .then(|| {
                    self.trials
                        .get(&record.trial)
                        .and_then(|t| self.experiments.get(&t.experiment))
                        .and_then(Experiment::config)
                        .map(|c| (c.searcher.metric.clone(), c.searcher.smaller_is_better))
                })
                .flatten();
            let (experiment, request_id, latest_checkpoint) =
                match self.current(record.trial, record.incarnation) {
                    Ok(t) => {
                        // Another group's steps are its own business (an
                        // inference pass may count anything): only training
                        // and validation reports say how far the trial is.
                        if !matches!(record.kind, MetricKind::Group(_)) {
                            t.steps_completed = t.steps_completed.max(record.steps_completed);
                        }
                        t.reports += 1;
                        let latest = if validation {
                            note_validation(t, &record, searcher_metric.as_ref());
                            t.latest_checkpoint.clone()
                        } else {
                            None
                        };
                        (t.experiment, t.request_id, latest)
                    }
                    Err(_) => {
                        refused += 1;
                        continue;
                    }
                };
            if validation {
                // A validation at the latest checkpoint's step ranks it.
                let value = self.trials.get(&record.trial).and_then(|t| {
                    (t.latest_validation_step == Some(record.steps_completed))
                        .then_some(t.latest_validation)
                        .flatten()
                });
                if let Some(c) = latest_checkpoint
                    .as_ref()
                    .and_then(|u| self.checkpoints.get_mut(u))
                    .filter(|c| c.steps_completed == record.steps_completed)
                {
                    c.validation = value.or(c.validation);
                }
                self.search_event(
                    experiment,
                    SearchEvent::ValidationCompleted {
                        request_id,
                        metrics: record.metrics.clone(),
                    },
                    changes,
                );
            }
            self.reports_applied += 1;
            changes.push(Change::Reported(record));
        }
        if oversized > 0 {
            rejected(format!("{oversized} records past the metric limits"))
        } else if refused > 0 {
            rejected(format!("{refused} records from stale incarnations"))
        } else {
            Reply::Ok
        }
    }

    pub(super) fn trial_exited(
        &mut self,
        trial: TrialId,
        incarnation: u64,
        outcome: TrialOutcome,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let max_restarts = {
            let Some(t) = self.trials.get(&trial) else {
                return rejected(format!("unknown trial {trial}"));
            };
            self.experiments
                .get(&t.experiment)
                .and_then(Experiment::config)
                .map_or(5, |c| c.max_restarts)
        };
        let (experiment, request_id, pending, unfinished) = match self.current(trial, incarnation) {
            Ok(t) => (
                t.experiment,
                t.request_id,
                t.pending,
                t.target.is_some_and(|target| t.steps_completed < target),
            ),
            Err(reply) => return reply,
        };
        let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) else {
            return Reply::Ok;
        };
        let preempting = std::mem::take(&mut t.preempting);
        changes.push(Change::RunEnded {
            trial,
            incarnation,
            why: run_end(&outcome, preempting, pending),
        });
        if pending == Pending::Kill {
            self.end_killed(trial, changes);
            return Reply::Ok;
        }
        let mut events = Vec::new();
        match outcome {
            TrialOutcome::Completed | TrialOutcome::Stopped => {
                if preempting && pending == Pending::None && outcome == TrialOutcome::Stopped {
                    // The scheduler took its slots back: it waits in the queue and
                    // resumes from its latest checkpoint.
                    t.state = TrialState::Queued;
                } else if pending == Pending::Pause {
                    t.state = TrialState::Paused;
                    t.pending = Pending::None;
                } else if pending == Pending::None && (unfinished || t.user_paused) {
                    // It exited before its target (or was paused by its user): it
                    // resumes from its latest checkpoint.
                    t.state = if t.user_paused {
                        TrialState::Paused
                    } else {
                        if outcome == TrialOutcome::Completed {
                            self.unfinished_exits += 1;
                        }
                        TrialState::Queued
                    };
                } else {
                    t.state = TrialState::Done(outcome);
                    events.push(SearchEvent::TrialExited { request_id });
                }
            }
            TrialOutcome::Preempted => t.state = TrialState::Queued,
            TrialOutcome::Errored { .. } => {
                t.restarts += 1;
                if t.restarts > max_restarts || pending == Pending::Stop {
                    t.state = TrialState::Done(outcome);
                    events.push(SearchEvent::TrialExitedEarly {
                        request_id,
                        reason: ExitedReason::Errored,
                    });
                    events.push(SearchEvent::TrialExited { request_id });
                } else {
                    t.state = TrialState::Queued;
                }
            }
            TrialOutcome::InvalidHyperparameters => {
                t.state = TrialState::Done(outcome);
                events.push(SearchEvent::TrialExitedEarly {
                    request_id,
                    reason: ExitedReason::InvalidHp,
                });
                events.push(SearchEvent::TrialExited { request_id });
            }
        }
        self.settle(trial);
        for event in events {
            self.search_event(experiment, event, changes);
        }
        self.maybe_collect(experiment, changes);
        Reply::Ok
    }

    /// Keeps a trial's derived bookkeeping true after its state changed: a queued
    /// trial's queue clock starts (once), a finished one leaves the live set.
    pub(super) fn settle(&mut self, id: TrialId) {
        let now = self.now_ms;
        if let Some(t) = trial_mut(&mut self.trials, &mut self.touched, id) {
            match t.state {
                TrialState::Queued => {
                    t.queued_ms.get_or_insert(now);
                }
                TrialState::Done(_) => {
                    t.queued_ms = None;
                    self.live.remove(&id);
                    self.refresh_replication(id);
                }
                _ => t.queued_ms = None,
            }
        }
    }
}

/// Keeps a trial's latest and best value of its experiment's searcher metric
/// (`metric`: its name and whether smaller is better). A report without it, or
/// with a value that is not a finite number, changes neither.
fn note_validation(t: &mut Trial, record: &MetricRecord, metric: Option<&(String, bool)>) {
    let Some((name, smaller_is_better)) = metric else {
        return;
    };
    let Some(value) = record
        .metrics
        .get(name)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
    else {
        return;
    };
    t.latest_validation = Some(value);
    t.latest_validation_step = Some(record.steps_completed);
    let better = match t.best_validation {
        None => true,
        Some(best) if *smaller_is_better => value < best,
        Some(best) => value > best,
    };
    if better {
        t.best_validation = Some(value);
    }
}

/// Why an incarnation ended, in the words the run history shows.
fn run_end(outcome: &TrialOutcome, preempting: bool, pending: Pending) -> String {
    match outcome {
        TrialOutcome::Completed => "completed".into(),
        TrialOutcome::Stopped if preempting => "preempted by the scheduler".into(),
        _ if pending == Pending::Kill => "killed by its user".into(),
        TrialOutcome::Stopped if pending == Pending::Pause => "paused by the searcher".into(),
        TrialOutcome::Stopped => "stopped".into(),
        TrialOutcome::Errored { exit_code, .. } => match exit_code {
            Some(code) => format!("errored (exit code {code})"),
            None => "errored".into(),
        },
        TrialOutcome::Preempted => "preempted (node draining or preemptible)".into(),
        TrialOutcome::InvalidHyperparameters => "invalid hyperparameters".into(),
    }
}
