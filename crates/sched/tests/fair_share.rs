//! Determined's fair-share cases (`fair_share_test.go`), ported.

use std::collections::BTreeMap;

use resolute_sched::{fair_share, Decision, Group, Node, Task};

fn schedule(groups: &[Group], tasks: &[Task], nodes: &[Node]) -> Decision {
    fair_share::schedule(groups, &BTreeMap::new(), tasks, nodes)
}

fn group(id: u64, weight: f64, max_slots: Option<u32>) -> Group {
    Group {
        id,
        team: String::new(),
        weight,
        max_slots,
        order: id,
    }
}

fn task(id: u64, group: u64, slots: u32, running_on: Option<u64>) -> Task {
    Task {
        id,
        group,
        slots,
        running_on: running_on.map(|n| vec![(n, slots)]).unwrap_or_default(),
        preemptible: true,
        protected: false,
        may_burst: false,
        holders: Vec::new(),
        priority: 42,
        order: id,
    }
}

fn nodes(slots: &[u32]) -> Vec<Node> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| Node::owned(i as u64 + 1, *s))
        .collect()
}

fn assigned(d: &Decision) -> Vec<u64> {
    let mut v: Vec<u64> = d.assign.iter().map(|(t, _)| *t).collect();
    v.sort();
    v
}

fn released(d: &Decision) -> Vec<u64> {
    let mut v = d.release.clone();
    v.sort();
    v
}

#[test]
fn max_slots_caps_a_group() {
    let groups = [group(1, 1.0, Some(1)), group(2, 1.0, None)];
    let tasks: Vec<Task> = (1..=8)
        .map(|i| task(i, if i <= 4 { 1 } else { 2 }, 1, None))
        .collect();
    let d = schedule(&groups, &tasks, &nodes(&[4]));
    assert_eq!(assigned(&d), vec![1, 5, 6, 7]);
    assert!(d.release.is_empty());
}

#[test]
fn weights_10_to_30_on_8_slots() {
    let groups = [group(1, 10.0, Some(100)), group(2, 30.0, Some(100))];
    let tasks: Vec<Task> = (1..=10)
        .map(|i| task(i, if i <= 3 { 1 } else { 2 }, 1, None))
        .collect();
    let d = schedule(&groups, &tasks, &nodes(&[8]));
    assert_eq!(assigned(&d), vec![1, 2, 4, 5, 6, 7, 8, 9], "2 and 6 slots");
}

#[test]
fn multi_slot_tasks_fit_whole_nodes() {
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let tasks = [task(1, 1, 4, None), task(2, 2, 4, None)];
    let d = schedule(&groups, &tasks, &nodes(&[4, 4]));
    assert_eq!(assigned(&d), vec![1, 2]);
    assert!(d.assign.iter().all(|(_, l)| l.len() == 1));
    let mut where_: Vec<u64> = d.assign.iter().map(|(_, l)| l[0].0).collect();
    where_.sort();
    assert_eq!(where_, vec![1, 2], "one gang per node, never split");
}

#[test]
fn max_slots_releases_running_trials() {
    let groups = [group(1, 1.0, Some(2))];
    let tasks: Vec<Task> = (1..=4).map(|i| task(i, 1, 1, Some(1))).collect();
    let d = schedule(&groups, &tasks, &nodes(&[4]));
    assert!(d.assign.is_empty());
    assert_eq!(released(&d), vec![1, 2]);
}

#[test]
fn an_unfittable_pending_gang_waits() {
    let groups = [group(1, 1.0, Some(2))];
    let tasks = [
        task(1, 1, 2, None),
        task(2, 1, 1, Some(1)),
        task(3, 1, 1, Some(2)),
    ];
    let d = schedule(&groups, &tasks, &nodes(&[2, 2]));
    assert!(d.assign.is_empty() && d.release.is_empty(), "{d:?}");
}

#[test]
fn multi_slot_deadlock_is_broken() {
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let tasks = [task(1, 1, 2, None), task(2, 2, 2, None)];
    let d = schedule(&groups, &tasks, &nodes(&[2]));
    assert_eq!(
        assigned(&d),
        vec![1],
        "the older group gets the node; the newer waits"
    );
}

