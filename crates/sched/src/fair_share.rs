//! Determined's `fair_share` policy, ported.

use std::collections::BTreeMap;

use crate::{Decision, FreeSlots, Group, GroupId, Node, Task};

/// A group's standing during one scheduling pass.
#[derive(Debug, Clone)]
struct GroupState {
    id: GroupId,
    weight: f64,
    order: u64,
    disabled: bool,
    /// Slots wanted (running + pending), capped by `max_slots`.
    demand: u32,
    /// Slots held now.
    active: u32,
    /// Slots held by non-preemptible work (offered first).
    presubscribed: u32,
    offered: u32,
    pending: Vec<usize>,
    running: Vec<usize>,
    /// Slots of the smallest pending trial.
    smallest_pending: Option<u32>,
}

/// One fair-share pass over `tasks` (in submission order) on `nodes`.
pub fn schedule(groups: &[Group], tasks: &[Task], nodes: &[Node]) -> Decision {
    let capacity: u32 = nodes.iter().map(|n| n.slots).sum();
    let mut free = FreeSlots::new(
        nodes,
        tasks
            .iter()
            .filter_map(|t| t.running_on.map(|n| (n, t.slots))),
    );
    let largest_node = nodes.iter().map(|n| n.slots).max().unwrap_or(0);
    let mut states = group_states(groups, tasks, capacity, largest_node);
    allocate_offers(&mut states, capacity);
    assign(&states, tasks, &mut free)
}

fn group_states(
    groups: &[Group],
    tasks: &[Task],
    capacity: u32,
    largest_node: u32,
) -> Vec<GroupState> {
    let mut states: Vec<GroupState> = Vec::new();
    let by_id: BTreeMap<GroupId, &Group> = groups.iter().map(|g| (g.id, g)).collect();
    let mut index: BTreeMap<GroupId, usize> = BTreeMap::new();
    for (i, t) in tasks.iter().enumerate() {
        // Work that can never fit is left out, so it cannot block others.
        if t.slots == 0 || t.slots > capacity || (t.running_on.is_none() && t.slots > largest_node)
        {
            continue;
        }
        let g = by_id.get(&t.group).copied();
        let at = *index.entry(t.group).or_insert_with(|| {
            states.push(GroupState {
                id: t.group,
                weight: g.map_or(1.0, |g| g.weight),
                order: g.map_or(u64::MAX, |g| g.order),
                disabled: false,
                demand: 0,
                active: 0,
                presubscribed: 0,
                offered: 0,
                pending: Vec::new(),
                running: Vec::new(),
                smallest_pending: None,
            });
            states.len() - 1
        });
        let s = &mut states[at];
        s.demand += t.slots;
        if t.running_on.is_some() {
            if !t.preemptible {
                s.presubscribed += t.slots;
            }
            s.active += t.slots;
            s.running.push(i);
        } else {
            s.pending.push(i);
            s.smallest_pending = Some(s.smallest_pending.map_or(t.slots, |m| m.min(t.slots)));
        }
    }
    for s in &mut states {
        if let Some(max) = by_id.get(&s.id).and_then(|g| g.max_slots) {
            s.demand = s.demand.min(max);
        }
    }
    states
}

fn total_weight(states: &[GroupState]) -> f64 {
    states
        .iter()
        .filter(|s| !s.disabled && s.offered < s.demand)
        .map(|s| s.weight)
        .sum()
}

/// Max-min progressive filling: each round offers every unsatisfied group its
/// weighted share of what was left at the round's start (at least one slot).
fn allocate_offers(states: &mut [GroupState], mut capacity: u32) {
    let mut preoffers: BTreeMap<GroupId, u32> = BTreeMap::new();
    for s in states.iter_mut().filter(|s| s.presubscribed > 0) {
        s.offered = s.presubscribed;
        preoffers.insert(s.id, s.presubscribed);
        capacity = capacity.saturating_sub(s.presubscribed);
    }
    // Smallest demand first (ties: earliest submitted).
    states.sort_by(|a, b| a.demand.cmp(&b.demand).then(a.order.cmp(&b.order)));
    // Deadlock breaking looks at the newest groups first.
    let mut by_time: Vec<usize> = (0..states.len()).collect();
    by_time.sort_by(|a, b| states[*b].order.cmp(&states[*a].order));
    let mut weight = total_weight(states);
    let mut left = states.len();
    // Every round satisfies or disables a group, or stops: at most 2n rounds.
    for _ in 0..=2 * states.len() + 1 {
        if left == 0 {
            return;
        }
        let mut progress = false;
        let start = capacity;
        for s in states.iter_mut() {
            if s.disabled || s.offered == s.demand {
                continue;
            }
            let share =
                ((f64::from(start) * s.weight / weight.max(f64::MIN_POSITIVE)) as u32).max(1);
            progress = true;
            let mut offer = share.min(capacity).min(s.demand - s.offered);
            let pre = preoffers.entry(s.id).or_default();
            // Slots already offered for non-preemptible work count first.
            if *pre > 0 {
                if *pre >= offer {
                    *pre -= offer;
                    offer = 0;
                } else {
                    offer -= *pre;
                    *pre = 0;
                }
            }
            s.offered += offer;
            capacity -= offer;
            if s.offered == s.demand {
                left -= 1;
            }
        }
        weight = total_weight(states);
        if capacity == 0 {
            // A group offered less than its smallest pending gang can never use its
            // offer: disable it and hand its slots back (newest group first).
            let victim = by_time.iter().copied().find(|i| {
                let s = &states[*i];
                !s.disabled
                    && s.offered != s.demand
                    && s.smallest_pending.is_some_and(|m| m > s.offered)
            });
            let Some(v) = victim else { return };
            capacity += states[v].offered;
            states[v].offered = 0;
            states[v].disabled = true;
            left -= 1;
            weight = total_weight(states);
        } else if !progress {
            return;
        }
    }
}

/// Releases preemptible trials of groups above their offer; places pending trials of
/// groups below it (best fit: the node with the fewest free slots that fits).
fn assign(states: &[GroupState], tasks: &[Task], free: &mut FreeSlots) -> Decision {
    let mut d = Decision::default();
    let mut by_order: Vec<&GroupState> = states.iter().collect();
    by_order.sort_by_key(|s| s.order);
    for s in by_order {
        if s.active > s.offered {
            let mut active = s.active;
            for &i in &s.running {
                if tasks[i].preemptible {
                    d.release.push(tasks[i].id);
                    active -= tasks[i].slots;
                    if active <= s.offered {
                        break;
                    }
                }
            }
        } else if s.active < s.offered {
            let mut room = s.offered - s.active;
            for &i in &s.pending {
                let t = &tasks[i];
                if t.slots > room {
                    continue;
                }
                if let Some(n) = free.best_fit(t.slots) {
                    free.adjust(n, -i64::from(t.slots));
                    d.assign.push((t.id, n));
                    room -= t.slots;
                }
            }
        }
    }
    d
}
