//! Disk space: what a file system has free, and the log's reserve.
//!
//! The log must be able to append when everything else has filled the disk
//! (trials' files, checkpoints, copies, other programs): a node that cannot
//! append cannot acknowledge, and one that exits on a full disk takes its
//! trials with it. So the log keeps a reserve, a file of allocated blocks
//! beside its segments ([`RESERVE_FILE`]), which [`crate::DurableStore`]
//! deletes when an append meets a full disk and then tries the append again.
//! The node's agent refuses new work well before (its low-water mark); the
//! reserve is for what the low-water mark could not stop.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::StorageError;

/// The log's reserve, in the log's directory.
pub const RESERVE_FILE: &str = "reserve.bin";
/// Bytes written per call when the file system cannot allocate without writing.
const ZEROS_CHUNK_BYTES: usize = 1024 * 1024;

/// Bytes free for an unprivileged user on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, StorageError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| StorageError::Io {
        op: "statvfs",
        path: path.display().to_string(),
        source: std::io::Error::from(e),
    })?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Whether an I/O error means the file system is full (or the quota used up).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Makes `path` a file of `bytes` allocated bytes (blocks taken from the file
/// system, not a sparse file), fsynced. An existing one of that size stays.
pub fn allocate(path: &Path, bytes: u64) -> Result<(), StorageError> {
    let err = |op: &'static str| {
        let path = path.display().to_string();
        move |source: std::io::Error| StorageError::Io { op, path, source }
    };
    if fs::metadata(path).is_ok_and(|m| m.len() == bytes) {
        return Ok(());
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(err("create"))?;
        let len = i64::try_from(bytes).unwrap_or(i64::MAX);
        match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len) {
            Ok(()) => {}
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                // No fallocate here: write the zeros.
                let zeros = vec![0u8; ZEROS_CHUNK_BYTES];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(ZEROS_CHUNK_BYTES as u64) as usize;
                    f.write_all(&zeros[..n]).map_err(err("write"))?;
                    left -= n as u64;
                }
            }
            Err(e) => return Err(err("fallocate")(std::io::Error::from(e))),
        }
        f.sync_all().map_err(err("fsync"))
    })();
    if result.is_err() {
        // Half a reserve would only take space: none at all.
        let _ = fs::remove_file(path);
    }
    result
}
