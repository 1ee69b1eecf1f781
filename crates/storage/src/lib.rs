//! The experiment log's storage.
//!
//! Raft's durability rests here: the node hands a store its new log entries and hard
//! state, the store makes them durable (`sync`), and only then does the node send the
//! messages that depend on them (raft-rs's Ready contract). After a crash, `open`
//! returns exactly what was synced: every acknowledged entry, no corrupt one.
//!
//! - [`DurableStore`]: files in the node's data dir. Checksummed records (crc32c), one
//!   fsync for many appends (group commit), a torn tail truncated on recovery, a
//!   corrupted middle refused with an error naming the file and offset, and atomic
//!   snapshot installs (write, fsync, rename, fsync the directory).
//! - [`SimStore`]: the same record format in memory, for the simulator: a simulated
//!   crash loses unsynced writes or tears the last one, and I/O errors can be injected.
//!
//! Both share [`wal`]'s encoding and recovery, so the simulator exercises the real
//! recovery code.
//!
//! [`blob::BlobStore`] keeps content-addressed blobs (checkpoints, model
//! directories) whose chunks are verified one by one as they arrive.
//!
//! The store knows nothing about raft-rs's types: [`LogEntry`], [`HardState`] and
//! [`SnapshotRecord`] are plain data defined by `core` (`core::log_store`, with the
//! [`LogStore`] trait), which converts them to and from raft-rs's.

pub mod blob;
mod durable;
mod sim;
pub mod space;
pub mod wal;

pub use durable::DurableStore;
pub use sim::{CrashMode, SimStore};

// The records and the trait are core's (the node's contract with its store);
// this crate implements them.
pub use resolute_core::log_store::{
    ConfState, HardState, LogEntry, LogStore, Recovered, SnapshotRecord, StorageError,
};
