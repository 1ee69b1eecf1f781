//! Scenario files (`simulations/*.toml`): the cluster's shape, its users'
//! experiments, the fault plan, the duration and the liveness bound.
//!
//! Unknown keys are errors (with file, line and column, from the TOML parser), and
//! every experiment config is checked with the same parser the nodes use.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest number of nodes a scenario may describe.
pub const NODES_MAX: u32 = 2_000;
/// Longest scenario, in simulated seconds (one week).
pub const DURATION_MAX_S: u64 = 7 * 24 * 3600;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in reports.
    pub name: String,
    /// What the scenario exercises.
    #[serde(default)]
    pub description: String,
    /// Simulated seconds of the fault phase.
    pub duration_s: u64,
    /// After the fault phase every fault heals; every experiment must then finish
    /// within this many simulated seconds.
    pub liveness_bound_s: u64,
    /// Node settings.
    #[serde(default)]
    pub node: NodeSettings,
    /// Sites (network neighbourhoods).
    pub sites: Vec<Site>,
    /// Cross-site network.
    #[serde(default)]
    pub network: Network,
    /// Groups of identical nodes.
    pub pools: Vec<Pool>,
    /// Experiments and when they arrive.
    #[serde(default)]
    pub experiments: Vec<ExperimentArrival>,
    /// How simulated trials train.
    #[serde(default)]
    pub trials: TrialModel,
    /// The fault plan.
    #[serde(default)]
    pub faults: Faults,
    /// How every resource pool schedules (each node declares it, as a node
    /// config would).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Where the file was read from (for relative experiment paths).
    #[serde(skip)]
    pub path: PathBuf,
    /// The experiment configs' text, loaded with the scenario.
    #[serde(skip)]
    pub experiment_texts: Vec<String>,
    /// Each experiment config's workspace (its owner gets a role there).
    #[serde(skip)]
    pub experiment_workspaces: Vec<String>,
}

/// Settings every simulated node uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// Milliseconds per node tick.
    pub tick_ms: u64,
    /// Voters the leader keeps.
    pub voters: usize,
    /// Election timeout in ticks.
    pub election_ticks: usize,
    /// Heartbeat period in ticks.
    pub heartbeat_ticks: usize,
    /// Lease length.
    pub lease_timeout_ms: u64,
    /// A latency class (`lan`, `wan`): when set, its timing replaces the
    /// three above, as `[node] latency` does in a node's config.
    pub latency: Option<resolute_core::node::LatencyClass>,
    /// Entries between snapshots.
    pub snapshot_entries: u64,
    /// Latency of one disk write + fsync, in milliseconds.
    pub fsync_ms: [u64; 2],
    /// Largest clock skew (tick-rate drift) between nodes, in parts per thousand.
    pub clock_skew_per_mille: u64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            tick_ms: 100,
            voters: 3,
            election_ticks: 10,
            heartbeat_ticks: 3,
            lease_timeout_ms: 3000,
            latency: None,
            snapshot_entries: 2000,
            fsync_ms: [1, 3],
            clock_skew_per_mille: 10,
        }
    }
}

impl NodeSettings {
    /// The timing every node runs with.
    pub fn timing(&self) -> resolute_core::node::Timing {
        match self.latency {
            Some(class) => class.timing(),
            None => resolute_core::node::Timing {
                election_ms: self.election_ticks as u64 * self.tick_ms,
                heartbeat_ms: self.heartbeat_ticks as u64 * self.tick_ms,
                lease_timeout_ms: self.lease_timeout_ms,
                disconnect_grace_ms: resolute_core::node::DISCONNECT_GRACE_DEFAULT_MS,
            },
        }
    }
}

/// A site: nodes within it talk with low latency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Its name.
    pub name: String,
    /// Latency range between two nodes of this site, in milliseconds.
    #[serde(default = "default_site_latency")]
    pub latency_ms: [u64; 2],
    /// Behind a NAT: its nodes dial out, but no node of another site can dial
    /// them. Two NATed sites talk through a relay (a node of a site without
    /// NAT), with the relay's latency and bandwidth.
    #[serde(default)]
    pub nat: bool,
}

fn default_site_latency() -> [u64; 2] {
    [1, 2]
}

