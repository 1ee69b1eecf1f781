//! The node's contract with its log store: the records it hands a store and gets
//! back after a crash, and the [`LogStore`] trait every store implements.
//!
//! These are plain data, not raft-rs's protobuf types (`log_cache` converts), so
//! the store crate (`crates/storage`: files, and a simulated store) depends on
//! core and not the other way round: core does no I/O.

use serde::{Deserialize, Serialize};

/// One Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log, from 1.
    pub index: u64,
    /// The leader's term when the entry was proposed.
    pub term: u64,
    /// raft-rs's entry type (normal, conf change, conf change v2).
    pub kind: u8,
    /// The command.
    pub data: Vec<u8>,
    /// raft-rs's entry context.
    pub context: Vec<u8>,
}

/// Raft's hard state: what must survive a crash besides the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HardState {
    /// Current term.
    pub term: u64,
    /// Whom this node voted for in `term` (0: nobody).
    pub vote: u64,
    /// Highest index known committed.
    pub commit: u64,
}

/// The cluster membership at a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConfState {
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration during a joint change.
    pub voters_outgoing: Vec<u64>,
    /// Learners to add when the joint change completes.
    pub learners_next: Vec<u64>,
    /// Whether the joint configuration is left automatically.
    pub auto_leave: bool,
}

/// A state-machine snapshot and the log position it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Last log index included in the snapshot.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Membership as of `index`.
    pub conf_state: ConfState,
    /// The serialized state machine.
    pub data: Vec<u8>,
}

/// What a store holds after recovery.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The last synced hard state (default if none was ever written).
    pub hard_state: HardState,
    /// The installed snapshot, if any.
    pub snapshot: Option<SnapshotRecord>,
    /// The entries after the snapshot, contiguous.
    pub entries: Vec<LogEntry>,
}

impl Recovered {
    /// Index of the last entry (or of the snapshot, or 0).
    pub fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .or(self.snapshot.as_ref().map(|s| s.index))
            .unwrap_or(0)
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The operating system refused an I/O operation.
    #[error("storage: {op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `write`, `fsync`, ...).
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record that was acknowledged earlier is damaged: recovery stops rather than
    /// silently dropping acknowledged entries.
    #[error("storage: {path}: corrupt record at byte {offset}: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A single write was larger than a record may be.
    #[error("storage: record of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the record.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Appended entries do not continue the log.
    #[error("storage: entries starting at {first} do not continue the log ending at {last}")]
    Gap {
        /// First index of the rejected batch.
        first: u64,
        /// Last index in the store.
        last: u64,
    },
    /// An injected fault (simulated stores only).
    #[error("storage: injected I/O error during {0}")]
    Injected(&'static str),
}

/// What every store offers the node.
pub trait LogStore {
    /// Queues entries (replacing the log from the first entry's index on) and/or a
    /// hard state. Nothing is durable until [`LogStore::sync`] returns.
    fn append(
        &mut self,
        entries: &[LogEntry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError>;

    /// Makes everything appended so far durable (one fsync for all of it).
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Atomically installs `snapshot` with `hard_state`, dropping the entries it
    /// covers; durable when it returns. Entries after the snapshot are kept when the
    /// log agrees with the snapshot at its index, dropped otherwise.
    fn install_snapshot(
        &mut self,
        snapshot: &SnapshotRecord,
        hard_state: &HardState,
    ) -> Result<(), StorageError>;

    /// Bytes of log on disk (or in memory) since the last snapshot.
    fn log_bytes(&self) -> u64;
}
