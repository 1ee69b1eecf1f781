//! The record format and recovery logic shared by the durable and simulated stores.
//!
//! A log is a sequence of records:
//!
//! ```text
//! +-----------+-----------+------+-------------------+
//! | len (u32) | crc (u32) | kind | payload (len - 1) |   little-endian; crc32c over kind + payload
//! +-----------+-----------+------+-------------------+
//! ```
//!
//! Recovery reads records until the end. Only the last record can be incomplete
//! (a write that was never acknowledged because its fsync never returned): a record
//! that runs past the end of the data, or fails its checksum with nothing but zeros
//! after it, is a torn tail and is cut off. A record that fails its checksum with
//! more data after it is corruption of acknowledged data, and recovery refuses it
//! (as etcd's WAL does) instead of silently losing entries.

use crate::{HardState, LogEntry, Recovered, SnapshotRecord, StorageError};
use resolute_types::codec;

/// Largest record, in bytes; a larger length field is damage, not data.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes before the payload: length, checksum, kind.
pub const HEADER_BYTES: usize = 9;
/// The payload of every segment's first record.
pub const SEGMENT_MAGIC: &[u8] = b"RESOLUTE-WAL-v1";

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The segment header ([`SEGMENT_MAGIC`]).
    Header = 1,
    /// A batch of entries.
    Entries = 2,
    /// A hard state.
    HardState = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Header),
            2 => Some(Kind::Entries),
            3 => Some(Kind::HardState),
            _ => None,
        }
    }
}

/// Appends one framed record to `out`.
pub fn encode_record(kind: Kind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), StorageError> {
    let len = payload.len() + 1;
    if len > RECORD_BYTES_MAX {
        return Err(StorageError::TooLarge {
            bytes: len,
            limit: RECORD_BYTES_MAX,
        });
    }
    let mut crc = crc32c::crc32c(&[kind as u8]);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    Ok(())
}

/// Encodes a batch of entries and/or a hard state as records.
pub fn encode_batch(
    entries: &[LogEntry],
    hard_state: Option<&HardState>,
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    if !entries.is_empty() {
        let payload = codec::encode(&entries).map_err(|e| corrupt_encode(e.to_string()))?;
        encode_record(Kind::Entries, &payload, out)?;
    }
    if let Some(hs) = hard_state {
        let payload = codec::encode(hs).map_err(|e| corrupt_encode(e.to_string()))?;
        encode_record(Kind::HardState, &payload, out)?;
    }
    Ok(())
}

fn corrupt_encode(detail: String) -> StorageError {
    StorageError::Corrupt {
        path: "<encode>".to_string(),
        offset: 0,
        detail,
    }
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Byte offset in its file.
    pub offset: u64,
    /// What it holds.
    pub kind: Kind,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The records of one file and where its valid data ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Every intact record, in order.
    pub records: Vec<Record>,
    /// Length of the intact prefix; anything after it is a torn tail to cut off.
    pub valid_len: u64,
}

/// Reads the records of `bytes` (the contents of `path`), separating a torn tail
/// from corruption.
pub fn scan(bytes: &[u8], path: &str) -> Result<Scan, StorageError> {
    let mut records = Vec::new();
    let mut off = 0usize;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if rest.len() < HEADER_BYTES {
            return torn_or_corrupt(
                bytes,
                off,
                rest.len(),
                path,
                "truncated record header",
                records,
            );
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > RECORD_BYTES_MAX {
            return torn_or_corrupt(
                bytes,
                off,
                rest.len(),
                path,
                &format!("impossible record length {len}"),
                records,
            );
        }
        if rest.len() < 8 + len {
            // The write of the last record never completed.
            return torn_or_corrupt(
                bytes,
                off,
                rest.len(),
                path,
                "record runs past the end",
                records,
            );
        }
        let body = &rest[8..8 + len];
        if crc32c::crc32c(body) != crc {
            return torn_or_corrupt(bytes, off, 8 + len, path, "checksum mismatch", records);
        }
        let Some(kind) = Kind::from_byte(body[0]) else {
            return Err(StorageError::Corrupt {
                path: path.to_string(),
                offset: off as u64,
                detail: format!("unknown record kind {}", body[0]),
            });
        };
        records.push(Record {
            offset: off as u64,
            kind,
            payload: body[1..].to_vec(),
        });
        off += 8 + len;
    }
    Ok(Scan {
        records,
        valid_len: off as u64,
    })
}

/// The record at `off` (spanning `span` bytes) is bad: a torn tail if nothing but
/// zeros follows it, corruption otherwise.
fn torn_or_corrupt(
    bytes: &[u8],
    off: usize,
    span: usize,
    path: &str,
    what: &str,
    records: Vec<Record>,
) -> Result<Scan, StorageError> {
    let after = &bytes[(off + span).min(bytes.len())..];
    if after.iter().all(|b| *b == 0) {
        return Ok(Scan {
            records,
            valid_len: off as u64,
        });
    }
    Err(StorageError::Corrupt {
        path: path.to_string(),
        offset: off as u64,
        detail: format!(
            "{what}, and {} bytes of later records follow: refusing to drop acknowledged entries",
            after.len()
        ),
    })
}

/// Replays records (of one or more segments, in order) on top of a snapshot.
#[derive(Debug, Default)]
pub struct Replay {
    hard_state: HardState,
    entries: Vec<LogEntry>,
}