#[test]
fn a_task_bigger_than_the_cluster_does_not_block_others() {
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let tasks = [task(1, 1, 5, None), task(2, 2, 4, None)];
    let d = schedule(&groups, &tasks, &nodes(&[4]));
    assert_eq!(assigned(&d), vec![2]);
}

#[test]
fn active_tasks_keep_their_slots() {
    let groups = [
        group(1, 1.0, None),
        group(2, 1.0, None),
        group(3, 1.0, None),
        group(4, 1.0, None),
    ];
    let tasks = [
        task(1, 1, 3, None),
        task(2, 2, 1, None),
        task(3, 2, 1, Some(2)),
        task(4, 3, 4, None),
        task(5, 4, 1, None),
    ];
    let d = schedule(&groups, &tasks, &nodes(&[4, 3]));
    assert_eq!(assigned(&d), vec![1, 2, 5]);
    assert!(d.release.is_empty());
}

#[test]
fn preemptible_work_above_its_share_is_released() {
    // Two single-task groups on one slot: the over-allocation is undone.
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let tasks = [task(1, 1, 1, Some(1)), task(2, 2, 1, Some(1))];
    let d = schedule(&groups, &tasks, &nodes(&[1]));
    assert_eq!(d.release, vec![2], "{d:?}");
}

#[test]
fn an_over_allocated_big_task_is_released() {
    // Determined's TestFairShareNilgroup: each task its own group.
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let tasks = [task(1, 1, 4, Some(1)), task(2, 2, 1, Some(1))];
    let d = schedule(&groups, &tasks, &nodes(&[4]));
    assert!(d.assign.is_empty());
    assert_eq!(d.release, vec![1]);
}

#[test]
fn non_preemptible_work_is_honoured_in_either_order() {
    let groups = [group(1, 1.0, Some(2))];
    for flip in [false, true] {
        let mut a = task(1, 1, 1, Some(1));
        let mut b = task(2, 1, 1, Some(1));
        if flip {
            a.preemptible = false;
        } else {
            b.preemptible = false;
        }
        let d = schedule(&groups, &[a.clone(), b.clone()], &nodes(&[1]));
        let preemptible = if flip { 2 } else { 1 };
        assert_eq!(d.release, vec![preemptible]);
    }
}

#[test]
fn same_input_same_output_and_never_over_allocated() {
    let mut x: u64 = 0x1234_5678_9abc;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..300 {
        let ns = nodes(
            &(0..1 + next(6))
                .map(|_| 1 + next(8) as u32)
                .collect::<Vec<_>>(),
        );
        let groups: Vec<Group> = (1..=1 + next(5))
            .map(|g| {
                group(
                    g,
                    1.0 + next(4) as f64,
                    if next(3) == 0 {
                        Some(1 + next(6) as u32)
                    } else {
                        None
                    },
                )
            })
            .collect();
        let tasks: Vec<Task> = (1..=next(30))
            .map(|i| task(i, 1 + next(groups.len() as u64), 1 + next(4) as u32, None))
            .collect();
        let d1 = schedule(&groups, &tasks, &ns);
        let d2 = schedule(&groups, &tasks, &ns);
        assert_eq!(d1, d2);
        for n in &ns {
            let used: u32 = d1
                .assign
                .iter()
                .flat_map(|(_, l)| l.iter())
                .filter(|(at, _)| *at == n.id)
                .map(|(_, s)| *s)
                .sum();
            assert!(
                used <= n.slots,
                "node {} over-allocated: {used} of {}",
                n.id,
                n.slots
            );
        }
        for g in &groups {
            if let Some(max) = g.max_slots {
                let used: u32 = d1
                    .assign
                    .iter()
                    .filter_map(|(t, _)| tasks.iter().find(|x| x.id == *t))
                    .filter(|x| x.group == g.id)
                    .map(|x| x.slots)
                    .sum();
                assert!(used <= max, "group {} above max_slots", g.id);
            }
        }
    }
}

