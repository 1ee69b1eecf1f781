//! [`LogCache`]: raft-rs's view of the persisted log, in memory.
//!
//! raft-rs reads its log through the synchronous `Storage` trait. To keep the core
//! free of I/O, this cache mirrors exactly what the shell has made durable: it is
//! built from the store's recovery at start-up and updated only when the shell
//! acknowledges a write (`Input::Persisted`). It also holds the latest state-machine
//! snapshot, which the leader sends to new or lagging followers.

// protobuf messages are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::log_store as store;

/// The in-memory log raft-rs reads.
#[derive(Debug, Default)]
pub struct LogCache {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
    /// raft-rs asked for a snapshot this cache could not give (none yet, or one
    /// whose membership lacks the receiver): the node should take a new one.
    snapshot_wanted: std::cell::Cell<bool>,
}

impl LogCache {
    /// A cache for a node with no history and the given membership (empty for a
    /// joining node, which learns its membership from the leader).
    pub fn new(conf_state: ConfState) -> Self {
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().set_conf_state(conf_state.clone());
        LogCache {
            hard_state: HardState::default(),
            conf_state,
            snapshot,
            entries: Vec::new(),
            snapshot_wanted: std::cell::Cell::new(false),
        }
    }

    /// A cache holding what the store recovered.
    pub fn from_recovered(rec: &store::Recovered) -> Self {
        let mut cache = LogCache::default();
        if let Some(s) = &rec.snapshot {
            cache.snapshot = to_snapshot(s);
            cache.conf_state = to_conf_state(&s.conf_state);
        }
        cache.entries = rec.entries.iter().map(to_entry).collect();
        cache.hard_state = to_hard_state(&rec.hard_state);
        cache
    }

    /// Whether raft-rs wanted a snapshot this cache could not give (and forgets it).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Index of the snapshot (0 if none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The membership as last applied.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Records the membership after an applied change.
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Records a persisted hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Appends persisted entries, replacing any conflicting suffix.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        let offset = self.snapshot_index() + 1;
        let keep = first.saturating_sub(offset) as usize;
        self.entries.truncate(keep.min(self.entries.len()));
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot received from the leader (after it was persisted).
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let agrees = self
            .entries
            .iter()
            .any(|e| e.index == index && e.term == term);
        if agrees {
            self.entries.retain(|e| e.index > index);
        } else {
            self.entries.clear();
        }
        self.conf_state = meta.get_conf_state().clone();
        if self.hard_state.commit < index {
            self.hard_state.commit = index;
        }
        self.snapshot = snapshot;
    }

    /// Replaces the snapshot with a newer local one and drops the entries it covers.
    pub fn compact_to(&mut self, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        self.entries.retain(|e| e.index > index);
        self.snapshot = snapshot;
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }
}

impl Storage for LogCache {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut out = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entries
            .get((idx - self.first()) as usize)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_metadata().get_conf_state();
        // raft-rs drops a snapshot whose membership lacks its receiver.
        let includes = cs.voters.contains(&to)
            || cs.learners.contains(&to)
            || cs.voters_outgoing.contains(&to)
            || cs.learners_next.contains(&to);
        if self.snapshot_index() < request_index || self.snapshot.data.is_empty() || !includes {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// raft-rs entry to store entry.
pub fn from_entry(e: &Entry) -> store::LogEntry {
    store::LogEntry {
        index: e.index,
        term: e.term,
        kind: e.get_entry_type() as u8,
        data: e.data.to_vec(),
        context: e.context.to_vec(),
    }
}

/// Store entry to raft-rs entry.
pub fn to_entry(e: &store::LogEntry) -> Entry {
    let mut out = Entry::default();
    out.index = e.index;
    out.term = e.term;
    out.set_entry_type(match e.kind {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    });
    out.data = e.data.clone().into();
    out.context = e.context.clone().into();
    out
}

/// raft-rs hard state to store hard state.
pub fn from_hard_state(hs: &HardState) -> store::HardState {
    store::HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

fn to_hard_state(hs: &store::HardState) -> HardState {
    let mut out = HardState::default();
    out.term = hs.term;
    out.vote = hs.vote;
    out.commit = hs.commit;
    out
}

/// raft-rs membership to store membership.
pub fn from_conf_state(cs: &ConfState) -> store::ConfState {
    store::ConfState {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        voters_outgoing: cs.voters_outgoing.clone(),
        learners_next: cs.learners_next.clone(),
        auto_leave: cs.auto_leave,
    }
}

fn to_conf_state(cs: &store::ConfState) -> ConfState {
    let mut out = ConfState::default();
    out.voters = cs.voters.clone();
    out.learners = cs.learners.clone();
    out.voters_outgoing = cs.voters_outgoing.clone();
    out.learners_next = cs.learners_next.clone();
    out.auto_leave = cs.auto_leave;
    out
}

/// raft-rs snapshot to store snapshot.
pub fn from_snapshot(s: &Snapshot) -> store::SnapshotRecord {
    let meta = s.get_metadata();
    store::SnapshotRecord {
        index: meta.index,
        term: meta.term,
        conf_state: from_conf_state(meta.get_conf_state()),
        data: s.data.to_vec(),
    }
}

fn to_snapshot(s: &store::SnapshotRecord) -> Snapshot {
    let mut out = Snapshot::default();
    out.data = s.data.clone().into();
    let meta = out.mut_metadata();
    meta.index = s.index;
    meta.term = s.term;
    meta.set_conf_state(to_conf_state(&s.conf_state));
    out
}
