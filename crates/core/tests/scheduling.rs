//! The scheduler inside the replicated state machine: gangs across nodes, burst
//! after waiting, anti-thrash, kill after `preemption_timeout`, pool settings; and
//! the leader's `Tick` that makes time-based decisions happen with no other traffic.

mod common;

use std::collections::BTreeMap;

use resolute_core::command::Command;
use resolute_core::node::Effect;
use resolute_core::pool::{Policy, PoolSettings};
use resolute_core::state::{Change, ClusterState, Signal, TrialState};
use resolute_core::{NodeConfig, NodeInfo, Reply};

/// A random search of `trials` trials with these `resources` fields (inline YAML).
fn experiment(trials: u32, resources: &str, extra: &str) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "hyperparameters: {{lr: {{type: double, minval: 0.01, maxval: 0.1}}}}
searcher: {{name: random, metric: loss, max_trials: {trials}, max_concurrent_trials: {trials}, max_time: 100, time_metric: batches}}
resources: {{{resources}}}
{extra}"
        ),
        overrides: vec![],
        owner: "o".into(),
        model_digest: "m".into(),
        default_seed: 3,
    }
}

fn owned(site: &str, slots: u32) -> NodeInfo {
    NodeInfo {
        site: site.into(),
        slots,
        ..Default::default()
    }
}

fn spot(slots: u32, cost_micros: u64) -> NodeInfo {
    NodeInfo {
        site: "cloud".into(),
        slots,
        preemptible: true,
        cost_per_slot_hour_micros: cost_micros,
        ..Default::default()
    }
}

/// The state machine alone, with a clock.
struct Sm {
    state: ClusterState,
    index: u64,
    now_ms: u64,
}

impl Sm {
    fn new(nodes: &[NodeInfo]) -> Self {
        let mut state = ClusterState::default();
        for (i, info) in nodes.iter().enumerate() {
            state.add_node(i as u64 + 1, info.clone(), &mut Vec::new());
        }
        Sm {
            state,
            index: 0,
            now_ms: 1_000,
        }
    }

    fn apply_at(&mut self, now_ms: u64, command: Command) -> (Reply, Vec<Change>) {
        self.now_ms = now_ms;
        self.index += 1;
        let env = common::honest_envelope(&self.state, self.index, now_ms, command);
        self.state.apply(self.index, env)
    }

    fn placed_on(&self, node: u64) -> Vec<u64> {
        self.state
            .trials
            .iter()
            .filter(|(_, t)| t.is_placed_on(node))
            .map(|(id, _)| *id)
            .collect()
    }

    fn queued(&self) -> usize {
        self.state
            .trials
            .values()
            .filter(|t| t.state == TrialState::Queued)
            .count()
    }
}

#[test]
fn a_gang_spans_nodes_and_a_lost_member_requeues_all_of_it() {
    let mut sm = Sm::new(&[owned("a", 4), owned("a", 4), owned("a", 2)]);
    let (_, changes) = sm.apply_at(1_000, experiment(1, "slots_per_trial: 8", ""));
    let t = &sm.state.trials[&1];
    assert_eq!(t.layout, vec![(1, 4), (2, 4)], "rank 0 first, whole gang");
    assert_eq!(t.state, TrialState::Assigned { node: 1 });
    let assigned: Vec<u64> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Assigned { node, .. } => Some(*node),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![1, 2], "every member node starts its part");
    let incarnation = t.incarnation;
    // Node 2 (rank 1) is lost: the gang goes back to the queue whole, rank 0 is
    // killed, and it cannot be placed again (6 slots left < 8).
    let (_, changes) = sm.apply_at(2_000, Command::NodeLost { node: 2 });
    assert!(changes.contains(&Change::Signal {
        trial: 1,
        node: 1,
        incarnation,
        signal: Signal::Kill
    }));
    assert_eq!(sm.state.trials[&1].state, TrialState::Queued);
    assert!(sm.placed_on(1).is_empty(), "never half a gang");
    // Node 2 comes back: the gang is placed again with a new incarnation.
    sm.apply_at(3_000, Command::NodeAlive { node: 2 });
    let t = &sm.state.trials[&1];
    assert!(t.is_placed() && t.incarnation > incarnation);
}

#[test]
fn queued_trials_burst_to_the_cheapest_cloud_node_after_waiting() {
    let mut sm = Sm::new(&[owned("a", 2), spot(4, 2_000_000), spot(4, 500_000)]);
    sm.apply_at(1_000, experiment(4, "", ""));
    assert_eq!(sm.placed_on(1).len(), 2, "owned capacity first");
    assert_eq!(sm.queued(), 2);
    // Tick at every deadline (the end of the running trials' protection is one:
    // placement may change then too): nothing bursts before burst_after_s.
    while let Some(due) = sm.state.next_deadline_ms() {
        if due >= 1_000 + 300_000 {
            assert_eq!(due, 1_000 + 300_000, "the default burst_after_s");
            break;
        }
        sm.apply_at(due, Command::Tick);
        assert_eq!(sm.queued(), 2, "not yet at {due} ms");
    }
    sm.apply_at(300_999, Command::Tick);
    assert_eq!(sm.queued(), 2, "not yet");
    sm.apply_at(301_000, Command::Tick);
    assert_eq!(sm.placed_on(3).len(), 2, "the cheaper cloud node");
    assert_eq!(sm.state.next_deadline_ms(), None);
}