impl Replay {
    /// Applies one record.
    pub fn apply(&mut self, record: &Record, path: &str) -> Result<(), StorageError> {
        let bad = |detail: String| StorageError::Corrupt {
            path: path.to_string(),
            offset: record.offset,
            detail,
        };
        match record.kind {
            Kind::Header => {
                if record.payload != SEGMENT_MAGIC {
                    return Err(bad("not a Resolute log segment (bad header)".to_string()));
                }
            }
            Kind::HardState => {
                self.hard_state = codec::decode(&record.payload).map_err(|e| bad(e.to_string()))?;
            }
            Kind::Entries => {
                let batch: Vec<LogEntry> =
                    codec::decode(&record.payload).map_err(|e| bad(e.to_string()))?;
                self.append(batch).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Appends a batch, replacing the log from its first index on.
    pub fn append(&mut self, batch: Vec<LogEntry>) -> Result<(), StorageError> {
        let Some(first) = batch.first().map(|e| e.index) else {
            return Ok(());
        };
        if let Some(last) = self.entries.last().map(|e| e.index) {
            if first > last + 1 {
                return Err(StorageError::Gap { first, last });
            }
            let keep = self.entries.partition_point(|e| e.index < first);
            self.entries.truncate(keep);
        }
        for pair in batch.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(StorageError::Gap {
                    first: pair[1].index,
                    last: pair[0].index,
                });
            }
        }
        self.entries.extend(batch);
        Ok(())
    }

    /// The recovered state, with `snapshot` applied: entries it covers are dropped,
    /// and the rest are kept only if the log agrees with the snapshot at its index.
    pub fn finish(self, snapshot: Option<SnapshotRecord>) -> Recovered {
        let mut entries = self.entries;
        if let Some(snap) = &snapshot {
            let agrees = entries
                .iter()
                .any(|e| e.index == snap.index && e.term == snap.term);
            let first_after = entries.first().is_some_and(|e| e.index == snap.index + 1);
            if agrees || first_after {
                entries.retain(|e| e.index > snap.index);
            } else {
                entries.clear();
            }
        }
        Recovered {
            hard_state: self.hard_state,
            snapshot,
            entries,
        }
    }
}

/// A snapshot file: `crc (u32) | payload` where the payload is the encoded record.
pub fn encode_snapshot(snapshot: &SnapshotRecord) -> Result<Vec<u8>, StorageError> {
    let payload = codec::encode(snapshot).map_err(|e| corrupt_encode(e.to_string()))?;
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a snapshot file; any damage is corruption (snapshots are installed atomically).
pub fn decode_snapshot(bytes: &[u8], path: &str) -> Result<SnapshotRecord, StorageError> {
    let bad = |detail: &str| StorageError::Corrupt {
        path: path.to_string(),
        offset: 0,
        detail: detail.to_string(),
    };
    if bytes.len() < 4 {
        return Err(bad("snapshot file too short"));
    }
    let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if crc32c::crc32c(&bytes[4..]) != crc {
        return Err(bad("snapshot checksum mismatch"));
    }
    codec::decode(&bytes[4..]).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry {
            index,
            term,
            kind: 0,
            data: vec![index as u8; 10],
            context: Vec::new(),
        }
    }

    fn log(batches: &[&[LogEntry]]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(Kind::Header, SEGMENT_MAGIC, &mut out).expect("header");
        for b in batches {
            encode_batch(
                b,
                Some(&HardState {
                    term: 1,
                    vote: 1,
                    commit: b[0].index,
                }),
                &mut out,
            )
            .expect("batch");
        }
        out
    }

    #[test]
    fn every_truncation_point_is_a_torn_tail() {
        let bytes = log(&[&[entry(1, 1), entry(2, 1)], &[entry(3, 1)]]);
        let full = scan(&bytes, "x").expect("scan");
        assert_eq!(full.valid_len as usize, bytes.len());
        for cut in 0..bytes.len() {
            let s = scan(&bytes[..cut], "x").expect("torn tails are not errors");
            assert!(s.valid_len as usize <= cut);
            assert!(full.records.starts_with(&s.records));
        }
    }

    #[test]
    fn zero_filled_tail_is_torn_and_a_flipped_bit_in_the_middle_is_corruption() {
        let mut bytes = log(&[&[entry(1, 1)], &[entry(2, 1)], &[entry(3, 1)]]);
        let good = bytes.len();
        bytes.extend(std::iter::repeat_n(0u8, 4096));
        assert_eq!(scan(&bytes, "x").expect("zeros").valid_len as usize, good);
        let mut damaged = log(&[&[entry(1, 1)], &[entry(2, 1)], &[entry(3, 1)]]);
        damaged[40] ^= 0x10;
        let err = scan(&damaged, "seg.log").expect_err("corrupt");
        assert!(
            err.to_string().contains("seg.log: corrupt record at byte"),
            "{err}"
        );
    }

    #[test]
    fn replay_overwrites_conflicting_suffixes() {
        let mut r = Replay::default();
        r.append(vec![entry(1, 1), entry(2, 1), entry(3, 1)])
            .expect("append");
        r.append(vec![entry(2, 2)]).expect("overwrite");
        assert!(matches!(
            r.append(vec![entry(9, 2)]),
            Err(StorageError::Gap { first: 9, last: 2 })
        ));
        let rec = r.finish(None);
        assert_eq!(
            rec.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 2)]
        );
    }
}
