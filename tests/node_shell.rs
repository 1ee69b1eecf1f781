//! The node shell (`crates/node`'s actors, `crates/trial`'s supervisor) as real
//! processes: a node stopped with SIGTERM drains, lets its trial checkpoint and
//! move, leaves the cluster and exits 0; a node SIGKILLed with a trial running
//! leaves that process group behind, and kills it when it starts again from its
//! data dir.

use std::path::Path;
use std::time::Duration;

use resolute_tests::{cli, get, repo, start, trials, until, NodeProc};

/// Whether a process runs (a zombie waiting to be reaped does not).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The process group a node remembered for a running incarnation of `trial`.
fn remembered_group(data: &Path, trial: u64) -> Option<(i32, std::path::PathBuf)> {
    let dir = data.join("trials").join(format!("trial-{trial}"));
    std::fs::read_dir(&dir).ok()?.flatten().find_map(|f| {
        let name = f.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("running-") && name.ends_with(".pgid")) {
            return None;
        }
        let text = std::fs::read_to_string(f.path()).ok()?;
        let pgid = text.split_whitespace().next()?.parse().ok()?;
        Some((pgid, f.path()))
    })
}

fn create(node: &NodeProc, yaml: &Path, extra: &[&str]) -> u64 {
    let mut args = vec!["experiment", "create", yaml.to_str().unwrap_or_default()];
    args.extend_from_slice(extra);
    get(&node.api, &args)["id"].as_u64().expect("experiment id")
}

#[test]
fn a_restarted_node_kills_the_trial_its_killed_previous_life_left_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = dir.path().join("sleeper.yaml");
    std::fs::write(
        &yaml,
        "name: sleeper\nentrypoint: sleep 600\nhyperparameters: {}\n\
         searcher: {name: single, metric: loss, max_length: {batches: 100}}\n",
    )
    .expect("config");
    let data = dir.path().join("a");
    let node = start(&data, 61, None);
    let id = create(&node, &yaml, &[]);
    let mut group = None;
    until("the trial's process runs", Duration::from_secs(60), || {
        let running = trials(&node.api, id)
            .iter()
            .any(|t| t["state"] == "Running");
        group = remembered_group(&data, 1);
        running && group.is_some()
    });
    let (pgid, file) = group.expect("group");
    assert!(runs(pgid), "the trial runs");
    // SIGKILL: the node dies, its trial's process group does not.
    drop(node);
    std::thread::sleep(Duration::from_millis(300));
    assert!(runs(pgid), "a SIGKILLed node leaves its trial behind");
    let again = start(&data, 61, None);
    until("the leftover is killed", Duration::from_secs(10), || {
        !runs(pgid)
    });
    assert!(!file.exists() || remembered_group(&data, 1).is_some_and(|(p, _)| p != pgid));
    drop(again);
}

