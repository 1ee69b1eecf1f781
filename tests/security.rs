//! Security with real processes and sockets: no route answers without a
//! token (the router's own route list is walked, so a new route cannot be
//! forgotten); roles and owners hold; a cross-site POST is refused; a node
//! that would serve tokens in clear text, or listen for strangers without a
//! cluster key, refuses to start; tokens never reach a log.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use resolute_tests::{bin, cli, cli_as, get, repo, start, until, NodeProc};

/// `resolute node start --config CONFIG --data-dir DATA`, to add to.
fn node_start(config: &std::path::Path, data: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["node", "start", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data);
    cmd
}

/// A raw request: its status and JSON body (Null when there is none).
fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let resp = if method == "GET" {
        let mut r = agent.get(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.call()
    } else {
        let mut r = agent.post(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send(body.unwrap_or("").as_bytes())
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A path of the route table with its parameters filled in.
fn fill(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{action}", "pause")
        .replace("{name}", "nobody")
        .replace("{uuid}", &"0".repeat(64))
}

fn token_of(v: &Value) -> String {
    v["token"].as_str().expect("token").to_string()
}

#[test]
fn no_route_answers_without_a_valid_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 81, None);
    let routes = resolute_node::api::route_list();
    assert!(routes.len() >= 19, "the route table: {routes:?}");
    let bad = "rsl_0011223344556677_".to_string() + &"ab".repeat(32);
    let bad_auth = format!("Bearer {bad}");
    let admin_auth = format!("Bearer {}", a.token);
    for (i, (method, path)) in routes.iter().enumerate() {
        let url = format!("{}{}", a.api, fill(path));
        let ct = [("content-type", "application/json")];
        let blob = [("content-type", "application/octet-stream")];
        let headers: &[(&str, &str)] = if *path == "/api/v1/blobs" { &blob } else { &ct };
        let (status, body) = http(method.as_str(), &url, headers, Some("{}"));
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        // With the admin's token the route exists (no 405, no bare 404).
        let mut with_admin = headers.to_vec();
        with_admin.push(("authorization", &admin_auth));
        let (status, body) = http(method.as_str(), &url, &with_admin, Some("{}"));
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            status != 404 || body["code"].is_string(),
            "{method} {path}: a 404 of the router, not of the handler"
        );
        // An unknown token, on the first routes (failures are throttled).
        if i < 10 {
            let mut with_bad = headers.to_vec();
            with_bad.push(("authorization", &bad_auth));
            let (status, _) = http(method.as_str(), &url, &with_bad, Some("{}"));
            assert_eq!(status, 401, "{method} {path} with an unknown token");
        }
    }
    // Guessing tokens is throttled: after 20 failures a minute, even a good
    // token from that address waits.
    let url = format!("{}/api/v1/me", a.api);
    let mut throttled = false;
    for _ in 0..11 {
        let (status, _) = http("GET", &url, &[("authorization", &bad_auth)], None);
        throttled |= status == 429;
    }
    assert!(throttled, "the 21st failure is answered 429");
    let (status, _) = http("GET", &url, &[("authorization", &admin_auth)], None);
    assert_eq!(status, 429);
}

/// An experiment config that trains for a while in `workspace`.
fn experiment(workspace: &str) -> String {
    let config = std::fs::read_to_string(repo().join("examples/quickstart/experiment.yaml"))
        .expect("quickstart config");
    format!("workspace: {workspace}\n{config}")
}

fn create_as(node: &NodeProc, token: &str, config: &str, owner: &str) -> (u16, Value) {
    // The built-in trainer is this build's binary (not on the PATH).
    create_with(node, token, config, owner, &bin(), &[])
}

/// `POST /experiments` as `token`, the built-in trainer at `trainer`, with
/// more `--config` overrides.
fn create_with(
    node: &NodeProc,
    token: &str,
    config: &str,
    owner: &str,
    trainer: &std::path::Path,
    overrides: &[&str],
) -> (u16, Value) {
    let mut all = vec![format!("entrypoint={} train", trainer.display())];
    all.extend(overrides.iter().map(|o| o.to_string()));
    let body = json!({"config": config, "owner": owner, "overrides": all}).to_string();
    let auth = format!("Bearer {token}");
    http(
        "POST",
        &format!("{}/api/v1/experiments", node.api),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Some(&body),
    )
}

