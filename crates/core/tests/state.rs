//! The replicated state machine alone: restarts, fencing, snapshots.

mod common;

use std::collections::BTreeMap;

use resolute_core::command::{Command, MetricKind, MetricRecord, TrialOutcome};
use resolute_core::state::{ClusterState, TrialState};
use resolute_core::{NodeInfo, Reply};
use resolute_types::Value;

const EXPERIMENT: &str = "hyperparameters: {lr: {type: double, minval: 0.01, maxval: 0.1}}
searcher: {name: asha, metric: loss, num_rungs: 2, max_trials: 4, divisor: 2, max_time: 20, time_metric: batches, max_concurrent_trials: 2}
max_restarts: 1
";

fn created(yaml: &str) -> Command {
    Command::ExperimentCreated {
        config_yaml: yaml.into(),
        overrides: vec![],
        owner: "o".into(),
        model_digest: "m".into(),
        default_seed: 3,
    }
}

struct Sm {
    state: ClusterState,
    index: u64,
}

impl Sm {
    fn new() -> Self {
        let mut state = ClusterState::default();
        let mut changes = Vec::new();
        state.add_node(
            1,
            NodeInfo {
                site: "a".into(),
                slots: 4,
                ..Default::default()
            },
            &mut changes,
        );
        state.add_node(
            2,
            NodeInfo {
                site: "b".into(),
                slots: 4,
                ..Default::default()
            },
            &mut changes,
        );
        Sm { state, index: 0 }
    }

    fn apply(&mut self, command: Command) -> Reply {
        self.index += 1;
        let env = common::honest_envelope(&self.state, self.index, self.index * 1000, command);
        self.state.apply(self.index, env).0
    }

    fn running(&self) -> Vec<(u64, u64)> {
        self.state
            .trials
            .iter()
            .filter(|(_, t)| matches!(t.state, TrialState::Assigned { .. }))
            .map(|(id, t)| (*id, t.incarnation))
            .collect()
    }

    fn validate(&mut self, trial: u64, incarnation: u64, step: u64, loss: f64) -> Reply {
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".to_string(), Value::Float(loss));
        metrics.insert("batches".to_string(), Value::Int(step as i64));
        self.apply(Command::Metrics {
            records: vec![MetricRecord {
                trial,
                incarnation,
                kind: MetricKind::Validation,
                steps_completed: step,
                metrics,
            }],
        })
    }
}

#[test]
fn errors_count_toward_max_restarts_and_lost_nodes_do_not() {
    let mut sm = Sm::new();
    sm.apply(created(EXPERIMENT));
    let (trial, inc) = sm.running()[0];
    let node = match sm.state.trials[&trial].state {
        TrialState::Assigned { node } => node,
        _ => unreachable!(),
    };
    // A lost node: requeued and placed again, restarts unchanged.
    sm.apply(Command::NodeLost { node });
    let t = &sm.state.trials[&trial];
    assert_eq!(t.restarts, 0);
    assert!(t.incarnation > inc, "placed again with a new incarnation");
    let inc = t.incarnation;
    // One error is within max_restarts: 1.
    sm.apply(Command::TrialExited {
        trial,
        incarnation: inc,
        outcome: TrialOutcome::Errored {
            message: "oom".into(),
            exit_code: Some(137),
        },
    });
    let t = &sm.state.trials[&trial];
    assert_eq!(t.restarts, 1);
    assert!(matches!(t.state, TrialState::Assigned { .. }), "restarted");
    // A second error exceeds it.
    let inc = t.incarnation;
    sm.apply(Command::TrialExited {
        trial,
        incarnation: inc,
        outcome: TrialOutcome::Errored {
            message: "oom".into(),
            exit_code: Some(137),
        },
    });
    assert!(matches!(
        sm.state.trials[&trial].state,
        TrialState::Done(TrialOutcome::Errored { .. })
    ));
}

