//! Garbage collection through the log, with real processes: an experiment of
//! ten trials with `save_trial_best: 1` (and no `save_trial_latest`) ends;
//! every node's state keeps exactly the ten best checkpoints, every node's
//! blob directory holds no other checkpoint, and every kept one is still on
//! each of its holders; its model directory stays on the two nodes that
//! recorded it and leaves the third. Then the experiment is deleted: its
//! checkpoints and model directory leave every blob directory and its rows
//! every tracking store.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use resolute_tests::{cli, create_python_core, get, start, this_node, until, NodeProc};
use serde_json::Value;

/// The complete blobs in a node's store (their manifests are there).
fn blobs(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data.join("blobs"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".manifest").map(str::to_string))
        .collect()
}

fn trials(n: &NodeProc, id: u64) -> Vec<Value> {
    get(&n.api, &["experiment", "trials", &id.to_string()])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn checkpoint_rows(n: &NodeProc) -> u64 {
    get(&n.api, &["cluster", "tracking"])["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r[0] == "checkpoints")
        .and_then(|r| r[1].as_u64())
        .unwrap_or(u64::MAX)
}

#[test]
fn an_ended_experiment_keeps_its_policys_checkpoints_on_every_node_and_a_deleted_one_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 71, None);
    let b = start(&dir.path().join("b"), 72, Some(&a.listen));
    let c = start(&dir.path().join("c"), 73, Some(&a.listen));
    until("three voters", Duration::from_secs(30), || {
        let v = get(&c.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 3)
    });
    let id = create_python_core(
        &a.api,
        &[
            "searcher.max_trials=10",
            "searcher.max_time=300",
            "hyperparameters.checkpoint_every=100",
            "checkpoint_storage.save_trial_best=1",
            "checkpoint_storage.save_trial_latest=0",
        ],
    );
    let nodes = [&a, &b, &c];
    until("the experiment completes", Duration::from_secs(240), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    until(
        "every node applied the policy",
        Duration::from_secs(60),
        || nodes.iter().all(|n| checkpoint_rows(n) == 10),
    );
    let model_digest = get(&a.api, &["experiment", "describe", &id.to_string()])["model_digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The kept checkpoints, with their holders, as the store has them.
    let mut kept: Vec<(String, Vec<String>)> = Vec::new();
    for t in trials(&a, id) {
        let runs = get(&a.api, &["trial", "runs", &t["id"].to_string()]);
        let cks = runs["checkpoints"].as_array().cloned().unwrap_or_default();
        assert_eq!(cks.len(), 1, "one checkpoint a trial: {runs}");
        let holders = cks[0]["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str().map(str::to_string))
            .collect();
        kept.push((
            cks[0]["uuid"].as_str().unwrap_or_default().to_string(),
            holders,
        ));
        assert_eq!(
            t["latest_checkpoint"], cks[0]["uuid"],
            "its latest checkpoint is the kept one"
        );
    }
    let kept_uuids: BTreeSet<String> = kept.iter().map(|(u, _)| u.clone()).collect();
    let left = || -> Vec<(String, String)> {
        nodes
            .iter()
            .flat_map(|n| {
                blobs(&n.data)
                    .into_iter()
                    .filter(|d| !kept_uuids.contains(d) && *d != model_digest)
                    .map(|d| (n.api.clone(), d))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !left().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "released blobs still on nodes: {:?} (kept {kept_uuids:?}, model {model_digest})",
            left()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The model directory stays on the two nodes that recorded it and leaves
    // the third, its unpacked copy with it.
    let unpacked = |n: &NodeProc| {
        n.data
            .join("trials/models/checkpoints")
            .join(&model_digest)
            .exists()
    };
    let with_model = || -> BTreeSet<String> {
        nodes
            .iter()
            .filter(|n| blobs(&n.data).contains(&model_digest))
            .map(|n| this_node(n))
            .collect()
    };
    until(
        "the model directory is on two nodes",
        Duration::from_secs(30),
        || with_model().len() == 2,
    );
    let holders: BTreeSet<String> = get(&a.api, &["experiment", "describe", &id.to_string()])
        ["model_holders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    assert_eq!(with_model(), holders, "the recorded holders keep it");
    for n in nodes {
        if !holders.contains(&this_node(n)) {
            assert!(!unpacked(n), "{}: its unpacked copy went too", n.api);
        }
    }
    for (uuid, holders) in &kept {
        assert!(!holders.is_empty(), "{uuid} has a holder");
        for n in nodes {
            if holders.contains(&this_node(n)) {
                assert!(blobs(&n.data).contains(uuid), "{} holds {uuid}", n.api);
            }
        }
    }
    // Deleted: no checkpoint blob, no row, anywhere.
    let (code, out) = cli(&b.api, &["experiment", "delete", &id.to_string()]);
    assert_eq!(code, 0, "{out}");
    until(
        "the deletion reaches every node",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                checkpoint_rows(n) == 0
                    && blobs(&n.data)
                        .iter()
                        .all(|d| !kept_uuids.contains(d) && *d != model_digest)
                    && !unpacked(n)
            })
        },
    );
    let listed = get(&c.api, &["experiment", "list"]);
    assert_eq!(listed, serde_json::json!([]), "{listed}");
}
