//! The node daemon's event loop: one task owns `core::Node` and carries out its
//! outputs against the durable store (fsync before `Persisted`), the swarm
//! (`crates/net`) and the trial service (`crates/trial`); network events, trial
//! events, API requests and ticks are its inputs. Blob fetches and trial launches
//! run as their own tasks and report back through the same loop.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use tokio::sync::{mpsc, oneshot};

use resolute_core::command::{Command, MetricRecord};
use resolute_core::node::{Effect, NodeError};
use resolute_core::state::{Signal, TrialState};
use resolute_core::{Input, Node, NodeConfig, NodeId, NodeInfo, Output, ProposalId, Reply};
use resolute_net::{NetConfig, NetEvent, NetHandle};
use resolute_storage::{DurableStore, LogStore};
use resolute_trial::{Launch, ServiceConfig, TrialEvent, TrialService};

use crate::config::NodeFile;

/// Delay before a proposal that found no leader (or timed out) is retried with
/// the same id (so it applies at most once).
const PROPOSAL_RETRY_MS: u64 = 300;
/// Copies of each trial's latest checkpoint kept on distinct nodes.
pub const CHECKPOINT_REPLICAS: usize = 2;
/// Where a node keeps its peers' addresses.
const PEERS_FILE: &str = "peers.json";
/// Where the daemon remembers the addresses it was told to join through (a
/// restart without `--join` dials them again).
const JOIN_FILE: &str = "join.json";
/// Tries at fetching a blob before a launch gives up.
const FETCH_ATTEMPTS: u64 = 8;
/// Pause after the first failed fetch (growing linearly).
const FETCH_RETRY_MS: u64 = 500;
/// Ticks between this node's gossiped records.
const ANNOUNCE_EVERY_TICKS: u64 = 10;
/// How long a gossiped record is believed.
const ANNOUNCEMENT_TTL_MS: u64 = 10_000;
/// Depth of the channel from the API and helper tasks to the loop.
const LOOP_CHANNEL_DEPTH: usize = 1024;
/// torchrun rendezvous ports: `MASTER_PORT_BASE` plus a value derived from the
/// trial and incarnation (every node of a gang computes the same one; two gangs
/// whose rank 0 shares a node rarely collide, and a new incarnation moves on).
const MASTER_PORT_BASE: u16 = 29_500;
/// How many ports the rendezvous ports spread over.
const MASTER_PORT_SPAN: u64 = 2_000;
/// `MASTER_ADDR` when rank 0's address is unknown (a single-node gang).
const LOOPBACK_HOST: &str = "127.0.0.1";

/// The rendezvous port of one incarnation of a trial.
fn master_port(trial: u64, incarnation: u64) -> u16 {
    // splitmix64's finalizer: consecutive trials land far apart.
    let mut z = trial ^ incarnation.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let spread = (z ^ (z >> 31)) % MASTER_PORT_SPAN;
    MASTER_PORT_BASE + spread as u16
}

/// The IP address of a multiaddr (`/ip4/10.0.0.5/tcp/7000` -> `10.0.0.5`);
/// unspecified addresses (0.0.0.0, ::) name no host.
fn host_of(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) if !ip.is_unspecified() => Some(ip.to_string()),
        Protocol::Ip6(ip) if !ip.is_unspecified() => Some(ip.to_string()),
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => Some(h.to_string()),
        _ => None,
    })
}

/// How often a node with GPUs asks NVML whether they are still healthy (a GPU
/// that disappears or reports uncorrected ECC errors leaves its capacity).
const GPU_HEALTH_CHECK_MS: u64 = 10_000;

/// What the daemon needs to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// The parsed config file.
    pub config: NodeFile,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Peers to join through.
    pub join: Vec<Multiaddr>,
}

/// A read of the node's state, run on the loop.
pub type ReadFn = Box<dyn FnOnce(&Node, &Local) -> serde_json::Value + Send>;

/// A request from the REST API (answered on its oneshot).
pub enum ApiCall {
    /// Propose a command; the reply when applied (or why not).
    Propose {
        /// What to apply.
        command: Command,
        /// The answer.
        reply: oneshot::Sender<Result<Reply, NodeError>>,
    },
    /// Read the state: the closure runs on the loop with the node.
    Read {
        /// Builds the answer.
        read: ReadFn,
        /// The answer.
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// A checkpoint's packed blob on this node's disk, fetched from a holder
    /// first when this node has no copy.
    Checkpoint {
        /// The checkpoint's uuid (its blob digest).
        uuid: String,
        /// Where the verified blob is, or why there is none.
        reply: oneshot::Sender<Result<PathBuf, BlobUnavailable>>,
    },
}

/// Why a checkpoint cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobUnavailable {
    /// No such checkpoint was ever recorded.
    NotFound,
    /// It exists, but no holder could be reached.
    Unreachable(String),
}

/// What only this node knows (its trials' logs, its identity, its API address).
pub struct Local {
    /// The trial service (logs of trials that ran here).
    pub trials: TrialService,
    /// This node's id.
    pub node: NodeId,
    /// Where the REST API listens.
    pub api: String,
    /// Its multiaddrs.
    pub listen: Vec<Multiaddr>,
    /// The peers it has a connection to now.
    pub connected: BTreeSet<NodeId>,
    /// The latest launch here of each trial.
    pub launches: BTreeMap<u64, Launched>,
    /// Each node's latest gossiped record (this node's own included): its GPUs,
    /// labels and free slots as it last told everyone.
    pub records: BTreeMap<NodeId, resolute_net::Announcement>,
}