#[test]
fn promotion_asha_pauses_and_resumes_through_the_log() {
    let mut sm = Sm::new();
    sm.apply(created(EXPERIMENT));
    let first = sm.running();
    assert_eq!(first.len(), 2, "max_concurrent_trials");
    // Both report at rung 0 (length 10); the better one is promoted, the worse paused.
    let (a, ia) = first[0];
    let (b, ib) = first[1];
    sm.validate(a, ia, 10, 0.5);
    sm.validate(b, ib, 10, 0.9);
    assert_eq!(
        sm.state.trials[&b].pending,
        resolute_core::state::Pending::Pause
    );
    sm.apply(Command::TrialExited {
        trial: b,
        incarnation: ib,
        outcome: TrialOutcome::Stopped,
    });
    assert_eq!(sm.state.trials[&b].state, TrialState::Paused);
    assert_eq!(
        sm.state.trials[&a].target,
        Some(20),
        "the better trial was promoted to the next rung"
    );
}

#[test]
fn snapshots_restore_exactly_and_searchers_continue_identically() {
    let mut sm = Sm::new();
    sm.apply(created(EXPERIMENT));
    let (a, ia) = sm.running()[0];
    sm.validate(a, ia, 10, 0.4);
    let bytes = sm.state.encode();
    let restored = ClusterState::decode(&bytes).expect("decode");
    assert_eq!(restored.digest(), sm.state.digest());
    let mut copy = Sm {
        state: restored,
        index: sm.index,
    };
    // Both continue the same way.
    for (trial, inc) in sm.running() {
        let r1 = sm.validate(trial, inc, 10, 0.7);
        let r2 = copy.validate(trial, inc, 10, 0.7);
        assert_eq!(r1, r2);
    }
    assert_eq!(copy.state.digest(), sm.state.digest());
    assert!(
        ClusterState::decode(&bytes[..bytes.len() / 2]).is_err(),
        "a torn snapshot is an error, not a panic"
    );
}

#[test]
fn bad_experiment_configs_are_rejected_on_apply() {
    let mut sm = Sm::new();
    let r = sm.apply(created("searcher: {name: random}"));
    assert!(
        matches!(r, Reply::Rejected { ref reason } if reason.contains("searcher.metric")),
        "{r:?}"
    );
    assert!(sm.state.experiments.is_empty());
}

/// The live trials by id search, the reference `live_trial_entries` must match.
fn live_by_search(state: &ClusterState) -> Vec<u64> {
    state
        .live_trials()
        .iter()
        .filter(|id| state.trials.contains_key(id))
        .copied()
        .collect()
}

fn live_by_walk(state: &ClusterState) -> Vec<u64> {
    state.live_trial_entries().map(|(id, _)| id).collect()
}

const MANY_TRIALS: &str = "hyperparameters: {lr: {type: double, minval: 0.01, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 40, max_concurrent_trials: 40}
";

#[test]
fn live_trial_entries_match_the_live_set_dense_or_sparse() {
    let mut sm = Sm::new();
    // Dense: one experiment's trials, then some of them finished in the middle.
    sm.apply(created(MANY_TRIALS));
    assert_eq!(live_by_walk(&sm.state), live_by_search(&sm.state));
    assert_eq!(live_by_walk(&sm.state).len(), 40);
    for (trial, incarnation) in sm.running().into_iter().skip(2).step_by(3) {
        sm.apply(Command::TrialExited {
            trial,
            incarnation,
            outcome: TrialOutcome::Completed,
        });
    }
    assert_eq!(live_by_walk(&sm.state), live_by_search(&sm.state));
    // Sparse: much finished history between two live experiments.
    for _ in 0..10 {
        sm.apply(created(MANY_TRIALS));
        let id = *sm
            .state
            .experiments
            .keys()
            .next_back()
            .expect("an experiment");
        sm.apply(Command::ExperimentControl {
            experiment: id,
            action: resolute_core::command::Control::Kill,
        });
    }
    sm.apply(created(MANY_TRIALS));
    let walked = live_by_walk(&sm.state);
    assert_eq!(walked, live_by_search(&sm.state));
    assert!(walked.len() > 40, "both live experiments are listed");
    // Every entry is the trial record of that id.
    for (id, t) in sm.state.live_trial_entries() {
        assert_eq!(Some(t), sm.state.trials.get(&id));
    }
}

