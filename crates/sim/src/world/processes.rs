//! Simulated training processes. A process starts when its node's agent
//! launches it, trains at its GPUs' speed along its experiment's learning curve,
//! reports validations and checkpoints to its node, and obeys what the agent
//! tells it: checkpoint and exit when preempted, a new target, go on or finish
//! at its target, die on SIGTERM or SIGKILL. Only the chief (node rank 0) of a
//! multi-node gang trains and reports; the other ranks hold their slots and
//! exit with it.

use std::collections::BTreeMap;

use resolute_agent::{Event, LaunchSpec, ProcessExit, TrialReport};
use resolute_core::command::{MetricKind, TrialId};
use resolute_types::config::ExperimentConfig;
use resolute_types::Value;

use super::{Occurrence, World};
use crate::curve::Curve;

/// What a process does once a checkpoint is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterCheckpoint {
    /// Keeps training (a periodic checkpoint).
    Continue,
    /// It is at its target: it asks whether to go on.
    Reach,
    /// It was asked to stop: it exits.
    Exit,
}

/// One process.
#[derive(Debug)]
pub(super) struct Process {
    pub(super) node: usize,
    epoch: u64,
    pub(super) trial: TrialId,
    pub(super) incarnation: u64,
    /// Slots it holds on its node (their indices).
    pub(super) gpus: Vec<usize>,
    /// Node rank 0: it trains and reports.
    chief: bool,
    rate: f64,
    units: u64,
    target: u64,
    seg_start_ms: u64,
    seg_units: u64,
    pub(super) started_ms: u64,
    train_start_ms: u64,
    next_validate: u64,
    next_checkpoint_ms: u64,
    last_checkpoint_ms: u64,
    /// Checkpointing on its way out.
    stopping: bool,
    /// At its target, waiting to hear whether to go on.
    waiting: bool,
    final_loss: f64,
    curve: usize,
    time_metric: String,
}

/// The processes, and the learning curves of the experiments they train.
#[derive(Debug, Default)]
pub(super) struct Processes {
    pub(super) by_key: BTreeMap<u64, Process>,
    next: u64,
    curves: Vec<(u64, ExperimentConfig, Curve)>,
}

