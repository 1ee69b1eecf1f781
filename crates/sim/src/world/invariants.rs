//! What must hold. After every step of a node: one leader per term, and every
//! replica applied the same log prefix. Sampled every few seconds: no node's
//! slots over-allocated (in the state, and no slot held by two processes of a
//! node), no half gangs, the scheduler's books consistent, a
//! committed checkpoint survives while a holder does, every live trial's latest
//! checkpoint gets its second copy. From every settled report: at most one live
//! incarnation of a trial commits progress; no honest entry refused for its
//! authority (users, roles, node and leader scope). And in the liveness phase, after
//! every fault healed: every experiment finishes within the bound.

use std::collections::{BTreeMap, VecDeque};

use resolute_core::command::{Command, Reply};
use resolute_core::state::{ClusterState, ModelRole, TrialState};
use resolute_core::NodeId;

use super::{mix, Occurrence, World, SAMPLE_EVERY_MS};

/// How long the last events are remembered for a violation report.
const RECENT_EVENTS: usize = 40;
/// How long a live trial's latest checkpoint may have a single copy while a
/// holder and another member are up.
const REPLICA_BOUND_MS: u64 = 600_000;

/// What the checkers remember.
#[derive(Debug, Default)]
pub(super) struct Checks {
    /// The newest incarnation of each trial that committed progress.
    accepted_incarnation: BTreeMap<u64, u64>,
    /// The leader of each term seen.
    leaders: BTreeMap<u64, NodeId>,
    /// The applied-log hash at each index (pruned below what every node applied).
    pub(super) log_hashes: BTreeMap<u64, u64>,
    pub(super) violations: Vec<String>,
    recent: VecDeque<String>,
    /// When each checkpoint was first seen as a live trial's latest (sampled).
    pub(super) latest_since: BTreeMap<String, u64>,
}

