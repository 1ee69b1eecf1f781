//! The network settings of a node (the `[net]` part of its config file).

use std::path::PathBuf;

use libp2p::Multiaddr;

use crate::reach::ReachabilityMode;
use crate::wire::MESSAGE_DEFAULT_MAX_BYTES;

/// How long a request may wait for its response.
pub const REQUEST_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// Chunk requests in flight per blob fetch (memory: this many chunks).
pub const FETCH_PARALLEL_CHUNKS_DEFAULT: usize = 8;
/// How long a node that asked to join may send Raft traffic before it is a member.
pub const ADMISSION_WINDOW_DEFAULT_MS: u64 = 120_000;
/// How long a gossiped node record is believed without a newer one.
pub const ANNOUNCEMENT_TTL_DEFAULT_MS: u64 = 30_000;
/// Chunk reads a holder runs at once for its peers (memory: this many chunks).
pub const SERVE_READS_DEFAULT: usize = 8;
/// Chunk requests a holder lets wait for a read before it answers "busy".
pub const SERVE_QUEUE_DEFAULT: usize = 4096;
/// Bytes a relay carries per circuit before it closes it (the two ends dial
/// a new one, or have hole-punched a direct connection by then): Raft and
/// gossip fit for a long while; a blob fetch prefers direct holders.
pub const RELAY_CIRCUIT_MAX_BYTES_DEFAULT: u64 = 256 << 20;
/// How long a relay carries one circuit before it closes it.
pub const RELAY_CIRCUIT_MAX_DURATION_DEFAULT_S: u64 = 3_600;
/// Depth of the channels between the swarm and the node (commands, events).
pub const CHANNEL_DEPTH: usize = 1024;

/// The network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Where the identity key and the blob store live.
    pub data_dir: PathBuf,
    /// Addresses to listen on (`/ip4/127.0.0.2/tcp/0` picks a port).
    pub listen: Vec<Multiaddr>,
    /// Addresses peers are told besides (an operator's `net.advertise`).
    pub advertise: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// The cluster's name: its gossip topic.
    pub cluster: String,
    /// A pre-shared key: when set, every connection is wrapped in libp2p's private
    /// network protocol, and peers without the key cannot connect at all.
    pub cluster_key: Option<[u8; 32]>,
    /// Largest request or non-chunk response, in bytes.
    pub max_message_bytes: usize,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// How long a request may wait for its response.
    pub request_timeout_ms: u64,
    /// Chunk requests in flight per blob fetch.
    pub fetch_parallel_chunks: usize,
    /// How long a node let in by `NetHandle::admit` may send Raft traffic and
    /// read blobs before it is a member (a join request alone admits nothing).
    pub admission_window_ms: u64,
    /// How long a gossiped record is believed.
    pub announcement_ttl_ms: u64,
    /// Chunk reads this node runs at once for its peers.
    pub serve_reads: usize,
    /// Chunk requests that may wait for a read before the answer is "busy".
    pub serve_queue: usize,
    /// This node's `site` label: AutoNAT asks only nodes of other sites.
    pub site: Option<String>,
    /// Whether AutoNAT decides this node's reachability, or the operator.
    pub reachability: ReachabilityMode,
    /// Serve as a circuit relay for peers behind NAT (only reachable nodes
    /// are asked to).
    pub relay_server: bool,
    /// Bytes this node relays per circuit before it closes it.
    pub relay_circuit_max_bytes: u64,
    /// How long this node relays one circuit, in seconds.
    pub relay_circuit_max_duration_s: u64,
}

impl NetConfig {
    /// Defaults: listen on `listen`, no bootstrap peers, no key, no mDNS.
    pub fn new(data_dir: PathBuf, listen: Multiaddr) -> Self {
        NetConfig {
            data_dir,
            listen: vec![listen],
            advertise: Vec::new(),
            bootstrap: Vec::new(),
            cluster: "resolute".to_string(),
            cluster_key: None,
            max_message_bytes: MESSAGE_DEFAULT_MAX_BYTES,
            mdns: false,
            request_timeout_ms: REQUEST_TIMEOUT_DEFAULT_MS,
            fetch_parallel_chunks: FETCH_PARALLEL_CHUNKS_DEFAULT,
            admission_window_ms: ADMISSION_WINDOW_DEFAULT_MS,
            announcement_ttl_ms: ANNOUNCEMENT_TTL_DEFAULT_MS,
            serve_reads: SERVE_READS_DEFAULT,
            serve_queue: SERVE_QUEUE_DEFAULT,
            site: None,
            reachability: ReachabilityMode::Auto,
            relay_server: true,
            relay_circuit_max_bytes: RELAY_CIRCUIT_MAX_BYTES_DEFAULT,
            relay_circuit_max_duration_s: RELAY_CIRCUIT_MAX_DURATION_DEFAULT_S,
        }
    }
}

/// Parses a cluster key written as 64 hex characters.
pub fn parse_cluster_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "cluster_key must be 64 hex characters (32 bytes), found {} characters",
            t.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}
