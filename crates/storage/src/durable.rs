//! [`DurableStore`]: the log on disk.
//!
//! Layout of the data dir:
//!
//! ```text
//! log/wal-0000000000000001.log   segments, appended in order; only the newest grows
//! log/snapshot.bin                the installed snapshot (crc32c + encoded record)
//! log/reserve.bin                 the log's reserve of disk space (`space`)
//! ```
//!
//! A write that meets a full disk is cut back to where the segment ended
//! before it (so no partial record is left between valid ones), the reserve is
//! deleted, and the write is tried once more; `reserve_released` tells the
//! node, which then refuses new work until the space is back (`set_reserve`
//! makes the reserve again).
//!
//! `append` writes into a buffer; `sync` writes the buffer and calls `fdatasync`
//! once, so many Ready batches share one fsync (group commit). A snapshot install
//! writes `snapshot.bin.tmp`, fsyncs it, renames it over `snapshot.bin`, fsyncs the
//! directory, then starts a new segment holding the hard state and the entries after
//! the snapshot, fsyncs it and the directory, and only then deletes older segments.
//! A crash at any point leaves either the old or the new snapshot, and a log that
//! replays correctly against it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::space;
use crate::wal::{self, Kind, Replay, SEGMENT_MAGIC};
use crate::{HardState, LogEntry, LogStore, Recovered, SnapshotRecord, StorageError};

/// Bytes buffered before `append` writes through to the file (the data is still not
/// durable until `sync`).
pub const WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// The durable log store in one directory.
#[derive(Debug)]
pub struct DurableStore {
    dir: PathBuf,
    segment_seq: u64,
    segment: File,
    /// Bytes of the newest segment that are written (where a failed write is
    /// cut back to).
    segment_len: u64,
    buffer: Vec<u8>,
    log_bytes: u64,
    /// The reserve's size when it exists (0: none kept).
    reserve_bytes: u64,
    /// How often a full disk made the store delete its reserve.
    reserve_released: u64,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.display().to_string();
    move |source| StorageError::Io { op, path, source }
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync dir", dir))
}

impl DurableStore {
    /// Opens (or creates) the store in `dir` and recovers what was synced. A torn
    /// tail of the newest segment is cut off; corruption anywhere else is an error.
    pub fn open(dir: &Path) -> Result<(DurableStore, Recovered), StorageError> {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        // A leftover temporary snapshot is an install that never completed.
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(io("remove", &tmp))?;
        }
        let snapshot = read_snapshot(dir)?;
        let segments = list_segments(dir)?;
        let mut replay = Replay::default();
        let mut log_bytes = 0;
        for (i, (_, path)) in segments.iter().enumerate() {
            let name = path.display().to_string();
            let bytes = fs::read(path).map_err(io("read", path))?;
            let scan = wal::scan(&bytes, &name)?;
            let last = i + 1 == segments.len();
            if scan.valid_len < bytes.len() as u64 {
                if !last {
                    return Err(StorageError::Corrupt {
                        path: name,
                        offset: scan.valid_len,
                        detail: "an older segment ends in a partial record".to_string(),
                    });
                }
                // Cut the torn tail so new records follow valid data.
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io("open", path))?;
                f.set_len(scan.valid_len).map_err(io("truncate", path))?;
                f.sync_all().map_err(io("fsync", path))?;
            }
            if last && scan.records.is_empty() {
                // The newest segment's header itself was torn: write it again.
                let mut header = Vec::new();
                wal::encode_record(Kind::Header, SEGMENT_MAGIC, &mut header)?;
                let mut f = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io("open", path))?;
                f.write_all(&header).map_err(io("write", path))?;
                f.sync_all().map_err(io("fsync", path))?;
                log_bytes += header.len() as u64;
                continue;
            }
            if scan.records.first().map(|r| r.kind) != Some(Kind::Header) {
                return Err(StorageError::Corrupt {
                    path: name,
                    offset: 0,
                    detail: "segment does not start with a header".to_string(),
                });
            }
            for record in &scan.records {
                replay.apply(record, &name)?;
            }
            log_bytes += scan.valid_len;
        }
        let recovered = replay.finish(snapshot);
        let (segment_seq, segment) = match segments.last() {
            Some((seq, path)) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io("open", path))?;
                (*seq, f)
            }
            None => new_segment(dir, 1, &[])?,
        };
        let segment_len = segment.metadata().map_err(io("stat", dir))?.len();
        let store = DurableStore {
            dir: dir.to_path_buf(),
            segment_seq,
            segment,
            segment_len,
            buffer: Vec::new(),
            log_bytes,
            reserve_bytes: 0,
            reserve_released: 0,
        };
        Ok((store, recovered))
    }

    fn write_buffer(&mut self) -> Result<(), StorageError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let path = self.segment_path(self.segment_seq);
        let mut result = self.segment.write_all(&self.buffer);
        if let Err(e) = &result {
            if space::is_disk_full(e) {
                // Cut back the part that was written before trying again.
                self.segment
                    .set_len(self.segment_len)
                    .map_err(io("truncate", &path))?;
                if self.release_reserve()? {
                    result = self.segment.write_all(&self.buffer);
                }
            }
        }
        if let Err(e) = result {
            // No partial record stays behind: a later write follows valid data.
            let _ = self.segment.set_len(self.segment_len);
            return Err(io("write", &path)(e));
        }
        self.segment_len += self.buffer.len() as u64;
        self.log_bytes += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// A write met a full disk: deletes the reserve. Whether there was one to
    /// delete.
    fn release_reserve(&mut self) -> Result<bool, StorageError> {
        let reserve = self.dir.join(space::RESERVE_FILE);
        if self.reserve_bytes == 0 || !reserve.exists() {
            return Ok(false);
        }
        fs::remove_file(&reserve).map_err(io("remove", &reserve))?;
        sync_dir(&self.dir)?;
        self.reserve_released += 1;
        Ok(true)
    }

    /// Keeps a reserve of `bytes` for the log (0: none), making it when it is
    /// missing (at start, and after a full disk used it once space is back).
    pub fn set_reserve(&mut self, bytes: u64) -> Result<(), StorageError> {
        self.reserve_bytes = bytes;
        let path = self.dir.join(space::RESERVE_FILE);
        if bytes == 0 {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &path)(e)),
                _ => Ok(()),
            };
        }
        space::allocate(&path, bytes)
    }

    /// Whether the reserve exists now.
    pub fn has_reserve(&self) -> bool {
        self.reserve_bytes > 0 && self.dir.join(space::RESERVE_FILE).exists()
    }

    /// How often a full disk made the store give up its reserve.
    pub fn reserve_released(&self) -> u64 {
        self.reserve_released
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_name(seq))
    }

    /// Reads back everything synced (used by snapshot installs and tests).
    pub fn read_back(dir: &Path) -> Result<Recovered, StorageError> {
        let snapshot = read_snapshot(dir)?;
        let mut replay = Replay::default();
        for (_, path) in list_segments(dir)? {
            let name = path.display().to_string();
            let bytes = fs::read(&path).map_err(io("read", &path))?;
            for record in wal::scan(&bytes, &name)?.records {
                replay.apply(&record, &name)?;
            }
        }
        Ok(replay.finish(snapshot))
    }
}

