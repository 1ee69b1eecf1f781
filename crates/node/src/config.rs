//! A node's config file (`config/*.toml`): every key documented in the shipped
//! examples, unknown keys refused with the file, line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use resolute_core::node::LatencyClass;

/// A node's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Where the log, blobs, identity and trial files live.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Site (data centre, region): voters spread across sites.
    #[serde(default = "default_site")]
    pub site: String,
    /// Slots offered when no NVIDIA GPU is found (or `gpus = "none"`).
    #[serde(default = "one")]
    pub cpu_slots: u32,
    /// `auto` (NVML discovery) or `none` (CPU slots only).
    #[serde(default = "auto")]
    pub gpus: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The resource pool this node serves, and the pool's settings.
    #[serde(default)]
    pub pool: Pool,
    /// Networking.
    #[serde(default)]
    pub net: Net,
    /// The REST API.
    #[serde(default)]
    pub api: Api,
    /// Timing.
    #[serde(default)]
    pub node: Timing,
    /// Who trials run as.
    #[serde(default)]
    pub trial: Trial,
    /// Disk space: the low-water mark and the log's reserve.
    #[serde(default)]
    pub disk: Disk,
}

/// Largest `disk.low_water_mib` (1 TiB).
pub const LOW_WATER_MIB_MAX: u64 = 1 << 20;
/// Largest `disk.log_reserve_mib` (64 GiB).
pub const LOG_RESERVE_MIB_MAX: u64 = 64 << 10;

/// The `[disk]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Disk {
    /// Below this much free space (MiB) on the data dir's file system the node
    /// takes no new trials, checkpoint copies or uploads (0: not watched).
    pub low_water_mib: u64,
    /// Space (MiB) kept for the log: given up when a write finds the disk full,
    /// so the node goes on instead of exiting (0: none).
    pub log_reserve_mib: u64,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            low_water_mib: 1024,
            log_reserve_mib: 64,
        }
    }
}

/// The site of a node whose config names none.
pub const DEFAULT_SITE: &str = "local";

fn default_site() -> String {
    DEFAULT_SITE.into()
}
fn one() -> u32 {
    1
}
fn auto() -> String {
    "auto".into()
}

/// The `[pool]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Pool name ("" is the default pool).
    pub name: String,
    /// Spot/preemptible capacity (burst).
    pub preemptible: bool,
    /// What a slot costs per hour (> 0 makes it burst capacity).
    pub cost_per_slot_hour: f64,
    /// `fair_share` or `priority`.
    pub policy: String,
    /// With `priority`: preempt lower priorities.
    pub preemption: bool,
    /// Seconds a trial waits for owned capacity before it may burst.
    pub burst_after_s: u64,
    /// Seconds after its start during which a trial is not preempted.
    pub min_runtime_s: u64,
}

impl Default for Pool {
    fn default() -> Self {
        let d = resolute_core::pool::PoolSettings::default();
        Pool {
            name: String::new(),
            preemptible: false,
            cost_per_slot_hour: 0.0,
            policy: "fair_share".into(),
            preemption: false,
            burst_after_s: d.burst_after_s,
            min_runtime_s: d.min_runtime_s,
        }
    }
}

/// The `[net]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Net {
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Multiaddrs peers are told to reach this node at, instead of what it
    /// listens on (a NAT's public address, a DNS name). Empty: what it
    /// listens on, never 0.0.0.0, and loopback only when it has nothing else.
    pub advertise: Vec<String>,
    /// Peers to join through (multiaddrs); `--join` adds more.
    pub bootstrap: Vec<String>,
    /// The cluster's name (its gossip topic).
    pub cluster: String,
    /// 64 hex characters: a pre-shared key that keeps strangers out.
    pub cluster_key: Option<String>,
    /// Discover peers on the LAN.
    pub mdns: bool,
    /// Largest request or answer on the wire, in bytes; a larger peer message
    /// (a Raft snapshot of a large state) travels as a blob instead.
    pub max_message_bytes: usize,
    /// `auto` (AutoNAT asks other sites' nodes to dial this one back),
    /// `public` (a cloud VM with a public address) or `private` (behind a
    /// NAT or firewall: reached through relays and hole punching).
    pub reachability: String,
    /// Serve as a circuit relay for nodes behind NAT (they reserve only on
    /// nodes that are reachable).
    pub relay: bool,
    /// Bytes relayed per circuit before the relay closes it.
    pub relay_circuit_max_bytes: u64,
    /// Seconds a circuit is relayed before the relay closes it.
    pub relay_circuit_max_duration_s: u64,
}