/// The network between sites and its faults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Latency range between nodes of different sites, in milliseconds.
    pub cross_site_latency_ms: [u64; 2],
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Bandwidth for checkpoint transfers, in MB per second.
    pub bandwidth_mb_s: f64,
    /// How long a request to a node that is up but cut off (a partition) takes
    /// to fail, in milliseconds (libp2p's request timeout, in production).
    pub request_timeout_ms: u64,
    /// Latency a relay adds to each message it forwards (on top of both legs),
    /// in milliseconds.
    pub relay_latency_ms: [u64; 2],
    /// Bandwidth of a relayed blob transfer, in MB per second (a relay serves
    /// many circuits; its uplink is shared).
    pub relay_bandwidth_mb_s: f64,
    /// Most bytes one relayed circuit carries, in MB (`net.relay_circuit_max_bytes`
    /// in production): a larger blob cannot come over a relay.
    pub relay_circuit_max_mb: f64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            cross_site_latency_ms: [10, 30],
            loss: 0.0,
            duplicate: 0.0,
            bandwidth_mb_s: 500.0,
            request_timeout_ms: 30_000,
            relay_latency_ms: [1, 5],
            relay_bandwidth_mb_s: 50.0,
            relay_circuit_max_mb: 256.0,
        }
    }
}

/// A group of identical nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Its name; nodes are named `<pool>-<n>`.
    pub name: String,
    /// Its site.
    pub site: String,
    /// How many nodes.
    pub nodes: u32,
    /// GPUs per node.
    pub gpus: u32,
    /// Relative speed of each GPU (1.0 is the reference).
    #[serde(default = "one")]
    pub gpu_speed: f64,
    /// Spot/preemptible capacity.
    #[serde(default)]
    pub preemptible: bool,
    /// Price per GPU-hour: a node that costs something is burst capacity, used
    /// after owned capacity (cheapest first).
    #[serde(default)]
    pub cost_per_gpu_hour: f64,
    /// The resource pool its nodes serve (empty: the default pool).
    #[serde(default)]
    pub resource_pool: String,
    /// When the pool's nodes join (simulated seconds).
    #[serde(default)]
    pub join_at_s: u64,
}

fn one() -> f64 {
    1.0
}

/// A pool's scheduling policy, by name.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    /// Weighted fair share (the default).
    #[default]
    FairShare,
    /// Priority, optionally preempting lower priorities.
    Priority,
}

/// The `[scheduler]` table: every pool's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduler {
    /// `fair_share` or `priority`.
    pub policy: PolicyName,
    /// With `priority`: preempt lower priorities.
    pub preemption: bool,
    /// Seconds a trial waits for owned capacity before it may burst.
    pub burst_after_s: u64,
    /// Seconds after its start during which a trial is not preempted.
    pub min_runtime_s: u64,
    /// Fair-share weight per team (workspace).
    pub team_weights: std::collections::BTreeMap<String, f64>,
}

impl Default for Scheduler {
    fn default() -> Self {
        let d = resolute_core::pool::PoolSettings::default();
        Scheduler {
            policy: PolicyName::FairShare,
            preemption: false,
            burst_after_s: d.burst_after_s,
            min_runtime_s: d.min_runtime_s,
            team_weights: d.team_weights,
        }
    }
}

impl Scheduler {
    /// The pool settings every node declares.
    pub fn settings(&self) -> resolute_core::pool::PoolSettings {
        use resolute_core::pool::{Policy, PoolSettings};
        PoolSettings {
            policy: match self.policy {
                PolicyName::FairShare => Policy::FairShare,
                PolicyName::Priority => Policy::Priority {
                    preemption: self.preemption,
                },
            },
            burst_after_s: self.burst_after_s,
            min_runtime_s: self.min_runtime_s,
            team_weights: self.team_weights.clone(),
        }
    }
}

/// Experiments submitted by a user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentArrival {
    /// Path to the experiment YAML, relative to the scenario file.
    pub config: String,
    /// Who submits it.
    #[serde(default = "default_owner")]
    pub owner: String,
    /// When (simulated seconds).
    #[serde(default)]
    pub arrive_s: u64,
    /// How many copies (arriving `every_s` apart).
    #[serde(default = "one_u32")]
    pub count: u32,
    /// Spacing of the copies.
    #[serde(default)]
    pub every_s: u64,
}

fn default_owner() -> String {
    "user".to_string()
}

fn one_u32() -> u32 {
    1
}

