//! What an ended experiment keeps: Determined's checkpoint policy applied on
//! every replica alike, the blobs released on their holders only, and
//! archive and delete.

mod common;

use std::collections::BTreeMap;

use common::{three, Cluster};
use resolute_core::command::{Command, Control, MetricKind, MetricRecord, TrialOutcome};
use resolute_core::node::Effect;
use resolute_core::state::{ExperimentState, TrialState};
use resolute_core::{NodeId, Reply};
use resolute_types::Value;

fn create(policy: &str) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "hyperparameters: {{lr: {{type: double, minval: 0.001, maxval: 0.1}}}}
searcher: {{name: random, metric: loss, max_trials: 3, max_concurrent_trials: 3, max_length: {{batches: 3}}}}
checkpoint_storage: {{type: shared_fs, host_path: /tmp, {policy}}}
"
        ),
        overrides: Vec::new(),
        owner: "alice".into(),
        model_digest: String::new(),
        default_seed: 1,
    }
}

fn ok(c: &mut Cluster, on: NodeId, command: Command) {
    let pid = c.propose_on(on, command);
    c.until(10_000, "applied", |c| c.replies.contains_key(&pid));
    assert!(
        matches!(
            c.replies[&pid],
            Ok(Reply::Ok) | Ok(Reply::ExperimentCreated { .. })
        ),
        "{:?}",
        c.replies[&pid]
    );
}

/// Each placed trial validates and checkpoints at steps 1, 2 and 3 (the loss
/// is lowest at step 2 for every trial), then completes. The uuids by trial.
fn run_to_the_end(c: &mut Cluster) -> BTreeMap<u64, Vec<String>> {
    c.until(10_000, "placed", |c| {
        c.members[&1]
            .node
            .state()
            .trials
            .values()
            .filter(|t| t.is_placed())
            .count()
            == 3
    });
    let placed: Vec<(u64, u64, NodeId)> = c.members[&1]
        .node
        .state()
        .trials
        .iter()
        .filter_map(|(id, t)| match t.state {
            TrialState::Assigned { node } | TrialState::Running { node } => {
                Some((*id, t.incarnation, node))
            }
            _ => None,
        })
        .collect();
    let mut uuids = BTreeMap::new();
    for (trial, incarnation, node) in placed {
        for step in 1..=3u64 {
            let loss = [0.5, 0.1, 0.3][step as usize - 1] + trial as f64 / 100.0;
            ok(
                c,
                node,
                Command::Metrics {
                    records: vec![MetricRecord {
                        trial,
                        incarnation,
                        kind: MetricKind::Validation,
                        steps_completed: step,
                        metrics: BTreeMap::from([("loss".into(), Value::Float(loss))]),
                    }],
                },
            );
            let uuid = format!("{:064x}", trial * 10 + step);
            ok(
                c,
                node,
                Command::CheckpointSaved {
                    uuid: uuid.clone(),
                    trial,
                    incarnation,
                    steps_completed: step,
                    size: 1,
                    digest: uuid.clone(),
                    holder: node,
                },
            );
            uuids.entry(trial).or_insert_with(Vec::new).push(uuid);
        }
        ok(
            c,
            node,
            Command::TrialExited {
                trial,
                incarnation,
                outcome: TrialOutcome::Completed,
            },
        );
    }
    c.until(10_000, "converged", |c| c.converged());
    uuids
}

