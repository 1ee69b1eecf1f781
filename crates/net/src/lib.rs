//! The libp2p shell: turns `core::Node` outputs into network traffic and network
//! traffic into its inputs. No scheduling or Raft logic lives here.
//!
//! One swarm per node ([`swarm`]): TCP + noise + yamux, optionally wrapped in a
//! pre-shared-key private network (`cluster_key`); identify, ping, gossipsub (one
//! topic per cluster, carrying signed [`gossip::Announcement`]s), request-response
//! ([`wire`]) for Raft and forwarded messages and for blob manifests and chunks,
//! and mDNS when enabled. The swarm runs as its own task; the node talks to it only
//! through a [`NetHandle`] (a bounded command channel; replies on oneshots) and a
//! bounded channel of [`NetEvent`]s (rust-libp2p's own guideline: no unbounded
//! queues).
//!
//! Admission has two gates: the cluster key (a peer without it cannot complete a
//! connection), and an allow-list fed from the Raft membership (plus nodes admitted
//! for a window) that decides who may send Raft traffic or read blobs. A join
//! request is always delivered: the leader decides on it (a join token).

pub mod addrs;
mod behaviour;
pub mod config;
pub mod gossip;
pub mod identity;
pub mod reach;
mod swarm;
pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use resolute_core::{NodeId, PeerMessage};

pub use config::NetConfig;
pub use gossip::{Announcement, Gpu};
pub use identity::node_id;
pub use reach::{LinkKind, PeerLink, Reachability, ReachabilityMode};

/// Why a network operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The identity key or the blob store could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The transport could not be built or could not listen.
    #[error("transport: {0}")]
    Transport(String),
    /// No connection to, or address for, the node is known.
    #[error("node {0:016x} is not known to this node")]
    UnknownNode(NodeId),
    /// Sending failed (the message is too large, the connection broke, timeout).
    #[error("sending to node {node:016x}: {reason}")]
    Send {
        /// The receiver.
        node: NodeId,
        /// What happened.
        reason: String,
    },
    /// The receiver refused the message (admission).
    #[error("node {node:016x} refused: {reason}")]
    Denied {
        /// The receiver.
        node: NodeId,
        /// Its reason.
        reason: String,
    },
    /// A blob could not be fetched from any holder.
    #[error("fetching blob {digest}: {reason}")]
    Fetch {
        /// The blob.
        digest: String,
        /// What went wrong last.
        reason: String,
    },
    /// The swarm task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// What the swarm tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A message for `core::Node` from an admitted peer.
    Message {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: PeerMessage,
    },
    /// A newer gossiped record of a node.
    Announcement(Announcement),
    /// A connection to a node opened.
    Connected(NodeId),
    /// The last connection to a node closed.
    Disconnected(NodeId),
    /// A request from a node that is not a member was refused (its Raft
    /// traffic, forwards or blob reads): counted, for the operator.
    Denied(NodeId),
    /// A member sent a peer message as a blob (`Request::PeerBlob`): fetch
    /// it from the member and take its bytes as `PeerMessage::Raft`.
    PeerBlob {
        /// The sender (which holds the blob).
        from: NodeId,
        /// The blob.
        digest: String,
        /// Its length, at most `wire::PEER_BLOB_MAX_BYTES`.
        size: u64,
    },
    /// A member asks for a copy of this node's tracking store at or past
    /// `min_index`: answer on `reply` within `LOGS_ANSWER_TIMEOUT_MS` (the
    /// copy's blob, encoded, or why not).
    TrackingCopyWanted {
        /// The member that asks.
        from: NodeId,
        /// The index it needs the copy to reach.
        min_index: u64,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// A member asks for a trial's log lines on this node, for a user: answer
    /// on `reply` within `LOGS_ANSWER_TIMEOUT_MS` (the lines, encoded, or why
    /// not).
    LogsWanted {
        /// The member that asks.
        from: NodeId,
        /// The trial.
        trial: u64,
        /// Lines read at or after this time (ms since the epoch).
        since_ms: u64,
        /// The user the member authenticated.
        user: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
}

/// How long a node has to answer a peer's request for log lines.
pub const LOGS_ANSWER_TIMEOUT_MS: u64 = 2_000;

/// What a finished fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Where the verified blob is.
    pub path: PathBuf,
    /// Chunks already on disk from an earlier, interrupted fetch.
    pub chunks_resumed: u32,
    /// Chunks received and written, per holder.
    pub chunks_by_holder: BTreeMap<NodeId, u32>,
    /// Chunks that failed verification (and were fetched again).
    pub bad_chunks: u32,
    /// "Busy" answers (a holder's queue was full; asked again after a pause).
    pub busy_answers: u32,
    /// Chunks a relay carried (no holder had a direct or hole-punched
    /// connection when they were asked for).
    pub relayed_chunks: u32,
    /// How each holder that sent chunks was connected when the fetch ended.
    pub links: BTreeMap<NodeId, LinkKind>,
}

/// This node's network identity and connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInfo {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its node id (derived from the peer id).
    pub node_id: NodeId,
    /// Where it listens.
    pub listen: Vec<Multiaddr>,
    /// Nodes it has a connection to.
    pub connected: Vec<NodeId>,
    /// How it is connected to each (direct, hole-punched, relayed) and the RTT.
    pub links: Vec<PeerLink>,
    /// Whether other sites can dial it.
    pub reachability: Reachability,
}

