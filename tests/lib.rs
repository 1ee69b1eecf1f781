//! Helpers of the multi-process tests: the `resolute` binary this workspace
//! builds, node processes on loopback addresses, the CLI against a node's API,
//! and waiting for a condition.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `resolute` binary of this build (target/<profile>/resolute, beside the
/// test's own executable), brought up to date once per test process: tested
/// alone, this package would otherwise run whatever binary an earlier build
/// left there. `RESOLUTE_BIN` names another binary instead.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("RESOLUTE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("the test's executable");
        // target/<profile>/deps/<test> -> target/<profile>/resolute
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "resolute-cli",
                "--bin",
                "resolute",
            ])
            .current_dir(repo());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let path = profile_dir.join("resolute");
        let built = build.status().is_ok_and(|s| s.success());
        assert!(built && path.exists(), "could not build {}", path.display());
        path
    })
    .clone()
}

/// A `resolute node start` process (killed with SIGKILL when dropped).
pub struct NodeProc {
    /// The process.
    pub child: Child,
    /// Its REST API (`http://host:port`).
    pub api: String,
    /// Its libp2p listen address.
    pub listen: String,
    /// Its data dir.
    pub data: PathBuf,
    /// The last byte of its 127.0.0.x address.
    pub host: u8,
    /// The cluster administrator's token.
    pub token: String,
}

/// How long a started node may take to know its cluster's administrator.
const AUTHENTICATED_WAIT_MS: u64 = 20_000;

/// Each cluster's administrator token and key file, by the data dirs, API
/// and listen addresses of its nodes (a test runs several clusters at once).
#[derive(Default)]
struct Clusters {
    by_data: BTreeMap<PathBuf, (String, PathBuf)>,
    /// Token, key file and the node's own API.
    by_addr: BTreeMap<String, (String, PathBuf, String)>,
    /// The network namespace of each API that is not in the test's own.
    namespaces: BTreeMap<String, String>,
}

fn clusters() -> std::sync::MutexGuard<'static, Clusters> {
    static C: OnceLock<Mutex<Clusters>> = OnceLock::new();
    C.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// `resolute cluster init` in `data`: the admin token.
pub fn init(data: &Path) -> String {
    let out = Command::new(bin())
        .args(["cluster", "init", "--no-save", "--json", "--data-dir"])
        .arg(data)
        .output()
        .expect("cluster init");
    assert!(
        out.status.success(),
        "cluster init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("cluster init --json");
    v["token"].as_str().expect("token").to_string()
}

/// The admin token and key file a node's start uses, and the join token it
/// presents: its own cluster's when it started before, the cluster's it joins
/// (with a join token made there), or a new cluster's.
fn credentials(data: &Path, join: Option<&str>) -> (String, PathBuf, Option<String>) {
    if let Some((token, key)) = clusters().by_data.get(data).cloned() {
        return (token, key, None);
    }
    let known = join.and_then(|j| clusters().by_addr.get(j).cloned());
    let (c, join_token) = match known {
        Some((token, key, api)) => {
            std::fs::create_dir_all(data).expect("data dir");
            let own = data.join("cluster.key");
            if !own.exists() {
                std::fs::copy(&key, &own).expect("cluster key");
            }
            let made = cli_as(&api, &token, &["cluster", "join-token", "--uses", "1"]);
            let v: Value = serde_json::from_str(made.1.trim()).expect("join-token --json");
            let join_token = v["token"].as_str().expect("join token").to_string();
            ((token, key), Some(join_token))
        }
        None => {
            let token = init(data);
            ((token, data.join("cluster.key")), None)
        }
    };
    clusters().by_data.insert(data.to_path_buf(), c.clone());
    (c.0, c.1, join_token)
}

/// The admin token of the cluster whose node serves `api`.
pub fn token_of(api: &str) -> String {
    clusters()
        .by_addr
        .get(api)
        .map(|(t, _, _)| t.clone())
        .unwrap_or_default()
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node with the laptop config on 127.0.0.`host`, joining `join` if
/// given; returns once it printed its ready line.
pub fn start(data: &Path, host: u8, join: Option<&str>) -> NodeProc {
    start_with(data, host, join, &repo().join("config/laptop.toml"))
}

/// [`start`] with another config file.
pub fn start_with(data: &Path, host: u8, join: Option<&str>, config: &Path) -> NodeProc {
    let place = Place {
        ns: None,
        api_host: host,
        listen_ip: format!("127.0.0.{host}"),
    };
    start_at(data, &place, join, config)
}

/// Where a node runs: a network namespace (`None`: the test's own), the
/// loopback host of its API (127.0.0.`api_host`, in that namespace), and the
/// IP its libp2p side listens on.
pub struct Place {
    /// The network namespace (`ip netns exec`).
    pub ns: Option<String>,
    /// The last byte of its API's loopback address.
    pub api_host: u8,
    /// Its libp2p listen IP.
    pub listen_ip: String,
}

/// The `resolute` binary, run in network namespace `ns` when given.
pub fn command_in(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin());
            c
        }
        None => Command::new(bin()),
    }
}

