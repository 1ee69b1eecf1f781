//! The node agent: everything a node decides about itself and its trials, as a
//! sans-IO state machine beside `core::Node`.
//!
//! `core` decides what the cluster does (applying the log on every replica);
//! this crate decides what one node does about it, and it is the same code in
//! production (`crates/node`'s actors) and in the simulator (`crates/sim`):
//!
//! | decision | where |
//! | --- | --- |
//! | which slots (and GPUs) an incarnation gets, when it may launch | `slots`, `trials` |
//! | which blobs to fetch for a launch, which checkpoints to copy, which model directories to keep, when to try again | `fetch` |
//! | deleting a blob on this disk that no record names (a lost proposal, a late copy, a release missed behind a snapshot) | `sweep` |
//! | retrying its own proposals with the same id; metric batching | `proposals` |
//! | GPU health to `NodeCapacity`; an error on a failed GPU is not the trial's | `gpu` |
//! | free disk space against the low-water mark to `NodeDisk`; what a node low on disk refuses | `disk` |
//! | how an exit is classified; when a stopping trial gets SIGTERM, then SIGKILL | `trials` |
//! | what a target change does to a running trial; whether a trial at its target goes on | `trials` |
//! | a trial's command, environment and place in a gang | `launch` |
//! | draining and leaving | `leave` |
//!
//! A shell feeds [`Event`]s to a [`Driver`] (the node and its agent) and carries
//! out the [`Action`]s it returns, in order. No I/O, clock, thread or OS
//! randomness inside (`clippy.toml` forbids them): time and the first proposal
//! id come in as arguments.

mod agent;
mod disk;
mod driver;
mod fetch;
mod gpu;
mod io;
pub mod launch;
mod leave;
mod models;
mod proposals;
mod slots;
mod sweep;
mod trials;

pub use agent::{Agent, AgentConfig, KILL_GRACE_DEFAULT_MS};
pub use disk::{DISK_CHECK_MS, DISK_RECOVERY_PERCENT};
pub use driver::Driver;
pub use fetch::{FETCH_ATTEMPTS, FETCH_RETRY_MAX_MS, FETCH_RETRY_MS};
pub use gpu::GPU_HEALTH_CHECK_MS;
pub use io::{Action, EarlyExit, Event, ProcessExit, SlotHealth, TrialReport};
pub use launch::{Gang, LaunchSpec};
pub use leave::{LEAVE_DRAIN_MS, LEAVE_REMOVE_MS};
pub use proposals::PROPOSAL_RETRY_MS;
pub use slots::Slots;
pub use sweep::{BLOB_ORPHAN_GRACE_MS, BLOB_SWEEP_MS};