#[test]
fn a_trial_too_big_for_owned_capacity_bursts_at_once() {
    let mut sm = Sm::new(&[owned("a", 2), spot(8, 1_000_000)]);
    sm.apply_at(1_000, experiment(1, "slots_per_trial: 6", ""));
    assert_eq!(sm.placed_on(2), vec![1]);
}

#[test]
fn young_trials_are_not_preempted_and_stuck_ones_are_killed() {
    let mut sm = Sm::new(&[owned("a", 2)]);
    sm.apply_at(
        500,
        Command::SetPool {
            pool: String::new(),
            settings: PoolSettings {
                policy: Policy::Priority { preemption: true },
                ..PoolSettings::default()
            },
        },
    );
    sm.apply_at(
        1_000,
        experiment(2, "priority: 60", "preemption_timeout: 30"),
    );
    assert_eq!(sm.placed_on(1).len(), 2);
    // A more urgent experiment 10 s later: the running trials are protected for
    // min_runtime_s (60 s) after they started.
    let (_, changes) = sm.apply_at(11_000, experiment(1, "priority: 10", ""));
    assert!(
        !changes.iter().any(|c| matches!(c, Change::Signal { .. })),
        "{changes:?}"
    );
    let due = sm.state.next_deadline_ms().expect("protection ends");
    assert_eq!(due, 61_000);
    let (_, changes) = sm.apply_at(due, Command::Tick);
    let stopped: Vec<_> = changes
        .iter()
        .filter(|c| {
            matches!(
                c,
                Change::Signal {
                    signal: Signal::Stop,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(stopped.len(), 1, "one victim: {changes:?}");
    // It never exits: killed after its preemption_timeout (30 s).
    let due = sm.state.next_deadline_ms().expect("the kill deadline");
    assert_eq!(due, 91_000);
    let (_, changes) = sm.apply_at(due, Command::Tick);
    assert!(
        changes.iter().any(|c| matches!(
            c,
            Change::Signal {
                signal: Signal::Kill,
                ..
            }
        )),
        "{changes:?}"
    );
}

#[test]
fn a_pool_takes_its_settings_from_the_first_node_that_declares_them() {
    let settings = PoolSettings {
        policy: Policy::Priority { preemption: false },
        burst_after_s: 10,
        min_runtime_s: 0,
        team_weights: BTreeMap::from([("vision".to_string(), 3.0)]),
    };
    let first = NodeInfo {
        pool: "gpu".into(),
        pool_settings: Some(settings.clone()),
        ..owned("a", 4)
    };
    let second = NodeInfo {
        pool: "gpu".into(),
        pool_settings: Some(PoolSettings::default()),
        ..owned("a", 4)
    };
    let sm = Sm::new(&[first, second]);
    assert_eq!(sm.state.pool_settings("gpu"), &settings);
    assert_eq!(sm.state.pool_settings(""), &PoolSettings::default());
}

#[test]
fn trials_wait_for_a_node_of_their_pool() {
    let gpu = NodeInfo {
        pool: "gpu".into(),
        ..owned("a", 4)
    };
    let mut sm = Sm::new(&[owned("a", 4)]);
    sm.apply_at(1_000, experiment(1, "resource_pool: gpu", ""));
    assert_eq!(
        sm.queued(),
        1,
        "the default pool's node does not serve pool gpu"
    );
    sm.state.add_node(9, gpu, &mut Vec::new());
    sm.apply_at(2_000, Command::Noop);
    sm.apply_at(3_000, Command::NodeAlive { node: 9 });
    assert_eq!(sm.placed_on(9), vec![1]);
}

#[test]
fn the_leader_proposes_a_tick_when_a_burst_is_due() {
    // One owned node with 2 slots and a cloud node: no traffic but heartbeats,
    // yet the queued trials move to the cloud node after burst_after_s.
    let mut c = common::Cluster::new(7);
    let settings = PoolSettings {
        burst_after_s: 20,
        ..PoolSettings::default()
    };
    let mut cfg = NodeConfig::new(1, owned("a", 2));
    cfg.info.pool_settings = Some(settings);
    c.add(cfg, true);
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    c.join_cfg(NodeConfig::new(2, spot(2, 1_000_000)), 1);
    c.until(20_000, "joined", |c| {
        c.converged() && c.members[&1].node.state().nodes.len() == 2
    });
    c.propose_on(1, experiment(4, "", ""));
    c.until(5_000, "owned slots used", |c| {
        c.effects
            .iter()
            .filter(|(n, e)| *n == 1 && matches!(e, Effect::StartTrial(_)))
            .count()
            == 2
    });
    c.run(10_000);
    assert!(
        !c.effects
            .iter()
            .any(|(n, e)| *n == 2 && matches!(e, Effect::StartTrial(_))),
        "no burst before burst_after_s"
    );
    c.until(15_000, "burst", |c| {
        c.effects
            .iter()
            .filter(|(n, e)| *n == 2 && matches!(e, Effect::StartTrial(_)))
            .count()
            == 2
    });
}