#[test]
fn a_capacity_drop_stops_the_newest_trials_there_without_charging_restarts() {
    let mut sm = Sm::new();
    sm.apply(created(MANY_TRIALS));
    let on = |sm: &Sm, node: u64| -> Vec<u64> {
        sm.state
            .trials
            .iter()
            .filter(|(_, t)| t.is_placed_on(node) && !t.preempting)
            .map(|(id, _)| *id)
            .collect()
    };
    let before = on(&sm, 1);
    assert_eq!(before.len(), 4, "node 1 is full");
    // Node 1 reports that 3 of its 4 GPUs failed their health check.
    sm.index += 1;
    let env = common::honest_envelope(
        &sm.state,
        sm.index,
        sm.index * 1000,
        Command::NodeCapacity {
            node: 1,
            slots: 1,
            stop_first: Vec::new(),
        },
    );
    let (reply, changes) = sm.state.apply(sm.index, env);
    assert_eq!(reply, Reply::Ok);
    let stopped: Vec<u64> = changes
        .iter()
        .filter_map(|c| match c {
            resolute_core::state::Change::Signal {
                trial,
                node: 1,
                signal: resolute_core::state::Signal::Stop,
                ..
            } => Some(*trial),
            _ => None,
        })
        .collect();
    assert_eq!(stopped.len(), 3, "{changes:?}");
    assert_eq!(on(&sm, 1), vec![before[0]], "the oldest keeps its slot");
    assert!(on(&sm, 2).len() == 4, "node 2 is untouched");
    // They checkpoint and stop: back in the queue, no restart charged, and node 1
    // gets no new work beyond its one slot.
    for trial in stopped {
        let inc = sm.state.trials[&trial].incarnation;
        sm.apply(Command::TrialExited {
            trial,
            incarnation: inc,
            outcome: TrialOutcome::Preempted,
        });
        let t = &sm.state.trials[&trial];
        assert_eq!(t.restarts, 0);
        assert!(!t.is_placed_on(1), "not placed back on the shrunken node");
    }
    let slots_on_1: u32 = sm
        .state
        .trials
        .values()
        .filter(|t| t.is_placed_on(1))
        .map(|t| t.slots)
        .sum();
    assert_eq!(slots_on_1, 1);
    // The GPUs come back: the node fills again.
    sm.apply(Command::NodeCapacity {
        node: 1,
        slots: 4,
        stop_first: Vec::new(),
    });
    assert_eq!(on(&sm, 1).len(), 4);
    // The node names the trial on its failed GPU: that one stops, though it is
    // the oldest there (the one that kept its slot above).
    let oldest = before[0];
    assert!(on(&sm, 1).contains(&oldest));
    sm.apply(Command::NodeCapacity {
        node: 1,
        slots: 3,
        stop_first: vec![oldest],
    });
    assert!(sm.state.trials[&oldest].preempting, "the named trial stops");
    assert_eq!(on(&sm, 1).len(), 3, "and only it");
}