/// [`start_with`] at a [`Place`].
pub fn start_at(data: &Path, place: &Place, join: Option<&str>, config: &Path) -> NodeProc {
    let host = place.api_host;
    let (token, key, join_token) = credentials(data, join);
    let mut cmd = command_in(place.ns.as_deref());
    cmd.args(["node", "start", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .args(["--api", &format!("127.0.0.{host}:0")])
        .args(["--listen", &format!("/ip4/{}/tcp/0", place.listen_ip)]);
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    if let Some(t) = join_token {
        cmd.env("RESOLUTE_JOIN_TOKEN", t);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node process");
    let out = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).expect("ready line");
    // Keep draining its stdout: a closed pipe would fail its later writes.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    let (api, listen) = (format!("http://{}", field("api=")), field("listen="));
    {
        let mut c = clusters();
        c.by_addr
            .insert(api.clone(), (token.clone(), key.clone(), api.clone()));
        c.by_addr
            .insert(listen.clone(), (token.clone(), key, api.clone()));
        if let Some(ns) = &place.ns {
            c.namespaces.insert(api.clone(), ns.clone());
        }
    }
    // The administrator's token works once the node has the entry that made
    // it (a new cluster's first entries; a joiner's catch-up): wait for that,
    // a while at most (a test may start a node that never joins).
    // Each failed try counts against the address's authentication budget
    // (`AUTH_FAILURES_MAX` a minute): the pause doubles, so a slow catch-up
    // does not get the tests throttled.
    let deadline = Instant::now() + Duration::from_millis(AUTHENTICATED_WAIT_MS);
    let mut pause_ms = 100;
    while cli_as(&api, &token, &["whoami"]).0 != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(pause_ms));
        pause_ms = (pause_ms * 2).min(2_000);
    }
    NodeProc {
        api,
        listen,
        child,
        data: data.to_path_buf(),
        host,
        token,
    }
}

/// Runs the CLI against a node's API (`--json`) as the cluster's
/// administrator; its exit code and stdout.
pub fn cli(api: &str, args: &[&str]) -> (i32, String) {
    cli_as(api, &token_of(api), args)
}