/// How simulated trials train.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrialModel {
    /// `time_metric` units per second on one reference GPU.
    pub units_per_gpu_s: f64,
    /// Length for searchers without `max_time`.
    pub default_length: u64,
    /// Validate every this many units (and at every target).
    pub validate_every: u64,
    /// Checkpoint every this many simulated seconds of training.
    pub checkpoint_every_s: u64,
    /// Checkpoint size in MB.
    pub checkpoint_mb: f64,
    /// Seconds to write a checkpoint.
    pub checkpoint_write_s: f64,
    /// Seconds to restore from a local checkpoint.
    pub restore_s: f64,
    /// Seconds a preempted/stopped trial has to checkpoint and exit.
    pub preemption_grace_s: u64,
}

impl Default for TrialModel {
    fn default() -> Self {
        TrialModel {
            units_per_gpu_s: 1.0,
            default_length: 600,
            validate_every: 100,
            checkpoint_every_s: 300,
            checkpoint_mb: 200.0,
            checkpoint_write_s: 5.0,
            restore_s: 10.0,
            preemption_grace_s: 60,
        }
    }
}

/// The fault plan: random rates plus scheduled events.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Node crashes per node-hour.
    pub crash_rate_per_node_hour: f64,
    /// Down time after a random crash, in seconds.
    pub restart_after_s: [u64; 2],
    /// Random partitions (isolate one node) per hour.
    pub partition_rate_per_hour: f64,
    /// Duration of a random partition, in seconds.
    pub partition_s: [u64; 2],
    /// Probability that a random crash also loses the node's disk.
    pub disk_loss_probability: f64,
    /// Probability that a disk write fails (the node then crashes).
    pub disk_error_rate: f64,
    /// Spot preemptions per preemptible node-hour.
    pub spot_rate_per_node_hour: f64,
    /// Notice before a spot node goes away, in seconds.
    pub spot_notice_s: u64,
    /// Scheduled events.
    pub events: Vec<FaultEvent>,
}

/// One scheduled fault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultEvent {
    /// When (simulated seconds).
    pub at_s: u64,
    /// What.
    pub kind: FaultKind,
    /// The node (`pool-n`), for node faults.
    #[serde(default)]
    pub node: Option<String>,
    /// The site, for site faults and splits.
    #[serde(default)]
    pub site: Option<String>,
    /// Down time before a crashed node restarts (none: it stays down until the
    /// liveness phase).
    #[serde(default)]
    pub restart_after_s: Option<u64>,
}

