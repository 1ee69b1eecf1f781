//! GPU health turned into capacity: every `GPU_HEALTH_CHECK_MS` (and at once
//! when a trial on GPUs exits with an error) the shell asks NVML about this
//! node's GPU slots; a GPU that is gone or failing leaves the node's capacity,
//! one that recovers comes back, and the change is proposed as
//! `Command::NodeCapacity`, naming the trials on the failed GPUs so that they
//! are the ones that stop (only this node knows which slot is which). A trial
//! whose GPU failed under it is reported preempted, not errored: it goes back
//! to the queue without a restart charged.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::{Command, TrialId, TrialOutcome};
use resolute_core::Node;

use crate::agent::{act, note, Agent, Outs};
use crate::io::{Action, SlotHealth};

/// How often a node with GPUs asks NVML whether they are still healthy.
pub const GPU_HEALTH_CHECK_MS: u64 = 10_000;

/// An exit held back until NVML has been asked about the trial's GPUs.
#[derive(Debug)]
struct HeldExit {
    key: (TrialId, u64),
    slots: Vec<usize>,
    outcome: TrialOutcome,
}

/// The health checks of one node.
#[derive(Debug)]
pub(crate) struct GpuWatch {
    /// Whether the node has GPU slots at all.
    enabled: bool,
    /// When the next periodic check is due.
    check_at: u64,
    /// A check was asked for and not answered yet.
    in_flight: bool,
    /// Why each failed GPU failed, by uuid.
    failures: BTreeMap<String, String>,
    held: Vec<HeldExit>,
}

impl GpuWatch {
    pub(crate) fn new(enabled: bool, now_ms: u64) -> GpuWatch {
        GpuWatch {
            enabled,
            check_at: now_ms + GPU_HEALTH_CHECK_MS,
            in_flight: false,
            failures: BTreeMap::new(),
            held: Vec::new(),
        }
    }

    pub(crate) fn failures(&self) -> &BTreeMap<String, String> {
        &self.failures
    }
}

impl Agent {
    fn ask_gpus(&mut self, out: &mut Outs) {
        if !self.gpu.in_flight {
            self.gpu.in_flight = true;
            act(out, Action::CheckGpus);
        }
    }

    /// Asks NVML when the periodic check is due.
    pub(crate) fn check_gpus_when_due(&mut self, out: &mut Outs) {
        if self.gpu.enabled && self.now_ms >= self.gpu.check_at {
            self.ask_gpus(out);
        }
    }

    /// A trial on GPUs exited with an error: its exit waits for NVML's word on
    /// its GPUs.
    pub(crate) fn hold_exit_for_gpu_check(
        &mut self,
        key: (TrialId, u64),
        slots: Vec<usize>,
        outcome: TrialOutcome,
        out: &mut Outs,
    ) {
        self.gpu.held.push(HeldExit {
            key,
            slots,
            outcome,
        });
        self.ask_gpus(out);
    }

    /// NVML's answer.
    pub(crate) fn on_gpu_health(
        &mut self,
        now_ms: u64,
        node: &Node,
        health: Option<Vec<SlotHealth>>,
        out: &mut Outs,
    ) {
        self.now_ms = now_ms;
        self.gpu.in_flight = false;
        self.gpu.check_at = now_ms + GPU_HEALTH_CHECK_MS;
        let held = std::mem::take(&mut self.gpu.held);
        let Some(health) = health else {
            note(
                out,
                "GPU health check: NVML unavailable; capacity unchanged".into(),
            );
            for h in held {
                self.report_exit(h.key, h.outcome, out);
            }
            return;
        };
        let failed: BTreeMap<usize, String> = (0..self.slots.count() as usize)
            .filter_map(|i| match health.get(i) {
                Some(SlotHealth::Healthy) => None,
                Some(SlotHealth::Failed(why)) => Some((i, why.clone())),
                None => Some((i, "NVML no longer lists it".to_string())),
            })
            .collect();
        let failed_set: BTreeSet<usize> = failed.keys().copied().collect();
        let offered = self.slots.count().saturating_sub(failed_set.len() as u32);
        // The cluster's record can be stale too: a node that restarted after a
        // GPU came back registers what its probe found, while the state keeps the
        // capacity it proposed before.
        let me = self.cfg.node;
        let recorded = node.state().nodes.get(&me).map(|n| n.info.slots);
        let changed = failed_set != *self.slots.failed() || recorded.is_some_and(|r| r != offered);
        if changed {
            note(
                out,
                format!(
                    "GPU health changed: {offered} of {} GPUs healthy (was {}); failed: {:?}",
                    self.slots.count(),
                    self.slots.offered(),
                    failed.values().collect::<Vec<_>>()
                ),
            );
            self.gpu.failures = failed
                .iter()
                .filter_map(|(i, why)| {
                    self.slots
                        .gpu_uuids()
                        .get(*i)
                        .map(|u| (u.clone(), why.clone()))
                })
                .collect();
            let mut stop_first: Vec<TrialId> = self
                .slots
                .holders_of(&failed_set)
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            stop_first.extend(held.iter().map(|h| h.key.0));
            self.slots.set_failed(failed_set.clone());
            self.propose_own(
                Command::NodeCapacity {
                    node: me,
                    slots: offered,
                    stop_first,
                },
                out,
            );
        }
        for h in held {
            let outcome = if h.slots.iter().any(|s| failed_set.contains(s)) {
                note(
                    out,
                    format!(
                        "trial {} incarnation {}: its GPU failed under it; requeued, no restart charged",
                        h.key.0, h.key.1
                    ),
                );
                TrialOutcome::Preempted
            } else {
                h.outcome
            };
            self.report_exit(h.key, outcome, out);
        }
    }
}
