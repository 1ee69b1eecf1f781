//! The durable store on real files, and the simulated store's crash semantics.

use std::path::PathBuf;

use resolute_storage::{
    ConfState, CrashMode, DurableStore, HardState, LogEntry, LogStore, SimStore, SnapshotRecord,
    StorageError,
};

fn entry(index: u64, term: u64) -> LogEntry {
    LogEntry {
        index,
        term,
        kind: 0,
        data: format!("cmd-{index}-{term}").into_bytes(),
        context: Vec::new(),
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<LogEntry> {
    range.map(|i| entry(i, term)).collect()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("resolute-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn hs(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote: 1,
        commit,
    }
}

#[test]
fn appends_survive_reopen_and_suffixes_are_replaced() {
    let dir = tmp("reopen");
    {
        let (mut s, rec) = DurableStore::open(&dir).expect("open");
        assert_eq!(rec.last_index(), 0);
        s.append(&entries(1..=10, 1), Some(&hs(1, 5)))
            .expect("append");
        s.append(&entries(8..=12, 2), Some(&hs(2, 9)))
            .expect("append");
        s.sync().expect("sync");
    }
    let (mut s, rec) = DurableStore::open(&dir).expect("reopen");
    assert_eq!(rec.hard_state, hs(2, 9));
    let got: Vec<(u64, u64)> = rec.entries.iter().map(|e| (e.index, e.term)).collect();
    let mut want: Vec<(u64, u64)> = (1..=7).map(|i| (i, 1)).collect();
    want.extend((8..=12).map(|i| (i, 2)));
    assert_eq!(got, want);
    // Appending after recovery continues the same log.
    s.append(&entries(13..=13, 2), None).expect("append");
    s.sync().expect("sync");
    drop(s);
    assert_eq!(DurableStore::open(&dir).expect("reopen").1.last_index(), 13);
    std::fs::remove_dir_all(&dir).ok();
}

fn segment(dir: &std::path::Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[test]
fn a_torn_tail_is_cut_and_the_log_goes_on() {
    let dir = tmp("torn");
    {
        let (mut s, _) = DurableStore::open(&dir).expect("open");
        s.append(&entries(1..=5, 1), Some(&hs(1, 5)))
            .expect("append");
        s.sync().expect("sync");
    }
    // Half of a record that was being written when the process died.
    let path = segment(&dir);
    let mut bytes = std::fs::read(&path).expect("read");
    let good = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 2, 9, 9]);
    std::fs::write(&path, &bytes).expect("write");
    let (mut s, rec) = DurableStore::open(&dir).expect("torn tails recover");
    assert_eq!(rec.last_index(), 5);
    assert_eq!(
        std::fs::metadata(&path).expect("meta").len() as usize,
        good,
        "the tail was cut"
    );
    s.append(&entries(6..=6, 1), None).expect("append");
    s.sync().expect("sync");
    drop(s);
    assert_eq!(DurableStore::open(&dir).expect("reopen").1.last_index(), 6);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_corrupted_middle_is_refused_with_file_and_offset() {
    let dir = tmp("corrupt");
    {
        let (mut s, _) = DurableStore::open(&dir).expect("open");
        for i in 1..=5 {
            s.append(&entries(i..=i, 1), None).expect("append");
        }
        s.sync().expect("sync");
    }
    let path = segment(&dir);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[40] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let err = DurableStore::open(&dir).expect_err("corruption is refused");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("corrupt record at byte"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn snap(index: u64, term: u64) -> SnapshotRecord {
    SnapshotRecord {
        index,
        term,
        conf_state: ConfState {
            voters: vec![1, 2, 3],
            ..ConfState::default()
        },
        data: vec![7; 100],
    }
}

#[test]
fn snapshots_install_atomically_and_compact_the_log() {
    let dir = tmp("snapshot");
    {
        let (mut s, _) = DurableStore::open(&dir).expect("open");
        s.append(&entries(1..=100, 1), Some(&hs(1, 100)))
            .expect("append");
        s.sync().expect("sync");
        let before = s.log_bytes();
        s.install_snapshot(&snap(60, 1), &hs(1, 100))
            .expect("install");
        assert!(s.log_bytes() < before, "covered entries are dropped");
        s.append(&entries(101..=110, 1), None).expect("append");
        s.sync().expect("sync");
    }
    // A leftover temporary file from an interrupted install is ignored.
    std::fs::write(dir.join("snapshot.bin.tmp"), b"half").expect("tmp");
    let (_, rec) = DurableStore::open(&dir).expect("reopen");
    assert_eq!(rec.snapshot, Some(snap(60, 1)));
    assert_eq!(rec.entries.first().map(|e| e.index), Some(61));
    assert_eq!(rec.last_index(), 110);
    assert!(!dir.join("snapshot.bin.tmp").exists());
    // A snapshot from a leader that disagrees with the local log replaces all of it.
    let (mut s, _) = DurableStore::open(&dir).expect("reopen");
    s.install_snapshot(&snap(105, 3), &hs(3, 105))
        .expect("install");
    drop(s);
    let (_, rec) = DurableStore::open(&dir).expect("reopen");
    assert_eq!(rec.snapshot.map(|s| s.index), Some(105));
    assert!(rec.entries.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

struct Counter(u64);

impl rand_core::RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u64() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[test]
fn simulated_crashes_never_lose_synced_entries() {
    let mut rng = Counter(42);
    for mode in [CrashMode::LoseUnsynced, CrashMode::TearUnsynced] {
        let mut s = SimStore::new();
        let mut synced = 0u64;
        let mut next = 1u64;
        for round in 0..300u64 {
            let n = 1 + rng.next_u64_mod(5);
            s.append(&entries(next..=next + n - 1, 1), Some(&hs(1, next)))
                .expect("append");
            next += n;
            if round % 3 != 0 {
                s.sync().expect("sync");
                synced = next - 1;
            }
            if round % 7 == 0 {
                s.crash(mode, &mut rng);
                let rec = s.recover().expect("recovers");
                assert!(rec.last_index() >= synced, "{mode:?}: lost synced entries");
                for (i, e) in rec.entries.iter().enumerate() {
                    assert_eq!(*e, entry(i as u64 + 1, 1), "{mode:?}: corrupt entry");
                }
                if mode == CrashMode::LoseUnsynced {
                    assert_eq!(rec.last_index(), synced);
                }
                next = rec.last_index() + 1;
                synced = rec.last_index();
            }
        }
    }
}

trait ModExt {
    fn next_u64_mod(&mut self, n: u64) -> u64;
}

impl ModExt for Counter {
    fn next_u64_mod(&mut self, n: u64) -> u64 {
        rand_core::RngCore::next_u64(self) % n
    }
}

#[test]
fn simulated_io_errors_are_reported_and_lose_only_unsynced_data() {
    let mut s = SimStore::new();
    for i in 1..=3 {
        s.append(&entries(i..=i, 1), None).expect("append");
    }
    s.sync().expect("sync");
    s.append(&entries(4..=6, 1), None).expect("append");
    s.fail_next_sync();
    assert!(matches!(s.sync(), Err(StorageError::Injected("fsync"))));
    assert_eq!(s.recover().expect("recover").last_index(), 3);
    // A flipped bit in the first of three synced records is corruption, not a tail.
    s.corrupt_byte(30);
    assert!(matches!(s.recover(), Err(StorageError::Corrupt { .. })));
}
