//! The experiment-tracking store with real processes: three nodes, trials
//! streaming metric reports, a follower SIGKILLed while it applies them and
//! restarted from its data dir. Its SQLite store must end equal to its peers'
//! (the same rows in every table, the same digest), with no gap: what it had
//! not written when it died comes again from its own log. Then a fourth node
//! joins, catches up from a snapshot that carries no reports, and fills the
//! gap with a copy of the leader's store fetched as a blob.

use std::time::Duration;

use resolute_tests::{bin, cli, create_python_core, get, repo, start, start_with, until, NodeProc};
use serde_json::Value;

fn tracking(n: &NodeProc) -> Value {
    get(&n.api, &["cluster", "tracking"])
}

fn metric_rows(v: &Value) -> u64 {
    v["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r[0] == "metrics")
        .and_then(|r| r[1].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_node_killed_while_applying_metric_batches_restarts_with_the_same_rows_as_its_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 61, None);
    let b = start(&dir.path().join("b"), 62, Some(&a.listen));
    let c = start(&dir.path().join("c"), 63, Some(&a.listen));
    until("three voters", Duration::from_secs(30), || {
        let v = get(&c.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 3)
    });
    // Four trials of 6,000 steps, a training report every 10: 2,400 reports.
    let id = create_python_core(
        &a.api,
        &[
            "searcher.max_time=6000",
            "hyperparameters.checkpoint_every=1000",
        ],
    );
    until("reports streaming in", Duration::from_secs(60), || {
        metric_rows(&tracking(&b)) >= 300
    });
    // SIGKILL b in the middle of it, and start it again from its data dir.
    let (b_data, b_host) = (b.data.clone(), b.host);
    drop(b);
    let b = start(&b_data, b_host, None);
    until("the experiment completes", Duration::from_secs(180), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    let nodes = [&a, &b, &c];
    let mut last = Vec::new();
    until(
        "every store holds the same rows",
        Duration::from_secs(60),
        || {
            last = nodes.iter().map(|n| tracking(n)).collect();
            last.windows(2)
                .all(|w| w[0]["digest"] == w[1]["digest"] && w[0]["rows"] == w[1]["rows"])
        },
    );
    let rows = metric_rows(&last[0]);
    assert!(rows >= 2_400, "every report is there: {rows}");
    for (n, v) in nodes.iter().zip(&last) {
        assert_eq!(v["gaps"], serde_json::json!([]), "{}: {v}", n.api);
    }
    // The store answers the queries users make: the trials by their best
    // validation loss, and one trial's latest validation points.
    let trials = get(
        &c.api,
        &[
            "experiment",
            "trials",
            &id.to_string(),
            "--sort",
            "best_metric",
        ],
    );
    let trials = trials.as_array().expect("trials");
    assert_eq!(trials.len(), 4);
    let best: Vec<f64> = trials
        .iter()
        .filter_map(|t| t["best_metric"].as_f64())
        .collect();
    assert_eq!(best.len(), 4, "{trials:?}");
    assert!(best.windows(2).all(|w| w[0] <= w[1]), "{best:?}");
    let first = trials[0]["id"].as_u64().expect("trial id").to_string();
    let latest = get(
        &b.api,
        &[
            "trial",
            "metrics",
            &first,
            "--group",
            "validation",
            "--latest",
            "--limit",
            "2",
        ],
    );
    let steps: Vec<u64> = latest
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["steps_completed"].as_u64())
        .collect();
    assert_eq!(steps, vec![6000, 5000]);
    let out = std::process::Command::new(bin())
        .args(["experiment", "list", "--sort", "nonsense", "-m", &a.api])
        .env("RESOLUTE_TOKEN", &a.token)
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a user's error: {err}");
    assert!(
        err.contains("sort: \"nonsense\""),
        "the error names the parameter: {err}"
    );
    // A node that joins now: its snapshot has the rows, not the reports; the
    // leader's store comes as a blob and it ends with the same rows.
    let d = start(&dir.path().join("d"), 64, Some(&a.listen));
    let want = tracking(&a);
    until(
        "the new node's store equals the leader's",
        Duration::from_secs(90),
        || {
            let v = tracking(&d);
            v["digest"] == want["digest"] && v["gaps"] == serde_json::json!([])
        },
    );
    let runs = get(&a.api, &["trial", "runs", &first]);
    assert!(
        runs["runs"].as_array().is_some_and(|r| !r.is_empty()),
        "{runs}"
    );
}

/// A node joins a cluster whose state's snapshot is larger than the largest
/// message the wire takes (`net.max_message_bytes`, 2 MiB here): the leader
/// keeps the snapshot as a blob, the joiner fetches it in chunks, and both
/// end with the same state.
#[test]
fn a_node_joins_from_a_snapshot_larger_than_any_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let laptop = std::fs::read_to_string(repo().join("config/laptop.toml")).expect("config");
    let small = laptop.replace(
        "max_message_bytes = 16777216",
        "max_message_bytes = 2097152",
    );
    assert_ne!(small, laptop, "the shipped config sets max_message_bytes");
    let config = dir.path().join("small-messages.toml");
    std::fs::write(&config, small).expect("config");
    let a = start_with(&dir.path().join("a"), 64, None, &config);
    // Three experiments whose configs carry 900 KB descriptions: a state of
    // more than 2.7 MB. They are killed at once (their configs stay).
    let base = std::fs::read_to_string(repo().join("examples/python-core/experiment.yaml"))
        .expect("example");
    let model = repo().join("examples/python-core");
    let mut ids = Vec::new();
    for i in 0..3 {
        let yaml = dir.path().join(format!("big-{i}.yaml"));
        let description = format!("{i}").repeat(900_000);
        std::fs::write(&yaml, format!("{base}description: \"{description}\"\n")).expect("yaml");
        let args = [
            "experiment",
            "create",
            yaml.to_str().expect("path"),
            model.to_str().expect("path"),
        ];
        let id = get(&a.api, &args)["id"].as_u64().expect("experiment id");
        let (code, out) = cli(&a.api, &["experiment", "kill", &id.to_string()]);
        assert_eq!(code, 0, "{out}");
        ids.push(id);
    }
    let a_applied = get(&a.api, &["cluster", "status"])["applied"]
        .as_u64()
        .expect("applied");
    let b = start_with(&dir.path().join("b"), 65, Some(&a.listen), &config);
    until("b applied what a did", Duration::from_secs(60), || {
        get(&b.api, &["cluster", "status"])["applied"]
            .as_u64()
            .is_some_and(|x| x >= a_applied)
    });
    let snapshot =
        |n: &NodeProc| std::fs::metadata(n.data.join("log/snapshot.bin")).map_or(0, |m| m.len());
    assert!(
        snapshot(&b) > 2_700_000,
        "b installed a snapshot of {} bytes",
        snapshot(&b)
    );
    for id in ids {
        let e = get(&b.api, &["experiment", "describe", &id.to_string()]);
        assert_eq!(e["id"].as_u64(), Some(id), "{e}");
    }
    let leftovers = std::fs::read_dir(b.data.join("partial"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "no partial fetch is left on b");
}