/// Creates segment `seq` holding a header and `records`, fsyncs it and the directory.
fn new_segment(dir: &Path, seq: u64, records: &[u8]) -> Result<(u64, File), StorageError> {
    let path = dir.join(segment_name(seq));
    let mut bytes = Vec::new();
    wal::encode_record(Kind::Header, SEGMENT_MAGIC, &mut bytes)?;
    bytes.extend_from_slice(records);
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io("create", &path))?;
    f.write_all(&bytes).map_err(io("write", &path))?;
    f.sync_all().map_err(io("fsync", &path))?;
    sync_dir(dir)?;
    Ok((seq, f))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))? {
        let path = entry.map_err(io("list", dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(hex) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            if let Ok(seq) = u64::from_str_radix(hex, 16) {
                out.push((seq, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_snapshot(dir: &Path) -> Result<Option<SnapshotRecord>, StorageError> {
    let path = dir.join(SNAPSHOT_FILE);
    match fs::read(&path) {
        Ok(bytes) => wal::decode_snapshot(&bytes, &path.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::Io {
            op: "read",
            path: path.display().to_string(),
            source: e,
        }),
    }
}

impl LogStore for DurableStore {
    fn append(
        &mut self,
        entries: &[LogEntry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        wal::encode_batch(entries, hard_state, &mut self.buffer)?;
        if self.buffer.len() >= WRITE_BUFFER_BYTES {
            self.write_buffer()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.write_buffer()?;
        let path = self.segment_path(self.segment_seq);
        self.segment.sync_data().map_err(io("fsync", &path))
    }

    fn install_snapshot(
        &mut self,
        snapshot: &SnapshotRecord,
        hard_state: &HardState,
    ) -> Result<(), StorageError> {
        match self.install_snapshot_once(snapshot, hard_state) {
            Err(StorageError::Io { source, op, path }) if space::is_disk_full(&source) => {
                // What the attempt left is not in use yet: the temporary file,
                // or a new segment the store does not write to.
                let _ = fs::remove_file(self.dir.join(format!("{SNAPSHOT_FILE}.tmp")));
                let next = self.segment_path(self.segment_seq + 1);
                if next.exists() {
                    fs::remove_file(&next).map_err(io("remove", &next))?;
                }
                if self.release_reserve()? {
                    self.install_snapshot_once(snapshot, hard_state)
                } else {
                    Err(StorageError::Io { source, op, path })
                }
            }
            result => result,
        }
    }

    fn log_bytes(&self) -> u64 {
        self.log_bytes + self.buffer.len() as u64
    }
}

impl DurableStore {
    /// One attempt at `install_snapshot`.
    fn install_snapshot_once(
        &mut self,
        snapshot: &SnapshotRecord,
        hard_state: &HardState,
    ) -> Result<(), StorageError> {
        self.sync()?;
        // 1. The snapshot file, atomically.
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let dst = self.dir.join(SNAPSHOT_FILE);
        let bytes = wal::encode_snapshot(snapshot)?;
        {
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
        }
        fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
        sync_dir(&self.dir)?;
        // 2. A new segment with what the snapshot does not cover.
        let kept = Self::read_back(&self.dir)?;
        let mut records = Vec::new();
        wal::encode_batch(&kept.entries, Some(hard_state), &mut records)?;
        let old: Vec<(u64, PathBuf)> = list_segments(&self.dir)?;
        let (seq, file) = new_segment(&self.dir, self.segment_seq + 1, &records)?;
        self.segment_seq = seq;
        self.segment_len = file.metadata().map_err(io("stat", &self.dir))?.len();
        self.segment = file;
        self.log_bytes = records.len() as u64;
        // 3. Older segments are now redundant.
        for (_, path) in old {
            fs::remove_file(&path).map_err(io("remove", &path))?;
        }
        sync_dir(&self.dir)
    }
}
