//! Placement: gangs all or nothing across the fewest nodes, locality, owned before
//! burst capacity, cheapest burst first.

use resolute_sched::{Layout, Node, Placer, Task};

fn task(id: u64, slots: u32) -> Task {
    Task {
        id,
        group: 1,
        slots,
        running_on: Vec::new(),
        preemptible: true,
        protected: false,
        may_burst: false,
        holders: Vec::new(),
        priority: 42,
        order: id,
    }
}

fn node(id: u64, slots: u32, site: &str) -> Node {
    Node {
        site: site.to_string(),
        ..Node::owned(id, slots)
    }
}

fn cloud(id: u64, slots: u32, cost_micros: u64) -> Node {
    Node {
        id,
        slots,
        site: "cloud".to_string(),
        burst: true,
        cost_per_slot_hour_micros: cost_micros,
        closed: false,
    }
}

/// Nodes with these free slots (each node 8 slots, the rest used).
fn partly_free(free: &[u32]) -> (Vec<Node>, Vec<Layout>) {
    let nodes: Vec<Node> = (0..free.len())
        .map(|i| node(i as u64 + 1, 8, "a"))
        .collect();
    let used = free
        .iter()
        .enumerate()
        .filter(|(_, f)| **f < 8)
        .map(|(i, f)| vec![(i as u64 + 1, 8 - f)])
        .collect();
    (nodes, used)
}

#[test]
fn one_node_when_it_fits_best_fit() {
    let (nodes, used) = partly_free(&[8, 4, 6]);
    let mut p = Placer::new(&nodes, &used);
    assert_eq!(p.place(&task(1, 4)), Some(vec![(2, 4)]));
    assert_eq!(p.place(&task(2, 5)), Some(vec![(3, 5)]));
    assert_eq!(p.free(3), 1);
}

#[test]
fn a_gang_spans_the_fewest_nodes_rank_zero_first() {
    let (nodes, used) = partly_free(&[3, 3, 5, 2]);
    let mut p = Placer::new(&nodes, &used);
    let layout = p.place(&task(1, 8)).expect("8 of 13 free slots");
    assert_eq!(layout, vec![(3, 5), (1, 3)], "5 + 3 on two nodes");
    assert_eq!(p.free(3), 0);
    assert_eq!(p.free(1), 0);
}

#[test]
fn the_last_piece_of_a_gang_goes_to_the_smallest_node_that_fits_it() {
    let (nodes, used) = partly_free(&[6, 3, 5, 2]);
    let mut p = Placer::new(&nodes, &used);
    // 6 on node 1, then 2 more: node 4 (2 free) rather than node 3 (5 free).
    assert_eq!(p.place(&task(1, 8)), Some(vec![(1, 6), (4, 2)]));
}

#[test]
fn never_half_a_gang() {
    let (nodes, used) = partly_free(&[3, 3]);
    let mut p = Placer::new(&nodes, &used);
    assert_eq!(p.place(&task(1, 8)), None);
    assert_eq!((p.free(1), p.free(2)), (3, 3), "nothing reserved");
}

#[test]
fn the_checkpoint_holder_then_its_site() {
    let nodes = vec![node(1, 8, "a"), node(2, 8, "b"), node(3, 4, "b")];
    let mut p = Placer::new(&nodes, &[]);
    let mut t = task(1, 2);
    t.holders = vec![2];
    assert_eq!(
        p.place(&t),
        Some(vec![(2, 2)]),
        "the holder, over best fit (3)"
    );
    // The holder is full: a node on its site.
    let mut p = Placer::new(&nodes, &[vec![(2, 8)]]);
    let mut q = Placer::new(&nodes, &[vec![(2, 8)]]);
    assert_eq!(p.place(&t), Some(vec![(3, 2)]));
    t.holders.clear();
    assert_eq!(q.place(&t), Some(vec![(3, 2)]), "best fit anyway");
    let nodes = vec![node(1, 4, "a"), node(2, 8, "b"), node(3, 8, "b")];
    let mut p = Placer::new(&nodes, &[vec![(2, 8)]]);
    t.holders = vec![2];
    assert_eq!(p.place(&t), Some(vec![(3, 2)]), "site b over best fit on a");
}

#[test]
fn owned_capacity_first_burst_only_after_waiting() {
    let nodes = vec![
        node(1, 4, "a"),
        cloud(2, 8, 3_000_000),
        cloud(3, 8, 1_000_000),
    ];
    let mut p = Placer::new(&nodes, &[vec![(1, 4)]]);
    let mut t = task(1, 4);
    assert_eq!(p.place(&t), None, "owned capacity is full; no burst yet");
    t.may_burst = true;
    assert_eq!(p.place(&t), Some(vec![(3, 4)]), "the cheapest cloud node");
    // A trial bigger than all owned capacity bursts at once.
    let mut p = Placer::new(&nodes, &[]);
    assert_eq!(p.place(&task(2, 6)), Some(vec![(3, 6)]));
    let mut p = Placer::new(&nodes, &[]);
    assert_eq!(
        p.place(&task(2, 3)),
        Some(vec![(1, 3)]),
        "owned while it fits"
    );
}

#[test]
fn property_gangs_are_whole_never_over_allocated_fewest_nodes_deterministic() {
    let mut x: u64 = 0x0dd_ba11;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..500 {
        let nodes: Vec<Node> = (1..=1 + next(10))
            .map(|id| node(id, 1 + next(8) as u32, ["a", "b"][next(2) as usize]))
            .collect();
        let mut p = Placer::new(&nodes, &[]);
        let mut free: Vec<u32> = nodes.iter().map(|n| n.slots).collect();
        for i in 1..=next(20) {
            let mut t = task(i, 1 + next(16) as u32);
            t.holders = vec![1 + next(12)];
            let before = free.clone();
            let again = p.clone().place(&t);
            let got = p.place(&t);
            assert_eq!(got, again, "same input, same output");
            let Some(layout) = got else {
                continue;
            };
            assert_eq!(layout.iter().map(|(_, s)| s).sum::<u32>(), t.slots);
            for (n, s) in &layout {
                let f = &mut free[*n as usize - 1];
                assert!(*s > 0 && *s <= *f, "node {n} gives {s} of {f} free");
                *f -= s;
            }
            // No fewer nodes could hold it.
            let mut sorted = before.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let mut sum = 0;
            let fewest = sorted
                .iter()
                .position(|f| {
                    sum += f;
                    sum >= t.slots
                })
                .map_or(usize::MAX, |k| k + 1);
            assert_eq!(layout.len(), fewest, "{layout:?} from {before:?}");
        }
    }
}

#[test]
fn a_closed_node_takes_no_new_work_and_counts_only_what_runs_there() {
    let mut full = node(2, 8, "a");
    full.closed = true;
    let nodes = vec![node(1, 4, "a"), full];
    let running = vec![vec![(2, 3)]];
    let mut p = Placer::new(&nodes, &running);
    assert_eq!(p.capacity(), 4 + 3, "its 5 idle slots are no capacity");
    assert_eq!(p.free(2), 0);
    let mut t = task(1, 2);
    t.holders = vec![2];
    assert_eq!(p.place(&t), Some(vec![(1, 2)]), "not even for its holder");
    assert_eq!(p.place(&task(2, 4)), None, "2 of 4 free elsewhere");
    p.give_back(&vec![(2, 3)]);
    assert_eq!(p.free(2), 0, "slots given back there stay unused");
}
