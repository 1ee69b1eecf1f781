//! Draining and leaving. A node that drains proposes `NodeDraining` for itself:
//! it gets no new work and its trials checkpoint, stop and move. A node that
//! leaves (a graceful stop) drains first, waits until nothing of its own is in
//! flight (or `LEAVE_DRAIN_MS` passed), then asks to be removed from the Raft
//! group and stops once that applied (or `LEAVE_REMOVE_MS` passed).

use resolute_core::command::{Command, ProposalId, Reply};
use resolute_core::{Node, NodeError};

use crate::agent::{act, note, Agent, Out, Outs};
use crate::io::Action;

/// Longest a leaving node waits for its trials to checkpoint and move.
pub const LEAVE_DRAIN_MS: u64 = 30_000;
/// Longest a leaving node waits for its removal from the group to apply.
pub const LEAVE_REMOVE_MS: u64 = 5_000;

/// Where a graceful stop is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leaving {
    /// Not leaving.
    #[default]
    Staying,
    /// Drained; waiting for its trials to move (until the deadline).
    Draining { until_ms: u64 },
    /// Asked to be removed (proposal `id`), until the deadline.
    Removing { id: ProposalId, until_ms: u64 },
    /// Out of the group.
    Left,
}

impl Leaving {
    pub(crate) fn owns(&self, id: ProposalId) -> bool {
        matches!(self, Leaving::Removing { id: mine, .. } if *mine == id)
    }
}

impl Agent {
    /// Proposes this node's drain.
    pub(crate) fn drain(&mut self, out: &mut Outs) {
        let node = self.cfg.node;
        self.propose_own(Command::NodeDraining { node }, out);
    }

    /// Begins a graceful stop.
    pub(crate) fn begin_leaving(&mut self, now_ms: u64, out: &mut Outs) {
        self.now_ms = now_ms;
        if self.leave == Leaving::Staying {
            self.leave = Leaving::Draining {
                until_ms: now_ms + LEAVE_DRAIN_MS,
            };
            note(out, "leaving: draining first".into());
            self.drain(out);
        }
    }

    /// Moves a graceful stop on (every tick).
    pub(crate) fn continue_leaving(&mut self, node: &Node, out: &mut Outs) {
        match self.leave {
            Leaving::Draining { until_ms } => {
                let me = self.cfg.node;
                let placed_here = node
                    .state()
                    .live_trial_entries()
                    .any(|(_, t)| t.is_placed_on(me));
                let busy = placed_here || self.busy();
                if busy && self.now_ms < until_ms {
                    return;
                }
                let id = self.proposals.next_id();
                self.leave = Leaving::Removing {
                    id,
                    until_ms: self.now_ms + LEAVE_REMOVE_MS,
                };
                out.push(Out::Leave { id });
            }
            Leaving::Removing { until_ms, .. } if self.now_ms >= until_ms => {
                self.left(out);
            }
            _ => {}
        }
    }

    /// The answer to the removal.
    pub(crate) fn on_leave_reply(
        &mut self,
        _node: &Node,
        result: Result<Reply, NodeError>,
        out: &mut Outs,
    ) {
        if result.is_ok() {
            self.left(out);
        }
    }

    /// Out of the group: whatever still runs here is killed.
    fn left(&mut self, out: &mut Outs) {
        if self.leave == Leaving::Left {
            return;
        }
        self.leave = Leaving::Left;
        self.stop_all(out);
        act(out, Action::Left);
    }
}