/// [`cli`] with another token.
pub fn cli_as(api: &str, token: &str, args: &[&str]) -> (i32, String) {
    let ns = clusters().namespaces.get(api).cloned();
    let out = command_in(ns.as_deref())
        .args(args)
        .args(["-m", api, "--json"])
        .env("RESOLUTE_TOKEN", token)
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A node's id as `cluster status` shows it (16 hex digits).
pub fn this_node(n: &NodeProc) -> String {
    get(&n.api, &["cluster", "status"])["this_node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The CLI's JSON answer (which must succeed).
pub fn get(api: &str, args: &[&str]) -> Value {
    let (code, out) = cli(api, args);
    assert_eq!(code, 0, "{args:?}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Waits until `f` holds, for at most `limit`.
pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An experiment's trials as the CLI shows them (none while it cannot say).
pub fn trials(api: &str, id: u64) -> Vec<Value> {
    let (code, out) = cli(api, &["experiment", "trials", &id.to_string()]);
    if code != 0 {
        return Vec::new();
    }
    serde_json::from_str::<Value>(out.trim())
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Submits the dependency-free Python example (`examples/python-core`) to the
/// node at `api`, with the project's Python client on its path and each of
/// `overrides` (`key.path=value`) as a `--config`; the experiment's id.
pub fn create_python_core(api: &str, overrides: &[&str]) -> u64 {
    let env = format!(
        "environment.environment_variables=[\"PYTHONPATH={}\"]",
        repo().join("python").display()
    );
    let config = repo().join("examples/python-core/experiment.yaml");
    let model = repo().join("examples/python-core");
    let mut args: Vec<String> = vec![
        "experiment".into(),
        "create".into(),
        config.display().to_string(),
        model.display().to_string(),
        "--config".into(),
        env,
    ];
    for o in overrides {
        args.push("--config".into());
        args.push((*o).to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    get(api, &args)["id"].as_u64().expect("experiment id")
}

// Experiments on a real cluster, shared by the Core API and harness tests.

/// Creates an experiment from `config` with `model` (`--config` overrides); its id.
pub fn create(api: &str, config: &Path, model: &Path, overrides: &[String]) -> u64 {
    let mut args: Vec<String> = vec![
        "experiment".into(),
        "create".into(),
        config.display().to_string(),
        model.display().to_string(),
    ];
    for o in overrides {
        args.push("--config".into());
        args.push(o.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    get(api, &args)["id"].as_u64().expect("experiment id")
}

/// The PYTHONPATH to the repository's client, for the examples.
pub fn client_env() -> String {
    format!(
        "environment.environment_variables=[\"PYTHONPATH={}\"]",
        repo().join("python").display()
    )
}

/// What [`kill_under_a_trial`] leaves: the nodes' data (kept until the
/// end of the test), the first node, the other survivor, the trial that
/// moved and its description.
pub struct Moved {
    /// The nodes' data dirs (dropped last).
    pub _dir: tempfile::TempDir,
    /// The node the experiment was submitted to.
    pub a: NodeProc,
    /// The other node that stayed up.
    pub _survivor: Option<NodeProc>,
    /// The trial that moved.
    pub trial: u64,
    /// `trial describe` of it.
    pub described: serde_json::Value,
}

/// Three nodes on `hosts`; the example `model` with `overrides` submitted to
/// the first; once a trial with slots on the second or third node has a
/// checkpoint held by two nodes, that node is SIGKILLed. Waits until the
/// experiment completes, with every trial trained to `length`, and the
/// trial that was there on a later incarnation (resumed from its checkpoint,
/// not from the start).
pub fn kill_under_a_trial(hosts: [u8; 3], model: &str, overrides: &[String], length: u64) -> Moved {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), hosts[0], None);
    let b = start(&dir.path().join("b"), hosts[1], Some(&a.listen));
    let c = start(&dir.path().join("c"), hosts[2], Some(&a.listen));
    until("three voters", Duration::from_secs(30), || {
        let v = get(&c.api, &["cluster", "status"]);
        v["voters"].as_array().is_some_and(|x| x.len() == 3)
    });
    let model = repo().join(model);
    let mut all = vec![
        client_env(),
        format!("searcher.max_length.batches={length}"),
    ];
    all.extend_from_slice(overrides);
    let id = create(&a.api, &model.join("experiment.yaml"), &model, &all);
    let ids = [this_node(&b), this_node(&c)];
    let mut victim: Option<(u64, usize)> = None;
    let copied = |trial: &serde_json::Value| {
        let runs = get(&a.api, &["trial", "runs", &trial["id"].to_string()]);
        runs["checkpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["holders"].as_array().is_some_and(|h| h.len() >= 2))
    };
    let on = |trial: &serde_json::Value, node: &str| {
        trial["layout"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["node"].as_str() == Some(node))
    };
    until(
        "a trial on b or c with a copied checkpoint",
        Duration::from_secs(120),
        || {
            for t in trials(&a.api, id) {
                for (k, node) in ids.iter().enumerate() {
                    if on(&t, node) && copied(&t) {
                        victim = Some((t["id"].as_u64().unwrap_or(0), k));
                        return true;
                    }
                }
            }
            false
        },
    );
    let (trial, k) = victim.expect("victim");
    let mut others = [Some(b), Some(c)];
    drop(others[k].take());
    let survivor = others[1 - k].take();
    until("the experiment completes", Duration::from_secs(240), || {
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    for t in trials(&a.api, id) {
        assert_eq!(t["state"], "Done(Completed)", "{t}");
        assert_eq!(t["steps_completed"], length, "{t}");
    }
    let described = get(&a.api, &["trial", "describe", &trial.to_string()]);
    assert!(
        described["incarnation"].as_u64().unwrap_or(0) >= 2,
        "it moved: {described}"
    );
    Moved {
        _dir: dir,
        a,
        _survivor: survivor,
        trial,
        described,
    }
}

/// The trial's metric reports and its last validation.
pub fn last_validation(api: &str, trial: u64) -> (serde_json::Value, serde_json::Value) {
    let m = get(api, &["trial", "metrics", &trial.to_string()]);
    let last = m
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|p| p["kind"] == "Validation")
        .cloned()
        .unwrap_or_default();
    (m, last)
}

/// Whether `python3` here imports torch (the PyTorchTrial tests need it).
pub fn has_torch() -> bool {
    Command::new("python3")
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `resolute experiment create CONFIG MODEL_DIR` against `n`.
pub fn experiment_create_in(n: &NodeProc, config: &Path, model: &Path) -> std::process::Output {
    Command::new(bin())
        .args(["experiment", "create"])
        .arg(config)
        .arg(model)
        .args(["-m", &n.api])
        .env("RESOLUTE_TOKEN", &n.token)
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli")
}
