//! What each node tells everyone by gossip: soft state (capacity, addresses,
//! what it holds), refreshed by sequence number and forgotten after its TTL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use resolute_core::NodeId;

use crate::reach::Reachability;

/// Blob digests listed in one record (the newest first).
pub const ANNOUNCED_BLOBS_MAX: usize = 64;

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML uuid.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Why it is not offered as a slot (its probe failed, or it failed a later
    /// health check); `None` when it is.
    pub disabled: Option<String>,
}

/// A node's gossiped record. It travels in a gossipsub message signed by the
/// node's key; receivers accept it only when `node` is the sender's node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The node.
    pub node: NodeId,
    /// Increases with every record the node publishes.
    pub seq: u64,
    /// How long the record is believed, in milliseconds.
    pub ttl_ms: u64,
    /// Where it listens.
    pub addrs: Vec<String>,
    /// Its REST API (`host:port`; empty when it has none), so that any node can
    /// gather what only another node holds (a trial's logs).
    pub api: String,
    /// Slots in all.
    pub slots_total: u32,
    /// Slots not in use.
    pub slots_free: u32,
    /// Its GPUs (empty: CPU slots), the disabled ones with the reason.
    pub gpus: Vec<Gpu>,
    /// Its labels (site, pool, ...).
    pub labels: BTreeMap<String, String>,
    /// Blobs it holds (at most [`ANNOUNCED_BLOBS_MAX`]).
    pub blobs: Vec<String>,
    /// Whether nodes of other sites can dial it (AutoNAT's answer or the
    /// operator's `net.reachability`; set by the swarm when it publishes).
    pub reachability: Reachability,
}