#[test]
fn a_second_copy_of_each_latest_checkpoint_goes_to_another_site_first() {
    let mut sm = Sm::new();
    let mut changes = Vec::new();
    sm.state.add_node(
        3,
        NodeInfo {
            site: "a".into(),
            slots: 4,
            ..Default::default()
        },
        &mut changes,
    );
    let members = [1, 2, 3];
    sm.apply(created(EXPERIMENT));
    let (trial, inc) = sm.running()[0];
    assert_eq!(
        sm.apply(Command::CheckpointSaved {
            uuid: "ck1".into(),
            trial,
            incarnation: inc,
            steps_completed: 5,
            size: 10,
            digest: "ck1".into(),
            holder: 1,
        }),
        Reply::Ok
    );
    // Node 1 (site a) holds it: node 2, the only member on another site, copies.
    let wanted = |sm: &Sm, me| sm.state.checkpoints_to_copy(me);
    assert_eq!(wanted(&sm, 2), vec![("ck1".to_string(), vec![1])]);
    assert!(wanted(&sm, 1).is_empty(), "a holder copies nothing");
    assert!(
        wanted(&sm, 3).is_empty(),
        "same site as the holder: not chosen"
    );
    // A snapshot rebuilds the index: the same answer on a restarted replica.
    let restored = ClusterState::decode(&sm.state.encode()).expect("decode");
    assert_eq!(restored.checkpoints_to_copy(2), wanted(&sm, 2));
    sm.apply(Command::CheckpointReplicated {
        uuid: "ck1".into(),
        holder: 2,
    });
    for me in members {
        assert!(
            wanted(&sm, me).is_empty(),
            "two copies: node {me} copies nothing"
        );
    }
    // A newer checkpoint starts over; a finished trial's checkpoints are not copied.
    sm.apply(Command::CheckpointSaved {
        uuid: "ck2".into(),
        trial,
        incarnation: inc,
        steps_completed: 9,
        size: 10,
        digest: "ck2".into(),
        holder: 1,
    });
    assert_eq!(wanted(&sm, 2).len(), 1);
    sm.apply(Command::ExperimentControl {
        experiment: 1,
        action: resolute_core::command::Control::Kill,
    });
    sm.apply(Command::TrialExited {
        trial,
        incarnation: inc,
        outcome: TrialOutcome::Stopped,
    });
    assert!(wanted(&sm, 2).is_empty(), "the trial is done");
}

#[test]
fn a_killed_trial_ends_for_good_and_its_search_goes_on() {
    use resolute_core::state::Pending;
    let mut sm = Sm::new();
    sm.apply(created(EXPERIMENT));
    let running = sm.running();
    assert_eq!(running.len(), 2, "max_concurrent_trials: 2");
    let (a, a_inc) = running[0];
    let (b, _) = running[1];
    // A placed trial is signalled; it ends when its exit comes in, however
    // it exited (SIGKILL reads as an error), without a restart.
    assert_eq!(sm.apply(Command::TrialKill { trial: a }), Reply::Ok);
    assert_eq!(sm.state.trials[&a].pending, Pending::Kill);
    sm.apply(Command::TrialExited {
        trial: a,
        incarnation: a_inc,
        outcome: TrialOutcome::Errored {
            message: "killed".into(),
            exit_code: None,
        },
    });
    let t = &sm.state.trials[&a];
    assert_eq!(t.state, TrialState::Done(TrialOutcome::Stopped));
    assert_eq!(t.restarts, 0);
    // The searcher heard it ended early and started another in its place.
    let now = sm.running();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().all(|(id, _)| *id != a) && now.iter().any(|(id, _)| *id == b));
    // A killed trial whose node is lost is not run again.
    let node = match sm.state.trials[&b].state {
        TrialState::Assigned { node } | TrialState::Running { node } => node,
        ref other => panic!("{other:?}"),
    };
    sm.apply(Command::TrialKill { trial: b });
    sm.apply(Command::NodeLost { node });
    assert_eq!(
        sm.state.trials[&b].state,
        TrialState::Done(TrialOutcome::Stopped)
    );
    // An ended or unknown trial is refused, and says why.
    for (trial, why) in [(a, "has ended"), (999, "unknown trial 999")] {
        match sm.apply(Command::TrialKill { trial }) {
            Reply::Rejected { reason } => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
