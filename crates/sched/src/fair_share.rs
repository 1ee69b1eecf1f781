//! Determined's `fair_share` policy, ported, with one level added above it: slots
//! are shared between teams first (an experiment's workspace), then between the
//! experiments of each team. A team's weight is the pool's setting for it, or else
//! the sum of its experiments' weights, which makes the two levels give the same
//! shares as Determined's flat policy unless team weights are set.

use std::collections::BTreeMap;

use crate::{Decision, Group, GroupId, Node, Placer, Task};

/// A group's (or a team's) standing during one scheduling pass.
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

impl GroupState {
    fn new(id: GroupId, weight: f64, order: u64) -> Self {
        GroupState {
            id,
            weight,
            order,
            disabled: false,
            demand: 0,
            active: 0,
            presubscribed: 0,
            offered: 0,
            pending: Vec::new(),
            running: Vec::new(),
            smallest_pending: None,
        }
    }
}

/// One fair-share pass over `tasks` (in submission order) on one pool's `nodes`.
/// `team_weights` overrides a team's weight (default: the sum of its groups').
pub fn schedule(
    groups: &[Group],
    team_weights: &BTreeMap<String, f64>,
    tasks: &[Task],
    nodes: &[Node],
) -> Decision {
    let mut placer = Placer::new(nodes, tasks.iter().map(|t| &t.running_on));
    let capacity = placer.capacity();
    let by_team = group_states(groups, tasks, capacity);
    // The team level: each team is one group whose demand is its groups' demand.
    let mut teams: Vec<GroupState> = by_team
        .iter()
        .enumerate()
        .map(|(i, (name, members))| {
            let sum: f64 = members.iter().map(|m| m.weight).sum();
            let weight = team_weights.get(name).copied().unwrap_or(sum);
            let order = members.iter().map(|m| m.order).min().unwrap_or(u64::MAX);
            let mut t = GroupState::new(i as u64, weight, order);
            for m in members {
                t.demand += m.demand;
                t.active += m.active;
                t.presubscribed += m.presubscribed;
                t.smallest_pending = match (t.smallest_pending, m.smallest_pending) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            t
        })
        .collect();
    allocate_offers(&mut teams, capacity);
    let mut states = Vec::new();
    for (i, (_, mut members)) in by_team.into_iter().enumerate() {
        let offered = teams
            .iter()
            .find(|t| t.id == i as u64)
            .map_or(0, |t| t.offered);
        allocate_offers(&mut members, offered);
        states.extend(members);
    }
    assign(&states, tasks, &mut placer)
}

/// The groups with work, by team.
fn group_states(
    groups: &[Group],
    tasks: &[Task],
    capacity: u32,
) -> BTreeMap<String, Vec<GroupState>> {
    let mut states: Vec<GroupState> = Vec::new();
    let by_id: BTreeMap<GroupId, &Group> = groups.iter().map(|g| (g.id, g)).collect();
    let mut index: BTreeMap<GroupId, usize> = BTreeMap::new();
    // Tasks come in runs of one group (a pass lists them in trial order), so the
    // group's index is looked up once per run.
    let mut last: Option<(GroupId, usize)> = None;
    for (i, t) in tasks.iter().enumerate() {
        // Work that can never fit is left out, so it cannot block others.
        if t.slots == 0 || t.slots > capacity {
            continue;
        }
        let at = match last {
            Some((group, at)) if group == t.group => at,
            _ => {
                let g = by_id.get(&t.group).copied();
                let at = *index.entry(t.group).or_insert_with(|| {
                    states.push(GroupState::new(
                        t.group,
                        g.map_or(1.0, |g| g.weight),
                        g.map_or(u64::MAX, |g| g.order),
                    ));
                    states.len() - 1
                });
                last = Some((t.group, at));
                at
            }
        };
        let s = &mut states[at];
        s.demand += t.slots;
        if t.is_running() {
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
    let mut by_team: BTreeMap<String, Vec<GroupState>> = BTreeMap::new();
    for mut s in states {
        let group = by_id.get(&s.id);
        if let Some(max) = group.and_then(|g| g.max_slots) {
            s.demand = s.demand.min(max);
        }
        let team = group.map(|g| g.team.clone()).unwrap_or_default();
        by_team.entry(team).or_default().push(s);
    }
    by_team
}

/// Weighted max-min fair offers: Determined's progressive filling made exact.
///
/// Every group is offered `clamp(level * weight, presubscribed, demand)` at the one
/// level where the offers add up to the capacity ("water filling"); the fractions
/// are rounded down and the slots left over go one each to the groups with the
/// largest fractions (ties: earliest submitted), so every group ends within one
/// slot of its weighted share. (Determined's rounds give every unsatisfied group at
/// least one slot per round, which can hand a light group twice its share.)
///
/// When the whole capacity is offered, a group offered less than its smallest
/// pending gang can never use its offer: the newest such group is disabled (offered
/// nothing) and the others share again (Determined's deadlock breaking).
fn allocate_offers(states: &mut [GroupState], capacity: u32) {
    let mut by_time: Vec<usize> = (0..states.len()).collect();
    by_time.sort_by(|a, b| {
        let (a, b) = (&states[*a], &states[*b]);
        b.order.cmp(&a.order).then(b.id.cmp(&a.id))
    });
    // Every round disables one group or ends: at most n + 1 rounds.
    for _ in 0..=states.len() {
        water_fill(states, capacity);
        let offered: u64 = states.iter().map(|s| u64::from(s.offered)).sum();
        if offered < u64::from(capacity) {
            return;
        }
        let victim = by_time.iter().copied().find(|i| {
            let s = &states[*i];
            !s.disabled
                && s.offered != s.demand
                && s.smallest_pending.is_some_and(|m| m > s.offered)
        });
        let Some(v) = victim else { return };
        states[v].disabled = true;
        states[v].offered = 0;
    }
}

/// Bisection steps for the fill level: far below one slot of precision for any
/// capacity that fits a `u32`.
const FILL_BISECTION_STEPS: u32 = 100;

/// One water-filling pass over the groups that are not disabled.
fn water_fill(states: &mut [GroupState], capacity: u32) {
    let live: Vec<usize> = (0..states.len()).filter(|i| !states[*i].disabled).collect();
    let bounds = |s: &GroupState| {
        let hi = f64::from(s.demand);
        (f64::from(s.presubscribed).min(hi), hi)
    };
    let weight = |s: &GroupState| s.weight.max(f64::MIN_POSITIVE);
    let fill = |level: f64, s: &GroupState| {
        let (lo, hi) = bounds(s);
        (level * weight(s)).clamp(lo, hi)
    };
    let total = |level: f64| live.iter().map(|i| fill(level, &states[*i])).sum::<f64>();
    let cap = f64::from(capacity);
    let mut low = 0.0;
    let mut high = live
        .iter()
        .map(|i| bounds(&states[*i]).1 / weight(&states[*i]))
        .fold(0.0, f64::max);
    if total(high) > cap {
        for _ in 0..FILL_BISECTION_STEPS {
            let mid = (low + high) / 2.0;
            if total(mid) > cap {
                high = mid;
            } else {
                low = mid;
            }
        }
    } else {
        low = high;
    }
    let shares: Vec<f64> = live.iter().map(|i| fill(low, &states[*i])).collect();
    let mut left = capacity;
    for (k, i) in live.iter().enumerate() {
        let s = &mut states[*i];
        s.offered = (shares[k].floor() as u32).min(s.demand);
        left = left.saturating_sub(s.offered);
    }
    // The slots left over: largest fractions first.
    let mut by_fraction: Vec<usize> = (0..live.len()).collect();
    by_fraction.sort_by(|a, b| {
        let fa = shares[*a] - shares[*a].floor();
        let fb = shares[*b] - shares[*b].floor();
        let (sa, sb) = (&states[live[*a]], &states[live[*b]]);
        fb.total_cmp(&fa)
            .then(sa.order.cmp(&sb.order))
            .then(sa.id.cmp(&sb.id))
    });
    while left > 0 {
        let mut gave = false;
        for k in &by_fraction {
            let s = &mut states[live[*k]];
            if left > 0 && s.offered < s.demand {
                s.offered += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
}

/// Releases preemptible trials of groups above their offer; places pending trials of
/// groups below it.
fn assign(states: &[GroupState], tasks: &[Task], placer: &mut Placer) -> Decision {
    let mut d = Decision::default();
    let mut by_order: Vec<&GroupState> = states.iter().collect();
    by_order.sort_by_key(|s| (s.order, s.id));
    for s in by_order {
        if s.active > s.offered {
            let mut active = s.active;
            for &i in &s.running {
                if tasks[i].releasable() {
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
                if let Some(layout) = placer.place(t) {
                    d.assign.push((t.id, layout));
                    room -= t.slots;
                }
            }
        }
    }
    d
}