#[test]
fn roles_and_owners_hold_and_tokens_never_reach_a_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 82, None);
    let admin = &a.token;
    let user = |name: &str, roles: &[&str]| {
        let mut args = vec!["user", "create", name];
        for r in roles {
            args.extend(["--role", r]);
        }
        get(&a.api, &args);
        token_of(&get(&a.api, &["token", "create", "--user", name]))
    };
    let alice = user("alice", &["team-a=user"]);
    let bob = user("bob", &["team-b=user"]);
    let carol = user("carol", &["team-a=viewer"]);
    // The owner is the authenticated user, whatever the body claims.
    let (status, v) = create_as(&a, &alice, &experiment("team-a"), "mallory");
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_u64().expect("id");
    let described = get(&a.api, &["experiment", "describe", &id.to_string()]);
    assert_eq!(described["owner"], "alice", "{described}");
    // A viewer reads but does not write; nobody creates where they hold no role.
    let (code, _) = cli_as(&a.api, &carol, &["experiment", "describe", &id.to_string()]);
    assert_eq!(code, 0, "a viewer of team-a reads its experiment");
    let (status, v) = create_as(&a, &carol, &experiment("team-a"), "");
    assert_eq!(status, 403, "a viewer's write: {v}");
    let (status, v) = create_as(&a, &bob, &experiment("team-a"), "");
    assert_eq!(status, 403, "bob holds no role in team-a: {v}");
    // Bob cannot pause, kill, read or list alice's experiment.
    let url = |p: &str| format!("{}/api/v1{p}", a.api);
    let as_bob = format!("Bearer {bob}");
    let bob_h = [
        ("content-type", "application/json"),
        ("authorization", as_bob.as_str()),
    ];
    for action in ["pause", "kill"] {
        let (status, v) = http(
            "POST",
            &url(&format!("/experiments/{id}/{action}")),
            &bob_h,
            Some("{}"),
        );
        assert_eq!(status, 403, "bob {action}: {v}");
    }
    let (status, _) = http("GET", &url(&format!("/experiments/{id}")), &bob_h, None);
    assert_eq!(status, 403);
    let (_, listed) = http("GET", &url("/experiments"), &bob_h, None);
    assert_eq!(
        listed,
        json!([]),
        "bob's list does not show alice's experiment"
    );
    let as_carol = format!("Bearer {carol}");
    let carol_h = [
        ("content-type", "application/json"),
        ("authorization", as_carol.as_str()),
    ];
    let (status, _) = http(
        "POST",
        &url(&format!("/experiments/{id}/pause")),
        &carol_h,
        Some("{}"),
    );
    assert_eq!(status, 403, "a viewer cannot pause");
    // A trial's logs and checkpoints are alice's workspace's too.
    let mut trial = 0;
    let mut uuid = String::new();
    until("a checkpoint of alice's", Duration::from_secs(120), || {
        let ts = get(&a.api, &["experiment", "trials", &id.to_string()]);
        for t in ts.as_array().into_iter().flatten() {
            if let Some(u) = t["latest_checkpoint"].as_str() {
                trial = t["id"].as_u64().unwrap_or(0);
                uuid = u.to_string();
                return true;
            }
        }
        false
    });
    let (status, _) = http("GET", &url(&format!("/trials/{trial}/logs")), &bob_h, None);
    assert_eq!(status, 403, "bob reads alice's logs");
    let (status, _) = http("GET", &url(&format!("/checkpoints/{uuid}")), &bob_h, None);
    assert_eq!(status, 403, "bob downloads alice's checkpoint");
    let (status, _) = http(
        "GET",
        &url(&format!("/trials/{trial}/logs")),
        &carol_h,
        None,
    );
    assert_eq!(status, 200, "a viewer of team-a reads the logs");
    // Bob may not drain a node or make users; a revoked token stops working.
    let (status, _) = http("POST", &url("/users"), &bob_h, Some(r#"{"name": "eve"}"#));
    assert_eq!(status, 403);
    let made = get(
        &a.api,
        &["token", "create", "--user", "bob", "--label", "spare"],
    );
    let spare = token_of(&made);
    assert_eq!(cli_as(&a.api, &spare, &["whoami"]).0, 0);
    get(
        &a.api,
        &["token", "revoke", made["id"].as_str().expect("id")],
    );
    until(
        "the revoked token stops working",
        Duration::from_secs(10),
        || cli_as(&a.api, &spare, &["whoami"]).0 != 0,
    );
    // The owner pauses their own experiment.
    assert_eq!(
        cli_as(&a.api, &alice, &["experiment", "pause", &id.to_string()]).0,
        0
    );
    // No token, nor any of their secrets, in any file of the node.
    let secrets: Vec<String> = [admin, &alice, &bob, &carol, &spare]
        .iter()
        .map(|t| t.rsplit('_').next().unwrap_or_default().to_string())
        .collect();
    let mut files = vec![dir.path().join("a.log")];
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "a token's secret is in {}",
                f.display()
            );
        }
    }
    let _ = admin;
}

