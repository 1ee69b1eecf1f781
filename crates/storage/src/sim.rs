//! [`SimStore`]: the log in memory, for the simulator.
//!
//! It writes the same records as the durable store into a byte buffer, tracks how
//! much of it is synced, and on a simulated crash loses unsynced bytes, keeps some of
//! them, or tears the last write, then recovers through the same [`wal`] code.

use rand_core::RngCore;

use crate::wal::{self, Kind, Replay, SEGMENT_MAGIC};
use crate::{HardState, LogEntry, LogStore, Recovered, SnapshotRecord, StorageError};

/// What a simulated crash does to unsynced writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Everything unsynced is lost.
    LoseUnsynced,
    /// A random prefix of the unsynced bytes survives (possibly ending mid-record).
    TearUnsynced,
}

/// An in-memory log store with crash and I/O-error injection.
#[derive(Debug, Clone)]
pub struct SimStore {
    /// Segment bytes written so far (synced prefix plus unsynced tail).
    bytes: Vec<u8>,
    /// How many of `bytes` are durable.
    synced: usize,
    snapshot: Option<SnapshotRecord>,
    /// When set, the next `sync` fails and loses its unsynced data.
    fail_next_sync: bool,
}

impl Default for SimStore {
    fn default() -> Self {
        Self::new()
    }
}

impl SimStore {
    /// An empty store.
    pub fn new() -> Self {
        let mut bytes = Vec::new();
        // The header of a constant is always encodable.
        let _ = wal::encode_record(Kind::Header, SEGMENT_MAGIC, &mut bytes);
        let synced = bytes.len();
        SimStore {
            bytes,
            synced,
            snapshot: None,
            fail_next_sync: false,
        }
    }

    /// Makes the next `sync` fail (as a disk I/O error would).
    pub fn fail_next_sync(&mut self) {
        self.fail_next_sync = true;
    }

    /// Simulates a crash: unsynced bytes are lost or torn as `mode` says (`rng`
    /// picks how much survives).
    pub fn crash(&mut self, mode: CrashMode, rng: &mut dyn RngCore) {
        let unsynced = self.bytes.len() - self.synced;
        let keep = match mode {
            CrashMode::LoseUnsynced => 0,
            CrashMode::TearUnsynced if unsynced > 0 => {
                (rng.next_u64() % (unsynced as u64 + 1)) as usize
            }
            CrashMode::TearUnsynced => 0,
        };
        self.bytes.truncate(self.synced + keep);
        // What reached the "disk" is now all there is.
        self.synced = self.bytes.len();
    }

    /// Recovers like the durable store: cuts a torn tail, refuses corruption.
    pub fn recover(&mut self) -> Result<Recovered, StorageError> {
        let scan = wal::scan(&self.bytes, "sim")?;
        self.bytes.truncate(scan.valid_len as usize);
        self.synced = self.synced.min(self.bytes.len());
        let mut replay = Replay::default();
        for record in &scan.records {
            replay.apply(record, "sim")?;
        }
        Ok(replay.finish(self.snapshot.clone()))
    }

    /// A one-line description of each record (for diagnosing a failed recovery).
    pub fn describe(&self) -> Vec<String> {
        let scan = match wal::scan(&self.bytes, "sim") {
            Ok(s) => s,
            Err(e) => return vec![e.to_string()],
        };
        let mut out = vec![format!(
            "snapshot: {:?}",
            self.snapshot.as_ref().map(|s| (s.index, s.term))
        )];
        for r in scan.records {
            let what = match r.kind {
                Kind::Entries => match resolute_types::codec::decode::<Vec<LogEntry>>(&r.payload) {
                    Ok(es) => format!(
                        "entries {:?}..{:?}",
                        es.first().map(|e| (e.index, e.term)),
                        es.last().map(|e| (e.index, e.term))
                    ),
                    Err(e) => format!("entries (undecodable: {e})"),
                },
                Kind::HardState => match resolute_types::codec::decode::<HardState>(&r.payload) {
                    Ok(hs) => format!("hard state {hs:?}"),
                    Err(e) => format!("hard state (undecodable: {e})"),
                },
                Kind::Header => "header".to_string(),
            };
            out.push(format!("@{} {what}", r.offset));
        }
        out
    }

    /// Flips one bit of synced data at `offset` (to test corruption handling).
    pub fn corrupt_byte(&mut self, offset: usize) {
        if let Some(b) = self.bytes.get_mut(offset) {
            *b ^= 0x01;
        }
    }
}

impl LogStore for SimStore {
    fn append(
        &mut self,
        entries: &[LogEntry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        wal::encode_batch(entries, hard_state, &mut self.bytes)
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if self.fail_next_sync {
            self.fail_next_sync = false;
            self.bytes.truncate(self.synced);
            return Err(StorageError::Injected("fsync"));
        }
        self.synced = self.bytes.len();
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        snapshot: &SnapshotRecord,
        hard_state: &HardState,
    ) -> Result<(), StorageError> {
        self.sync()?;
        let current = self.recover()?;
        let mut replay = Replay::default();
        replay.append(current.entries)?;
        let kept = replay.finish(Some(snapshot.clone()));
        let mut fresh = SimStore::new();
        wal::encode_batch(&kept.entries, Some(hard_state), &mut fresh.bytes)?;
        fresh.synced = fresh.bytes.len();
        fresh.snapshot = Some(snapshot.clone());
        *self = fresh;
        Ok(())
    }

    fn log_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
}
