//! What each command does to the state (`ClusterState::apply`): nodes and their
//! capacity, checkpoints, experiment controls, and the stop deadlines.

use super::*;

impl ClusterState {
    /// Applies one entry.
    pub fn apply(&mut self, index: u64, envelope: Envelope) -> (Reply, Vec<Change>) {
        self.applied_index = self.applied_index.max(index);
        if let Some(reply) = self.seen.get(&envelope.id) {
            return (reply.clone(), Vec::new());
        }
        let mut changes = Vec::new();
        self.now_ms = self.now_ms.max(envelope.time_ms);
        if let Err(reason) = self.authorize(&envelope) {
            self.forbidden += 1;
            let reply = Reply::Forbidden { reason };
            self.remember(envelope.id, reply.clone());
            return (reply, changes);
        }
        let mut envelope = envelope;
        if let Command::Metrics { records } = &mut envelope.command {
            self.own_records(envelope.proposer, records);
        }
        if envelope.command == Command::Tick {
            // Time-based decisions are made on the leader's Tick entries (and,
            // for placement, on every entry that runs it).
            self.enforce_stop_deadlines(&mut changes);
        }
        let user = envelope.user;
        let reply = self.apply_command(envelope.command, user.as_deref(), &mut changes);
        self.schedule(&mut changes);
        self.remember(envelope.id, reply.clone());
        (reply, changes)
    }

