//! The tracking store fed by a real in-process cluster (core's test cluster:
//! three `core::Node`s over a seeded network), each node writing its own
//! batches into its own SQLite file, as the node actor does.

#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{three, Cluster};
use resolute_core::command::{MetricKind, MetricRecord};
use resolute_core::state::TrialState;
use resolute_core::track::TrackBatch;
use resolute_core::{Command, NodeId};
use resolute_tracking::{
    ExperimentFilter, ExperimentSort, MetricsQuery, Reader, SortOrder, Tracker, TrialSort,
};
use resolute_types::Value;

fn create(max_trials: u32, name: &str) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "name: {name}
hyperparameters:
  lr: {{type: double, minval: 0.001, maxval: 0.1}}
  model: {{width: {{type: int, minval: 8, maxval: 64}}}}
searcher: {{name: random, metric: loss, max_trials: {max_trials}, max_length: {{batches: 100}}}}
"
        ),
        overrides: Vec::new(),
        owner: "alice".into(),
        model_digest: String::new(),
        default_seed: 1,
    }
}

/// The placed trials: (trial, incarnation, node).
fn placed(c: &Cluster) -> Vec<(u64, u64, NodeId)> {
    let leader = c.leader().expect("leader");
    c.members[&leader]
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
        .collect()
}

/// Reports `n` training and `n` validation points for each placed trial, from
/// the node it runs on, `per_entry` records to a Metrics entry.
fn report(c: &mut Cluster, n: u64, per_entry: usize) {
    for (trial, incarnation, node) in placed(c) {
        let records: Vec<MetricRecord> = (1..=n)
            .flat_map(|step| {
                let loss = 1.0 / (step as f64 + trial as f64);
                [
                    MetricRecord {
                        trial,
                        incarnation,
                        kind: MetricKind::Training,
                        steps_completed: step,
                        metrics: BTreeMap::from([("loss".into(), Value::Float(loss))]),
                    },
                    MetricRecord {
                        trial,
                        incarnation,
                        kind: MetricKind::Validation,
                        steps_completed: step,
                        metrics: BTreeMap::from([
                            ("loss".into(), Value::Float(loss)),
                            ("accuracy".into(), Value::Float(1.0 - loss)),
                        ]),
                    },
                ]
            })
            .collect();
        for chunk in records.chunks(per_entry) {
            let pid = c.propose_on(
                node,
                Command::Metrics {
                    records: chunk.to_vec(),
                },
            );
            c.until(10_000, "reported", |c| c.replies.contains_key(&pid));
        }
    }
}

/// A cluster with two experiments whose trials reported metrics.
fn history(seed: u64) -> Cluster {
    let mut c = three(seed);
    for (trials, name) in [(3, "small"), (2, "other")] {
        let pid = c.propose_on(1, create(trials, name));
        c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    }
    c.until(5_000, "placed", |c| !placed(c).is_empty());
    report(&mut c, 20, 7);
    c.until(10_000, "converged", |c| c.converged());
    c
}

/// Writes node `id`'s batches into a store at `path`, `per_write` batches to a
/// transaction (the actor coalesces a step's batches).
fn feed(c: &Cluster, id: NodeId, path: &Path, per_write: usize) -> Tracker {
    let mut t = Tracker::open(path).expect("open");
    let batches: Vec<TrackBatch> = c
        .tracks
        .iter()
        .filter(|(n, _)| *n == id)
        .map(|(_, b)| b.clone())
        .collect();
    let state = c.members[&id].node.state();
    for chunk in batches.chunks(per_write) {
        t.write(chunk, state, false).expect("write");
    }
    t
}

