//! One trial incarnation's life on this node, and every decision in it:
//!
//! ```text
//!  start effect --> Preparing --(inputs fetched, slots free)--> Starting
//!                      |                                          | Launched
//!                      | stop/kill: reported Stopped, no process  v
//!                      +-------------------------------------- Running --(exit)--> reported
//! ```
//!
//! - A stop or pause asks the process to checkpoint and exit (`Preempt`); the
//!   state decides when that has taken too long (`preemption_timeout`) and sends
//!   a kill.
//! - A kill is SIGTERM, then SIGKILL after the grace period.
//! - A target change reaches the running process (`Retarget`); a process that
//!   trained to its target asks before it exits (`Reached`), and is told once its
//!   last validation has applied, so a searcher that promotes it on arrival keeps
//!   it running instead of relaunching it.
//! - How an exit is classified: the code's own early exit, a clean exit after a
//!   stop, an error; an error on GPUs waits for NVML (a GPU that failed under the
//!   trial is not the trial's fault).

use std::collections::BTreeSet;

use resolute_core::command::{Command, MetricRecord, TrialId, TrialOutcome};
use resolute_core::state::{Pending, Signal};
use resolute_core::Node;

use crate::agent::{act, note, Agent, Outs};
use crate::io::{Action, EarlyExit, ProcessExit, TrialReport};
use crate::launch::{self, LaunchSpec};

/// Where an incarnation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for its inputs to be fetched, or for its slots.
    Preparing,
    /// Handed to the shell, which starts its process.
    Starting,
    /// Its process runs.
    Running,
}

/// One incarnation on this node.
#[derive(Debug)]
pub(crate) struct Incarnation {
    pub(crate) spec: LaunchSpec,
    pub(crate) phase: Phase,
    /// Inputs (blob digests) still to fetch.
    missing: BTreeSet<String>,
    /// When its start effect arrived.
    since_ms: u64,
    /// It was asked to checkpoint and stop (a stop or pause signal).
    asked_to_stop: bool,
    /// The state killed it (its exit is a stop, not an error).
    killed: bool,
    /// When SIGKILL follows the SIGTERM already sent.
    kill_at: Option<u64>,
    /// Not this node's any more (stale after a restart, or fenced): its exit is
    /// not reported.
    silent: bool,
    /// What the code said before it exited.
    early_exit: Option<EarlyExit>,
    /// It trained to this many units and waits to hear whether to go on.
    reached: Option<u64>,
}

impl Incarnation {
    /// The inputs it still waits for, if any (for `Agent::summary`).
    pub(crate) fn missing_summary(&self) -> String {
        if self.missing.is_empty() {
            String::new()
        } else {
            format!(" waiting for {:?}", self.missing)
        }
    }
}

impl Agent {
    /// A trial was placed here: prepare its launch.
    pub(crate) fn start(&mut self, node: &Node, start: resolute_core::StartTrial, out: &mut Outs) {
        let key = (start.trial, start.incarnation);
        if self.incarnations.contains_key(&key) {
            return; // A repeated start (after a reconcile) changes nothing.
        }
        // An older incarnation of the trial still here is stale: it goes.
        let older: Vec<(TrialId, u64)> = self
            .incarnations
            .keys()
            .filter(|(t, i)| *t == start.trial && *i < start.incarnation)
            .copied()
            .collect();
        for k in older {
            self.drop_quietly(k, out);
        }
        if self.refuse_launch_for_disk(node, key, out) {
            return;
        }
        let Some(spec) = launch::spec(node.state(), start, self.slots.are_gpus()) else {
            note(out, format!("trial {}: no such experiment here", key.0));
            return;
        };
        let missing: BTreeSet<String> = [&spec.model_digest, &spec.latest_checkpoint]
            .into_iter()
            .flatten()
            .filter(|d| !self.have.contains(*d))
            .cloned()
            .collect();
        self.incarnations.insert(
            key,
            Incarnation {
                spec,
                phase: Phase::Preparing,
                missing: missing.clone(),
                since_ms: self.now_ms,
                asked_to_stop: false,
                killed: false,
                kill_at: None,
                silent: false,
                early_exit: None,
                reached: None,
            },
        );
        for digest in &missing {
            self.fetch_for_launch(node, digest, key, out);
        }
        self.try_launch(key, out);
    }