    pub(super) fn remember(&mut self, id: ProposalId, reply: Reply) {
        self.seen.insert(id, reply);
        self.seen_order.push_back(id);
        while self.seen_order.len() > SEEN_PROPOSALS_MAX {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    pub(super) fn apply_command(
        &mut self,
        command: Command,
        user: Option<&str>,
        changes: &mut Vec<Change>,
    ) -> Reply {
        // Everything but progress reports can change what placement sees; metrics
        // can too, through the searcher (run_op marks those cases).
        if !matches!(
            command,
            Command::Metrics { .. }
                | Command::CheckpointSaved { .. }
                | Command::CheckpointReplicated { .. }
                | Command::ModelKept { .. }
                | Command::TrialStarted { .. }
                | Command::User(_)
                | Command::Noop
        ) {
            self.placement_dirty = true;
        }
        if matches!(
            command,
            Command::NodeLost { .. }
                | Command::NodeDraining { .. }
                | Command::NodeAlive { .. }
                | Command::NodeCapacity { .. }
                | Command::NodeDisk { .. }
        ) {
            self.pool_nodes = None;
        }
        match command {
            Command::Noop => Reply::Ok,
            Command::SetPool { pool, settings } => {
                self.pools.insert(pool, settings);
                Reply::Ok
            }
            Command::Tick => Reply::Ok,
            Command::NodeLost { node } => self.set_node_state(node, NodeState::Lost, changes),
            Command::NodeDraining { node } => {
                let reply = self.set_node_state(node, NodeState::Draining, changes);
                self.signal_node(node, Signal::Stop, changes);
                reply
            }
            Command::NodeAlive { node } => self.set_node_state(node, NodeState::Alive, changes),
            Command::NodeApproved { node } => self.approve_node(node),
            Command::NodeRemoved { node } => self.remove_for_good(node, changes),
            Command::NodeCapacity {
                node,
                slots,
                stop_first,
            } => self.set_capacity(node, slots, &stop_first, changes),
            Command::ExperimentCreated {
                config_yaml,
                overrides,
                owner,
                model_digest,
                default_seed,
            } => self.create_experiment(
                config_yaml,
                overrides,
                // The owner is the user whose authority the entry carries.
                user.map_or(owner, str::to_owned),
                model_digest,
                default_seed,
                changes,
            ),
            Command::ExperimentControl { experiment, action } => {
                self.control(experiment, action, changes)
            }
            Command::TrialKill { trial } => self.kill_trial(trial, changes),
            Command::User(command) => self.apply_user(user, command),
            Command::TrialStarted { trial, incarnation } => {
                match self.current(trial, incarnation) {
                    Ok(t) => {
                        if let TrialState::Assigned { node } = t.state {
                            t.state = TrialState::Running { node };
                        }
                        Reply::Ok
                    }
                    Err(reply) => reply,
                }
            }
            Command::Metrics { records } => self.metrics(records, changes),
            Command::CheckpointSaved {
                uuid,
                trial,
                incarnation,
                steps_completed,
                size,
                digest,
                holder,
            } => match self.current(trial, incarnation) {
                Ok(t) => {
                    t.latest_checkpoint = Some(uuid.clone());
                    // Ranked by the validation at its step (reported before it,
                    // or after it: `metrics` fills it in then).
                    let validation = (t.latest_validation_step == Some(steps_completed))
                        .then_some(t.latest_validation)
                        .flatten();
                    let holders = BTreeSet::from([holder]);
                    changes.push(Change::Checkpoint { uuid: uuid.clone() });
                    self.checkpoints.insert(
                        uuid,
                        Checkpoint {
                            trial,
                            steps_completed,
                            size,
                            digest,
                            holders,
                            validation,
                        },
                    );
                    self.refresh_replication(trial);
                    Reply::Ok
                }
                Err(reply) => reply,
            },
            Command::CheckpointReplicated { uuid, holder } => match self.checkpoints.get_mut(&uuid)
            {
                Some(c) => {
                    if c.holders.insert(holder) {
                        changes.push(Change::Checkpoint { uuid: uuid.clone() });
                    }
                    let trial = c.trial;
                    self.refresh_replication(trial);
                    Reply::Ok
                }
                None => rejected(format!("unknown checkpoint {uuid}")),
            },
            Command::ModelKept { digest, holder } => self.model_kept(digest, holder),
            Command::TrialExited {
                trial,
                incarnation,
                outcome,
            } => self.trial_exited(trial, incarnation, outcome, changes),
            Command::NodeDisk { node, low } => match self.nodes.get_mut(&node) {
                Some(n) => {
                    n.disk_low = low;
                    // Who copies which checkpoint changes with it.
                    self.replication_generation += 1;
                    Reply::Ok
                }
                None => rejected(format!("unknown node {node}")),
            },
        }
    }

    pub(super) fn set_node_state(
        &mut self,
        node: NodeId,
        state: NodeState,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(n) = self.nodes.get_mut(&node) else {
            return rejected(format!("unknown node {node}"));
        };
        n.state = state;
        self.replication_generation += 1;
        if state == NodeState::Lost {
            self.requeue_from(node, changes);
        }
        Reply::Ok
    }

    /// A node's slot count changed (a GPU failed its health check, or came back).
    /// When its placed trials no longer fit, trials checkpoint and stop and go
    /// back to the queue, like trials the scheduler releases (a failed GPU is not
    /// their fault, so no restart is charged): first those the node named (they
    /// ran on the failed GPUs; only the node knows which slot is which), then the
    /// most recently started.
    pub(super) fn set_capacity(
        &mut self,
        node: NodeId,
        slots: u32,
        stop_first: &[TrialId],
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(n) = self.nodes.get_mut(&node) else {
            return rejected(format!("unknown node {node}"));
        };
        n.info.slots = slots;
        let mut placed: Vec<(u64, TrialId, u32)> = self
            .live_trial_entries()
            .filter(|(_, t)| t.is_placed())
            .map(|(id, t)| {
                let here: u32 = t
                    .layout
                    .iter()
                    .filter(|(n, _)| *n == node)
                    .map(|(_, s)| *s)
                    .sum();
                (t.started_ms, id, here)
            })
            .filter(|(_, _, here)| *here > 0)
            .collect();
        let mut used: u32 = placed.iter().map(|(_, _, here)| *here).sum();
        // Named first, then newest first (ties: the larger trial id).
        placed.sort_unstable_by(|a, b| {
            let named = |t: &(u64, TrialId, u32)| stop_first.contains(&t.1);
            named(b).cmp(&named(a)).then(b.cmp(a))
        });
        let now = self.now_ms;
        for (_, id, here) in placed {
            if used <= slots {
                break;
            }
            used -= here;
            let Some(t) = trial_mut(&mut self.trials, &mut self.touched, id) else {
                continue;
            };
            if !t.preempting {
                t.preempting = true;
                signal_trial(id, t, Signal::Stop, now, changes);
            }
        }
        Reply::Ok
    }

    /// Trials with slots on `node` go back to the queue; a lost node is not the
    /// trial's fault, so it does not count toward `max_restarts` (as in
    /// Determined). The other nodes of a multi-node gang kill their part: a gang
    /// runs whole or not at all.
    pub(super) fn requeue_from(&mut self, node: NodeId, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        let mut killed = Vec::new();
        for (id, t) in self.trials.iter_mut() {
            if !t.is_placed_on(node) {
                continue;
            }
            self.touched.trial(*id);
            for (other, _) in &t.layout {
                if *other != node {
                    changes.push(Change::Signal {
                        trial: *id,
                        node: *other,
                        incarnation: t.incarnation,
                        signal: Signal::Kill,
                    });
                }
            }
            changes.push(Change::RunEnded {
                trial: *id,
                incarnation: t.incarnation,
                why: format!("node {node:016x} was lost or removed"),
            });
            t.stop_deadline_ms = None;
            if t.pending == Pending::Kill {
                // Its user killed it: it is not run again.
                killed.push(*id);
                continue;
            }
            t.state = TrialState::Queued;
            t.queued_ms = Some(now);
        }
        for id in killed {
            self.end_killed(id, changes);
        }
    }

    /// A user kills one trial (see `Command::TrialKill`): a placed one is
    /// signalled and ends when its exit (or its node's loss) is applied; any
    /// other ends now.
    pub(super) fn kill_trial(&mut self, trial: TrialId, changes: &mut Vec<Change>) -> Reply {
        let now = self.now_ms;
        let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) else {
            return rejected(format!("unknown trial {trial}"));
        };
        if let TrialState::Done(outcome) = &t.state {
            return rejected(format!("trial {trial} has ended ({outcome:?})"));
        }
        if t.is_placed() {
            t.pending = Pending::Kill;
            signal_trial(trial, t, Signal::Kill, now, changes);
            return Reply::Ok;
        }
        self.end_killed(trial, changes);
        Reply::Ok
    }

    /// A killed trial ends stopped; its searcher hears it was canceled.
    pub(super) fn end_killed(&mut self, trial: TrialId, changes: &mut Vec<Change>) {
        let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) else {
            return;
        };
        t.state = TrialState::Done(TrialOutcome::Stopped);
        t.pending = Pending::None;
        let (experiment, request_id) = (t.experiment, t.request_id);
        self.settle(trial);
        self.tell_user_canceled(experiment, request_id, changes);
        self.maybe_collect(experiment, changes);
    }