#[test]
fn with_demand_above_supply_each_group_gets_within_one_slot_of_its_share() {
    let mut x: u64 = 0x5eed_f00d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..300 {
        let ns = nodes(
            &(0..1 + next(8))
                .map(|_| 1 + next(8) as u32)
                .collect::<Vec<_>>(),
        );
        let capacity: u32 = ns.iter().map(|n| n.slots).sum();
        let groups: Vec<Group> = (1..=1 + next(5))
            .map(|g| group(g, 1.0 + next(9) as f64, None))
            .collect();
        // Every group wants more than the whole pool, one slot per trial.
        let mut tasks = Vec::new();
        for g in &groups {
            for _ in 0..=capacity {
                let id = tasks.len() as u64 + 1;
                tasks.push(task(id, g.id, 1, None));
            }
        }
        let d = schedule(&groups, &tasks, &ns);
        let total_weight: f64 = groups.iter().map(|g| g.weight).sum();
        for g in &groups {
            let got = d
                .assign
                .iter()
                .filter(|(t, _)| tasks[*t as usize - 1].group == g.id)
                .count() as f64;
            let share = f64::from(capacity) * g.weight / total_weight;
            assert!(
                (got - share).abs() <= 1.0 + 1e-9,
                "group {} (weight {}) got {got} slots of {capacity}, share {share:.2}",
                g.id,
                g.weight
            );
        }
    }
}

fn team_group(id: u64, team: &str, weight: f64) -> Group {
    Group {
        team: team.to_string(),
        ..group(id, weight, None)
    }
}

fn slots_per_group(d: &Decision, tasks: &[Task]) -> BTreeMap<u64, u32> {
    let mut m = BTreeMap::new();
    for (t, l) in &d.assign {
        let g = tasks.iter().find(|x| x.id == *t).map_or(0, |x| x.group);
        *m.entry(g).or_default() += l.iter().map(|(_, s)| s).sum::<u32>();
    }
    m
}

#[test]
fn teams_share_first_then_their_experiments() {
    // Team a runs three experiments, team b one; the pool weighs the teams 1:3.
    let groups = [
        team_group(1, "a", 1.0),
        team_group(2, "a", 1.0),
        team_group(3, "a", 1.0),
        team_group(4, "b", 1.0),
    ];
    let tasks: Vec<Task> = (1..=40)
        .map(|i| task(i, 1 + (i - 1) % 4, 1, None))
        .collect();
    let weights = BTreeMap::from([("a".to_string(), 1.0), ("b".to_string(), 3.0)]);
    let d = fair_share::schedule(&groups, &weights, &tasks, &nodes(&[8]));
    let got = slots_per_group(&d, &tasks);
    assert_eq!(got.get(&4), Some(&6), "team b gets 3/4 of 8: {got:?}");
    assert_eq!(got.values().sum::<u32>(), 8);
}

#[test]
fn without_team_weights_teams_weigh_what_their_experiments_weigh() {
    // Determined's flat shares are kept: weights 10:30 on 8 slots => 2 and 6,
    // whether or not the experiments are in different workspaces.
    let tasks: Vec<Task> = (1..=20)
        .map(|i| task(i, if i <= 10 { 1 } else { 2 }, 1, None))
        .collect();
    let flat = [group(1, 10.0, None), group(2, 30.0, None)];
    let teams = [team_group(1, "a", 10.0), team_group(2, "b", 30.0)];
    let a = slots_per_group(&schedule(&flat, &tasks, &nodes(&[8])), &tasks);
    let b = slots_per_group(&schedule(&teams, &tasks, &nodes(&[8])), &tasks);
    assert_eq!(a, b);
    assert_eq!(a, BTreeMap::from([(1, 2), (2, 6)]));
}

#[test]
fn protected_trials_are_not_released() {
    // Two single-task groups on one slot; the newer one started moments ago.
    let groups = [group(1, 1.0, None), group(2, 1.0, None)];
    let mut young = task(2, 2, 1, Some(1));
    young.protected = true;
    let tasks = [task(1, 1, 1, Some(1)), young];
    let d = schedule(&groups, &tasks, &nodes(&[1]));
    assert!(d.release.is_empty(), "{d:?}");
}

#[test]
fn a_gang_larger_than_any_node_spans_nodes() {
    let groups = [group(1, 1.0, None)];
    let tasks = [task(1, 1, 12, None)];
    let d = schedule(&groups, &tasks, &nodes(&[8, 8, 8]));
    assert_eq!(d.assign.len(), 1);
    let layout = &d.assign[0].1;
    assert_eq!(layout.len(), 2, "fewest nodes: {layout:?}");
    assert_eq!(layout.iter().map(|(_, s)| s).sum::<u32>(), 12);
}
