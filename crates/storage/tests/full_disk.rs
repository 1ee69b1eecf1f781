//! The log on a file system that fills up: a small tmpfs mounted for the test
//! (needs root; says "skipped" otherwise). With a reserve the append goes
//! through; without one it fails cleanly, leaves no partial record, and works
//! again once space is back.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use resolute_storage::space::{self, RESERVE_FILE};
use resolute_storage::{DurableStore, HardState, LogEntry, LogStore};

const FS_MIB: u64 = 8;
const RESERVE_BYTES: u64 = 1024 * 1024;

/// A tmpfs of `FS_MIB` at a fresh directory, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(name: &str) -> Option<SmallFs> {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to this process's effective uid.
        if fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
            eprintln!("skipped: mounting a small file system needs root");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("resolute-full-{name}-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_MIB}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Fills the file system holding `dir` until a write fails.
fn fill(dir: &Path) -> PathBuf {
    let ballast = dir.join("ballast");
    let mut f = fs::File::create(&ballast).expect("ballast");
    let chunk = vec![7u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if space::is_disk_full(&e) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    // Small writes too, so that not even one block is left.
    while f.write_all(&[7u8; 512]).is_ok() {}
    let _ = f.sync_all();
    ballast
}

fn entries(from: u64, n: u64, bytes: usize) -> Vec<LogEntry> {
    (from..from + n)
        .map(|index| LogEntry {
            index,
            term: 1,
            kind: 0,
            data: vec![index as u8; bytes],
            context: Vec::new(),
        })
        .collect()
}

fn hs(commit: u64) -> HardState {
    HardState {
        term: 1,
        vote: 1,
        commit,
    }
}

#[test]
fn a_full_disk_takes_the_reserve_and_the_append_goes_through() {
    let Some(fs_) = SmallFs::mount("reserve") else {
        return;
    };
    let dir = fs_.0.join("log");
    let (mut s, _) = DurableStore::open(&dir).expect("open");
    s.set_reserve(RESERVE_BYTES).expect("reserve");
    assert!(s.has_reserve());
    let before = space::free_bytes(&dir).expect("statvfs");
    assert!(
        before < FS_MIB * 1024 * 1024 - RESERVE_BYTES + 64 * 1024,
        "the reserve takes real blocks: {before} bytes free"
    );
    s.append(&entries(1, 10, 1000), Some(&hs(10)))
        .expect("append");
    s.sync().expect("sync");
    let ballast = fill(&fs_.0);
    assert!(space::free_bytes(&dir).expect("statvfs") < 4096);
    // 200 KiB of entries: more than is free, less than the reserve.
    s.append(&entries(11, 200, 1000), Some(&hs(210)))
        .expect("append on a full disk");
    s.sync().expect("sync on a full disk");
    assert_eq!(s.reserve_released(), 1);
    assert!(!s.has_reserve());
    assert!(!dir.join(RESERVE_FILE).exists());
    drop(s);
    let (mut s, rec) = DurableStore::open(&dir).expect("reopen");
    assert_eq!(rec.last_index(), 210, "every synced entry is there");
    // Space back: the reserve is made again.
    fs::remove_file(&ballast).expect("free space");
    s.set_reserve(RESERVE_BYTES).expect("reserve again");
    assert!(s.has_reserve());
}

#[test]
fn without_a_reserve_a_full_disk_fails_the_write_cleanly_and_the_log_goes_on_later() {
    let Some(fs_) = SmallFs::mount("noreserve") else {
        return;
    };
    let dir = fs_.0.join("log");
    let (mut s, _) = DurableStore::open(&dir).expect("open");
    s.append(&entries(1, 10, 1000), Some(&hs(10)))
        .expect("append");
    s.sync().expect("sync");
    let ballast = fill(&fs_.0);
    s.append(&entries(11, 200, 1000), Some(&hs(210)))
        .expect("buffered");
    let err = s.sync().expect_err("no space, no reserve");
    assert!(err.to_string().contains("write"), "{err}");
    // Nothing partial was left behind: a reopen recovers the synced entries
    // without calling anything torn or corrupt.
    fs::remove_file(&ballast).expect("free space");
    s.sync()
        .expect("the buffered entries go through once space is back");
    drop(s);
    let (_, rec) = DurableStore::open(&dir).expect("reopen");
    assert_eq!(rec.last_index(), 210);
}
