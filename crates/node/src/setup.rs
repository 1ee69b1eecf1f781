//! What a node starts from: its config and data dir turned into the network's
//! settings, the node's and agent's settings, its GPUs (after their probe), the
//! peers it knew before a restart and the addresses it joins through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;

use resolute_core::pool::{Policy, PoolSettings};
use resolute_core::{NodeConfig, NodeId, NodeInfo};
use resolute_net::NetConfig;

use crate::config::NodeFile;
use crate::DaemonError;

/// Where a node keeps its peers' addresses.
pub const PEERS_FILE: &str = "peers.json";
/// Where a node remembers the addresses it was told to join through (a restart
/// without `--join` dials them again).
pub const JOIN_FILE: &str = "join.json";

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// The parsed config file.
    pub config: NodeFile,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Peers to join through.
    pub join: Vec<Multiaddr>,
    /// The join token to present (`resolute cluster join-token`).
    pub join_token: Option<String>,
}

pub(crate) fn setup(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Setup(e.to_string())
}

/// The operator's `net.advertise` multiaddrs and `api.advertise` address,
/// checked (the error names the field and the value).
pub(crate) fn advertise(opts: &Options) -> Result<(Vec<Multiaddr>, Option<String>), DaemonError> {
    let c = &opts.config;
    let addrs = c
        .net
        .advertise
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| setup(format!("net.advertise {a}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(api) = &c.api.advertise {
        api.parse::<std::net::SocketAddr>()
            .map_err(|e| setup(format!("api.advertise {api}: {e} (expected IP:port)")))?;
    }
    Ok((addrs, c.api.advertise.clone()))
}

/// The network's settings from the config.
pub(crate) fn net_config(opts: &Options) -> Result<NetConfig, DaemonError> {
    let c = &opts.config;
    let listen = c
        .net
        .listen
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| setup(format!("net.listen {a}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let first = listen
        .first()
        .cloned()
        .ok_or_else(|| setup("net.listen: at least one address"))?;
    let mut net = NetConfig::new(opts.data_dir.clone(), first);
    net.listen = listen;
    net.cluster = c.net.cluster.clone();
    net.mdns = c.net.mdns;
    net.max_message_bytes = c.net.max_message_bytes;
    net.reachability = c
        .net
        .reachability
        .parse()
        .map_err(|e| setup(format!("net.reachability: {e}")))?;
    net.relay_server = c.net.relay;
    net.relay_circuit_max_bytes = c.net.relay_circuit_max_bytes;
    net.relay_circuit_max_duration_s = c.net.relay_circuit_max_duration_s;
    // AutoNAT asks nodes of other sites (a cluster that never named its
    // sites asks every peer).
    net.site = (c.site != crate::config::DEFAULT_SITE).then(|| c.site.clone());
    let key = crate::bootstrap::cluster_key(c.net.cluster_key.as_deref(), &opts.data_dir)
        .map_err(setup)?;
    crate::bootstrap::check_net_listen(&net.listen, key.as_deref()).map_err(setup)?;
    net.cluster_key = key
        .as_deref()
        .map(resolute_net::config::parse_cluster_key)
        .transpose()
        .map_err(setup)?;
    Ok(net)
}

/// The addresses to join through: `--join`, the config's bootstrap peers, or
/// (neither given) the ones remembered from an earlier start. Whatever was given
/// is remembered for the next start.
pub(crate) fn join_addresses(opts: &Options) -> Result<(Vec<Multiaddr>, bool), DaemonError> {
    let mut join = opts.join.clone();
    for b in &opts.config.net.bootstrap {
        join.push(
            b.parse()
                .map_err(|e| setup(format!("net.bootstrap {b}: {e}")))?,
        );
    }
    let file = opts.data_dir.join(JOIN_FILE);
    let given = !join.is_empty();
    if given {
        let list: Vec<String> = join.iter().map(|a| a.to_string()).collect();
        write_atomically(&file, &serde_json::to_vec(&list).unwrap_or_default());
    } else {
        join = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
    }
    Ok((join, given))
}

/// The peers this node knew before a restart, by id.
pub(crate) fn known_peers(data_dir: &Path) -> BTreeMap<NodeId, Vec<String>> {
    std::fs::read(data_dir.join(PEERS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Every GPU NVML lists (after its CUDA probe), for the gossiped record; the
/// ones that passed their probe are the node's slots.
pub(crate) fn gpus(config: &NodeFile) -> Vec<resolute_net::Gpu> {
    if config.gpus != "auto" {
        return Vec::new();
    }
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
}

/// What the node offers the cluster, and the labels its record gossips.
pub(crate) fn node_info(config: &NodeFile, slots: u32) -> (NodeInfo, BTreeMap<String, String>) {
    let c = config;
    let settings = PoolSettings {
        policy: if c.pool.policy == "priority" {
            Policy::Priority {
                preemption: c.pool.preemption,
            }
        } else {
            Policy::FairShare
        },
        burst_after_s: c.pool.burst_after_s,
        min_runtime_s: c.pool.min_runtime_s,
        team_weights: BTreeMap::new(),
    };
    let info = NodeInfo {
        site: c.site.clone(),
        slots,
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
    (info, labels)
}

/// The core's settings from the config's timing.
pub(crate) fn node_config(opts: &Options, id: NodeId, info: NodeInfo) -> NodeConfig {
    let config = &opts.config;
    let mut cfg = NodeConfig::new(id, info);
    cfg.join_token = opts.join_token.clone();
    cfg.tick_ms = config.node.tick_ms;
    // Checked when the file was loaded; a config built in code falls back to
    // the class's defaults.
    let timing = config
        .node
        .resolved()
        .unwrap_or_else(|_| resolute_core::node::LatencyClass::default().timing());
    cfg.set_timing(timing);
    cfg.voters = config.node.voters;
    cfg
}

/// A random 128-bit start for this process's proposal ids (so ids from different
/// runs of the same node never collide).
pub(crate) fn proposal_base() -> u128 {
    use std::io::Read;
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u128::from_le_bytes(b)
}

/// Replaces `path` with `bytes` through a temporary file and a rename (a crash
/// leaves the old file or the new one, never half of one). Best effort: these
/// files only speed up a restart.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Where a node keeps everything.
pub fn data_dir(config: &NodeFile, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| config.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("resolute-data"))
}

/// The IP address of a multiaddr (`/ip4/10.0.0.5/tcp/7000` -> `10.0.0.5`);
/// unspecified addresses (0.0.0.0, ::) name no host.
pub(crate) fn host_of(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) if !ip.is_unspecified() => Some(ip.to_string()),
        Protocol::Ip6(ip) if !ip.is_unspecified() => Some(ip.to_string()),
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => Some(h.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_from_listen_addresses() {
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
    }
}