#[test]
fn a_cross_site_request_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 83, None);
    let url = format!("{}/api/v1/experiments", a.api);
    let auth = format!("Bearer {}", a.token);
    let config = json!({"config": experiment("x")}).to_string();
    // What a web page can send without asking first: text/plain, its Origin.
    let (status, v) = http(
        "POST",
        &url,
        &[
            ("content-type", "text/plain"),
            ("origin", "http://evil.example"),
        ],
        Some(&config),
    );
    assert!(status == 403 || status == 415, "{status} {v}");
    // Even with a stolen token: the Origin and the Content-Type are checked.
    let (status, v) = http(
        "POST",
        &url,
        &[
            ("content-type", "application/json"),
            ("origin", "http://evil.example"),
            ("authorization", &auth),
        ],
        Some(&config),
    );
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["code"], "bad_origin");
    let (status, v) = http(
        "POST",
        &url,
        &[("content-type", "text/plain"), ("authorization", &auth)],
        Some(&config),
    );
    assert_eq!(status, 415, "{v}");
    // DNS rebinding: a foreign host name that resolves to loopback.
    let (status, v) = http(
        "GET",
        &url,
        &[("host", "evil.example:80"), ("authorization", &auth)],
        None,
    );
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["code"], "bad_host");
    // A config is at most 1 MiB on this path too.
    let huge = json!({"config": "#".repeat(1_200_000)}).to_string();
    let (status, _) = http(
        "POST",
        &url,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Some(&huge),
    );
    assert_eq!(status, 413);
    assert_eq!(
        get(&a.api, &["experiment", "list"]),
        json!([]),
        "nothing was created"
    );
    let _ = cli;
}

#[test]
fn a_node_that_would_be_open_to_the_network_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("a");
    resolute_tests::init(&data);
    let run = |args: &[&str]| {
        let out = node_start(&repo().join("config/laptop.toml"), &data)
            .args(args)
            .output()
            .expect("node start");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--api", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(
        err.contains("loopback") && err.contains("127.0.0.1") && err.contains("api.tls_cert"),
        "{err}"
    );
    std::fs::remove_file(data.join("cluster.key")).expect("key");
    let (ok, err) = run(&["--listen", "/ip4/0.0.0.0/tcp/0"]);
    assert!(!ok);
    assert!(err.contains("cluster key"), "{err}");
    // A new cluster without its administrator does not start either.
    let fresh = dir.path().join("b");
    let out = node_start(&repo().join("config/laptop.toml"), &fresh)
        .output()
        .expect("node start");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster init"));
}

/// Node ids a process printed on stderr while it waited to be admitted.
fn waiting_ids(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let id = line
                .strip_prefix("node ")
                .and_then(|l| l.split_once(" waits to be admitted"))
                .map(|(id, _)| id.to_string());
            if let Some(id) = id {
                let _ = tx.send(id);
            }
        }
    });
    rx
}