#[test]
fn a_node_stopped_with_sigterm_drains_leaves_and_its_trial_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 62, None);
    let mut b = start(&dir.path().join("b"), 63, Some(&a.listen));
    until("two members", Duration::from_secs(30), || {
        let v = get(&a.api, &["cluster", "status"]);
        v["nodes"].as_array().is_some_and(|n| n.len() == 2)
    });
    let b_id = get(&b.api, &["cluster", "status"])["this_node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let python = repo().join("python");
    let env = format!(
        "environment.environment_variables=[\"PYTHONPATH={}\"]",
        python.display()
    );
    let yaml = repo().join("examples/python-core/experiment.yaml");
    let model = repo().join("examples/python-core");
    let id = create(
        &a,
        &yaml,
        &[
            model.to_str().unwrap_or_default(),
            "--config",
            &env,
            "--config",
            "searcher.max_trials=4",
            "--config",
            "searcher.max_time=400000",
            "--config",
            "hyperparameters.checkpoint_every=2000",
        ],
    );
    let mut moving = None;
    until("a checkpointed trial on b", Duration::from_secs(90), || {
        moving = trials(&a.api, id)
            .into_iter()
            .find(|t| t["node"].as_str() == Some(&b_id) && !t["latest_checkpoint"].is_null())
            .and_then(|t| t["id"].as_u64());
        moving.is_some()
    });
    let trial = moving.expect("trial");
    // Room for b's trials: a's two slots are taken by trials that run on, so
    // a third node joins with two free ones.
    let _c = start(&dir.path().join("c"), 64, Some(&a.listen));
    until("three members", Duration::from_secs(30), || {
        let v = get(&a.api, &["cluster", "status"]);
        v["nodes"].as_array().is_some_and(|n| n.len() == 3)
    });
    // SIGTERM: b drains (its trials checkpoint and stop), leaves, exits 0.
    let pid = b.child.id() as i32;
    assert_eq!(send_signal(pid, "TERM"), Some(true), "signal sent");
    let mut code = None;
    until("b exits", Duration::from_secs(60), || {
        code = b.child.try_wait().ok().flatten().and_then(|s| s.code());
        code.is_some()
    });
    assert_eq!(code, Some(0), "a graceful stop");
    until(
        "b is out of the membership",
        Duration::from_secs(30),
        || {
            let v = get(&a.api, &["cluster", "status"]);
            v["nodes"].as_array().is_some_and(|n| n.len() == 2)
        },
    );
    until(
        "its trial runs on another node",
        Duration::from_secs(60),
        || {
            trials(&a.api, id).iter().any(|t| {
                t["id"].as_u64() == Some(trial)
                    && t["state"] == "Running"
                    && t["node"] != b_id.as_str()
            })
        },
    );
    let t = trials(&a.api, id)
        .into_iter()
        .find(|t| t["id"].as_u64() == Some(trial))
        .expect("trial");
    assert_eq!(t["restarts"], 0, "a drain is not the trial's fault: {t}");
    let _ = cli(&a.api, &["experiment", "kill", &id.to_string()]);
}

/// Sends a signal with the `kill` command (no unsafe code in tests).
fn send_signal(pid: i32, signal: &str) -> Option<bool> {
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .ok()
        .map(|s| s.success())
}

/// What a node gossips as its address: the operator's `net.advertise` when
/// set (a NAT's public address); a bad one stops the node with the field's
/// name before it touches its data.
#[test]
fn a_node_advertises_the_operators_addresses_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let laptop = std::fs::read_to_string(repo().join("config/laptop.toml")).expect("laptop.toml");
    assert!(
        laptop.contains("advertise = []"),
        "the shipped config documents it"
    );
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        laptop.replace(
            "advertise = []",
            "advertise = [\"/ip4/203.0.113.9/tcp/4001\"]",
        ),
    )
    .expect("config");
    let a = resolute_tests::start_with(&dir.path().join("a"), 104, None, &config);
    let status = get(&a.api, &["cluster", "status"]);
    assert_eq!(
        status["listen"],
        serde_json::json!(["/ip4/203.0.113.9/tcp/4001"]),
        "{status}"
    );
    drop(a);
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        laptop.replace("advertise = []", "advertise = [\"not-an-address\"]"),
    )
    .expect("config");
    let out = std::process::Command::new(resolute_tests::bin())
        .args(["node", "start", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path().join("b"))
        .args([
            "--api",
            "127.0.0.105:0",
            "--listen",
            "/ip4/127.0.0.105/tcp/0",
        ])
        .output()
        .expect("node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("net.advertise not-an-address"), "{stderr}");
}

/// `resolute node init` writes a config the node starts from (and never
/// replaces one); `node systemd` prints a unit for it.
#[test]
fn node_init_writes_a_config_a_node_starts_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n");
    let run = |args: &[&str]| {
        std::process::Command::new(resolute_tests::bin())
            .args(args)
            .output()
            .expect("cli")
    };
    let data_s = data.display().to_string();
    let out = run(&["node", "init", "--role", "laptop", "--data-dir", &data_s]);
    assert!(out.status.success(), "{out:?}");
    let config = data.join("node.toml");
    let again = run(&["node", "init", "--role", "laptop", "--data-dir", &data_s]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let a = resolute_tests::start_with(&data, 106, None, &config);
    assert_eq!(
        get(&a.api, &["cluster", "status"])["nodes"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let unit = run(&[
        "node",
        "systemd",
        "--config",
        &config.display().to_string(),
        "--data-dir",
        &data_s,
    ]);
    let unit = String::from_utf8_lossy(&unit.stdout);
    assert!(
        unit.contains(&format!("--config {}", config.display()))
            && unit.contains("Restart=on-failure"),
        "{unit}"
    );
}
