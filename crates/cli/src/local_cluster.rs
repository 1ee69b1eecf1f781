//! A cluster of `resolute node start` processes on loopback, for the quick start
//! and the benchmarks that need real nodes (`bench recovery`, `bench submit`),
//! or placed in network namespaces (`bench wan`: [`NodeSpec`]).
//!
//! Every node is a separate process with its own data dir, real libp2p and real
//! fsync; the first bootstraps the cluster and the others join through it. The
//! processes run in their own process groups (a terminal's Ctrl-C reaches only
//! this process, which stops them in order) and are stopped when the
//! `LocalCluster` is dropped, or by `stop_on_signal` when this process gets
//! SIGINT or SIGTERM.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::{self, Target};

/// The node config every local node uses (CPU slots, short leases).
const NODE_CONFIG: &str = include_str!("../../../config/laptop.toml");
/// How long a node may take to print its ready line.
const NODE_READY_TIMEOUT_MS: u64 = 30_000;
/// How long a stopping node may drain before it is killed.
const NODE_STOP_GRACE_MS: u64 = 10_000;
/// Where a new node listens: any free port on loopback.
const ANY_PORT: &str = "/ip4/127.0.0.1/tcp/0";
/// How long the cluster may take to elect a leader with every voter in.
const CLUSTER_FORM_TIMEOUT_MS: u64 = 60_000;

/// The pids of every node process alive, shared with the signal handler.
type Pids = Arc<Mutex<Vec<i32>>>;

/// Where and how one node runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its network namespace (`ip netns`; None: this process's).
    pub ns: Option<String>,
    /// Its API's `IP:port` (in its namespace).
    pub api: String,
    /// Its libp2p listen multiaddr.
    pub listen: String,
    /// Its config file's text.
    pub config: String,
}

impl NodeSpec {
    /// A node on loopback with the laptop config.
    pub fn loopback() -> NodeSpec {
        NodeSpec {
            ns: None,
            api: "127.0.0.1:0".into(),
            listen: ANY_PORT.into(),
            config: NODE_CONFIG.into(),
        }
    }
}

/// One node process.
pub struct LocalNode {
    /// "a", "b", "c", ...
    pub name: String,
    /// Its REST API, `http://127.0.0.1:PORT`.
    pub api: String,
    /// Its libp2p multiaddr.
    pub listen: String,
    /// Its node id (hex, as the API prints it).
    pub id: String,
    /// Its data dir.
    pub data: PathBuf,
    /// The cluster administrator's token (the cluster makes its own).
    pub token: String,
    /// How it was started (its namespace, addresses, config).
    pub spec: NodeSpec,
    child: Option<Child>,
}

impl LocalNode {
    /// Whether its process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs `f` with a client target for its API, from inside its network
    /// namespace (on a thread of its own that enters it).
    pub fn call<T: Send>(
        &self,
        f: impl FnOnce(&Target) -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let target = self.target();
        let Some(ns) = &self.spec.ns else {
            return f(&target);
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_namespace(ns)?;
                f(&target)
            })
            .join()
            .unwrap_or_else(|_| bail!("a client call in namespace {ns} panicked"))
        })
    }

    /// A client target for its API.
    pub fn target(&self) -> Target {
        Target {
            node: self.api.clone(),
            json: true,
            csv: false,
            token: Some(self.token.clone()),
            ca_cert: None,
        }
    }
}

/// Several node processes forming one cluster.
pub struct LocalCluster {
    /// The nodes, in start order (`nodes[0]` bootstrapped the cluster).
    pub nodes: Vec<LocalNode>,
    /// Where the nodes' data dirs, configs and logs are.
    dir: PathBuf,
    exe: PathBuf,
    pids: Pids,
    /// The administrator's token.
    pub token: String,
}

impl LocalCluster {
    /// Starts `count` nodes under `dir` (which must be empty or absent) and waits
    /// until every one of them is a voter or learner and a leader is known.
    pub fn start(dir: &Path, count: usize) -> anyhow::Result<LocalCluster> {
        Self::start_placed(dir, &vec![NodeSpec::loopback(); count])
    }