    /// The searcher hears that a trial its user canceled or killed ended
    /// early, and then that it ended.
    fn tell_user_canceled(
        &mut self,
        experiment: ExperimentId,
        request_id: RequestId,
        changes: &mut Vec<Change>,
    ) {
        self.search_event(
            experiment,
            SearchEvent::TrialExitedEarly {
                request_id,
                reason: ExitedReason::UserCanceled,
            },
            changes,
        );
        self.search_event(experiment, SearchEvent::TrialExited { request_id }, changes);
    }

    pub(super) fn signal_node(&mut self, node: NodeId, signal: Signal, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        for (id, t) in self.trials.iter_mut() {
            if t.is_placed_on(node) {
                self.touched.trial(*id);
                signal_trial(*id, t, signal, now, changes);
            }
        }
    }

    /// Kills the placed trials whose stop or pause signal went unanswered for
    /// their `preemption_timeout`.
    pub(super) fn enforce_stop_deadlines(&mut self, changes: &mut Vec<Change>) {
        let now = self.now_ms;
        for id in &self.live {
            let Some(t) = trial_mut(&mut self.trials, &mut self.touched, *id) else {
                continue;
            };
            if t.is_placed() && t.stop_deadline_ms.is_some_and(|d| d <= now) {
                signal_trial(*id, t, Signal::Kill, now, changes);
            }
        }
    }

