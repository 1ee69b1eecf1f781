//! End to end with separate processes on 127.0.0.x (real fsync, real libp2p):
//! three `resolute node start` processes; an experiment submitted to a follower
//! completes with the trials per length that preview-search plans; SIGKILL of a
//! node running trials moves them elsewhere, resuming from their latest
//! checkpoints, without charging max_restarts; a stopped node restarts from its
//! data dir and rejoins; every node ends with the same digest;
//! SIGKILL of the leader early and late in a submission never creates the experiment twice
//! and never loses one the CLI reported as created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use resolute_tests::{bin, cli, get, repo, start, trials, until, NodeProc};

#[test]
fn three_processes_submit_to_a_follower_survive_kill_9_and_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 51, None);
    let b = start(&dir.path().join("b"), 52, Some(&a.listen));
    let c = start(&dir.path().join("c"), 53, Some(&a.listen));
    until("three voters", Duration::from_secs(30), || {
        let v = get(&c.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 3)
    });
    // Every node's gossiped record (labels, GPUs: none here) reaches the others.
    until(
        "gossiped labels of every node",
        Duration::from_secs(30),
        || {
            let v = get(&c.api, &["cluster", "status"]);
            v["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == 3
                    && nodes.iter().all(|n| {
                        n["labels"]["site"].is_string()
                            && n["labels"]["pool"].is_string()
                            && n["labels"]["preemptible"] == "false"
                            && n["gpus"].as_array().is_some_and(Vec::is_empty)
                    })
            })
        },
    );
    // (a) Submit to a follower (c; a bootstrapped and leads at first).
    let python = repo().join("python");
    let env = format!(
        "environment.environment_variables=[\"PYTHONPATH={}\"]",
        python.display()
    );
    let config = repo().join("examples/python-core/experiment.yaml");
    let model = repo().join("examples/python-core");
    let created = get(
        &c.api,
        &[
            "experiment",
            "create",
            config.to_str().unwrap_or_default(),
            model.to_str().unwrap_or_default(),
            "--config",
            &env,
            "--config",
            "searcher.max_time=30000",
            "--config",
            "hyperparameters.checkpoint_every=3000",
        ],
    );
    let id = created["id"].as_u64().expect("experiment id");
    // (b) Once a trial on b or c has checkpointed, SIGKILL that node.
    let id_of = |n: &NodeProc| {
        get(&n.api, &["cluster", "status"])["this_node"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let ids = [id_of(&b), id_of(&c)];
    let mut victim: Option<(u64, usize)> = None;
    until(
        "a checkpointed trial on b or c",
        Duration::from_secs(90),
        || {
            for t in trials(&a.api, id) {
                for (k, node) in ids.iter().enumerate() {
                    if t["node"].as_str() == Some(node) && !t["latest_checkpoint"].is_null() {
                        victim = Some((t["id"].as_u64().unwrap_or(0), k));
                        return true;
                    }
                }
            }
            false
        },
    );
    let (trial, k) = victim.expect("victim");
    let mut nodes = [Some(b), Some(c)];
    let killed = nodes[k].take().expect("node");
    let (killed_data, killed_host) = (killed.data.clone(), killed.host);
    drop(killed);
    until("the experiment completes", Duration::from_secs(120), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    // The trials per training length are what preview-search plans.
    let planned = Command::new(bin())
        .arg("preview-search")
        .arg(&config)
        .args(["--config", "searcher.max_time=30000", "--json"])
        .output()
        .expect("preview-search");
    let planned: Value = serde_json::from_slice(&planned.stdout).expect("preview json");
    let mut trained = serde_json::Map::new();
    for t in trials(&a.api, id) {
        let key = t["steps_completed"].to_string();
        let n = trained.get(&key).and_then(Value::as_u64).unwrap_or(0);
        trained.insert(key, Value::from(n + 1));
    }
    assert_eq!(Value::Object(trained), planned, "trials per length");
    let t = get(&a.api, &["trial", "describe", &trial.to_string()]);
    assert_eq!(
        t["restarts"], 0,
        "a lost node is not the trial's fault: {t}"
    );
    assert!(t["incarnation"].as_u64().unwrap_or(0) >= 2, "it moved: {t}");
    // No validation reported before its checkpoint was lost: 10 steps apart, all there.
    let m = get(&a.api, &["trial", "metrics", &trial.to_string()]);
    let mut steps: Vec<u64> = m
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "Validation")
        .filter_map(|p| p["steps_completed"].as_u64())
        .collect();
    steps.sort_unstable();
    steps.dedup();
    assert_eq!(
        steps,
        (1..=10).map(|k| k * 3000).collect::<Vec<_>>(),
        "{steps:?}"
    );
    // (d) The killed node restarts from its data dir and rejoins.
    let restarted = start(&killed_data, killed_host, None);
    let mut alive: Vec<NodeProc> = [Some(a), Some(restarted)]
        .into_iter()
        .chain(nodes)
        .flatten()
        .collect();
    // (e) Every node reports the same state digest.
    agree(&alive, "the restarted node catches up");
    // (c) SIGKILL the leader during a submission to a follower: the experiment
    // exists exactly once, or the CLI said it failed (and then at most once).
    // Early (before the creation reaches the leader: the CLI fails) and late
    // (after it committed: the CLI succeeds); the killed node restarts between.
    for delay_ms in [5, 40] {
        let killed = submit_while_the_leader_dies(&mut alive, &config, &model, &env, delay_ms);
        agree(&alive, "the two survivors agree");
        alive.push(start(&killed.0, killed.1, None));
        agree(&alive, "the restarted leader catches up");
    }
}

/// Submits to a follower and SIGKILLs the leader `delay_ms` later; checks that
/// the experiment exists once if the CLI said so, never twice. The killed
/// node's data dir and host.
fn submit_while_the_leader_dies(
    alive: &mut Vec<NodeProc>,
    config: &Path,
    model: &Path,
    env: &str,
    delay_ms: u64,
) -> (PathBuf, u8) {
    let statuses: Vec<Value> = alive
        .iter()
        .map(|n| get(&n.api, &["cluster", "status"]))
        .collect();
    let leader = statuses
        .iter()
        .position(|s| s["leader"] == s["this_node"])
        .expect("a leader");
    let follower = alive[(leader + 1) % alive.len()].api.clone();
    let name = format!("exactly-once-{delay_ms}");
    let submit = {
        let (config, model, follower, env, name) = (
            config.to_path_buf(),
            model.to_path_buf(),
            follower.clone(),
            env.to_string(),
            name.clone(),
        );
        std::thread::spawn(move || {
            cli(
                &follower,
                &[
                    "experiment",
                    "create",
                    config.to_str().unwrap_or_default(),
                    model.to_str().unwrap_or_default(),
                    "--config",
                    &format!("name={name}"),
                    "--config",
                    &env,
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(delay_ms));
    let killed = alive.remove(leader);
    let gone = (killed.data.clone(), killed.host);
    drop(killed);
    let (code, out) = submit.join().expect("submit thread");
    let old_leader = statuses[leader]["this_node"].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = get(&follower, &["cluster", "status"]);
        if s["leader"] != "0000000000000000" && s["leader"] != old_leader {
            break;
        }
        if Instant::now() > deadline {
            for n in alive.iter() {
                eprintln!("{}", get(&n.api, &["cluster", "status"]));
            }
            panic!("no new leader");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut count = 0;
    until("the submission is settled", Duration::from_secs(30), || {
        let (c, list) = cli(&follower, &["experiment", "list"]);
        if c != 0 {
            return false;
        }
        let list: Value = serde_json::from_str(list.trim()).unwrap_or_default();
        count = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["name"] == name.as_str())
            .count();
        true
    });
    eprintln!("leader killed {delay_ms} ms into a submission: exit {code}, {count} created");
    if code == 0 {
        assert_eq!(count, 1, "the CLI said it was created: {out}");
    } else {
        assert!(count <= 1, "created {count} times: {out}");
    }
    gone
}

/// Waits until every node reports the same applied index and state digest.
fn agree(nodes: &[NodeProc], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all: Vec<Value> = nodes
            .iter()
            .map(|n| get(&n.api, &["cluster", "status"]))
            .collect();
        let same = all
            .windows(2)
            .all(|w| w[0]["applied"] == w[1]["applied"] && w[0]["digest"] == w[1]["digest"]);
        if same {
            return;
        }
        let shown: Vec<String> = all
            .iter()
            .map(|s| {
                format!(
                    "{} applied {} digest {} connected {}",
                    s["this_node"], s["applied"], s["digest"], s["connected"]
                )
            })
            .collect();
        assert!(
            Instant::now() < deadline,
            "timed out: {what}:\n{}",
            shown.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
