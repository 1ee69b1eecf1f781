//! The leader's care of the membership: who is alive (leases and disconnect
//! grace), who is declared lost or alive again, who becomes a voter; and a
//! node's own fence when it loses its quorum.

use super::*;

impl Node {
    /// A node that cannot reach a quorum for longer than its lease stops its trials:
    /// by then the leader has declared it lost and requeued them elsewhere.
    pub(super) fn fence(&mut self, out: &mut Vec<Output>) {
        if self.is_leader() {
            // check_quorum makes a leader without a quorum step down.
            self.last_quorum_ms = Some(self.now_ms);
        }
        // A node that just started gets a full lease to find the leader.
        let since = *self.last_quorum_ms.get_or_insert(self.now_ms);
        let silent = self.now_ms.saturating_sub(since) > self.cfg.lease_timeout_ms;
        if silent && !self.fenced && self.is_member(self.cfg.id) {
            // Only now look at the trials (this runs every tick on every node).
            let me = self.cfg.id;
            let mine: Vec<(TrialId, u64)> = self
                .state
                .trials
                .iter()
                .filter(|(_, t)| t.is_placed_on(me))
                .map(|(id, t)| (*id, t.incarnation))
                .collect();
            self.fenced = true;
            if !mine.is_empty() {
                self.fenced_trials = mine;
                out.push(Output::Effect(Effect::StopAllTrials));
            }
        } else if !silent && self.fenced {
            // Contact is back: tell the cluster that the stopped trials are gone
            // (a preemption: it does not count toward max_restarts). Reports for
            // trials that were reassigned meanwhile are rejected as stale.
            self.fenced = false;
            for (trial, incarnation) in std::mem::take(&mut self.fenced_trials) {
                let id = self.internal_id();
                let command = Command::TrialExited {
                    trial,
                    incarnation,
                    outcome: crate::command::TrialOutcome::Preempted,
                };
                self.propose(id, self.cfg.id, None, command, out);
            }
        }
    }

    pub(super) fn alive(&self, node: NodeId) -> bool {
        if node == self.cfg.id {
            return true;
        }
        let Some(seen) = self.last_seen.get(&node).copied() else {
            return false;
        };
        // Gone since its connection closed, and the grace has passed.
        let grace = self.cfg.disconnect_grace_ms.min(self.cfg.lease_timeout_ms);
        let gone = self
            .disconnected_at
            .get(&node)
            .is_some_and(|d| seen <= *d && self.now_ms.saturating_sub(*d) > grace);
        !gone && self.now_ms.saturating_sub(seen) <= self.cfg.lease_timeout_ms
    }

    pub(super) fn maintain_membership(&mut self) {
        if self.raw.raft.has_pending_conf() {
            return;
        }
        let cs = self.raw.store().conf_state().clone();
        if !cs.voters_outgoing.is_empty() {
            return; // Still in a joint configuration.
        }
        // An admin's removal goes first (`Command::NodeRemoved`).
        let removed = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .find(|n| self.state.is_removed(**n))
            .copied();
        if let Some(node) = removed {
            self.remove_member(node);
            return;
        }
        let site = |n: &NodeId| {
            self.state
                .nodes
                .get(n)
                .map(|r| r.info.site.clone())
                .unwrap_or_default()
        };
        let voter_sites: BTreeSet<String> = cs
            .voters
            .iter()
            .filter(|v| self.alive(**v))
            .map(site)
            .collect();
        // Prefer a learner on a site no live voter is on, then the lowest id.
        let candidate = cs
            .learners
            .iter()
            .filter(|l| self.alive(**l))
            .min_by_key(|l| (voter_sites.contains(&site(l)), **l))
            .copied();
        let expired = cs.voters.iter().find(|v| !self.alive(**v)).copied();
        let changes = match (expired, candidate) {
            // The silent voter becomes a learner (it catches up if it returns).
            (Some(old), Some(new)) => vec![
                single(old, ConfChangeType::AddLearnerNode),
                single(new, ConfChangeType::AddNode),
            ],
            (None, Some(new)) if cs.voters.len() < self.cfg.voters => {
                vec![single(new, ConfChangeType::AddNode)]
            }
            // Spread the voters: one of a crowded site's hands its vote to
            // a learner on a site that has none (each swap adds a site, so
            // this settles). The voters chosen first are those that joined
            // first, often one site's; a site that joins later must still get
            // its voter, or losing the first site loses the quorum.
            (None, Some(new)) if !voter_sites.contains(&site(&new)) => {
                match self.crowded_voter(&cs.voters, site) {
                    Some(old) => vec![
                        single(old, ConfChangeType::AddLearnerNode),
                        single(new, ConfChangeType::AddNode),
                    ],
                    None => return,
                }
            }
            _ => return,
        };
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.set_changes(changes.into());
        let _ = self.raw.propose_conf_change(Vec::new(), cc);
    }

    /// The highest live voter (never this node, the leader) that shares its
    /// site with another live voter: the one to give way to a learner on a
    /// site with no voter.
    fn crowded_voter(&self, voters: &[NodeId], site: impl Fn(&NodeId) -> String) -> Option<NodeId> {
        let mut per_site: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for v in voters.iter().filter(|v| self.alive(**v)) {
            per_site.entry(site(v)).or_default().push(*v);
        }
        per_site
            .values()
            .filter(|vs| vs.len() >= 2)
            .flatten()
            .filter(|v| **v != self.cfg.id)
            .max()
            .copied()
    }

    /// The leader declares nodes lost when their lease expires, and alive again when
    /// they heartbeat.
    pub(super) fn maintain_leases(&mut self, out: &mut Vec<Output>) {
        let mut proposals = Vec::new();
        for (node, record) in &self.state.nodes {
            let alive = self.alive(*node);
            if record.state == NodeState::Alive
                && !alive
                && !self.proposed.contains(&(*node, false))
            {
                proposals.push((*node, false));
            }
            if record.state == NodeState::Lost && alive && !self.proposed.contains(&(*node, true)) {
                proposals.push((*node, true));
            }
        }
        for (node, alive) in proposals {
            self.proposed.remove(&(node, !alive));
            self.proposed.insert((node, alive));
            let id = self.internal_id();
            let command = if alive {
                Command::NodeAlive { node }
            } else {
                Command::NodeLost { node }
            };
            self.propose(id, self.cfg.id, None, command, out);
        }
    }
}
