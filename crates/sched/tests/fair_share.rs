//! Determined's fair-share cases (`fair_share_test.go`), ported.

use resolute_sched::fair_share::schedule;
use resolute_sched::{Decision, Group, Node, Task};

fn group(id: u64, weight: f64, max_slots: Option<u32>) -> Group {
    Group {
        id,
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
        running_on,
        preemptible: true,
    }
}

fn nodes(slots: &[u32]) -> Vec<Node> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| Node {
            id: i as u64 + 1,
            slots: *s,
        })
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
    let mut where_: Vec<u64> = d.assign.iter().map(|(_, n)| *n).collect();
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
                .filter(|(_, at)| *at == n.id)
                .map(|(t, _)| tasks.iter().find(|x| x.id == *t).map_or(0, |x| x.slots))
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