/// A trial incarnation this node started.
#[derive(Debug, Clone, Copy)]
pub struct Launched {
    /// Which incarnation.
    pub incarnation: u64,
    /// Milliseconds spent fetching its model directory and checkpoint first.
    pub fetch_ms: u64,
}

/// Messages to the loop from helper tasks.
enum Internal {
    Launched {
        trial: u64,
        incarnation: u64,
        /// Time spent fetching its model directory and checkpoint.
        fetch_ms: u64,
    },
    LaunchFailed {
        trial: u64,
        incarnation: u64,
        reason: String,
    },
    Replicated {
        uuid: String,
    },
    ReplicationFailed {
        uuid: String,
    },
    /// A model directory fetch ended, done or not (the store tells which).
    ModelFetchEnded {
        digest: String,
    },
    /// NVML's view of the GPUs, from the periodic health check.
    GpuHealth(resolute_trial::gpu::Discovery),
    /// A trial on GPUs exited with an error, and NVML was asked about its GPUs
    /// before the exit is reported (a GPU that failed under it is not its fault).
    ErroredOnGpus {
        trial: u64,
        incarnation: u64,
        outcome: resolute_core::command::TrialOutcome,
        slots: Vec<usize>,
        found: resolute_trial::gpu::Discovery,
    },
}

/// The running node.
pub struct Daemon {
    node: Node,
    store: DurableStore,
    net: NetHandle,
    net_events: mpsc::Receiver<NetEvent>,
    trials: TrialService,
    trial_events: mpsc::Receiver<TrialEvent>,
    api: mpsc::Receiver<ApiCall>,
    internal_tx: mpsc::Sender<Internal>,
    internal: mpsc::Receiver<Internal>,
    local: Local,
    tick_ms: u64,
    /// API proposals waiting for their reply.
    waiting: BTreeMap<ProposalId, oneshot::Sender<Result<Reply, NodeError>>>,
    /// Own proposals (trial reports) retried until applied.
    own: BTreeMap<ProposalId, (Command, Option<tokio::time::Instant>)>,
    next_proposal: u128,
    members: Vec<NodeId>,
    /// Join targets until this node is a member.
    joining: bool,
    metrics: Vec<MetricRecord>,
    replicating: BTreeSet<String>,
    /// When a model directory that could not be fetched is tried again.
    model_retry_at: BTreeMap<String, tokio::time::Instant>,
    gpus: Vec<String>,
    /// Slots handed to running incarnations: (trial, incarnation) -> slot indices.
    slots_in_use: BTreeMap<(u64, u64), Vec<usize>>,
    slot_count: u32,
    /// Every GPU NVML listed at start, for the gossiped record: the ones that
    /// passed their probe are the slots (`gpus`), the others say why not.
    gpu_records: Vec<resolute_net::Gpu>,
    /// Why a slot's GPU failed its last health check, by uuid.
    gpu_failures: BTreeMap<String, String>,
    /// What the gossiped record says of this node besides its slots: the config's
    /// labels, with its site, pool, cost and whether it is preemptible.
    labels: BTreeMap<String, String>,
    /// GPU slots out of service (failed their last health check).
    slots_failed: BTreeSet<usize>,
    /// When the next GPU health check is due (None: no GPUs, or one is running).
    gpu_check_at: Option<tokio::time::Instant>,
    ticks: u64,
    announce_seq: u64,
    /// Where each known node listens (from gossip), kept in `peers.json` so a
    /// restarted node can find the cluster again.
    addrs: BTreeMap<NodeId, Vec<String>>,
    /// The addresses this node joined through, dialed again while it has no peer.
    join: Vec<Multiaddr>,
    addrs_dirty: bool,
    data_dir: PathBuf,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Storage, network or trial service setup failed.
    #[error("{0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Setup(e.to_string())
}

/// A random 128-bit start for this process's proposal ids (so ids from different
/// runs of the same node never collide).
fn proposal_base() -> u128 {
    use std::io::Read;
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u128::from_le_bytes(b) & !(1u128 << 127)
}

