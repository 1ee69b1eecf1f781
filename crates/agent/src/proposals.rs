//! The node's own proposals (trial reports, capacity, copies): each is retried
//! with the same id until it applies, so that it applies exactly once however
//! often leaders change. Metrics are batched: one `Command::Metrics` per tick
//! carries every record reported since the last.

use std::collections::BTreeMap;

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId, Reply, TrialId};
use resolute_core::{Node, NodeError};

use crate::agent::{act, Agent, Out, Outs};
use crate::io::Action;

/// Delay before a proposal that found no leader (or timed out) is retried with
/// the same id.
pub const PROPOSAL_RETRY_MS: u64 = 300;

/// One own proposal not yet applied.
#[derive(Debug)]
struct Own {
    command: Command,
    /// When to propose it again (None: waiting for its answer).
    retry_at: Option<u64>,
}

/// The agent's proposals in flight.
#[derive(Debug)]
pub(crate) struct Proposals {
    next: u128,
    own: BTreeMap<ProposalId, Own>,
    /// Metric records waiting for the next batch.
    batch: Vec<MetricRecord>,
    /// Validation records per incarnation that have not applied yet (batched or
    /// proposed): a trial that reached its target waits for them.
    unsettled: BTreeMap<(TrialId, u64), u32>,
}

impl Proposals {
    pub(crate) fn new(base: u128) -> Proposals {
        Proposals {
            next: base,
            own: BTreeMap::new(),
            batch: Vec::new(),
            unsettled: BTreeMap::new(),
        }
    }

    pub(crate) fn next_id(&mut self) -> ProposalId {
        // The top bit stays clear: it marks `core`'s own internal proposals.
        self.next = self.next.wrapping_add(1) & !(1u128 << 127);
        ProposalId(self.next)
    }

    pub(crate) fn owns(&self, id: ProposalId) -> bool {
        self.own.contains_key(&id)
    }

    pub(crate) fn len(&self) -> usize {
        self.own.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.own.is_empty() && self.batch.is_empty()
    }

    /// Whether any own proposal in flight matches.
    pub(crate) fn any(&self, matches: impl Fn(&Command) -> bool) -> bool {
        self.own.values().any(|o| matches(&o.command))
    }

    /// Whether validation records of this incarnation are still to apply.
    pub(crate) fn unsettled(&self, key: (TrialId, u64)) -> bool {
        self.unsettled.get(&key).is_some_and(|n| *n > 0)
    }
}

impl Agent {
    /// Proposes `command` (after any batched metrics, which must apply first:
    /// a checkpoint or an exit follows the metrics reported before it).
    pub(crate) fn propose_own(&mut self, command: Command, out: &mut Outs) {
        self.flush_metrics(out);
        self.submit(command, out);
    }

    fn submit(&mut self, command: Command, out: &mut Outs) {
        let id = self.proposals.next_id();
        self.proposals.own.insert(
            id,
            Own {
                command: command.clone(),
                retry_at: None,
            },
        );
        out.push(Out::Propose { id, command });
    }

    /// Adds a metric record to the next batch.
    pub(crate) fn batch_metrics(&mut self, record: MetricRecord) {
        if record.kind == MetricKind::Validation {
            *self
                .proposals
                .unsettled
                .entry((record.trial, record.incarnation))
                .or_default() += 1;
        }
        self.proposals.batch.push(record);
    }

    /// Proposes the batched metric records as one command.
    pub(crate) fn flush_metrics(&mut self, out: &mut Outs) {
        if !self.proposals.batch.is_empty() {
            let records = std::mem::take(&mut self.proposals.batch);
            self.submit(Command::Metrics { records }, out);
        }
    }

    /// Proposes again, with the same ids, what failed and is due.
    pub(crate) fn retry_proposals(&mut self, out: &mut Outs) {
        let now = self.now_ms;
        for (id, own) in self.proposals.own.iter_mut() {
            if own.retry_at.is_some_and(|t| t <= now) {
                own.retry_at = None;
                out.push(Out::Propose {
                    id: *id,
                    command: own.command.clone(),
                });
            }
        }
    }

    /// The answer to one of the agent's proposals.
    pub(crate) fn on_reply(
        &mut self,
        now_ms: u64,
        node: &Node,
        id: ProposalId,
        result: Result<Reply, NodeError>,
        out: &mut Outs,
    ) {
        self.now_ms = now_ms;
        if self.leave.owns(id) {
            self.on_leave_reply(node, result, out);
            return;
        }
        let reply = match result {
            Ok(reply) => reply,
            Err(_) => {
                // No leader, refused on the way, or timed out (it may still
                // apply): the same id again later applies at most once.
                if let Some(own) = self.proposals.own.get_mut(&id) {
                    own.retry_at = Some(now_ms + PROPOSAL_RETRY_MS);
                }
                return;
            }
        };
        let Some(own) = self.proposals.own.remove(&id) else {
            return;
        };
        if let Command::Metrics { records } = &own.command {
            self.settle_validations(node, records, out);
        }
        // A checkpoint the log refused (its incarnation had ended first) or
        // whose record is gone (its copy arrived after a deletion) is nobody's:
        // its blob would stay here for ever.
        let unrecorded = match (&own.command, &reply) {
            (Command::CheckpointSaved { uuid, .. }, Reply::Rejected { .. })
            | (Command::CheckpointReplicated { uuid, .. }, Reply::Rejected { .. }) => {
                Some(uuid.clone())
            }
            _ => None,
        };
        if let Some(uuid) = unrecorded.filter(|u| !self.blob_in_use(node, u)) {
            self.have.remove(&uuid);
            act(out, Action::DeleteBlob { digest: uuid });
        }
        act(
            out,
            Action::Settled {
                command: own.command,
                reply,
            },
        );
    }

    /// Validation records applied: an incarnation that reached its target and
    /// waited for them learns whether to go on.
    fn settle_validations(&mut self, node: &Node, records: &[MetricRecord], out: &mut Outs) {
        let mut settled = Vec::new();
        for r in records.iter().filter(|r| r.kind == MetricKind::Validation) {
            let key = (r.trial, r.incarnation);
            if let Some(n) = self.proposals.unsettled.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.proposals.unsettled.remove(&key);
                    settled.push(key);
                }
            }
        }
        for key in settled {
            self.answer_reached(node, key, out);
        }
    }
}