fn released(c: &Cluster) -> Vec<(NodeId, String)> {
    c.effects
        .iter()
        .filter_map(|(n, e)| match e {
            Effect::DeleteBlob { digest } => Some((*n, digest.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn an_ended_experiment_keeps_each_trials_best_checkpoint_and_releases_the_rest_on_their_holders() {
    let mut c = three(31);
    ok(
        &mut c,
        1,
        create("save_trial_best: 1, save_trial_latest: 0"),
    );
    let uuids = run_to_the_end(&mut c);
    let state = c.members[&1].node.state();
    assert!(state
        .experiments
        .values()
        .all(|e| e.state == ExperimentState::Completed));
    // Exactly the best (step 2) of each trial stays, on every replica.
    let kept: Vec<&String> = state.checkpoints.keys().collect();
    let best: Vec<&String> = uuids.values().map(|u| &u[1]).collect();
    assert_eq!(kept, best);
    for t in state.trials.values() {
        assert!(
            t.latest_checkpoint
                .as_ref()
                .is_some_and(|u| best.contains(&u)),
            "a trial's latest checkpoint falls back to a kept one: {t:?}"
        );
    }
    // Every dropped one is released once, on the node that holds it, and no
    // kept one is.
    let mut dropped: Vec<String> = uuids
        .values()
        .flat_map(|u| [u[0].clone(), u[2].clone()])
        .collect();
    dropped.sort();
    let mut got: Vec<String> = released(&c).into_iter().map(|(_, d)| d).collect();
    got.sort();
    assert_eq!(got, dropped);
    for (node, digest) in released(&c) {
        let trial = uuids
            .iter()
            .find(|(_, u)| u.contains(&digest))
            .map(|(t, _)| *t)
            .expect("a trial's checkpoint");
        let ran_on = state.trials[&trial].layout.first().map(|l| l.0);
        // A finished trial's layout is cleared; its holder proposed it.
        assert!(ran_on.is_none() || ran_on == Some(node));
    }
}

#[test]
fn the_experiments_best_and_each_trials_latest_are_kept_and_delete_removes_the_rest() {
    let mut c = three(32);
    ok(
        &mut c,
        1,
        create("save_experiment_best: 1, save_trial_best: 0, save_trial_latest: 1"),
    );
    let uuids = run_to_the_end(&mut c);
    let state = c.members[&1].node.state();
    let first = *uuids.keys().next().expect("a trial");
    // The experiment's best: the lowest loss, trial `first` at step 2; and
    // every trial's latest (step 3).
    let mut want: Vec<&String> = uuids.values().map(|u| &u[2]).collect();
    want.push(&uuids[&first][1]);
    want.sort();
    let kept: Vec<&String> = state.checkpoints.keys().collect();
    assert_eq!(kept, want);
    let experiment = *state.experiments.keys().next().expect("experiment");
    ok(
        &mut c,
        1,
        Command::ExperimentControl {
            experiment,
            action: Control::Archive,
        },
    );
    assert!(c.members[&2].node.state().experiments[&experiment].archived);
    let before = c.members[&1].node.state().reports_applied;
    ok(
        &mut c,
        1,
        Command::ExperimentControl {
            experiment,
            action: Control::Delete,
        },
    );
    c.until(10_000, "converged", |c| c.converged());
    let state = c.members[&3].node.state();
    assert!(state.experiments.is_empty());
    assert!(state.trials.is_empty());
    assert!(state.checkpoints.is_empty());
    assert_eq!(
        state.reports_applied,
        before - 9,
        "its nine reports are gone"
    );
    assert_eq!(released(&c).len(), 9, "every checkpoint released once");
}

#[test]
fn a_node_that_replays_the_policys_entry_after_a_restart_deletes_the_blobs_then() {
    let mut c = three(33);
    ok(
        &mut c,
        1,
        create("save_trial_best: 1, save_trial_latest: 0"),
    );
    run_to_the_end(&mut c);
    let holder = released(&c).first().map(|r| r.0).expect("a release");
    let mine: std::collections::BTreeSet<String> = released(&c)
        .into_iter()
        .filter(|(n, _)| *n == holder)
        .map(|(_, d)| d)
        .collect();
    c.effects.clear();
    c.crash(holder);
    c.restart(holder);
    c.until(10_000, "converged", |c| c.converged());
    let again: std::collections::BTreeSet<String> = released(&c)
        .into_iter()
        .filter(|(n, _)| *n == holder)
        .map(|(_, d)| d)
        .collect();
    // Its log still holds the entry that released them (no snapshot since):
    // once the replay is over, it deletes them (again: deleting is idempotent).
    assert_eq!(again, mine);
}