/// A child process killed when dropped (a failed assertion leaves nothing running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn members(api: &str) -> Vec<String> {
    let s = get(api, &["cluster", "status"]);
    s["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|n| n["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn not_allowed(api: &str) -> u64 {
    let s = get(api, &["cluster", "status"]);
    s["security"]["dropped_peer_messages"]["NotAllowed"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_node_with_the_key_but_no_join_token_is_not_admitted_until_approved_and_a_removed_one_is_refused(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 84, None);
    // A stranger that has the cluster key (copied) but no join token.
    let data = dir.path().join("stranger");
    std::fs::create_dir_all(&data).expect("dir");
    std::fs::copy(a.data.join("cluster.key"), data.join("cluster.key")).expect("key");
    let mut stranger = node_start(&repo().join("config/laptop.toml"), &data)
        .args([
            "--api",
            "127.0.0.85:0",
            "--listen",
            "/ip4/127.0.0.85/tcp/0",
            "--join",
            &a.listen,
        ])
        .env_remove("RESOLUTE_JOIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Killed)
        .expect("stranger");
    let ids = waiting_ids(stranger.0.stderr.take().expect("stderr"));
    until(
        "the stranger's announcements are refused",
        Duration::from_secs(30),
        || not_allowed(&a.api) >= 2,
    );
    assert_eq!(members(&a.api).len(), 1, "not a member");
    assert_eq!(get(&a.api, &["cluster", "status"])["learners"], json!([]));
    // It says how to let it in; an admin approves it by that id.
    let id = ids
        .recv_timeout(Duration::from_secs(30))
        .expect("the stranger prints its id");
    let (code, out) = cli(&a.api, &["node", "approve", &id]);
    assert_eq!(code, 0, "approve: {out}");
    until(
        "the approved node is a member",
        Duration::from_secs(30),
        || members(&a.api).contains(&id),
    );
    // A third node joins with a join token from the admin (used up).
    let b = start(&dir.path().join("b"), 86, Some(&a.listen));
    until("b is a member", Duration::from_secs(30), || {
        members(&a.api).len() == 3
    });
    // Removed: out of the membership everywhere, and what it sends is refused.
    let (code, out) = cli(&a.api, &["node", "remove", &id]);
    assert_eq!(code, 0, "remove: {out}");
    for api in [&a.api, &b.api] {
        until("the removed node is gone", Duration::from_secs(30), || {
            let s = get(api, &["cluster", "status"]);
            !members(api).contains(&id)
                && !s["learners"].to_string().contains(&id)
                && !s["voters"].to_string().contains(&id)
                && s["removed"].to_string().contains(&id)
        });
    }
    // Refused by the swarm (not a member) or by the leader (removed).
    let denied = |api: &str| {
        let s = get(api, &["cluster", "status"]);
        s["security"]["denied_requests"].as_u64().unwrap_or(0) + not_allowed(api)
    };
    let refused = denied(&a.api) + denied(&b.api);
    // Restarted, it asks to join again, even with a fresh join token: refused.
    drop(stranger);
    let join = cli(&a.api, &["cluster", "join-token"]);
    let v: Value = serde_json::from_str(join.1.trim()).expect("join-token --json");
    let again = node_start(&repo().join("config/laptop.toml"), &data)
        .args(["--api", "127.0.0.85:0", "--listen", "/ip4/127.0.0.85/tcp/0"])
        .args(["--join", &a.listen, "--join", &b.listen])
        .env("RESOLUTE_JOIN_TOKEN", v["token"].as_str().expect("token"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Killed)
        .expect("the removed node again");
    until(
        "the removed node's requests are refused",
        Duration::from_secs(30),
        || denied(&a.api) + denied(&b.api) > refused,
    );
    std::thread::sleep(Duration::from_secs(2));
    for api in [&a.api, &b.api] {
        assert!(!members(api).contains(&id), "a removed node stays out");
    }
    // An admin's approval lets it back in.
    let (code, out) = cli(&a.api, &["node", "approve", &id]);
    assert_eq!(code, 0, "approve again: {out}");
    until("the node is back", Duration::from_secs(30), || {
        members(&b.api).contains(&id)
    });
    drop(again);
}

#[test]
fn a_node_that_gives_each_trial_its_own_uid_runs_the_quick_start_experiment() {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective uid.
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid != 0 {
        eprintln!("skipped: switching users needs root, and this test runs as uid {euid}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    // The trials' users must reach the data dir and the trainer: the build's
    // binary may live under root's own home (CARGO_TARGET_DIR), so a copy.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let trainer = dir.path().join("resolute");
    std::fs::copy(bin(), &trainer).expect("copy the binary");
    let laptop = std::fs::read_to_string(repo().join("config/laptop.toml")).expect("config");
    let config = dir.path().join("isolated.toml");
    let isolated = laptop.replace(
        "# uid_range = \"61000-61999\"",
        "uid_range = \"61000-61999\"",
    );
    assert_ne!(isolated, laptop, "the laptop config documents uid_range");
    std::fs::write(&config, isolated).expect("config");
    let a = resolute_tests::start_with(&dir.path().join("a"), 87, None, &config);
    // The node's own files are out of a trial's reach.
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&a.data).ok(), Some(0o711));
    assert_eq!(mode(&a.data.join("cluster.key")).ok(), Some(0o600));
    // The quick start's search, cut short: two trials side by side.
    let overrides = ["searcher.max_trials=2", "searcher.max_time=3000"];
    let (status, v) = create_with(
        &a,
        &a.token,
        &experiment("Uncategorized"),
        "",
        &trainer,
        &overrides,
    );
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_u64().expect("id").to_string();
    // Its trials run, as uids of the range, and checkpoint.
    let mut uids = std::collections::BTreeSet::new();
    until("the experiment completes", Duration::from_secs(120), || {
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
            if cwd.starts_with(a.data.join("trials")) {
                if let Ok(m) = std::fs::metadata(entry.path()) {
                    uids.insert(m.uid());
                }
            }
        }
        get(&a.api, &["experiment", "describe", &id])["state"] == "Completed"
    });
    assert!(
        uids.len() >= 2 && uids.iter().all(|u| (61_000..=61_999).contains(u)),
        "trial processes ran as {uids:?}"
    );
    let trials = get(&a.api, &["experiment", "trials", &id]);
    let checkpointed = trials
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["latest_checkpoint"].is_string())
        .count();
    assert!(checkpointed > 0, "{trials}");
}

#[test]
fn a_trials_log_is_gathered_from_its_node_over_the_cluster_channel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), 88, None);
    let b = start(&dir.path().join("b"), 89, Some(&a.listen));
    until("two members", Duration::from_secs(30), || {
        get(&a.api, &["cluster", "status"])["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    let b_id = get(&b.api, &["cluster", "status"])["this_node"]
        .as_str()
        .expect("id")
        .to_string();
    // Four trials on four slots: some run on b.
    let overrides = ["searcher.max_trials=4", "searcher.max_time=2000"];
    let (status, v) = create_with(
        &a,
        &a.token,
        &experiment("Uncategorized"),
        "",
        &bin(),
        &overrides,
    );
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_u64().expect("id");
    // A's answer for some trial holds lines that b read (b sent them).
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let on_b = loop {
        let ts = resolute_tests::trials(&a.api, id);
        let found = ts.iter().filter_map(|t| t["id"].as_u64()).find(|trial| {
            let lines = get(&a.api, &["trial", "logs", &trial.to_string()]);
            lines
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["node"] == b_id.as_str()))
        });
        if let Some(trial) = found {
            break trial;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line from b ({b_id}) in a's answers; trials: {ts:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Nothing for a user who may not read it.
    get(
        &a.api,
        &["user", "create", "eve", "--role", "elsewhere=user"],
    );
    let eve = token_of(&get(&a.api, &["token", "create", "--user", "eve"]));
    let as_eve = format!("Bearer {eve}");
    let (status, _) = http(
        "GET",
        &format!("{}/api/v1/trials/{on_b}/logs", a.api),
        &[("authorization", &as_eve)],
        None,
    );
    assert_eq!(status, 403, "eve may not read the trial's log");
}

#[test]
fn with_tls_the_api_serves_https_beyond_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A self-signed certificate for the address the client dials.
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).expect("cert");
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).expect("key");
    let laptop = std::fs::read_to_string(repo().join("config/laptop.toml")).expect("config");
    let config = dir.path().join("tls.toml");
    let with_tls = laptop.replace(
        "listen = \"127.0.0.1:8080\"",
        &format!(
            "listen = \"0.0.0.0:0\"\ntls_cert = {:?}\ntls_key = {:?}",
            cert_pem.display().to_string(),
            key_pem.display().to_string()
        ),
    );
    assert_ne!(with_tls, laptop);
    std::fs::write(&config, with_tls).expect("config");
    let data = dir.path().join("a");
    let admin = resolute_tests::init(&data);
    let mut node = node_start(&config, &data)
        .args(["--listen", "/ip4/127.0.0.90/tcp/0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Killed)
        .expect("node");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(node.0.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("ready line");
    let port = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("api=0.0.0.0:"))
        .unwrap_or_else(|| panic!("listens on all interfaces: {ready}"))
        .to_string();
    let https = format!("https://127.0.0.1:{port}");
    let whoami = |url: &str, ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(bin());
        cmd.args(["whoami", "-m", url, "--json"])
            .env("RESOLUTE_TOKEN", &admin)
            .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests");
        if let Some(ca) = ca {
            cmd.arg("--ca-cert").arg(ca);
        }
        let out = cmd.output().expect("cli");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    until(
        "the administrator is known over https",
        Duration::from_secs(30),
        || {
            let (code, out) = whoami(&https, Some(&cert_pem));
            code == Some(0) && out.contains("admin")
        },
    );
    // Not without trusting the certificate, and not in clear text.
    let (code, _) = whoami(&https, None);
    assert_ne!(code, Some(0), "an unknown issuer is refused");
    let (code, _) = whoami(&format!("http://127.0.0.1:{port}"), None);
    assert_ne!(code, Some(0), "plain HTTP gets no answer");
    drop(node);
}
