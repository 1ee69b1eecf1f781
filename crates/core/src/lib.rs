//! The sans-IO core of a Resolute node.
//!
//! [`Node`] wraps raft-rs's `RawNode` and the replicated [`state::ClusterState`]:
//! inputs (ticks, peer messages, proposals, persisted acknowledgements, heartbeats)
//! go in through [`Node::step`], outputs (messages to send, writes to persist,
//! effects for this node, replies) come out. No I/O, clock or thread inside: the
//! actix shell and the simulator drive the same code.

pub mod command;
pub mod guard;
mod log_cache;
pub mod log_store;
pub mod node;
pub mod pool;
pub mod state;
pub mod track;

pub use command::{Command, Envelope, NodeId, NodeInfo, ProposalId, Reply};
pub use node::{Effect, Input, Node, NodeConfig, NodeError, Output, PeerMessage, StartTrial};