impl World<'_> {
    fn curve_index(&mut self, node: usize, experiment: u64) -> Option<usize> {
        if let Some(i) = self
            .procs
            .curves
            .iter()
            .position(|(e, _, _)| *e == experiment)
        {
            return Some(i);
        }
        let config = self.nodes[node]
            .driver
            .as_ref()?
            .node()
            .state()
            .experiments
            .get(&experiment)?
            .config()?
            .clone();
        let max = config
            .searcher
            .method
            .budget()
            .map_or(self.sc.trials.default_length, |b| b.max_time);
        let curve = Curve::new(
            &config.hyperparameters,
            self.opts.seed ^ experiment.wrapping_mul(0x2545_f491_4f6c_dd1d),
            max as f64 / 4.0,
        );
        self.procs.curves.push((experiment, config, curve));
        Some(self.procs.curves.len() - 1)
    }

    fn find_process(&self, node: usize, trial: TrialId, incarnation: u64) -> Option<u64> {
        self.procs
            .by_key
            .iter()
            .find(|(_, p)| p.node == node && p.trial == trial && p.incarnation == incarnation)
            .map(|(k, _)| *k)
    }

    fn report_to(&mut self, node: usize, report: TrialReport) {
        if !self.nodes[node].down {
            self.step(node, Event::Trial(report));
        }
    }

    /// The agent launches an incarnation: its inputs are on this node's disk
    /// (the agent fetched them first) and its slots are free.
    pub(super) fn launch(&mut self, node: usize, spec: LaunchSpec) {
        let (trial, incarnation) = (spec.trial, spec.incarnation);
        if self.find_process(node, trial, incarnation).is_some() {
            return;
        }
        let Some(curve) = self.curve_index(node, spec.experiment) else {
            return;
        };
        let mut start_units = 0;
        let mut restore_ms = 0.0;
        if let Some(uuid) = &spec.latest_checkpoint {
            let state = self.nodes[node].driver.as_ref().map(|d| d.node().state());
            let Some(ck) = state.and_then(|s| s.checkpoints.get(uuid)).cloned() else {
                self.violation(format!(
                    "trial {trial} resumed from checkpoint {uuid}, which is not committed"
                ));
                return;
            };
            if !self.nodes[node].blobs.contains(uuid) {
                self.violation(format!(
                    "trial {trial} launched on {} without its checkpoint {uuid}",
                    self.nodes[node].name
                ));
                return;
            }
            start_units = ck.steps_completed;
            restore_ms = self.sc.trials.restore_s * 1000.0;
        }
        let (max, time_metric) = {
            let (_, config, _) = &self.procs.curves[curve];
            let b = config.searcher.method.budget();
            (
                b.as_ref()
                    .map_or(self.sc.trials.default_length, |b| b.max_time),
                b.map_or("batches".to_string(), |b| b.time_metric),
            )
        };
        let final_loss = {
            let (_, config, c) = &self.procs.curves[curve];
            c.final_loss(&config.hyperparameters, &spec.hparams)
        };
        let chief = spec.gang.as_ref().is_none_or(|g| g.group_rank == 0);
        let gang_slots = spec.gang.as_ref().map_or(spec.slots_here, |g| g.world_size);
        // The chief of a gang trains at the speed of all its slots.
        let rate =
            self.sc.trials.units_per_gpu_s * self.nodes[node].speed * f64::from(gang_slots.max(1))
                / 1000.0;
        let train_start = self.now + restore_ms as u64;
        let key = self.procs.next;
        self.procs.next += 1;
        let every = self.sc.trials.validate_every.max(1);
        self.procs.by_key.insert(
            key,
            Process {
                node,
                epoch: self.nodes[node].epoch,
                trial,
                incarnation,
                gpus: spec.slots.clone(),
                chief,
                rate,
                units: start_units,
                target: spec.target.unwrap_or(max).max(1),
                seg_start_ms: train_start,
                seg_units: start_units,
                started_ms: self.now,
                train_start_ms: train_start,
                next_validate: (start_units / every + 1) * every,
                next_checkpoint_ms: train_start + self.sc.trials.checkpoint_every_s * 1000,
                last_checkpoint_ms: train_start,
                stopping: false,
                waiting: false,
                final_loss,
                curve,
                time_metric,
            },
        );
        if chief {
            let site = self.sc.sites[self.nodes[node].site].name.clone();
            self.stats.trial_started(self.now, trial, &site);
            let name = self.nodes[node].name.clone();
            self.note(format!(
                "trial {trial}.{incarnation} starts on {name} at {start_units}"
            ));
        }
        self.report_to(node, TrialReport::Launched { trial, incarnation });
        if chief {
            self.reschedule(key);
        }
    }

    /// Brings a process's progress up to now.
    fn advance(&mut self, key: u64) {
        let now = self.now;
        if let Some(p) = self.procs.by_key.get_mut(&key) {
            if now > p.seg_start_ms && !p.waiting {
                let units = p.seg_units + ((now - p.seg_start_ms) as f64 * p.rate) as u64;
                p.units = units.min(p.target.max(p.seg_units));
            }
        }
    }

    /// Schedules the process's next interesting moment.
    fn reschedule(&mut self, key: u64) {
        self.advance(key);
        let Some(p) = self.procs.by_key.get_mut(&key) else {
            return;
        };
        if p.stopping || p.waiting || !p.chief {
            return;
        }
        p.seg_start_ms = p.seg_start_ms.max(self.now);
        p.seg_units = p.units;
        let goal = p.next_validate.min(p.target);
        let until_goal = if goal > p.units {
            ((goal - p.units) as f64 / p.rate).ceil() as u64
        } else {
            0
        };
        let at = (p.seg_start_ms + until_goal)
            .min(p.next_checkpoint_ms.max(p.seg_start_ms))
            .max(self.now + 1);
        self.schedule(at, Occurrence::TrialStep { process: key });
    }

    pub(super) fn trial_step(&mut self, key: u64) {
        self.advance(key);
        let Some(p) = self.procs.by_key.get(&key) else {
            return;
        };
        if p.stopping || p.waiting || self.nodes[p.node].epoch != p.epoch || self.nodes[p.node].down
        {
            return;
        }
        let (node, trial, incarnation, units, target) =
            (p.node, p.trial, p.incarnation, p.units, p.target);
        if units >= p.next_validate.min(target) {
            let (_, _, curve) = &self.procs.curves[p.curve];
            let loss = curve.loss(p.final_loss, units);
            let mut metrics = BTreeMap::new();
            metrics.insert("validation_loss".to_string(), Value::Float(loss));
            metrics.insert("loss".to_string(), Value::Float(loss));
            metrics.insert(p.time_metric.clone(), Value::Int(units as i64));
            let experiment = self.procs.curves[p.curve].0;
            self.stats.validated(experiment, loss);
            let every = self.sc.trials.validate_every.max(1);
            if let Some(p) = self.procs.by_key.get_mut(&key) {
                p.next_validate = (units / every + 1) * every;
            }
            self.report_to(
                node,
                TrialReport::Metrics {
                    trial,
                    incarnation,
                    kind: MetricKind::Validation,
                    steps_completed: units,
                    metrics,
                },
            );
        }
        if units >= target {
            // At its target: a checkpoint, then it asks whether to go on.
            if let Some(p) = self.procs.by_key.get_mut(&key) {
                p.waiting = true;
            }
            self.checkpoint_later(key, units, AfterCheckpoint::Reach);
            return;
        }
        let due = self
            .procs
            .by_key
            .get(&key)
            .is_some_and(|p| self.now >= p.next_checkpoint_ms);
        if due {
            if let Some(p) = self.procs.by_key.get_mut(&key) {
                p.next_checkpoint_ms = self.now + self.sc.trials.checkpoint_every_s * 1000;
            }
            self.checkpoint_later(key, units, AfterCheckpoint::Continue);
        }
        self.reschedule(key);
    }

    fn checkpoint_later(&mut self, key: u64, units: u64, then: AfterCheckpoint) {
        let at = self.now + (self.sc.trials.checkpoint_write_s * 1000.0) as u64;
        self.schedule(
            at,
            Occurrence::CheckpointDone {
                process: key,
                units,
                then,
            },
        );
    }

    pub(super) fn checkpoint_done(&mut self, key: u64, units: u64, then: AfterCheckpoint) {
        let Some(p) = self.procs.by_key.get(&key) else {
            return;
        };
        if self.nodes[p.node].epoch != p.epoch || self.nodes[p.node].down {
            return;
        }
        let (node, trial, incarnation) = (p.node, p.trial, p.incarnation);
        let uuid = format!("ck-{trial}-{incarnation}-{units}");
        let size = (self.sc.trials.checkpoint_mb * 1e6) as u64;
        self.nodes[node].blobs.insert(uuid.clone());
        // The whole gang's work up to here is safe.
        let now = self.now;
        for q in self
            .procs
            .by_key
            .values_mut()
            .filter(|q| q.trial == trial && q.incarnation == incarnation)
        {
            q.last_checkpoint_ms = now;
        }
        self.report_to(
            node,
            TrialReport::CheckpointSaved {
                trial,
                incarnation,
                uuid,
                steps_completed: units,
                size,
            },
        );
        match then {
            AfterCheckpoint::Continue => {}
            AfterCheckpoint::Reach => {
                let waiting = self.procs.by_key.get(&key).is_some_and(|p| p.waiting);
                if waiting {
                    self.report_to(
                        node,
                        TrialReport::Reached {
                            trial,
                            incarnation,
                            steps: units,
                        },
                    );
                }
            }
            AfterCheckpoint::Exit => self.exit_cleanly(key),
        }
    }

    /// Checkpoint, then exit.
    fn begin_exit(&mut self, key: u64) {
        self.advance(key);
        let Some(p) = self.procs.by_key.get_mut(&key) else {
            return;
        };
        if p.stopping {
            return;
        }
        p.stopping = true;
        let units = p.units;
        self.checkpoint_later(key, units, AfterCheckpoint::Exit);
    }

    /// The process exits with code 0, and the other ranks of its gang with it.
    fn exit_cleanly(&mut self, key: u64) {
        let Some(p) = self.procs.by_key.get(&key) else {
            return;
        };
        let (trial, incarnation) = (p.trial, p.incarnation);
        let gang: Vec<u64> = self
            .procs
            .by_key
            .iter()
            .filter(|(_, q)| q.trial == trial && q.incarnation == incarnation)
            .map(|(k, _)| *k)
            .collect();
        for k in gang {
            self.end_with(
                k,
                ProcessExit {
                    code: Some(0),
                    ..Default::default()
                },
                true,
            );
        }
    }

    /// Ends a process and tells its node how.
    fn end_with(&mut self, key: u64, exit: ProcessExit, clean: bool) {
        let Some(p) = self.procs.by_key.get(&key) else {
            return;
        };
        let (node, trial, incarnation) = (p.node, p.trial, p.incarnation);
        self.end_process(key, clean);
        self.report_to(
            node,
            TrialReport::Exited {
                trial,
                incarnation,
                exit,
            },
        );
    }

    /// The preemption signal: the chief checkpoints and exits (the other ranks
    /// exit with it).
    pub(super) fn preempt(&mut self, node: usize, trial: TrialId, incarnation: u64) {
        if let Some(key) = self.find_process(node, trial, incarnation) {
            let chief = self.procs.by_key.get(&key).is_some_and(|p| p.chief);
            if chief {
                self.begin_exit(key);
            }
        }
    }

    /// A new target for a running process.
    pub(super) fn retarget(&mut self, node: usize, trial: TrialId, incarnation: u64, target: u64) {
        if let Some(key) = self.find_process(node, trial, incarnation) {
            if let Some(p) = self.procs.by_key.get_mut(&key) {
                p.target = target.max(1);
            }
            self.reschedule(key);
        }
    }

    /// The answer to a process at its target: train on, or exit.
    pub(super) fn proceed(
        &mut self,
        node: usize,
        trial: TrialId,
        incarnation: u64,
        target: Option<u64>,
    ) {
        let Some(key) = self.find_process(node, trial, incarnation) else {
            return;
        };
        let Some(p) = self.procs.by_key.get_mut(&key) else {
            return;
        };
        if !p.waiting || p.stopping {
            return;
        }
        p.waiting = false;
        match target {
            Some(t) if t > p.units => {
                p.target = t;
                p.seg_start_ms = self.now;
                p.seg_units = p.units;
                self.reschedule(key);
            }
            // Its checkpoint at the target is written: it exits.
            _ => self.exit_cleanly(key),
        }
    }

    /// SIGTERM or SIGKILL: the process dies without a checkpoint.
    pub(super) fn signal_process(
        &mut self,
        node: usize,
        trial: TrialId,
        incarnation: u64,
        signal: i32,
    ) {
        if let Some(key) = self.find_process(node, trial, incarnation) {
            self.end_with(
                key,
                ProcessExit {
                    code: None,
                    signal: Some(signal),
                    last_lines: vec![format!("terminated by signal {signal}")],
                },
                false,
            );
        }
    }

    /// A process dies of a hardware fault (its GPU failed under it).
    pub(super) fn fail_process(&mut self, key: u64, why: &str) {
        if let Some(p) = self.procs.by_key.get(&key) {
            let site = &self.sc.sites[self.nodes[p.node].site].name;
            self.stats.interrupted(self.now, p.trial, site);
        }
        self.end_with(
            key,
            ProcessExit {
                code: Some(1),
                signal: None,
                last_lines: vec![why.to_string()],
            },
            false,
        );
    }

    /// Every process on `node` dies with it (crash): nothing reports.
    pub(super) fn kill_node_processes(&mut self, node: usize) {
        let procs: Vec<u64> = self
            .procs
            .by_key
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(k, _)| *k)
            .collect();
        for key in procs {
            if let Some(p) = self.procs.by_key.get(&key) {
                let site = &self.sc.sites[self.nodes[p.node].site].name;
                self.stats.interrupted(self.now, p.trial, site);
            }
            self.end_process(key, false);
        }
    }

    /// Removes a process and counts its GPU time: all of it useful when it
    /// ended cleanly, up to its last checkpoint otherwise.
    pub(super) fn end_process(&mut self, key: u64, clean: bool) {
        let Some(p) = self.procs.by_key.remove(&key) else {
            return;
        };
        let slots = p.gpus.len().max(1) as u32;
        let useful_until = if clean {
            self.now
        } else {
            p.last_checkpoint_ms.max(p.train_start_ms)
        };
        self.stats.ran(
            self.now,
            p.started_ms,
            p.train_start_ms,
            useful_until,
            slots,
        );
        let node_id = self.nodes[p.node].id;
        for g in &p.gpus {
            self.stats.span(
                p.trial,
                p.incarnation,
                p.started_ms,
                self.now,
                node_id,
                *g,
                clean,
                p.units,
            );
        }
    }

    /// Processes still running count until now (the report is due).
    pub(super) fn end_all_processes(&mut self) {
        let keys: Vec<u64> = self.procs.by_key.keys().copied().collect();
        for k in keys {
            self.end_process(k, true);
        }
    }
}