impl Daemon {
    /// Opens the data dir, starts the swarm, the trial service and the node.
    pub async fn start(
        opts: Options,
        api: mpsc::Receiver<ApiCall>,
        api_addr: String,
    ) -> Result<Daemon, DaemonError> {
        let c = &opts.config;
        std::fs::create_dir_all(&opts.data_dir).map_err(setup)?;
        let (store, recovered) = DurableStore::open(&opts.data_dir.join("log")).map_err(setup)?;
        let listen = c
            .net
            .listen
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| setup(format!("net.listen {a}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut net_config = NetConfig::new(opts.data_dir.clone(), listen[0].clone());
        net_config.listen = listen;
        net_config.cluster = c.net.cluster.clone();
        net_config.mdns = c.net.mdns;
        net_config.cluster_key = c
            .net
            .cluster_key
            .as_deref()
            .map(resolute_net::config::parse_cluster_key)
            .transpose()
            .map_err(setup)?;
        let mut join = opts.join.clone();
        for b in &c.net.bootstrap {
            join.push(
                b.parse()
                    .map_err(|e| setup(format!("net.bootstrap {b}: {e}")))?,
            );
        }
        let join_file = opts.data_dir.join(JOIN_FILE);
        let remembered_join: Vec<Multiaddr> = std::fs::read(&join_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        if !join.is_empty() {
            let list: Vec<String> = join.iter().map(|a| a.to_string()).collect();
            write_atomically(&join_file, &serde_json::to_vec(&list).unwrap_or_default());
        }
        let (net, net_events, _task) = resolute_net::spawn(net_config).await.map_err(setup)?;
        let (trials, trial_events) = TrialService::start(ServiceConfig {
            work_root: opts.data_dir.join("trials"),
            data_dir: opts.data_dir.clone(),
            kill_grace_ms: resolute_trial::KILL_GRACE_DEFAULT_MS,
        })
        .await
        .map_err(setup)?;
        let gpu_records: Vec<resolute_net::Gpu> = if c.gpus == "auto" {
            resolute_trial::gpu::discover(true)
                .gpus
                .iter()
                .map(|g| resolute_net::Gpu {
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_mib: g.memory_mib,
                    disabled: (!g.usable).then(|| g.reason.clone().unwrap_or_default()),
                })
                .collect()
        } else {
            Vec::new()
        };
        // The slots: the GPUs that passed their probe, in NVML order.
        let gpus: Vec<String> = gpu_records
            .iter()
            .filter(|g| g.disabled.is_none())
            .map(|g| g.uuid.clone())
            .collect();
        let gpu_check_at = (!gpus.is_empty())
            .then(|| tokio::time::Instant::now() + Duration::from_millis(GPU_HEALTH_CHECK_MS));
        let slot_count = if gpus.is_empty() {
            c.cpu_slots
        } else {
            gpus.len() as u32
        };
        let settings = resolute_core::pool::PoolSettings {
            policy: if c.pool.policy == "priority" {
                resolute_core::pool::Policy::Priority {
                    preemption: c.pool.preemption,
                }
            } else {
                resolute_core::pool::Policy::FairShare
            },
            burst_after_s: c.pool.burst_after_s,
            min_runtime_s: c.pool.min_runtime_s,
            team_weights: BTreeMap::new(),
        };
        let info = NodeInfo {
            site: c.site.clone(),
            slots: slot_count,
            pool: c.pool.name.clone(),
            preemptible: c.pool.preemptible,
            cost_per_slot_hour_micros: (c.pool.cost_per_slot_hour * 1e6).round() as u64,
            pool_settings: Some(settings),
            labels: c.labels.clone(),
        };
        let mut labels = info.labels.clone();
        labels.insert("site".into(), info.site.clone());
        labels.insert("pool".into(), info.pool.clone());
        labels.insert("preemptible".into(), info.preemptible.to_string());
        labels.insert(
            "cost_per_slot_hour".into(),
            format!("{}", c.pool.cost_per_slot_hour),
        );
        let mut cfg = NodeConfig::new(net.node_id, info);
        cfg.tick_ms = c.node.tick_ms;
        cfg.lease_timeout_ms = c.node.lease_timeout_ms;
        cfg.disconnect_grace_ms = c.node.disconnect_grace_ms;
        cfg.voters = c.node.voters;
        let fresh = recovered.snapshot.is_none() && recovered.entries.is_empty();
        let bootstrap = fresh && join.is_empty();
        if join.is_empty() {
            join = remembered_join;
        }
        let (node, first) = Node::new(cfg, &recovered, bootstrap).map_err(setup)?;
        for addr in &join {
            // A peer may not be up yet; the join is retried below.
            let _ = net.dial(addr.clone()).await;
        }
        // Peers this node knew before a restart.
        let known: BTreeMap<NodeId, Vec<String>> = std::fs::read(opts.data_dir.join(PEERS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for addr in known.values().flatten() {
            if let Ok(a) = addr.parse::<Multiaddr>() {
                let _ = net.dial(a).await;
            }
        }
        let info = net.info().await.map_err(setup)?;
        let (internal_tx, internal) = mpsc::channel(LOOP_CHANNEL_DEPTH);
        let node_id = net.node_id;
        let mut d = Daemon {
            node,
            store,
            net,
            net_events,
            trials: trials.clone(),
            trial_events,
            api,
            internal_tx,
            internal,
            local: Local {
                node: node_id,
                trials,
                api: api_addr,
                listen: info.listen,
                connected: BTreeSet::new(),
                launches: BTreeMap::new(),
                records: BTreeMap::new(),
            },
            tick_ms: c.node.tick_ms,
            waiting: BTreeMap::new(),
            own: BTreeMap::new(),
            next_proposal: proposal_base(),
            members: Vec::new(),
            joining: fresh && !bootstrap,
            metrics: Vec::new(),
            replicating: BTreeSet::new(),
            model_retry_at: BTreeMap::new(),
            gpus,
            slots_in_use: BTreeMap::new(),
            slot_count,
            slots_failed: BTreeSet::new(),
            gpu_records,
            gpu_failures: BTreeMap::new(),
            labels,
            gpu_check_at,
            ticks: 0,
            announce_seq: 0,
            addrs: known,
            join,
            addrs_dirty: false,
            data_dir: opts.data_dir.clone(),
        };
        d.carry_out(first);
        Ok(d)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.net.node_id
    }

    /// The blob store (model directories and checkpoints) this node serves from.
    pub fn blobs(&self) -> resolute_storage::blob::BlobStore {
        self.trials.store().clone()
    }

    /// Its listen addresses.
    pub fn listen(&self) -> &[Multiaddr] {
        &self.local.listen
    }

    fn now(&self) -> u64 {
        // The leader stamps entries with this clock: wall time in milliseconds.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn step(&mut self, input: Input) {
        let now = self.now();
        let outs = self.node.step(now, input);
        self.carry_out(outs);
    }

    fn carry_out(&mut self, outs: Vec<Output>) {
        let mut work: VecDeque<Output> = outs.into();
        while let Some(out) = work.pop_front() {
            match out {
                Output::Send { to, msg } => {
                    self.net.send_nowait(to, msg);
                }
                Output::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } => {
                    // A write that fails leaves the node unable to keep its promises:
                    // stop rather than acknowledge what is not durable.
                    let result = (|| {
                        if let Some(s) = &snapshot {
                            self.store
                                .install_snapshot(s, &hard_state.unwrap_or_default())?;
                        }
                        self.store.append(&entries, hard_state.as_ref())?;
                        self.store.sync()
                    })();
                    if let Err(e) = result {
                        eprintln!("fatal: the log store failed: {e}");
                        std::process::exit(3);
                    }
                    if seq > 0 {
                        let now = self.now();
                        work.extend(self.node.step(now, Input::Persisted { seq }));
                    }
                }
                Output::Reply { id, result } => self.on_reply(id, result),
                Output::Effect(e) => self.on_effect(e),
            }
        }
    }

    fn on_reply(&mut self, id: ProposalId, result: Result<Reply, NodeError>) {
        if let Some(reply) = self.waiting.remove(&id) {
            let _ = reply.send(result);
            return;
        }
        if let Some((_, retry)) = self.own.get_mut(&id) {
            match result {
                Ok(_) => {
                    self.own.remove(&id);
                }
                Err(_) => {
                    *retry = Some(
                        tokio::time::Instant::now() + Duration::from_millis(PROPOSAL_RETRY_MS),
                    );
                }
            }
        }
    }

    fn propose_own(&mut self, command: Command) {
        self.next_proposal = self.next_proposal.wrapping_add(1);
        let id = ProposalId(self.next_proposal);
        self.own.insert(id, (command.clone(), None));
        self.step(Input::Propose { id, command });
    }

    fn retry_own(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(ProposalId, Command)> = self
            .own
            .iter()
            .filter(|(_, (_, r))| r.is_some_and(|t| t <= now))
            .map(|(id, (c, _))| (*id, c.clone()))
            .collect();
        for (id, command) in due {
            if let Some(e) = self.own.get_mut(&id) {
                e.1 = None;
            }
            self.step(Input::Propose { id, command });
        }
    }

    fn on_effect(&mut self, effect: Effect) {
        match effect {
            Effect::StartTrial {
                trial,
                incarnation,
                experiment,
                hparams,
                seed,
                slots,
                node_rank,
                layout,
                target,
                latest_checkpoint,
            } => self.start_trial(
                trial,
                incarnation,
                experiment,
                hparams,
                seed,
                slots,
                node_rank,
                &layout,
                target,
                latest_checkpoint,
            ),
            Effect::SignalTrial {
                trial,
                incarnation,
                signal,
            } => match signal {
                Signal::Stop | Signal::Pause => {
                    let timeout_ms = self
                        .node
                        .state()
                        .trials
                        .get(&trial)
                        .map_or(3_600_000, |t| t.preemption_timeout_s * 1000);
                    self.trials.stop(trial, incarnation, timeout_ms);
                }
                Signal::Kill => self.trials.kill(trial, incarnation),
                Signal::Target(_) => {}
            },
            Effect::StopAllTrials => self.trials.kill_all(),
            Effect::Reconcile { keep } => {
                let keep: BTreeSet<(u64, u64)> = keep.into_iter().collect();
                let stale: Vec<(u64, u64)> = self
                    .slots_in_use
                    .keys()
                    .filter(|k| !keep.contains(k))
                    .copied()
                    .collect();
                for (t, i) in stale {
                    self.trials.kill(t, i);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_trial(
        &mut self,
        trial: u64,
        incarnation: u64,
        experiment: u64,
        hparams: resolute_types::Value,
        seed: u32,
        slots: u32,
        node_rank: usize,
        layout: &[(NodeId, u32)],
        target: Option<u64>,
        latest_checkpoint: Option<String>,
    ) {
        if self.slots_in_use.contains_key(&(trial, incarnation)) {
            return;
        }
        let state = self.node.state();
        let Some(exp) = state.experiments.get(&experiment) else {
            return;
        };
        let Some(config) = exp.config() else { return };
        let entrypoint = match &config.entrypoint {
            Some(resolute_types::config::Entrypoint::Command(c)) => c.clone(),
            Some(resolute_types::config::Entrypoint::Args(a)) => a.join(" "),
            None => String::new(),
        };
        // Slots: GPU uuids when this node has GPUs.
        let used: BTreeSet<usize> = self.slots_in_use.values().flatten().copied().collect();
        let mine: Vec<usize> = (0..self.slot_count as usize)
            .filter(|s| !used.contains(s) && !self.slots_failed.contains(s))
            .take(slots as usize)
            .collect();
        let gpus: Vec<String> = mine
            .iter()
            .filter_map(|s| self.gpus.get(*s).cloned())
            .collect();
        self.slots_in_use.insert((trial, incarnation), mine);
        let vars = if self.gpus.is_empty() {
            &config.environment.environment_variables.cpu
        } else {
            &config.environment.environment_variables.cuda
        };
        let env: BTreeMap<String, String> = vars
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let distributed = (layout.len() > 1).then(|| resolute_trial::Distributed {
            rank: layout[..node_rank].iter().map(|(_, s)| *s).sum(),
            world_size: layout.iter().map(|(_, s)| *s).sum(),
            local_world_size: slots,
            group_rank: node_rank as u32,
            master_addr: self.rank0_host(layout),
            master_port: master_port(trial, incarnation),
        });
        let time_metric = config
            .searcher
            .method
            .budget()
            .map_or("batches".to_string(), |b| b.time_metric);
        let model_digest = (!exp.model_digest.is_empty()).then(|| exp.model_digest.clone());
        let members = self.other_members();
        let checkpoint_holders: Vec<NodeId> = latest_checkpoint
            .as_ref()
            .and_then(|c| state.checkpoints.get(c))
            .map(|c| {
                c.holders
                    .iter()
                    .copied()
                    .filter(|n| *n != self.id())
                    .collect()
            })
            .unwrap_or_default();
        let launch = Launch {
            trial,
            incarnation,
            experiment,
            entrypoint,
            model_dir: None,
            model_digest: model_digest.clone(),
            hparams: serde_json::to_value(&hparams).unwrap_or_default(),
            seed,
            latest_checkpoint: latest_checkpoint.clone(),
            target,
            time_metric,
            gpus,
            distributed,
            env,
        };
        let (net, trials, tx) = (
            self.net.clone(),
            self.trials.clone(),
            self.internal_tx.clone(),
        );
        tokio::spawn(async move {
            let store = trials.store().clone();
            // Fetch what is missing first: nothing unverified reaches the trial.
            let needed = [
                ("model directory", model_digest, members),
                ("checkpoint", latest_checkpoint, checkpoint_holders),
            ];
            let mut failed = None;
            let fetch_started = tokio::time::Instant::now();
            for (what, digest, holders) in needed {
                let Some(d) = digest.filter(|d| !store.has(d)) else {
                    continue;
                };
                if let Err(e) = fetch_patiently(&net, &d, &holders).await {
                    failed = Some(format!("{what}: {e}"));
                    break;
                }
            }
            let fetch_ms = fetch_started.elapsed().as_millis() as u64;
            let msg = match failed {
                Some(reason) => Err(reason),
                None => trials.launch(launch).await.map_err(|e| e.to_string()),
            };
            let msg = match msg {
                Ok(()) => Internal::Launched {
                    trial,
                    incarnation,
                    fetch_ms,
                },
                Err(reason) => Internal::LaunchFailed {
                    trial,
                    incarnation,
                    reason,
                },
            };
            let _ = tx.send(msg).await;
        });
    }

    /// The host of a gang's node rank 0 for torchrun's `MASTER_ADDR`: the IP
    /// of its first listen address (this node's own, or what gossip told us).
    fn rank0_host(&self, layout: &[(NodeId, u32)]) -> String {
        let Some(&(rank0, _)) = layout.first() else {
            return LOOPBACK_HOST.to_string();
        };
        let addrs: Vec<String> = if rank0 == self.id() {
            self.local.listen.iter().map(|a| a.to_string()).collect()
        } else {
            self.addrs.get(&rank0).cloned().unwrap_or_default()
        };
        addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .find_map(|a| host_of(&a))
            .unwrap_or_else(|| LOOPBACK_HOST.to_string())
    }

    /// The Raft members other than this node (where blobs can come from).
    fn other_members(&self) -> Vec<NodeId> {
        let me = self.id();
        self.members.iter().copied().filter(|n| *n != me).collect()
    }

    /// Slots this node offers now: its GPUs less the failed ones (or CPU slots).
    fn slots_offered(&self) -> u32 {
        self.slot_count
            .saturating_sub(self.slots_failed.len() as u32)
    }

    /// Starts an NVML health check off the loop when one is due.
    fn check_gpus(&mut self) {
        let due = self
            .gpu_check_at
            .is_some_and(|at| at <= tokio::time::Instant::now());
        if !due {
            return;
        }
        self.gpu_check_at = None;
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let found = resolute_trial::gpu::discover(false);
            let _ = tx.blocking_send(Internal::GpuHealth(found));
        });
    }

    /// A GPU that failed its health check leaves the node's capacity (proposed
    /// to the cluster, which stops trials that no longer fit); one that recovers
    /// comes back.
    fn on_gpu_health(&mut self, found: resolute_trial::gpu::Discovery, exited: Option<u64>) {
        self.gpu_check_at =
            Some(tokio::time::Instant::now() + Duration::from_millis(GPU_HEALTH_CHECK_MS));
        let Some(healthy) = resolute_trial::gpu::healthy_slots(&self.gpus, &found) else {
            eprintln!(
                "node {:016x}: GPU health check: NVML unavailable ({}); capacity unchanged",
                self.id(),
                found.nvml_error.unwrap_or_default()
            );
            return;
        };
        let failed: BTreeSet<usize> = (0..healthy.len()).filter(|i| !healthy[*i]).collect();
        // The cluster's record can be stale too: a node that restarted after a
        // GPU came back registers what its probe found, but the state keeps the
        // capacity it proposed before.
        let recorded = self
            .node
            .state()
            .nodes
            .get(&self.id())
            .map(|n| n.info.slots);
        let offered = self.slot_count.saturating_sub(failed.len() as u32);
        if failed == self.slots_failed && recorded.is_none_or(|r| r == offered) {
            return;
        }
        self.gpu_failures = failed
            .iter()
            .filter_map(|i| self.gpus.get(*i))
            .map(|uuid| {
                let why = found
                    .gpus
                    .iter()
                    .find(|g| g.uuid == *uuid)
                    .and_then(|g| g.reason.clone())
                    .unwrap_or_else(|| "NVML no longer lists it".to_string());
                (uuid.clone(), why)
            })
            .collect();
        let (before, slots) = (self.slots_offered(), offered);
        self.slots_failed = failed;
        eprintln!(
            "node {:016x}: GPU health changed: {slots} of {} GPUs healthy (was {before}); failed: {:?}",
            self.id(),
            self.slot_count,
            self.slots_failed
                .iter()
                .filter_map(|i| self.gpus.get(*i))
                .collect::<Vec<_>>()
        );
        // The trials on the failed GPUs stop first (only this node knows which
        // slot is which); `exited` just exited on one of this node's GPUs.
        let mut stop_first: Vec<u64> = self
            .slots_in_use
            .iter()
            .filter(|(_, s)| s.iter().any(|i| self.slots_failed.contains(i)))
            .map(|((trial, _), _)| *trial)
            .collect();
        stop_first.extend(exited);
        let node = self.id();
        self.propose_own(Command::NodeCapacity {
            node,
            slots,
            stop_first,
        });
    }

    fn on_internal(&mut self, m: Internal) {
        match m {
            Internal::GpuHealth(found) => self.on_gpu_health(found, None),
            Internal::ErroredOnGpus {
                trial,
                incarnation,
                outcome,
                slots,
                found,
            } => {
                self.on_gpu_health(found, Some(trial));
                let outcome = if slots.iter().any(|s| self.slots_failed.contains(s)) {
                    // Lost to hardware, like a lost node: back to the queue
                    // without charging a restart.
                    eprintln!(
                        "trial {trial} incarnation {incarnation}: its GPU failed under it; \
                         requeued, no restart charged"
                    );
                    resolute_core::command::TrialOutcome::Preempted
                } else {
                    outcome
                };
                self.propose_own(Command::TrialExited {
                    trial,
                    incarnation,
                    outcome,
                });
            }
            Internal::Launched {
                trial,
                incarnation,
                fetch_ms,
            } => {
                self.local.launches.insert(
                    trial,
                    Launched {
                        incarnation,
                        fetch_ms,
                    },
                );
                self.propose_own(Command::TrialStarted { trial, incarnation });
            }
            Internal::LaunchFailed {
                trial,
                incarnation,
                reason,
            } => {
                eprintln!(
                    "node {:016x}: trial {trial} incarnation {incarnation} could not start: {reason} (connected {:x?}, known addresses of {:x?})",
                    self.id(),
                    self.local.connected,
                    self.addrs.keys().collect::<Vec<_>>()
                );
                self.slots_in_use.remove(&(trial, incarnation));
                self.propose_own(Command::TrialExited {
                    trial,
                    incarnation,
                    outcome: resolute_core::command::TrialOutcome::Errored {
                        message: reason,
                        exit_code: None,
                    },
                });
            }
            Internal::Replicated { uuid } => {
                let holder = self.id();
                self.propose_own(Command::CheckpointReplicated { uuid, holder });
            }
            Internal::ReplicationFailed { uuid } => {
                self.replicating.remove(&uuid);
            }
            Internal::ModelFetchEnded { digest } => {
                self.replicating.remove(&digest);
                // Tried and (if the store lacks it) failed: not again at once.
                let later = tokio::time::Instant::now() + Duration::from_millis(FETCH_RETRY_MS);
                self.model_retry_at.insert(digest, later);
                let store = self.trials.store().clone();
                self.model_retry_at.retain(|d, _| !store.has(d));
            }
        }
    }

    fn on_trial_event(&mut self, e: TrialEvent) {
        match e {
            TrialEvent::Metrics {
                trial,
                incarnation,
                kind,
                steps_completed,
                metrics,
            } => self.metrics.push(MetricRecord {
                trial,
                incarnation,
                kind,
                steps_completed,
                metrics,
            }),
            TrialEvent::CheckpointSaved {
                trial,
                incarnation,
                uuid,
                steps_completed,
                size,
                ..
            } => {
                self.flush_metrics();
                let holder = self.id();
                self.propose_own(Command::CheckpointSaved {
                    uuid: uuid.clone(),
                    trial,
                    incarnation,
                    steps_completed,
                    size,
                    digest: uuid,
                    holder,
                });
            }
            TrialEvent::Exited {
                trial,
                incarnation,
                outcome,
                ..
            } => {
                if let resolute_core::command::TrialOutcome::Errored { message, exit_code } =
                    &outcome
                {
                    eprintln!(
                        "trial {trial} incarnation {incarnation} failed ({exit_code:?}): {message}"
                    );
                }
                self.flush_metrics();
                let slots = self
                    .slots_in_use
                    .remove(&(trial, incarnation))
                    .unwrap_or_default();
                let errored = matches!(
                    outcome,
                    resolute_core::command::TrialOutcome::Errored { .. }
                );
                if errored && !self.gpus.is_empty() && !slots.is_empty() {
                    // Ask NVML before reporting: the exit is reported when the
                    // answer is back (off the loop; milliseconds).
                    let tx = self.internal_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let found = resolute_trial::gpu::discover(false);
                        let _ = tx.blocking_send(Internal::ErroredOnGpus {
                            trial,
                            incarnation,
                            outcome,
                            slots,
                            found,
                        });
                    });
                    return;
                }
                self.propose_own(Command::TrialExited {
                    trial,
                    incarnation,
                    outcome,
                });
            }
            TrialEvent::Progress { .. }
            | TrialEvent::EarlyExit { .. }
            | TrialEvent::PreemptAcked { .. } => {}
        }
    }

    fn flush_metrics(&mut self) {
        if !self.metrics.is_empty() {
            let records = std::mem::take(&mut self.metrics);
            self.propose_own(Command::Metrics { records });
        }
    }

    /// Keeps `CHECKPOINT_REPLICAS` copies of every live trial's latest checkpoint:
    /// the nodes the state chooses (`ClusterState::checkpoints_to_copy`) fetch it
    /// and record their copy.
    fn replicate_checkpoints(&mut self) {
        let wanted: Vec<(String, Vec<NodeId>)> = self
            .node
            .state()
            .checkpoints_to_copy(self.id(), &self.members)
            .into_iter()
            .filter(|(uuid, _)| !self.replicating.contains(uuid))
            .collect();
        for (uuid, holders) in wanted {
            self.replicating.insert(uuid.clone());
            let (net, tx) = (self.net.clone(), self.internal_tx.clone());
            tokio::spawn(async move {
                let msg = match net.fetch(&uuid, holders).await {
                    Ok(_) => Internal::Replicated { uuid },
                    Err(_) => Internal::ReplicationFailed { uuid },
                };
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Fetches the model directory of every unfinished experiment that this node
    /// lacks (`ClusterState::models_to_keep`), from any member.
    fn keep_models(&mut self) {
        let store = self.trials.store().clone();
        let now = tokio::time::Instant::now();
        let wanted: Vec<String> = self
            .node
            .state()
            .models_to_keep()
            .into_iter()
            .filter(|d| !self.replicating.contains(d) && !store.has(d))
            .filter(|d| self.model_retry_at.get(d).is_none_or(|t| *t <= now))
            .collect();
        let members = self.other_members();
        if members.is_empty() {
            return;
        }
        for digest in wanted {
            self.replicating.insert(digest.clone());
            let (net, tx, holders) = (self.net.clone(), self.internal_tx.clone(), members.clone());
            let me = self.id();
            tokio::spawn(async move {
                if let Err(e) = net.fetch(&digest, holders).await {
                    eprintln!("node {me:016x}: model directory {digest} not copied yet: {e}");
                }
                let _ = tx.send(Internal::ModelFetchEnded { digest }).await;
            });
        }
    }

    fn on_net(&mut self, e: NetEvent) {
        match e {
            NetEvent::Message { from, msg } => self.step(Input::Peer { from, msg }),
            NetEvent::Connected(n) => {
                self.local.connected.insert(n);
                if self.joining {
                    self.step(Input::Join { via: n });
                }
            }
            NetEvent::Disconnected(n) => {
                self.local.connected.remove(&n);
                self.step(Input::Disconnected { node: n });
            }
            NetEvent::Announcement(a) => {
                self.local.records.insert(a.node, a.clone());
                if self.addrs.get(&a.node) != Some(&a.addrs) {
                    self.addrs.insert(a.node, a.addrs);
                    self.addrs_dirty = true;
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        self.step(Input::Tick);
        // Every connected peer is alive (a lost connection stops the heartbeat).
        let peers: Vec<NodeId> = self.local.connected.iter().copied().collect();
        for n in peers {
            self.step(Input::Heartbeat { node: n });
        }
        self.flush_metrics();
        self.retry_own();
        self.check_gpus();
        let (v, l) = self.node.membership();
        let mut members = [v, l].concat();
        members.sort_unstable();
        if members != self.members && !members.is_empty() {
            self.members = members.clone();
            let _ = self.net.set_members(members.clone()).await;
        }
        if self.joining && members.contains(&self.id()) {
            self.joining = false;
        }
        if self.joining && self.node.applied() == 0 {
            // Ask again through anyone connected (the first try may have raced).
            let via = self.local.connected.iter().next().copied();
            if let Some(via) = via {
                if self.node.applied() == 0 && (self.now() / 1000) % 3 == 0 {
                    self.step(Input::Join { via });
                }
            }
        }
        if std::mem::take(&mut self.addrs_dirty) {
            if let Ok(bytes) = serde_json::to_vec(&self.addrs) {
                write_atomically(&self.data_dir.join(PEERS_FILE), &bytes);
            }
        }
        self.replicate_checkpoints();
        // At once, not on the announce cadence: a short trial may checkpoint and
        // its node die within a second of the submission.
        self.keep_models();
        self.ticks += 1;
        if self.ticks % ANNOUNCE_EVERY_TICKS == 1 {
            self.announce().await;
            self.remember_and_redial().await;
        }
    }

    /// Saves the peers' addresses, and dials members this node is not connected to.
    async fn remember_and_redial(&mut self) {
        let me = self.id();
        let missing: Vec<Multiaddr> = self
            .members
            .iter()
            .filter(|n| **n != me && !self.local.connected.contains(n))
            .filter_map(|n| self.addrs.get(n))
            .flatten()
            .filter_map(|a| a.parse().ok())
            .collect();
        let alone = self.local.connected.is_empty();
        let missing = missing
            .into_iter()
            .chain(self.join.iter().filter(|_| alone).cloned());
        for a in missing {
            let net = self.net.clone();
            tokio::spawn(async move {
                let _ = net.dial(a).await;
            });
        }
    }

    /// Gossips this node's record: how to reach it, its slots, what it holds.
    async fn announce(&mut self) {
        self.announce_seq += 1;
        let used: u32 = self.slots_in_use.values().map(|s| s.len() as u32).sum();
        let mut blobs = self.trials.store().list();
        blobs.truncate(resolute_net::gossip::ANNOUNCED_BLOBS_MAX);
        let a = resolute_net::Announcement {
            node: self.id(),
            seq: self.announce_seq,
            ttl_ms: ANNOUNCEMENT_TTL_MS,
            addrs: self.local.listen.iter().map(|a| a.to_string()).collect(),
            api: self.local.api.clone(),
            slots_total: self.slots_offered(),
            slots_free: self.slots_offered().saturating_sub(used),
            gpus: self
                .gpu_records
                .iter()
                .map(|g| match self.gpu_failures.get(&g.uuid) {
                    Some(why) if g.disabled.is_none() => resolute_net::Gpu {
                        disabled: Some(format!("failed its health check: {why}")),
                        ..g.clone()
                    },
                    _ => g.clone(),
                })
                .collect(),
            labels: self.labels.clone(),
            blobs,
        };
        self.local.records.insert(a.node, a.clone());
        let _ = self.net.publish(a).await;
    }

    fn on_api(&mut self, call: ApiCall) {
        match call {
            ApiCall::Propose { command, reply } => {
                self.next_proposal = self.next_proposal.wrapping_add(1);
                let id = ProposalId(self.next_proposal);
                self.waiting.insert(id, reply);
                self.step(Input::Propose { id, command });
            }
            ApiCall::Read { read, reply } => {
                let _ = reply.send(read(&self.node, &self.local));
            }
            ApiCall::Checkpoint { uuid, reply } => self.serve_checkpoint(uuid, reply),
        }
    }

    fn serve_checkpoint(
        &mut self,
        uuid: String,
        reply: oneshot::Sender<Result<PathBuf, BlobUnavailable>>,
    ) {
        let store = self.trials.store().clone();
        let me = self.id();
        let holders: Option<Vec<NodeId>> = self
            .node
            .state()
            .checkpoints
            .get(&uuid)
            .map(|c| c.holders.iter().copied().filter(|n| *n != me).collect());
        if store.has(&uuid) {
            let _ = reply.send(Ok(store.path(&uuid)));
            return;
        }
        let Some(holders) = holders else {
            let _ = reply.send(Err(BlobUnavailable::NotFound));
            return;
        };
        let net = self.net.clone();
        tokio::spawn(async move {
            let r = match fetch_patiently(&net, &uuid, &holders).await {
                Ok(()) => Ok(store.path(&uuid)),
                Err(e) => Err(BlobUnavailable::Unreachable(e.to_string())),
            };
            let _ = reply.send(r);
        });
    }

    /// Runs until `stop` resolves: then drains (trials checkpoint and stop),
    /// leaves the group and returns.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.tick_ms.max(10)));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                Some(e) = self.net_events.recv() => self.on_net(e),
                Some(e) = self.trial_events.recv() => self.on_trial_event(e),
                Some(m) = self.internal.recv() => self.on_internal(m),
                Some(c) = self.api.recv() => self.on_api(c),
                _ = &mut stop => break,
            }
        }
        self.leave().await;
    }

    /// Graceful stop: ask for no new work, let local trials checkpoint and stop,
    /// then leave the Raft group.
    async fn leave(&mut self) {
        let me = self.id();
        self.propose_own(Command::NodeDraining { node: me });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                Some(e) = self.net_events.recv() => self.on_net(e),
                Some(e) = self.trial_events.recv() => self.on_trial_event(e),
                Some(m) = self.internal.recv() => self.on_internal(m),
            }
            let busy = self
                .node
                .state()
                .trials
                .values()
                .any(|t| t.is_placed_on(me) && !matches!(t.state, TrialState::Done(_)));
            if !busy && self.slots_in_use.is_empty() && self.own.is_empty() {
                break;
            }
        }
        self.next_proposal = self.next_proposal.wrapping_add(1);
        let id = ProposalId(self.next_proposal);
        self.step(Input::Leave { id });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                Some(e) = self.net_events.recv() => self.on_net(e),
            }
            if !self.node.membership().0.contains(&me) && !self.node.membership().1.contains(&me) {
                break;
            }
        }
        self.trials.kill_all();
        self.net.shutdown().await;
    }
}

/// Fetches a blob, retrying for a while: a holder's address may not have reached
/// this node by gossip yet, or a holder may be restarting. A missing blob is not
/// the trial's fault, so it is not reported as a failure until this gives up.
async fn fetch_patiently(
    net: &NetHandle,
    digest: &str,
    holders: &[NodeId],
) -> Result<(), resolute_net::NetError> {
    let mut last = None;
    for attempt in 0..FETCH_ATTEMPTS {
        match net.fetch(digest, holders.to_vec()).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(FETCH_RETRY_MS * (attempt + 1))).await;
    }
    Err(last.unwrap_or(resolute_net::NetError::Stopped))
}

/// Replaces `path` with `bytes` through a temporary file and a rename (a crash
/// leaves the old file or the new one, never half of one). Best effort: these
/// files only speed up a restart.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Where the daemon keeps everything, made absolute.
pub fn data_dir(config: &NodeFile, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| config.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("resolute-data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank0_hosts_come_from_listen_addresses_and_ports_from_the_incarnation() {
        let parse = |a: &str| a.parse::<Multiaddr>().expect("multiaddr");
        assert_eq!(
            host_of(&parse("/ip4/10.1.2.3/tcp/7000")).as_deref(),
            Some("10.1.2.3")
        );
        assert_eq!(
            host_of(&parse("/ip6/fd00::5/tcp/7000")).as_deref(),
            Some("fd00::5")
        );
        assert_eq!(
            host_of(&parse("/dns4/gpu-7.lab/tcp/7000")).as_deref(),
            Some("gpu-7.lab")
        );
        assert_eq!(host_of(&parse("/ip4/0.0.0.0/tcp/7000")), None);
        let p = master_port(42, 1);
        assert!((MASTER_PORT_BASE..MASTER_PORT_BASE + MASTER_PORT_SPAN as u16).contains(&p));
        assert_eq!(p, master_port(42, 1), "every node of the gang agrees");
        assert_ne!(p, master_port(42, 2), "a new incarnation moves on");
        let ports: BTreeSet<u16> = (0..100).map(|t| master_port(t, 1)).collect();
        assert!(
            ports.len() > 95,
            "trials spread over the range: {}",
            ports.len()
        );
    }
}
