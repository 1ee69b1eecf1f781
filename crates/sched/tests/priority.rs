//! The priority policy: order, FIFO, preemption, backfill, equal-priority peers.

use resolute_sched::priority::{schedule, Options};
use resolute_sched::{Layout, Node, Task};

fn t(id: u64, slots: u32, priority: u8, running_on: Option<u64>) -> Task {
    Task {
        id,
        group: id,
        slots,
        running_on: running_on.map(|n| vec![(n, slots)]).unwrap_or_default(),
        preemptible: true,
        protected: false,
        may_burst: false,
        holders: Vec::new(),
        priority,
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

const PREEMPT: Options = Options { preemption: true };
const NO_PREEMPT: Options = Options { preemption: false };

fn ids(v: &[(u64, Layout)]) -> Vec<u64> {
    let mut x: Vec<u64> = v.iter().map(|(t, _)| *t).collect();
    x.sort();
    x
}

#[test]
fn lower_numbers_first_then_fifo() {
    let tasks = [t(3, 2, 42, None), t(1, 2, 42, None), t(2, 2, 10, None)];
    let d = schedule(&tasks, &nodes(&[4]), NO_PREEMPT);
    assert_eq!(
        ids(&d.assign),
        vec![1, 2],
        "priority 10 first, then the earlier 42"
    );
}

#[test]
fn higher_priority_preempts_lower_newest_first() {
    let tasks = [
        t(1, 2, 60, Some(1)),
        t(2, 2, 60, Some(1)),
        t(3, 2, 10, None),
    ];
    let d = schedule(&tasks, &nodes(&[4]), PREEMPT);
    assert_eq!(
        d.release,
        vec![2],
        "the newest low-priority trial checkpoints and stops"
    );
    assert!(
        d.assign.is_empty(),
        "the high-priority trial starts once the slots are back"
    );
}

#[test]
fn equal_priority_peers_are_never_preempted() {
    let tasks = [t(1, 4, 42, Some(1)), t(2, 4, 42, None)];
    let d = schedule(&tasks, &nodes(&[4]), PREEMPT);
    assert!(d.release.is_empty() && d.assign.is_empty(), "{d:?}");
}

#[test]
fn without_preemption_running_work_stays() {
    let tasks = [t(1, 4, 90, Some(1)), t(2, 4, 1, None)];
    let d = schedule(&tasks, &nodes(&[4]), NO_PREEMPT);
    assert!(d.release.is_empty() && d.assign.is_empty());
}

#[test]
fn small_preemptible_work_backfills_the_gaps() {
    // The 4-slot priority-10 trial cannot fit (2 free) and nothing lower can be
    // preempted; the 1-slot priority-50 trials fill the gap.
    let tasks = [
        t(1, 2, 5, Some(1)),
        t(2, 4, 10, None),
        t(3, 1, 50, None),
        t(4, 1, 50, None),
    ];
    let d = schedule(&tasks, &nodes(&[4]), PREEMPT);
    assert_eq!(ids(&d.assign), vec![3, 4]);
    assert!(d.release.is_empty());
}

#[test]
fn non_preemptible_victims_are_skipped() {
    let mut a = t(1, 4, 80, Some(1));
    a.preemptible = false;
    let tasks = [a, t(2, 4, 80, Some(2)), t(3, 4, 10, None)];
    let d = schedule(&tasks, &nodes(&[4, 4]), PREEMPT);
    assert_eq!(d.release, vec![2]);
}

#[test]
fn deterministic_never_over_allocated_never_preempts_peers_or_betters() {
    let mut x: u64 = 0xfeed_beef;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..500 {
        let ns = nodes(
            &(0..1 + next(5))
                .map(|_| 1 + next(8) as u32)
                .collect::<Vec<_>>(),
        );
        let mut free: Vec<u32> = ns.iter().map(|n| n.slots).collect();
        let mut tasks = Vec::new();
        for i in 1..=next(25) {
            let slots = 1 + next(4) as u32;
            let priority = [1, 10, 42, 42, 60, 99][next(6) as usize];
            let node = next(ns.len() as u64 + 2) as usize;
            let running_on = (node < ns.len() && free[node] >= slots).then(|| {
                free[node] -= slots;
                ns[node].id
            });
            tasks.push(t(i, slots, priority, running_on));
        }
        let d1 = schedule(&tasks, &ns, PREEMPT);
        assert_eq!(d1, schedule(&tasks, &ns, PREEMPT));
        for n in &ns {
            let running: u32 = tasks
                .iter()
                .filter(|x| !d1.release.contains(&x.id))
                .flat_map(|x| x.running_on.iter())
                .filter(|(at, _)| *at == n.id)
                .map(|(_, s)| *s)
                .sum();
            let new: u32 = d1
                .assign
                .iter()
                .flat_map(|(_, l)| l.iter())
                .filter(|(at, _)| *at == n.id)
                .map(|(_, s)| *s)
                .sum();
            assert!(running + new <= n.slots, "node {} over-allocated", n.id);
        }
        let best_waiting = tasks
            .iter()
            .filter(|x| !x.is_running())
            .map(|x| x.priority)
            .min()
            .unwrap_or(100);
        for r in &d1.release {
            assert!(
                tasks[*r as usize - 1].priority > best_waiting,
                "released a peer or better"
            );
        }
    }
}

#[test]
fn protected_victims_are_skipped() {
    // The newest low-priority trial started moments ago: the older one goes.
    let mut young = t(2, 2, 60, Some(1));
    young.protected = true;
    let tasks = [t(1, 2, 60, Some(1)), young, t(3, 2, 10, None)];
    let d = schedule(&tasks, &nodes(&[4]), PREEMPT);
    assert_eq!(d.release, vec![1]);
}

#[test]
fn a_multi_node_gang_preempts_across_nodes() {
    // A 6-slot trial needs a gang over both nodes: one victim on each.
    let tasks = [
        t(1, 2, 10, Some(1)),
        t(2, 2, 60, Some(1)),
        t(3, 2, 60, Some(2)),
        t(4, 2, 60, Some(2)),
        t(5, 6, 10, None),
    ];
    let d = schedule(&tasks, &nodes(&[4, 4]), PREEMPT);
    let mut released = d.release.clone();
    released.sort();
    assert_eq!(released, vec![2, 3, 4], "{d:?}");
}