/// Smallest `net.max_message_bytes`: a Raft append of
/// `RAFT_MESSAGE_BYTES_MAX` and its frame must fit.
pub const MAX_MESSAGE_BYTES_MIN: usize = 2 << 20;
/// Largest `net.max_message_bytes` (a frame is read whole into memory).
pub const MAX_MESSAGE_BYTES_MAX: usize = 256 << 20;

impl Default for Net {
    fn default() -> Self {
        Net {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            advertise: Vec::new(),
            bootstrap: Vec::new(),
            cluster: "resolute".into(),
            cluster_key: None,
            mdns: false,
            max_message_bytes: resolute_net::wire::MESSAGE_DEFAULT_MAX_BYTES,
            reachability: "auto".into(),
            relay: true,
            relay_circuit_max_bytes: resolute_net::config::RELAY_CIRCUIT_MAX_BYTES_DEFAULT,
            relay_circuit_max_duration_s:
                resolute_net::config::RELAY_CIRCUIT_MAX_DURATION_DEFAULT_S,
        }
    }
}

/// The `[api]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Address of the REST API (`127.0.0.1:0` picks a port).
    pub listen: String,
    /// `IP:port` peers are told the API is at (for a trial's logs), when the
    /// API listens on every interface and the first advertised IP is not the
    /// one to use. It must be an IP of `net.advertise` (or loopback): peers
    /// refuse a record whose API is on a host it does not list.
    pub advertise: Option<String>,
    /// A PEM certificate chain: the API speaks HTTPS (needed to listen
    /// beyond loopback).
    pub tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    pub tls_key: Option<PathBuf>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: "127.0.0.1:8080".into(),
            advertise: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The `[trial]` table (see `resolute_trial::isolation`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trial {
    /// Every trial runs as this `user[:group]` (names or numbers).
    pub run_as: Option<String>,
    /// Every running trial gets a uid of its own from `FIRST-LAST`.
    pub uid_range: Option<String>,
}

impl Trial {
    /// The setting, checked.
    pub fn run_as(&self) -> Result<resolute_trial::RunAs, String> {
        resolute_trial::RunAs::parse(self.run_as.as_deref(), self.uid_range.as_deref())
    }
}

/// The `[node]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Raft tick, in milliseconds.
    pub tick_ms: u64,
    /// How far apart the cluster's nodes are (`lan` or `wan`): the defaults of
    /// the four timers below.
    pub latency: String,
    /// Raft's base election timeout (the class's default when unset).
    pub election_ms: Option<u64>,
    /// The leader's heartbeat period (the class's default when unset).
    pub heartbeat_ms: Option<u64>,
    /// A node silent this long is declared lost (the class's default when unset).
    pub lease_timeout_ms: Option<u64>,
    /// A node whose connections all closed is declared lost after this long
    /// unless it reconnects (a crash is noticed before the lease ends; the
    /// class's default when unset).
    pub disconnect_grace_ms: Option<u64>,
    /// Voters in the Raft group.
    pub voters: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick_ms: 100,
            latency: LatencyClass::default().name().to_string(),
            election_ms: None,
            heartbeat_ms: None,
            lease_timeout_ms: None,
            disconnect_grace_ms: None,
            voters: 3,
        }
    }
}

impl Timing {
    /// The latency class, checked.
    pub fn class(&self) -> Result<LatencyClass, String> {
        LatencyClass::parse(&self.latency).ok_or_else(|| {
            let names: Vec<&str> = LatencyClass::ALL.iter().map(|c| c.name()).collect();
            format!(
                "node.latency must be one of {}, not {:?}",
                names.join(", "),
                self.latency
            )
        })
    }

    /// The timers: the class's defaults with what the file sets on top,
    /// checked against each other.
    pub fn resolved(&self) -> Result<resolute_core::node::Timing, String> {
        let mut t = self.class()?.timing();
        t.election_ms = self.election_ms.unwrap_or(t.election_ms);
        t.heartbeat_ms = self.heartbeat_ms.unwrap_or(t.heartbeat_ms);
        t.lease_timeout_ms = self.lease_timeout_ms.unwrap_or(t.lease_timeout_ms);
        t.disconnect_grace_ms = self.disconnect_grace_ms.unwrap_or(t.disconnect_grace_ms);
        match t.problem(self.tick_ms) {
            Some(p) => Err(format!(
                "node timing (election_ms {}, heartbeat_ms {}, lease_timeout_ms {}, tick_ms {}): {p}",
                t.election_ms, t.heartbeat_ms, t.lease_timeout_ms, self.tick_ms
            )),
            None => Ok(t),
        }
    }
}