/// What a [`NetHandle`] asks of the swarm task.
pub(crate) enum SwarmCommand {
    Send {
        to: NodeId,
        request: wire::Request,
        reply: Option<oneshot::Sender<Result<(), NetError>>>,
    },
    Publish {
        announcement: Announcement,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Fetch {
        digest: String,
        holders: Vec<NodeId>,
        reply: oneshot::Sender<Result<FetchReport, NetError>>,
    },
    SetMembers {
        members: Vec<NodeId>,
    },
    Admit {
        node: NodeId,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Info {
        reply: oneshot::Sender<NetInfo>,
    },
    Announcements {
        reply: oneshot::Sender<Vec<Announcement>>,
    },
    Ask {
        to: NodeId,
        request: wire::Request,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    Shutdown,
}

/// The node's side of the swarm: cheap to clone, every call bounded.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<SwarmCommand>,
    /// This node's peer id.
    pub peer_id: PeerId,
    /// This node's node id.
    pub node_id: NodeId,
}

impl NetHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> SwarmCommand,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Sends `msg` to `to` and waits for its acknowledgement.
    pub async fn send(&self, to: NodeId, msg: PeerMessage) -> Result<(), NetError> {
        self.call(|reply| SwarmCommand::Send {
            to,
            request: wire::Request::Peer(msg),
            reply: Some(reply),
        })
        .await?
    }

    /// Sends without waiting (Raft tolerates loss): false when the command queue
    /// is full and the message was dropped.
    pub fn send_nowait(&self, to: NodeId, msg: PeerMessage) -> bool {
        self.commands
            .try_send(SwarmCommand::Send {
                to,
                request: wire::Request::Peer(msg),
                reply: None,
            })
            .is_ok()
    }

    /// Tells `to` that a peer message waits for it in this node's blob store
    /// as `digest` (`Request::PeerBlob`), without waiting; false when dropped.
    pub fn send_blob_nowait(&self, to: NodeId, digest: String, size: u64) -> bool {
        self.commands
            .try_send(SwarmCommand::Send {
                to,
                request: wire::Request::PeerBlob { digest, size },
                reply: None,
            })
            .is_ok()
    }

    /// Publishes this node's record to the cluster's topic.
    pub async fn publish(&self, announcement: Announcement) -> Result<(), NetError> {
        self.call(|reply| SwarmCommand::Publish {
            announcement,
            reply,
        })
        .await?
    }

    /// Fetches a blob from `holders` into this node's store (resuming what an
    /// earlier fetch left), verified chunk by chunk and as a whole.
    pub async fn fetch(&self, digest: &str, holders: Vec<NodeId>) -> Result<FetchReport, NetError> {
        let digest = digest.to_string();
        self.call(|reply| SwarmCommand::Fetch {
            digest,
            holders,
            reply,
        })
        .await?
    }

    /// The Raft membership: only these nodes (and admitted joiners) may send Raft
    /// traffic or read blobs. Until it is first set, everyone with the cluster
    /// key may.
    pub async fn set_members(&self, members: Vec<NodeId>) -> Result<(), NetError> {
        self.commands
            .send(SwarmCommand::SetMembers { members })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Lets `node` send Raft traffic for the admission window (before the
    /// membership says it is a member).
    pub async fn admit(&self, node: NodeId) -> Result<(), NetError> {
        self.commands
            .send(SwarmCommand::Admit { node })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Dials a peer and waits until the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| SwarmCommand::Dial { addr, reply })
            .await?
    }

    /// Identity, listen addresses, connections.
    pub async fn info(&self) -> Result<NetInfo, NetError> {
        self.call(|reply| SwarmCommand::Info { reply }).await
    }

    /// The records currently believed (one per node, unexpired).
    pub async fn announcements(&self) -> Result<Vec<Announcement>, NetError> {
        self.call(|reply| SwarmCommand::Announcements { reply })
            .await
    }

    /// Asks member `to` for a trial's log lines on it, for `user` (the caller
    /// authenticated them; `to` checks their rights itself).
    pub async fn logs(
        &self,
        to: NodeId,
        trial: u64,
        since_ms: u64,
        user: String,
    ) -> Result<Vec<u8>, NetError> {
        let request = wire::Request::Logs {
            trial,
            since_ms,
            user,
        };
        self.call(|reply| SwarmCommand::Ask { to, request, reply })
            .await?
    }

    /// Asks member `to` for a copy of its tracking store at or past
    /// `min_index`: the node's encoded answer (see the node's
    /// `TrackingCopyWanted` handler).
    pub async fn tracking_copy(&self, to: NodeId, min_index: u64) -> Result<Vec<u8>, NetError> {
        let request = wire::Request::TrackingCopy { min_index };
        self.call(|reply| SwarmCommand::Ask { to, request, reply })
            .await?
    }

    /// Stops the swarm (its connections close).
    pub async fn shutdown(&self) {
        let _ = self.commands.send(SwarmCommand::Shutdown).await;
    }
}

/// Starts a node's swarm on the current tokio runtime: returns the handle, the
/// events, and the task (abort it to kill the swarm at once).
pub async fn spawn(
    config: NetConfig,
) -> Result<
    (
        NetHandle,
        mpsc::Receiver<NetEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NetError,
> {
    swarm::spawn(config).await
}