    /// [`LocalCluster::start`] with each node where `specs` say.
    pub fn start_placed(dir: &Path, specs: &[NodeSpec]) -> anyhow::Result<LocalCluster> {
        let count = specs.len();
        assert!(count >= 1, "a cluster has at least one node");
        if dir.exists()
            && dir
                .read_dir()
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "{} is not empty: the cluster starts from a fresh data dir",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let exe = std::env::current_exe().context("finding the resolute binary")?;
        // Its own key and administrator, as `resolute cluster init` makes them;
        // every node gets the key.
        let made =
            resolute_node::bootstrap::init(&dir.join("a"), "admin").map_err(anyhow::Error::msg)?;
        let key = std::fs::read(&made.key_path)?;
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            dir: dir.to_path_buf(),
            exe,
            pids: Arc::new(Mutex::new(Vec::new())),
            token: made.token,
        };
        let mut join_token = None;
        for (k, spec) in specs.iter().enumerate() {
            let name = ((b'a' + k as u8) as char).to_string();
            let join = cluster.nodes.first().map(|n| n.listen.clone());
            if k == 1 {
                // The others join with a token the administrator makes.
                join_token = Some(cluster.join_token(count as u32 - 1)?);
            }
            let data = dir.join(&name);
            resolute_node::bootstrap::private_dir(&data).map_err(anyhow::Error::msg)?;
            resolute_node::bootstrap::write_private(
                &data.join(resolute_node::bootstrap::CLUSTER_KEY_FILE),
                &key,
            )
            .map_err(anyhow::Error::msg)?;
            let joining = join.as_deref().zip(join_token.as_deref());
            let node = cluster.spawn(&name, &data, joining, spec.clone())?;
            cluster.nodes.push(node);
        }
        cluster.wait_formed(count)?;
        Ok(cluster)
    }

    /// Stops every node when this process gets SIGINT or SIGTERM, then exits 130.
    pub fn stop_on_signal(&self) {
        let pids = self.pids.clone();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            });
            eprintln!("\nstopping the local nodes ...");
            let alive: Vec<i32> = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
            stop_pids(&alive);
            std::process::exit(130);
        });
    }

    fn spawn(
        &self,
        name: &str,
        data: &Path,
        join: Option<(&str, &str)>,
        spec: NodeSpec,
    ) -> anyhow::Result<LocalNode> {
        std::fs::create_dir_all(data)?;
        let config = self.dir.join(format!("{name}.toml"));
        std::fs::write(&config, &spec.config)
            .with_context(|| format!("writing {}", config.display()))?;
        let log = data.with_extension("log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        // The trials' entrypoints (`resolute train`) find this very binary.
        let mut path = self
            .exe
            .parent()
            .map(|d| d.as_os_str().to_owned())
            .unwrap_or_default();
        if let Some(p) = std::env::var_os("PATH") {
            path.push(":");
            path.push(p);
        }
        let mut cmd = match &spec.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args(["node", "start", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data)
            .args(["--api", &spec.api, "--listen", &spec.listen])
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0);
        if let Some((addr, token)) = join {
            cmd.args(["--join", addr]).env("RESOLUTE_JOIN_TOKEN", token);
        }
        let mut child = cmd.spawn().context("starting a node process")?;
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id() as i32);
        let ready = read_ready_line(&mut child)
            .with_context(|| format!("node {name} did not start; its log is {}", log.display()));
        let line = match ready {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
                .with_context(|| format!("no {k} in the ready line {line:?}"))
        };
        Ok(LocalNode {
            name: name.to_string(),
            api: format!("http://{}", field("api=")?),
            listen: field("listen=")?,
            id: field("node=")?,
            data: data.to_path_buf(),
            token: self.token.clone(),
            spec,
            child: Some(child),
        })
    }

    /// Waits until every running node is connected to every other one.
    pub fn wait_connected(&self) -> anyhow::Result<()> {
        self.wait_formed(self.nodes.len())
    }

    fn wait_formed(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(CLUSTER_FORM_TIMEOUT_MS);
        let expected = count.min(3);
        loop {
            // Every node connected to every other: a cluster that only hangs
            // together through its first node loses its quorum with that node.
            let formed = self.nodes.iter().all(|n| {
                n.call(|t| client::get_json(t, "/cluster")).is_ok_and(|s| {
                    s["leader"]
                        .as_str()
                        .is_some_and(|l| l != "0000000000000000")
                        && s["voters"].as_array().is_some_and(|v| v.len() >= expected)
                        && s["connected"]
                            .as_array()
                            .is_some_and(|c| c.len() + 1 >= count)
                })
            });
            if formed {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the local cluster did not form within {} s; node logs are in {}",
                    CLUSTER_FORM_TIMEOUT_MS / 1000,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the node the others follow, as `nodes[from]` sees it.
    pub fn leader(&self, from: usize) -> Option<usize> {
        let s = self.nodes[from]
            .call(|t| client::get_json(t, "/cluster"))
            .ok()?;
        let leader = s["leader"].as_str()?;
        self.nodes.iter().position(|n| n.id == leader)
    }

    /// SIGKILLs node `k` (no drain, no goodbye).
    pub fn kill(&mut self, k: usize) {
        if let Some(mut child) = self.nodes[k].child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.forget(child.id() as i32);
        }
    }

    /// Starts node `k` again from its data dir, on its old address (as a
    /// rebooted machine would be); it finds its peers by itself.
    pub fn restart(&mut self, k: usize) -> anyhow::Result<()> {
        assert!(!self.nodes[k].is_running(), "restart of a running node");
        let n = &self.nodes[k];
        let (name, data) = (n.name.clone(), n.data.clone());
        let spec = NodeSpec {
            listen: n.listen.clone(),
            ..n.spec.clone()
        };
        let node = self.spawn(&name, &data, None, spec)?;
        self.nodes[k] = node;
        Ok(())
    }

    /// A join token for `uses` nodes, made on the first node (which may
    /// still be applying its administrator).
    fn join_token(&self, uses: u32) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_millis(NODE_READY_TIMEOUT_MS);
        loop {
            let asked = self.nodes[0].call(|t| {
                client::post_json(
                    t,
                    "/join-tokens",
                    serde_json::json!({"uses": uses, "label": "local cluster"}),
                )
            });
            match asked {
                Ok(v) => {
                    return v["token"]
                        .as_str()
                        .map(str::to_string)
                        .context("no token in the answer")
                }
                Err(e) if Instant::now() > deadline => bail!("a join token: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stops every node with SIGTERM (drain and leave), SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let pids: Vec<i32> = self
            .nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id() as i32))
            .collect();
        stop_pids(&pids);
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.wait();
            }
        }
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn forget(&self, pid: i32) {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| *p != pid);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves this thread into network namespace `ns` (made by `ip netns add`).
pub(crate) fn enter_namespace(ns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))
}

/// Reads the node's first stdout line (`ready node=... api=... listen=...`),
/// then keeps draining its stdout so that later writes never fail.
fn read_ready_line(child: &mut Child) -> anyhow::Result<String> {
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let first = reader.read_line(&mut line).map(|_| line.clone());
        let _ = tx.send(first);
        let mut sink = Vec::new();
        while reader.read_until(b'\n', &mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_millis(NODE_READY_TIMEOUT_MS))
        .context("no ready line in time")??;
    if !line.starts_with("ready ") {
        bail!("it exited before it was ready");
    }
    Ok(line.trim().to_string())
}

/// SIGTERM to each process, then SIGKILL to those still alive after the grace.
fn stop_pids(pids: &[i32]) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_millis(NODE_STOP_GRACE_MS);
    let alive = |p: &i32| kill(Pid::from_raw(*p), None).is_ok() && !is_zombie(*p);
    while pids.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids.iter().filter(|p| alive(p)) {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
}

/// Whether a child has exited but was not reaped yet (it no longer runs).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}