/// Scheduled fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The node process dies (unsynced writes lost or torn).
    Crash,
    /// The node dies and its disk is replaced with an empty one; it rejoins with a
    /// new identity.
    DiskLoss,
    /// The node is cut off from everyone (both directions).
    Isolate,
    /// The node cannot send but still receives (one-way partition).
    MuteOutgoing,
    /// The site is cut off from the other sites.
    SplitSite,
    /// Every node of the site crashes.
    SiteOutage,
    /// Every partition heals and every crashed node restarts.
    HealAll,
    /// A spot notice: the node drains, then goes away after the notice.
    Spot,
    /// The node leaves gracefully.
    Leave,
    /// Every node restarts one after another (one per `restart_after_s`).
    RollingRestart,
    /// One GPU of the node fails, as NVML would report it: the lowest-numbered
    /// healthy GPU that runs a trial (else the lowest healthy one). The node
    /// proposes its smaller capacity naming that trial, whose process dies and is
    /// requeued without a restart charged; with `restart_after_s` the GPU
    /// recovers then and the node proposes its capacity back.
    GpuFailure,
}

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Toml {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The scenario is well-formed but inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Scenario {
    /// Reads and checks a scenario file and the experiment configs it names.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: name.clone(),
            source,
        })?;
        let mut s: Scenario = toml::from_str(&text).map_err(|e| ScenarioError::Toml {
            path: name.clone(),
            message: e.to_string(),
        })?;
        s.path = path.to_path_buf();
        let invalid = |message: String| ScenarioError::Invalid {
            path: name.clone(),
            message,
        };
        s.check().map_err(invalid)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for e in &s.experiments {
            let p = dir.join(&e.config);
            let yaml = std::fs::read_to_string(&p).map_err(|source| ScenarioError::Io {
                path: p.display().to_string(),
                source,
            })?;
            match resolute_types::config::parse_str(&p.display().to_string(), &yaml, &[]) {
                Ok(loaded) => s.experiment_workspaces.push(
                    resolute_core::state::auth::workspace_or_default(&loaded.config.workspace)
                        .to_string(),
                ),
                Err(errs) => {
                    return Err(ScenarioError::Invalid {
                        path: name.clone(),
                        message: format!("experiment {}:\n{errs}", e.config),
                    })
                }
            }
            s.experiment_texts.push(yaml);
        }
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if self.duration_s == 0 || self.duration_s > DURATION_MAX_S {
            return Err(format!("duration_s must be between 1 and {DURATION_MAX_S}"));
        }
        if self.pools.is_empty() || self.sites.is_empty() {
            return Err("a scenario needs at least one site and one pool".into());
        }
        let nodes: u32 = self.pools.iter().map(|p| p.nodes).sum();
        if nodes == 0 || nodes > NODES_MAX {
            return Err(format!(
                "pools must describe between 1 and {NODES_MAX} nodes (found {nodes})"
            ));
        }
        for p in &self.pools {
            if !self.sites.iter().any(|s| s.name == p.site) {
                return Err(format!("pool {}: unknown site {}", p.name, p.site));
            }
            if p.gpu_speed <= 0.0 || !p.gpu_speed.is_finite() {
                return Err(format!("pool {}: gpu_speed must be positive", p.name));
            }
            if p.cost_per_gpu_hour < 0.0 || !p.cost_per_gpu_hour.is_finite() {
                return Err(format!(
                    "pool {}: cost_per_gpu_hour must not be negative",
                    p.name
                ));
            }
        }
        let probability = |v: f64, what: &str| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} must be between 0 and 1"))
            }
        };
        if self
            .scheduler
            .team_weights
            .iter()
            .any(|(_, w)| *w <= 0.0 || !w.is_finite())
        {
            return Err("scheduler.team_weights must be positive".into());
        }
        probability(self.network.loss, "network.loss")?;
        probability(self.network.duplicate, "network.duplicate")?;
        probability(
            self.faults.disk_loss_probability,
            "faults.disk_loss_probability",
        )?;
        probability(self.faults.disk_error_rate, "faults.disk_error_rate")?;
        if let Some(p) = self.node.timing().problem(self.node.tick_ms) {
            return Err(format!("node timing: {p}"));
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if self.node.tick_ms == 0
            || !positive(self.trials.units_per_gpu_s)
            || !positive(self.network.bandwidth_mb_s)
            || !positive(self.network.relay_bandwidth_mb_s)
            || !positive(self.network.relay_circuit_max_mb)
        {
            return Err(
                "node.tick_ms, trials.units_per_gpu_s, network.bandwidth_mb_s, \
                 network.relay_bandwidth_mb_s and network.relay_circuit_max_mb must be positive"
                    .into(),
            );
        }
        if self.sites.iter().filter(|s| s.nat).count() >= 2 && self.sites.iter().all(|s| s.nat) {
            return Err(
                "every site is behind NAT: two NATed sites need a site without NAT to relay".into(),
            );
        }
        for range in [
            self.node.fsync_ms,
            self.network.cross_site_latency_ms,
            self.network.relay_latency_ms,
            self.faults.restart_after_s,
            self.faults.partition_s,
        ] {
            if range[0] > range[1] {
                return Err(format!(
                    "range {range:?}: the first value must not exceed the second"
                ));
            }
        }
        for e in &self.faults.events {
            let needs_node = matches!(
                e.kind,
                FaultKind::Crash
                    | FaultKind::DiskLoss
                    | FaultKind::Isolate
                    | FaultKind::MuteOutgoing
                    | FaultKind::Spot
                    | FaultKind::Leave
                    | FaultKind::GpuFailure
            );
            let needs_site = matches!(e.kind, FaultKind::SplitSite | FaultKind::SiteOutage);
            if needs_node && e.node.is_none() {
                return Err(format!("fault at {} s: {:?} needs `node`", e.at_s, e.kind));
            }
            if let Some(node) = &e.node {
                let known = self
                    .pools
                    .iter()
                    .any(|p| (1..=p.nodes).any(|i| format!("{}-{i}", p.name) == *node));
                if !known {
                    return Err(format!(
                        "fault at {} s: no node {node:?} (nodes are named <pool>-1 to <pool>-N)",
                        e.at_s
                    ));
                }
            }
            if needs_site
                && !e
                    .site
                    .as_ref()
                    .is_some_and(|s| self.sites.iter().any(|x| &x.name == s))
            {
                return Err(format!(
                    "fault at {} s: {:?} needs a known `site`",
                    e.at_s, e.kind
                ));
            }
        }
        Ok(())
    }
}