#[test]
fn every_replica_writes_the_same_rows_whatever_its_batches() {
    let c = history(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut summaries = Vec::new();
    for (id, per_write) in [(1, 1), (2, 5), (3, 1000)] {
        let t = feed(&c, id, &dir.path().join(format!("{id}.sqlite")), per_write);
        summaries.push(t.summary().expect("summary"));
    }
    let first = &summaries[0];
    let rows: BTreeMap<_, _> = first.rows.iter().cloned().collect();
    assert_eq!(rows["experiments"], 2);
    assert!(rows["trials"] >= 2, "{rows:?}");
    assert!(
        rows["metrics"] >= 80,
        "two groups x 20 steps x two trials: {rows:?}"
    );
    assert!(rows["hyperparameters"] >= 2 * rows["trials"], "{rows:?}");
    assert!(rows["runs"] >= 2, "{rows:?}");
    for s in &summaries[1..] {
        assert_eq!(s.rows, first.rows);
        assert_eq!(s.digest, first.digest, "replicas differ");
    }
}

#[test]
fn a_replayed_log_adds_nothing_twice_and_a_store_behind_catches_up() {
    let c = history(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.sqlite");
    let whole = feed(&c, 2, &path, 3).summary().expect("summary");
    // A restart replays the log since the snapshot: everything again.
    let again = feed(&c, 2, &path, 1).summary().expect("summary");
    assert_eq!(again, whole);
    // Stopped halfway (a kill between transactions), then the rest.
    let half = dir.path().join("half.sqlite");
    let batches: Vec<TrackBatch> = c
        .tracks
        .iter()
        .filter(|(n, _)| *n == 2)
        .map(|(_, b)| b.clone())
        .collect();
    let state = c.members[&2].node.state();
    {
        let mut t = Tracker::open(&half).expect("open");
        t.write(&batches[..batches.len() / 2], state, true)
            .expect("write");
    }
    let mut t = Tracker::open(&half).expect("reopen");
    assert!(t.applied_index() > 0);
    t.write(&batches, state, false).expect("write");
    assert_eq!(t.summary().expect("summary"), whole);
    // A deleted store is rebuilt from the state: rows, not reports, with the gap.
    let fresh = dir.path().join("fresh.sqlite");
    let mut t = Tracker::open(&fresh).expect("open");
    t.catch_up(state).expect("catch up");
    let s = t.summary().expect("summary");
    let rows: BTreeMap<_, _> = s.rows.iter().cloned().collect();
    let whole_rows: BTreeMap<_, _> = whole.rows.iter().cloned().collect();
    assert_eq!(rows["trials"], whole_rows["trials"]);
    assert_eq!(rows["experiments"], whole_rows["experiments"]);
    assert_eq!(rows["metrics"], 0);
    assert_eq!(s.gaps.len(), 1);
    assert_eq!(s.gaps[0].from_index, 1);
    assert_eq!(s.gaps[0].to_index, state.applied_index);
    assert_eq!(s.gaps[0].reports, state.reports_applied);
    // The replicas that joined by snapshot before any report lack none.
    for id in [2, 3] {
        let t = feed(&c, id, &dir.path().join(format!("joined-{id}.sqlite")), 2);
        assert_eq!(t.summary().expect("summary").gaps, vec![]);
    }
    assert_eq!(s.applied_index, state.applied_index);
}

#[test]
fn queries_filter_sort_and_page() {
    let c = history(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.sqlite");
    feed(&c, 1, &path, 4);
    let r = Reader::open(&path).expect("reader");
    let (trial, _, _) = placed(&c)[0];
    // A trial's validation points, the latest first, five at a time.
    let page = r
        .trial_metrics(
            trial,
            &MetricsQuery {
                group: Some("validation".into()),
                limit: Some(5),
                order: SortOrder::Desc,
                ..Default::default()
            },
        )
        .expect("metrics");
    assert_eq!(page.total, 20);
    assert_eq!(page.items.len(), 5);
    assert_eq!(page.items[0]["steps_completed"], 20);
    assert_eq!(page.items[0]["kind"], "Validation");
    assert!(page.items[0]["metrics"]["accuracy"].is_number());
    let since = r
        .trial_metrics(
            trial,
            &MetricsQuery {
                since_step: Some(15),
                ..Default::default()
            },
        )
        .expect("metrics");
    assert_eq!(since.total, 12, "two groups, steps 15 to 20");
    assert_eq!(since.items[0]["steps_completed"], 15);
    // Experiments by best metric, one to a page.
    let by_best = |offset| {
        r.experiments(&ExperimentFilter {
            sort: ExperimentSort::BestMetric,
            limit: Some(1),
            offset,
            ..Default::default()
        })
        .expect("experiments")
    };
    let first = by_best(0);
    assert_eq!(first.total, 2);
    assert_eq!(first.next_offset, Some(1));
    let second = by_best(1);
    assert_eq!(second.next_offset, None);
    let (a, b) = (
        first.items[0]["best_metric"].as_f64().expect("best"),
        second.items[0]["best_metric"].as_f64().expect("best"),
    );
    assert!(a <= b, "{a} then {b}");
    let named = r
        .experiments(&ExperimentFilter {
            name: Some("oth".into()),
            ..Default::default()
        })
        .expect("experiments");
    assert_eq!(named.total, 1);
    assert_eq!(named.items[0]["name"], "other");
    let nobody = r
        .experiments(&ExperimentFilter {
            readable: Some(Default::default()),
            ..Default::default()
        })
        .expect("experiments");
    assert_eq!(
        nobody.total, 0,
        "a user who may read no workspace sees none"
    );
    // Trials by a nested hyperparameter and by a metric.
    let experiment = c.members[&1].node.state().trials[&trial].experiment;
    for sort in [
        TrialSort::Hparam("model.width".into()),
        TrialSort::Metric("accuracy".into()),
        TrialSort::BestMetric,
    ] {
        let page = r
            .trials(experiment, &sort, SortOrder::Desc, None, 0)
            .expect("trials");
        let keys: Vec<f64> = page
            .items
            .iter()
            .filter_map(|t| t["sort_key"].as_f64())
            .collect();
        assert!(!keys.is_empty(), "{sort:?}: {page:?}");
        assert!(keys.windows(2).all(|w| w[0] >= w[1]), "{sort:?}: {keys:?}");
    }
    assert!(TrialSort::parse("nonsense").is_err());
    let runs = r.runs(trial).expect("runs");
    assert_eq!(runs[0]["incarnation"], 1, "{runs:?}");
}

#[test]
fn a_node_that_joins_after_the_reports_knows_how_many_it_lacks() {
    let mut c = history(6);
    c.join(4, "site-4", 1);
    c.until(20_000, "node 4 caught up", |c| {
        c.converged() && c.members.contains_key(&4)
    });
    let replaced: Vec<&TrackBatch> = c
        .tracks
        .iter()
        .filter(|(n, b)| *n == 4 && b.replaced)
        .map(|(_, b)| b)
        .collect();
    assert!(!replaced.is_empty(), "node 4 installed a snapshot");
    let dir = tempfile::tempdir().expect("tempdir");
    let t = feed(&c, 4, &dir.path().join("4.sqlite"), 3);
    let s = t.summary().expect("summary");
    let state = c.members[&4].node.state();
    assert_eq!(s.gaps.len(), 1, "{s:?}");
    assert_eq!(s.gaps[0].reports, state.reports_applied);
    // It asks a peer for a copy of its store, installs it, and the batches it
    // applied since then go on top: the same rows as the peer, no gap.
    let mut t = t;
    let gap_to = s.gaps[0].to_index;
    assert_eq!(t.wants_copy(), Some(gap_to));
    let peer = feed(&c, 1, &dir.path().join("1.sqlite"), 4);
    let copy = dir.path().join("copy.sqlite");
    let index = resolute_tracking::copy_store(peer.path(), &copy).expect("copy");
    assert_eq!(index, peer.applied_index());
    assert_eq!(
        t.install_copy(&copy, index + 1).expect("short"),
        None,
        "a copy short of the gap is not installed"
    );
    assert_eq!(t.install_copy(&copy, gap_to).expect("install"), Some(index));
    assert_eq!(t.wants_copy(), None);
    let batches: Vec<TrackBatch> = c
        .tracks
        .iter()
        .filter(|(n, _)| *n == 4)
        .map(|(_, b)| b.clone())
        .collect();
    t.write(&batches, state, false).expect("replay");
    let mine = t.summary().expect("summary");
    let theirs = peer.summary().expect("summary");
    assert_eq!(mine.gaps, vec![]);
    assert_eq!(mine.rows, theirs.rows);
    assert_eq!(mine.digest, theirs.digest);
}
