//! Determined's `priority` policy: lower number first (1-99), FIFO within a
//! priority, optional preemption of lower priorities, and backfill of smaller
//! preemptible work into the gaps. Unlike Determined, a trial is never preempted
//! for a peer of the same priority (Determined compared queue positions there,
//! which let equal-priority jobs preempt each other).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Decision, Node, NodeId, TrialId};

/// A trial as the priority policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PTask {
    /// Its id.
    pub id: TrialId,
    /// Slots it needs (on one node).
    pub slots: u32,
    /// 1 (first) to 99 (last).
    pub priority: u8,
    /// Queue position (submission order); earlier first within a priority.
    pub order: u64,
    /// Where it runs, if it does.
    pub running_on: Option<NodeId>,
    /// Whether it may be preempted.
    pub preemptible: bool,
}

/// Policy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Preempt lower-priority work for higher-priority work.
    pub preemption: bool,
}

/// The node with the fewest free slots that still fits `slots` (best fit).
fn best_fit(free: &BTreeMap<NodeId, u32>, slots: u32) -> Option<NodeId> {
    free.iter()
        .filter(|(_, f)| **f >= slots)
        .min_by_key(|(n, f)| (**f, **n))
        .map(|(n, _)| *n)
}

/// One priority pass.
pub fn schedule(tasks: &[PTask], nodes: &[Node], opts: Options) -> Decision {
    let mut free: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (n.id, n.slots)).collect();
    for t in tasks {
        if let Some(n) = t.running_on {
            if let Some(f) = free.get_mut(&n) {
                *f = f.saturating_sub(t.slots);
            }
        }
    }
    let mut pending: BTreeMap<u8, Vec<&PTask>> = BTreeMap::new();
    let mut running: BTreeMap<u8, Vec<&PTask>> = BTreeMap::new();
    for t in tasks {
        let map = if t.running_on.is_some() {
            &mut running
        } else {
            &mut pending
        };
        map.entry(t.priority).or_default().push(t);
    }
    for list in pending.values_mut().chain(running.values_mut()) {
        list.sort_by_key(|t| (t.order, t.id));
    }
    let mut decision = Decision::default();
    let mut released: BTreeSet<TrialId> = BTreeSet::new();
    let mut backfilling = false;
    for (&priority, list) in &pending {
        let mut placed = Vec::new();
        let mut failed = Vec::new();
        for t in list {
            match best_fit(&free, t.slots) {
                Some(n) => {
                    // Reserve the slots even if the start waits (see below).
                    *free.entry(n).or_default() -= t.slots;
                    placed.push((*t, n));
                }
                None => failed.push(*t),
            }
        }
        // Start nothing while higher-priority work waits for preemptions; below a
        // priority that could not be fully placed, only preemptible work is started
        // (backfill), since it can be taken back.
        if released.is_empty() {
            for (t, n) in placed {
                if !backfilling || (opts.preemption && t.preemptible) {
                    decision.assign.push((t.id, n));
                }
            }
        }
        if !failed.is_empty() {
            backfilling = true;
        }
        if !opts.preemption {
            continue;
        }
        for t in failed {
            if let Some(n) = best_fit(&free, t.slots) {
                // Room appeared through earlier preemptions: it starts next pass.
                *free.entry(n).or_default() -= t.slots;
                continue;
            }
            if let Some((victims, local)) = preempt_for(t, priority, &running, &released, &free) {
                free = local;
                released.extend(victims);
            }
        }
    }
    decision.release = released.into_iter().collect();
    decision
}

/// Victims (strictly lower priority, preemptible, lowest priority and newest first)
/// whose slots let `t` fit; and the slots after placing `t`.
fn preempt_for(
    t: &PTask,
    priority: u8,
    running: &BTreeMap<u8, Vec<&PTask>>,
    released: &BTreeSet<TrialId>,
    free: &BTreeMap<NodeId, u32>,
) -> Option<(Vec<TrialId>, BTreeMap<NodeId, u32>)> {
    let mut local = free.clone();
    let mut victims = Vec::new();
    for (&p, list) in running.iter().rev() {
        if p <= priority {
            break;
        }
        for v in list.iter().rev() {
            if !v.preemptible || released.contains(&v.id) {
                continue;
            }
            if let Some(n) = v.running_on {
                *local.entry(n).or_default() += v.slots;
            }
            victims.push(v.id);
            if let Some(n) = best_fit(&local, t.slots) {
                *local.entry(n).or_default() -= t.slots;
                return Some((victims, local));
            }
        }
    }
    None
}