    /// The trial, if `incarnation` is its current one; otherwise the rejection.
    pub(super) fn current(
        &mut self,
        trial: TrialId,
        incarnation: u64,
    ) -> Result<&mut Trial, Reply> {
        let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) else {
            return Err(rejected(format!("unknown trial {trial}")));
        };
        let live = matches!(
            t.state,
            TrialState::Assigned { .. } | TrialState::Running { .. }
        );
        if t.incarnation != incarnation || !live {
            self.stale_reports += 1;
            return Err(rejected(format!(
                "stale incarnation {incarnation} of trial {trial} (current {}, {:?})",
                t.incarnation, t.state
            )));
        }
        Ok(t)
    }

    pub(super) fn control(
        &mut self,
        experiment: ExperimentId,
        action: Control,
        changes: &mut Vec<Change>,
    ) -> Reply {
        match action {
            Control::Archive => return self.archive(experiment, true),
            Control::Unarchive => return self.archive(experiment, false),
            Control::Delete => return self.delete_experiment(experiment, changes),
            _ => {}
        }
        let Some(e) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) else {
            return rejected(format!("unknown experiment {experiment}"));
        };
        if matches!(
            e.state,
            ExperimentState::Completed | ExperimentState::Canceled | ExperimentState::Errored
        ) {
            return rejected(format!("experiment {experiment} has ended ({:?})", e.state));
        }
        match action {
            Control::Pause => e.state = ExperimentState::Paused,
            Control::Activate => e.state = ExperimentState::Active,
            Control::Cancel | Control::Kill => {
                e.state = ExperimentState::Canceled;
                e.ended_ms = Some(self.now_ms);
            }
            Control::Archive | Control::Unarchive | Control::Delete => {}
        }
        let ids: Vec<TrialId> = self
            .trials
            .iter()
            .filter(|(_, t)| t.experiment == experiment)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(t) = trial_mut(&mut self.trials, &mut self.touched, id) else {
                continue;
            };
            let placed = t.is_placed();
            let now = self.now_ms;
            match action {
                Control::Pause => {
                    t.user_paused = true;
                    if placed {
                        signal_trial(id, t, Signal::Pause, now, changes);
                    } else if t.state == TrialState::Queued {
                        t.state = TrialState::Paused;
                    }
                }
                Control::Activate => {
                    if t.user_paused {
                        t.user_paused = false;
                        if t.state == TrialState::Paused && t.pending == Pending::None {
                            t.state = TrialState::Queued;
                        }
                    }
                }
                Control::Archive | Control::Unarchive | Control::Delete => {}
                Control::Cancel | Control::Kill => {
                    let signal = if action == Control::Kill {
                        Signal::Kill
                    } else {
                        Signal::Stop
                    };
                    if placed {
                        t.pending = Pending::Stop;
                        signal_trial(id, t, signal, now, changes);
                    } else if !matches!(t.state, TrialState::Done(_)) {
                        t.state = TrialState::Done(TrialOutcome::Stopped);
                        let request_id = t.request_id;
                        self.tell_user_canceled(experiment, request_id, changes);
                    }
                }
            }
            self.settle(id);
        }
        if let Some(e) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) {
            if matches!(action, Control::Cancel | Control::Kill) {
                e.state = ExperimentState::Canceled;
            }
        }
        self.maybe_collect(experiment, changes);
        Reply::Ok
    }
}