/// Reads and checks a config file; errors name the file and line.
pub fn load(path: &Path) -> Result<NodeFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse(&path.display().to_string(), &text)
}

/// Parses config text (`name` is used in errors).
pub fn parse(name: &str, text: &str) -> Result<NodeFile, String> {
    let f: NodeFile = toml::from_str(text).map_err(|e| format!("{name}: {e}"))?;
    let bad = |m: String| Err(format!("{name}: {m}"));
    if f.cpu_slots == 0 || f.cpu_slots > 1024 {
        return bad("cpu_slots must be between 1 and 1024".into());
    }
    if f.gpus != "auto" && f.gpus != "none" {
        return bad(format!(
            "gpus must be \"auto\" or \"none\", not {:?}",
            f.gpus
        ));
    }
    if f.pool.policy != "fair_share" && f.pool.policy != "priority" {
        return bad(format!(
            "pool.policy must be \"fair_share\" or \"priority\", not {:?}",
            f.pool.policy
        ));
    }
    if !(f.pool.cost_per_slot_hour >= 0.0 && f.pool.cost_per_slot_hour.is_finite()) {
        return bad("pool.cost_per_slot_hour must not be negative".into());
    }
    if let Some(k) = &f.net.cluster_key {
        resolute_net::config::parse_cluster_key(k).map_err(|e| format!("{name}: net.{e}"))?;
    }
    f.trial.run_as().map_err(|e| format!("{name}: {e}"))?;
    if f.api.tls_cert.is_some() != f.api.tls_key.is_some() {
        return bad("api.tls_cert and api.tls_key go together: set both or neither".into());
    }
    if !(MAX_MESSAGE_BYTES_MIN..=MAX_MESSAGE_BYTES_MAX).contains(&f.net.max_message_bytes) {
        return bad(format!(
            "net.max_message_bytes must be between {MAX_MESSAGE_BYTES_MIN} and {MAX_MESSAGE_BYTES_MAX}"
        ));
    }
    if f.disk.low_water_mib > LOW_WATER_MIB_MAX {
        return bad(format!(
            "disk.low_water_mib must be at most {LOW_WATER_MIB_MAX}"
        ));
    }
    if f.disk.log_reserve_mib > LOG_RESERVE_MIB_MAX {
        return bad(format!(
            "disk.log_reserve_mib must be at most {LOG_RESERVE_MIB_MAX}"
        ));
    }
    if !(1..=7).contains(&f.node.voters) {
        return bad("node.voters must be between 1 and 7".into());
    }
    f.node.resolved().map_err(|e| format!("{name}: {e}"))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        for name in ["laptop.toml", "onprem.toml", "cloud.toml"] {
            let f = load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            f.trial.run_as().expect("trial settings");
            // The multi-site roles run the wide-area timing.
            let wan = name != "laptop.toml";
            assert_eq!(
                f.node.class(),
                Ok(if wan {
                    LatencyClass::Wan
                } else {
                    LatencyClass::Lan
                })
            );
        }
    }

    #[test]
    fn timing_is_the_class_with_what_the_file_sets_on_top() {
        let f = parse(
            "x.toml",
            "[node]\nlatency = \"wan\"\nlease_timeout_ms = 20000\n",
        )
        .expect("parses");
        let t = f.node.resolved().expect("sound");
        assert_eq!((t.election_ms, t.lease_timeout_ms), (3_000, 20_000));
        let e = parse("x.toml", "[node]\nlatency = \"moon\"\n").expect_err("refused");
        assert!(
            e.starts_with("x.toml: node.latency must be one of lan, wan"),
            "{e}"
        );
        let e = parse(
            "x.toml",
            "[node]\nlatency = \"wan\"\nlease_timeout_ms = 2000\n",
        )
        .expect_err("a lease shorter than an election");
        assert!(
            e.contains("lease_timeout_ms 2000") && e.contains("the lease"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_trial_setting_names_its_key_and_file() {
        let e = parse("x.toml", "[trial]\nuid_range = \"5-1\"\n").expect_err("refused");
        assert!(e.starts_with("x.toml: trial.uid_range"), "{e}");
    }
}