    /// Launches an incarnation whose inputs are here, once its slots are free.
    fn try_launch(&mut self, key: (TrialId, u64), out: &mut Outs) {
        let Some(x) = self.incarnations.get_mut(&key) else {
            return;
        };
        if x.phase != Phase::Preparing || !x.missing.is_empty() {
            return;
        }
        // An older incarnation may still be on its way out of its slots.
        let Some((slots, gpus)) = self.slots.take(key, x.spec.slots_here) else {
            return;
        };
        x.spec.slots = slots;
        x.spec.gpus = gpus;
        x.phase = Phase::Starting;
        let waited = self.now_ms.saturating_sub(x.since_ms);
        self.launches.insert(key.0, (key.1, waited));
        act(out, Action::Launch(Box::new(x.spec.clone())));
    }

    /// Whether a local incarnation starts from `digest` (its model directory
    /// or its checkpoint).
    pub(crate) fn uses_input(&self, digest: &str) -> bool {
        self.incarnations.values().any(|x| {
            x.spec.model_digest.as_deref() == Some(digest)
                || x.spec.latest_checkpoint.as_deref() == Some(digest)
        })
    }

    /// Launches what waited for slots.
    pub(crate) fn launch_waiting(&mut self, _node: &Node, out: &mut Outs) {
        let waiting: Vec<(TrialId, u64)> = self
            .incarnations
            .iter()
            .filter(|(_, x)| x.phase == Phase::Preparing && x.missing.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in waiting {
            self.try_launch(key, out);
        }
    }

    /// One of an incarnation's inputs is in the local store now.
    pub(crate) fn input_ready(
        &mut self,
        _node: &Node,
        key: (TrialId, u64),
        digest: &str,
        out: &mut Outs,
    ) {
        if let Some(x) = self.incarnations.get_mut(&key) {
            x.missing.remove(digest);
        }
        self.try_launch(key, out);
    }

    /// An input could not be fetched: the launch gives up. A checkpoint that no
    /// holder serves is not the trial's fault: it goes back to the queue without
    /// a restart charged, and resumes from a checkpoint some member still holds.
    /// A model directory that cannot be had is an error (bounded by
    /// `max_restarts`).
    pub(crate) fn input_unavailable(
        &mut self,
        _node: &Node,
        key: (TrialId, u64),
        digest: &str,
        why: &str,
        out: &mut Outs,
    ) {
        let Some(x) = self.incarnations.remove(&key) else {
            return;
        };
        self.forget_launch(key);
        let outcome = if x.spec.latest_checkpoint.as_deref() == Some(digest) {
            note(
                out,
                format!(
                    "trial {} incarnation {}: checkpoint {digest} unreachable ({why}); back to the queue",
                    key.0, key.1
                ),
            );
            TrialOutcome::Preempted
        } else {
            TrialOutcome::Errored {
                message: format!("model directory {digest}: {why}"),
                exit_code: None,
            }
        };
        self.report_exit(key, outcome, out);
    }

    /// A signal from the state for an incarnation here.
    pub(crate) fn signal(
        &mut self,
        _node: &Node,
        trial: TrialId,
        incarnation: u64,
        signal: Signal,
        out: &mut Outs,
    ) {
        let key = (trial, incarnation);
        let Some(x) = self.incarnations.get_mut(&key) else {
            return;
        };
        match signal {
            Signal::Stop | Signal::Pause | Signal::Kill => {
                if signal == Signal::Kill {
                    x.killed = true;
                } else {
                    x.asked_to_stop = true;
                }
                match x.phase {
                    // Nothing runs yet: nothing is lost by not starting it.
                    Phase::Preparing => self.cancel(key, out),
                    // The signal is delivered once the process is up.
                    Phase::Starting => {}
                    Phase::Running if signal == Signal::Kill => self.terminate(key, out),
                    Phase::Running => act(out, Action::Preempt { trial, incarnation }),
                }
            }
            Signal::Target(target) => {
                x.spec.target = Some(target);
                if x.phase != Phase::Preparing {
                    act(
                        out,
                        Action::Retarget {
                            trial,
                            incarnation,
                            target,
                        },
                    );
                }
            }
        }
    }

    /// Drops an incarnation that has not launched, and reports it stopped.
    fn cancel(&mut self, key: (TrialId, u64), out: &mut Outs) {
        self.forget_launch(key);
        if let Some(x) = self.incarnations.remove(&key) {
            self.slots.release(key);
            if !x.silent {
                self.report_exit(key, TrialOutcome::Stopped, out);
            }
        }
    }

    /// SIGTERM now, SIGKILL after the grace period.
    fn terminate(&mut self, key: (TrialId, u64), out: &mut Outs) {
        let grace = self.cfg.kill_grace_ms;
        let Some(x) = self.incarnations.get_mut(&key) else {
            return;
        };
        if x.kill_at.is_none() {
            x.kill_at = Some(self.now_ms + grace);
            act(
                out,
                Action::Terminate {
                    trial: key.0,
                    incarnation: key.1,
                },
            );
        }
    }

    /// SIGKILL for the incarnations whose grace is over.
    pub(crate) fn escalate_stops(&mut self, out: &mut Outs) {
        let now = self.now_ms;
        for (key, x) in self.incarnations.iter_mut() {
            if x.kill_at.is_some_and(|t| t <= now) {
                x.kill_at = Some(u64::MAX);
                act(
                    out,
                    Action::Kill {
                        trial: key.0,
                        incarnation: key.1,
                    },
                );
            }
        }
    }

    /// An incarnation that is no longer this node's: killed, its exit unreported.
    fn drop_quietly(&mut self, key: (TrialId, u64), out: &mut Outs) {
        let Some(x) = self.incarnations.get_mut(&key) else {
            return;
        };
        x.silent = true;
        if x.phase == Phase::Preparing {
            self.cancel(key, out);
        } else {
            act(
                out,
                Action::Kill {
                    trial: key.0,
                    incarnation: key.1,
                },
            );
        }
    }

    /// Kills, quietly, the incarnations the state no longer places here: a
    /// node that comes back from a crash replays its log, starts what that log
    /// placed on it, and only then learns from the leader that the cluster
    /// declared it lost meanwhile and moved its trials (a lost node's own part
    /// of a gang gets no signal: the state requeues the trial). Whatever such
    /// an incarnation reports is refused as stale anyway; its slots are the
    /// node's again.
    pub(crate) fn drop_stale(&mut self, node: &Node, out: &mut Outs) {
        let me = self.cfg.node;
        let trials = &node.state().trials;
        let stale: Vec<(TrialId, u64)> = self
            .incarnations
            .iter()
            .filter(|(_, x)| !x.silent)
            .map(|(k, _)| *k)
            .filter(|(t, i)| {
                !trials
                    .get(t)
                    .is_some_and(|x| x.incarnation == *i && x.is_placed_on(me))
            })
            .collect();
        for key in stale {
            note(
                out,
                format!(
                    "trial {} incarnation {} is no longer this node's: killed",
                    key.0, key.1
                ),
            );
            self.drop_quietly(key, out);
        }
    }

    /// This node fenced itself (no quorum for a lease): every trial here stops
    /// now; `core` reports them preempted when contact is back.
    pub(crate) fn stop_all(&mut self, out: &mut Outs) {
        note(
            out,
            "no quorum for a lease: stopping every trial here".into(),
        );
        let keys: Vec<(TrialId, u64)> = self.incarnations.keys().copied().collect();
        for key in keys {
            self.drop_quietly(key, out);
        }
    }

    /// The state was rebuilt: exactly these incarnations are this node's.
    pub(crate) fn reconcile(&mut self, keep: &[(TrialId, u64)], out: &mut Outs) {
        let stale: Vec<(TrialId, u64)> = self
            .incarnations
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        for key in stale {
            self.drop_quietly(key, out);
        }
    }

    /// What a trial process (or its launch) did.
    pub(crate) fn on_report(
        &mut self,
        now_ms: u64,
        node: &Node,
        report: TrialReport,
        out: &mut Outs,
    ) {
        self.now_ms = now_ms;
        match report {
            TrialReport::Launched { trial, incarnation } => {
                self.on_launched(trial, incarnation, out)
            }
            TrialReport::LaunchFailed {
                trial,
                incarnation,
                reason,
            } => {
                let key = (trial, incarnation);
                self.slots.release(key);
                if let Some(x) = self.incarnations.remove(&key) {
                    note(
                        out,
                        format!(
                            "trial {trial} incarnation {incarnation} could not start: {reason}"
                        ),
                    );
                    if !x.silent {
                        let outcome = TrialOutcome::Errored {
                            message: reason,
                            exit_code: None,
                        };
                        self.report_exit(key, outcome, out);
                    }
                }
            }
            TrialReport::Metrics {
                trial,
                incarnation,
                kind,
                steps_completed,
                metrics,
            } => {
                if self.incarnations.contains_key(&(trial, incarnation)) {
                    self.batch_metrics(MetricRecord {
                        trial,
                        incarnation,
                        kind,
                        steps_completed,
                        metrics,
                    });
                }
            }
            TrialReport::CheckpointSaved {
                trial,
                incarnation,
                uuid,
                steps_completed,
                size,
            } => {
                self.have.insert(uuid.clone());
                let holder = self.cfg.node;
                self.propose_own(
                    Command::CheckpointSaved {
                        uuid: uuid.clone(),
                        trial,
                        incarnation,
                        steps_completed,
                        size,
                        digest: uuid,
                        holder,
                    },
                    out,
                );
            }
            TrialReport::EarlyExit {
                trial,
                incarnation,
                reason,
            } => {
                if let Some(x) = self.incarnations.get_mut(&(trial, incarnation)) {
                    x.early_exit = Some(reason);
                }
            }
            TrialReport::Reached {
                trial,
                incarnation,
                steps,
            } => {
                let key = (trial, incarnation);
                if let Some(x) = self.incarnations.get_mut(&key) {
                    x.reached = Some(steps);
                }
                if !self.proposals.unsettled(key) {
                    self.answer_reached(node, key, out);
                }
            }
            TrialReport::Exited {
                trial,
                incarnation,
                exit,
            } => self.exited((trial, incarnation), exit, out),
        }
    }

    fn on_launched(&mut self, trial: TrialId, incarnation: u64, out: &mut Outs) {
        let key = (trial, incarnation);
        let Some(x) = self.incarnations.get_mut(&key) else {
            // Dropped while it was starting: it must not run.
            act(out, Action::Kill { trial, incarnation });
            return;
        };
        x.phase = Phase::Running;
        let (silent, killed, asked) = (x.silent, x.killed, x.asked_to_stop);
        if silent {
            act(out, Action::Kill { trial, incarnation });
            return;
        }
        self.propose_own(Command::TrialStarted { trial, incarnation }, out);
        if killed {
            self.terminate(key, out);
        } else if asked {
            act(out, Action::Preempt { trial, incarnation });
        }
    }

    /// Tells an incarnation that trained to its target whether to go on: to the
    /// trial's target as the state has it now (the searcher may have raised it
    /// when the validation at that target applied), or not, when it is stale,
    /// asked to stop or pause, or done.
    pub(crate) fn answer_reached(&mut self, node: &Node, key: (TrialId, u64), out: &mut Outs) {
        let Some(x) = self.incarnations.get_mut(&key) else {
            return;
        };
        let Some(steps) = x.reached.take() else {
            return;
        };
        let target = node
            .state()
            .trials
            .get(&key.0)
            .filter(|t| t.incarnation == key.1 && t.is_placed() && t.pending == Pending::None)
            .and_then(|t| t.target)
            .filter(|t| *t > steps && !x.asked_to_stop && !x.killed);
        if let Some(t) = target {
            x.spec.target = Some(t);
        }
        act(
            out,
            Action::Proceed {
                trial: key.0,
                incarnation: key.1,
                target,
            },
        );
    }

    /// The process ended: classify and report (an error on GPUs first asks
    /// NVML about them).
    fn exited(&mut self, key: (TrialId, u64), exit: ProcessExit, out: &mut Outs) {
        let slots = self.slots.release(key);
        let Some(x) = self.incarnations.remove(&key) else {
            return;
        };
        if x.silent {
            return;
        }
        let outcome = classify(&x, &exit);
        if let TrialOutcome::Errored { message, exit_code } = &outcome {
            note(
                out,
                format!(
                    "trial {} incarnation {} failed ({exit_code:?}): {message}",
                    key.0, key.1
                ),
            );
            if self.slots.are_gpus() && !slots.is_empty() {
                self.hold_exit_for_gpu_check(key, slots, outcome, out);
                return;
            }
        }
        self.report_exit(key, outcome, out);
    }

    /// Proposes the incarnation's exit (after the metrics it reported).
    pub(crate) fn report_exit(
        &mut self,
        key: (TrialId, u64),
        outcome: TrialOutcome,
        out: &mut Outs,
    ) {
        self.propose_own(
            Command::TrialExited {
                trial: key.0,
                incarnation: key.1,
                outcome,
            },
            out,
        );
    }
}

/// How an exit is classified: the code's own invalid-hyperparameters exit; a
/// clean exit, or death by a signal, after this node asked it to stop (or the
/// state killed it) is a stop; a clean exit otherwise completes (the state
/// requeues a trial that completed short of its target); anything else is an
/// error, with the signal and the last lines it printed.
pub(crate) fn classify(x: &Incarnation, exit: &ProcessExit) -> TrialOutcome {
    let stopped = x.asked_to_stop || x.killed;
    match (x.early_exit, exit.code) {
        (Some(EarlyExit::InvalidHyperparameters), _) => TrialOutcome::InvalidHyperparameters,
        (_, Some(0)) if stopped => TrialOutcome::Stopped,
        (_, Some(0)) => TrialOutcome::Completed,
        (_, None) if stopped => TrialOutcome::Stopped,
        _ => TrialOutcome::Errored {
            message: match exit.signal {
                Some(s) => format!("killed by signal {s}\n{}", exit.last_lines.join("\n")),
                None => exit.last_lines.join("\n"),
            },
            exit_code: exit.code,
        },
    }
}
