//! Determined's `priority` policy: lower number first (1-99), FIFO within a
//! priority, optional preemption of lower priorities, and backfill of smaller
//! preemptible work into the gaps. Unlike Determined, a trial is never preempted
//! for a peer of the same priority (Determined compared queue positions there,
//! which let equal-priority jobs preempt each other), and never within its
//! protected time after starting ([`Task::protected`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Decision, Layout, Node, Placer, Task, TrialId};

/// Policy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Preempt lower-priority work for higher-priority work.
    pub preemption: bool,
}

/// One priority pass over one pool.
pub fn schedule(tasks: &[Task], nodes: &[Node], opts: Options) -> Decision {
    let mut placer = Placer::new(nodes, tasks.iter().map(|t| &t.running_on));
    let mut pending: BTreeMap<u8, Vec<&Task>> = BTreeMap::new();
    let mut running: BTreeMap<u8, Vec<&Task>> = BTreeMap::new();
    for t in tasks {
        let map = if t.is_running() {
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
        let mut placed: Vec<(&Task, Layout)> = Vec::new();
        let mut failed = Vec::new();
        for t in list {
            // Reserve the slots even if the start waits (see below).
            match placer.place(t) {
                Some(layout) => placed.push((*t, layout)),
                None => failed.push(*t),
            }
        }
        // Start nothing while higher-priority work waits for preemptions; below a
        // priority that could not be fully placed, only preemptible work is started
        // (backfill), since it can be taken back.
        if released.is_empty() {
            for (t, layout) in placed {
                if !backfilling || (opts.preemption && t.preemptible) {
                    decision.assign.push((t.id, layout));
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
            if placer.place(t).is_some() {
                // Room appeared through earlier preemptions: it starts next pass.
                continue;
            }
            if let Some((victims, local)) = preempt_for(t, priority, &running, &released, &placer) {
                placer = local;
                released.extend(victims);
            }
        }
    }
    decision.release = released.into_iter().collect();
    decision
}

/// Victims (strictly lower priority, releasable, lowest priority and newest first)
/// whose slots let `t` fit; and the free slots after placing `t`.
fn preempt_for(
    t: &Task,
    priority: u8,
    running: &BTreeMap<u8, Vec<&Task>>,
    released: &BTreeSet<TrialId>,
    placer: &Placer,
) -> Option<(Vec<TrialId>, Placer)> {
    let mut local = placer.clone();
    let mut victims = Vec::new();
    for (&p, list) in running.iter().rev() {
        if p <= priority {
            break;
        }
        for v in list.iter().rev() {
            if !v.releasable() || released.contains(&v.id) {
                continue;
            }
            local.give_back(&v.running_on);
            victims.push(v.id);
            if local.place(t).is_some() {
                return Some((victims, local));
            }
        }
    }
    None
}