impl World<'_> {
    /// Remembers an event for a violation report.
    pub(super) fn note(&mut self, what: String) {
        let recent = &mut self.checks.recent;
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(format!("{:>10.3}s {what}", self.now as f64 / 1000.0));
    }

    /// Records a violation (with the last events) and ends the run.
    pub(super) fn violation(&mut self, what: String) {
        if self.checks.violations.len() < 20 {
            let recent: Vec<String> = self.checks.recent.iter().cloned().collect();
            self.checks.violations.push(format!(
                "at {:.3}s: {what}\n    last events:\n      {}",
                self.now as f64 / 1000.0,
                recent.join("\n      ")
            ));
        }
        self.finished = true;
    }

    /// Cheap invariants after every step of a node.
    pub(super) fn check_node(&mut self, node: usize) {
        let Some(n) = self.nodes[node].driver.as_ref().map(|d| d.node()) else {
            return;
        };
        let id = n.id();
        let term = n.leader_term();
        let (index, hash) = n.log_hash();
        if term > 0 {
            match self.checks.leaders.get(&term) {
                Some(other) if *other != id => {
                    let other = *other;
                    self.violation(format!(
                        "two leaders in term {term}: nodes {other} and {id}"
                    ));
                    return;
                }
                _ => {
                    self.checks.leaders.insert(term, id);
                }
            }
        }
        if index > 0 {
            match self.checks.log_hashes.get(&index) {
                Some(h) if *h != hash => {
                    self.violation(format!(
                        "node {id} applied a different log prefix at index {index}"
                    ));
                }
                Some(_) => {}
                None => {
                    self.checks.log_hashes.insert(index, hash);
                    self.digest = mix(self.digest, index ^ hash);
                }
            }
        }
    }

    /// One of a node's own proposals applied: metrics accepted from an
    /// incarnation older than one that committed progress break fencing.
    pub(super) fn settled(&mut self, command: Command, reply: Reply) {
        let Command::Metrics { records } = command else {
            return;
        };
        if reply != Reply::Ok {
            return;
        }
        for r in records {
            let seen = *self
                .checks
                .accepted_incarnation
                .entry(r.trial)
                .or_insert(r.incarnation);
            if seen > r.incarnation {
                self.violation(format!(
                    "trial {}: incarnation {} committed progress after incarnation {seen}",
                    r.trial, r.incarnation
                ));
                return;
            }
            self.checks
                .accepted_incarnation
                .insert(r.trial, r.incarnation);
        }
    }

    /// The most advanced live node's state.
    pub(super) fn freshest(&self) -> Option<&ClusterState> {
        self.nodes
            .iter()
            .filter(|n| !n.down)
            .filter_map(|n| n.driver.as_ref())
            .max_by_key(|d| d.node().applied())
            .map(|d| d.node().state())
    }

    pub(super) fn sample(&mut self) {
        if self.finished {
            return;
        }
        self.schedule(self.now + SAMPLE_EVERY_MS, Occurrence::Sample);
        let mut problems = Vec::new();
        let mut queued = Vec::new();
        let mut share_acc: BTreeMap<String, f64> = BTreeMap::new();
        let mut pool_acc: BTreeMap<usize, f64> = BTreeMap::new();
        let mut gangs = Vec::new();
        let mut done = None;
        let mut first_seen = Vec::new();
        if let Some(state) = self.freshest() {
            // Every simulated node and user is honest: nothing they propose is
            // refused for its authority (a refusal is a bug of the role,
            // node-scope or leader-scope checks, or of who proposes what).
            if state.forbidden > 0 {
                problems.push(format!(
                    "{} honest entries were refused for their authority",
                    state.forbidden
                ));
            }
            // No node's slots are over-allocated.
            let mut used: BTreeMap<NodeId, u32> = BTreeMap::new();
            // The scheduler's bookkeeping: every unfinished trial is live (it is
            // what placement looks at) and every queued trial has a queue clock
            // (checked every minute).
            let check_books = (self.now / SAMPLE_EVERY_MS) % 12 == 0;
            for (id, t) in state.trials.iter().filter(|_| check_books) {
                let done = matches!(t.state, TrialState::Done(_));
                if done == state.live_trials().contains(id) {
                    problems.push(format!("trial {id} ({:?}) live-set mismatch", t.state));
                }
                if t.state == TrialState::Queued && t.queued_ms.is_none() {
                    problems.push(format!("queued trial {id} has no queue clock"));
                }
            }
            for t in state.trials.values().filter(|t| t.is_placed()) {
                let total: u32 = t.layout.iter().map(|(_, s)| *s).sum();
                if total != t.slots.max(1) {
                    problems.push(format!(
                        "trial of {} slots placed as {:?} (half a gang)",
                        t.slots, t.layout
                    ));
                }
                for (node, slots) in &t.layout {
                    *used.entry(*node).or_default() += slots;
                    if let Some(&i) = self.by_id.get(node) {
                        *pool_acc.entry(self.nodes[i].group).or_default() +=
                            f64::from(*slots) * SAMPLE_EVERY_MS as f64;
                    }
                }
                if t.layout.len() > 1 {
                    gangs.push((t.experiment, t.request_id.0));
                }
            }
            for (node, u) in &used {
                let slots = state.nodes.get(node).map_or(0, |n| n.info.slots);
                // After a GPU failure the node holds more than its new capacity
                // until the trials it stopped have exited; those are the only
                // excess allowed.
                let shrunk = self
                    .by_id
                    .get(node)
                    .is_some_and(|i| self.nodes[*i].gpu_failed.iter().any(|f| *f));
                let staying: u32 = state
                    .trials
                    .values()
                    .filter(|t| shrunk && t.is_placed() && !t.preempting)
                    .flat_map(|t| t.layout.iter())
                    .filter(|(n, _)| n == node)
                    .map(|(_, s)| *s)
                    .sum();
                let over = if shrunk { staying > slots } else { *u > slots };
                if over {
                    problems.push(format!("node {node} has {u} slots allocated of {slots}"));
                }
            }
            // A committed checkpoint survives while a holder does (checked every
            // minute: blobs only disappear with a whole disk).
            let check_blobs = (self.now / SAMPLE_EVERY_MS) % 12 == 0;
            for (uuid, ck) in state.checkpoints.iter().filter(|_| check_blobs) {
                for h in &ck.holders {
                    if let Some(&i) = self.by_id.get(h) {
                        let n = &self.nodes[i];
                        if !n.gone && !n.down && !n.blobs.contains(uuid) {
                            problems.push(format!(
                                "checkpoint {uuid} is committed on node {h}, which lost it"
                            ));
                        }
                    }
                }
            }
            // Every live trial's latest checkpoint gets a second copy on another
            // node once it has been the latest for a while, as long as one of its
            // holders is up to copy from and another member is up to copy to (a
            // single copy dies with its disk).
            if check_blobs {
                for (id, t) in state.live_trial_entries() {
                    let Some(uuid) = &t.latest_checkpoint else {
                        continue;
                    };
                    let Some(ck) = state.checkpoints.get(uuid) else {
                        continue;
                    };
                    let Some(&since) = self.checks.latest_since.get(uuid) else {
                        first_seen.push(uuid.clone());
                        continue;
                    };
                    let up = |n: &NodeId| {
                        self.by_id
                            .get(n)
                            .is_some_and(|i| !self.nodes[*i].down && !self.nodes[*i].gone)
                    };
                    let a_holder_is_up = ck.holders.iter().any(up);
                    let up_members = state.nodes.keys().filter(|n| up(n)).count();
                    if ck.holders.len() < 2
                        && a_holder_is_up
                        && up_members >= 2
                        && self.now.saturating_sub(since) > REPLICA_BOUND_MS
                    {
                        problems.push(format!(
                            "trial {id}: its latest checkpoint {uuid} has one copy after {} s",
                            (self.now - since) / 1000
                        ));
                    }
                }
            }
            // GPU time per group while every group has work waiting in the queue:
            // then each wants more than it holds, and max-min fair share promises
            // each its weighted share. (A group whose demand is below its share
            // leaves the rest to others, which is fair and not counted.)
            let group_of = |exp: u64| {
                state
                    .experiments
                    .get(&exp)
                    .and_then(|e| e.config())
                    .map(|c| c.workspace.clone())
                    .filter(|w| !w.is_empty())
                    .unwrap_or_else(|| format!("experiment {exp}"))
            };
            let mut waiting: BTreeMap<String, u32> = BTreeMap::new();
            let mut running: BTreeMap<String, u32> = BTreeMap::new();
            for (exp, e) in &state.experiments {
                if !e.state.is_finished() {
                    waiting.entry(group_of(*exp)).or_default();
                }
            }
            for t in state.trials.values() {
                let g = group_of(t.experiment);
                match t.state {
                    TrialState::Queued => *waiting.entry(g).or_default() += 1,
                    TrialState::Assigned { .. } | TrialState::Running { .. } => {
                        *running.entry(g).or_default() += t.slots.max(1);
                    }
                    _ => {}
                }
            }
            if waiting.len() > 1 && waiting.values().all(|d| *d > 0) {
                for (g, slots) in running {
                    *share_acc.entry(g).or_default() += f64::from(slots) * SAMPLE_EVERY_MS as f64;
                }
            }
            queued = state
                .trials
                .iter()
                .filter(|(_, t)| t.state == TrialState::Queued)
                .map(|(id, _)| *id)
                .collect();
            let finished = state
                .experiments
                .values()
                .filter(|e| e.state.is_finished())
                .count() as u64;
            done = Some((finished, state.experiments.len() as u64));
        }
        // No two processes of a node hold the same slot (the agent's slot table).
        let mut held: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        for p in self.procs.by_key.values() {
            for g in &p.gpus {
                if let Some(other) = held.insert((p.node, *g), p.trial) {
                    problems.push(format!(
                        "{}: slot {g} held by trials {other} and {}",
                        self.nodes[p.node].name, p.trial
                    ));
                }
            }
        }
        for (p, ms) in pool_acc {
            *self.stats.pool_gpu_ms.entry(p).or_default() += ms;
        }
        self.stats.multi_node_placements.extend(gangs);
        for (g, ms) in share_acc {
            *self.stats.group_gpu_ms.entry(g).or_default() += ms;
        }
        for p in problems {
            self.violation(p);
        }
        for t in queued {
            self.stats.queued_since.entry(t).or_insert(self.now);
        }
        for uuid in first_seen {
            self.checks.latest_since.insert(uuid, self.now);
        }
        // Prune the log-hash map below what every live node has applied.
        let floor = self
            .nodes
            .iter()
            .filter_map(|n| n.driver.as_ref())
            .map(|d| d.node().applied())
            .min()
            .unwrap_or(0);
        let keep = self.checks.log_hashes.split_off(&floor.saturating_sub(1));
        self.checks.log_hashes = keep;
        if !self.fault_phase {
            let deadline = (self.sc.duration_s + self.sc.liveness_bound_s) * 1000;
            let all_in = self.clients.all_answered()
                && self.clients.submitted == self.expected_submissions();
            if let Some((finished, total)) = done {
                let nobodys = self.blobs_in_no_record();
                if all_in && total >= self.clients.submitted && finished == total {
                    if nobodys.is_empty() {
                        self.finished = true;
                        return;
                    }
                    if self.now >= deadline {
                        for p in nobodys {
                            self.violation(format!(
                                "liveness: {p} {} s after every fault healed",
                                self.sc.liveness_bound_s
                            ));
                        }
                        return;
                    }
                }
                if self.now >= deadline {
                    let detail = self.unfinished_detail();
                    self.violation(format!("liveness: {} of {total} experiments unfinished {} s after every fault healed{detail}", total - finished, self.sc.liveness_bound_s));
                }
            } else if self.now >= deadline {
                self.violation("liveness: no node is up".into());
            }
        }
    }

    /// The blobs on live nodes' disks that no record names: each must be a
    /// checkpoint its node's state says it holds, or a model directory it
    /// keeps (`ClusterState::models_for`). A blob no record names is never released (a release goes to
    /// recorded holders only) and would fill the disk over the years; the
    /// agent's sweep deletes it, so the run is not over until none is left.
    /// Nodes with own proposals or incarnations in flight are left out: what
    /// they propose may still record a blob.
    fn blobs_in_no_record(&self) -> Vec<String> {
        let mut found = Vec::new();
        for n in self.nodes.iter().filter(|n| !n.down && !n.gone) {
            let Some(d) = n.driver.as_ref().filter(|d| !d.agent().busy()) else {
                continue;
            };
            let state = d.node().state();
            let models = state.models_for(n.id);
            for digest in &n.blobs {
                let named = match state.checkpoints.get(digest) {
                    Some(c) => c.holders.contains(&n.id),
                    None => models
                        .get(digest)
                        .is_some_and(|r| *r != ModelRole::KeptElsewhere),
                };
                if !named {
                    found.push(format!(
                        "{}: blob {digest} is on its disk and in no record",
                        n.name
                    ));
                }
            }
        }
        found
    }

    /// What the unfinished experiments' trials are doing (for a liveness report).
    fn unfinished_detail(&self) -> String {
        let Some(state) = self.freshest() else {
            return String::new();
        };
        let mut out = String::new();
        for (id, e) in &state.experiments {
            if e.state.is_finished() {
                continue;
            }
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for t in state.trials.values().filter(|t| t.experiment == *id) {
                let key = match &t.state {
                    TrialState::Done(o) => format!("done {o:?}"),
                    other => format!("{other:?} pending {:?}", t.pending),
                };
                *counts.entry(key).or_default() += 1;
            }
            out.push_str(&format!(
                "\n    experiment {id} ({:?}, progress {:.2}, last error {:?}): {counts:?}",
                e.state,
                e.progress(),
                e.last_error
            ));
        }
        for n in &self.nodes {
            if let Some(agent) = n.driver.as_ref().map(|d| d.agent()) {
                out.push_str(&format!("\n    {} agent: {}", n.name, agent.summary()));
            }
            if let Some(x) = n.driver.as_ref().map(|d| d.node()) {
                let (v, l) = x.membership();
                out.push_str(&format!("\n    {} (id {}): leader {} term {} applied {} committed {} voters {v:?} learners {l:?} snapshot {}", n.name, n.id, x.leader_id(), x.term(), x.applied(), x.committed(), x.snapshot_index()));
            }
        }
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.down)
            .map(|n| n.name.clone())
            .collect();
        out.push_str(&format!(
            "\n    live nodes: {live:?}, running processes: {}",
            self.procs.by_key.len()
        ));
        out
    }
}
