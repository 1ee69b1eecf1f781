//! Crash safety on real files: a child process appends and fsyncs as fast as it can
//! and is SIGKILLed at random moments, 200 times; after every kill, recovery must hold
//! every entry the child acknowledged (printed after its fsync returned) and no
//! corrupt or out-of-order entry.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use resolute_storage::{ConfState, DurableStore, HardState, LogEntry, LogStore, SnapshotRecord};

const KILLS: u32 = 200;
const CHILD_DIR_ENV: &str = "RESOLUTE_CRASH_CHILD_DIR";

/// The content every entry must have: derived from its index, of varying length.
fn payload(index: u64) -> Vec<u8> {
    let len = 16 + (index % 97) as usize;
    index
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn entry(index: u64) -> LogEntry {
    LogEntry {
        index,
        term: 1,
        kind: 0,
        data: payload(index),
        context: Vec::new(),
    }
}

/// The child: append batches forever, fsync each, print `ACK <last index>` after
/// every fsync, and now and then install a snapshot.
#[test]
#[ignore = "run by sigkill_at_random_moments_keeps_every_acknowledged_entry"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let (mut store, recovered) = DurableStore::open(Path::new(&dir)).expect("child open");
    let mut last = recovered.last_index();
    let mut out = std::io::stdout().lock();
    for batch in 0u64.. {
        let n = 1 + (last * 7 + batch) % 13;
        let batch_entries: Vec<LogEntry> = (last + 1..=last + n).map(entry).collect();
        last += n;
        store
            .append(
                &batch_entries,
                Some(&HardState {
                    term: 1,
                    vote: 1,
                    commit: last,
                }),
            )
            .expect("append");
        store.sync().expect("sync");
        writeln!(out, "ACK {last}").expect("stdout");
        out.flush().expect("flush");
        if batch % 40 == 39 {
            let snapshot = SnapshotRecord {
                index: last - 3,
                term: 1,
                conf_state: ConfState {
                    voters: vec![1],
                    ..ConfState::default()
                },
                data: payload(last - 3),
            };
            store
                .install_snapshot(
                    &snapshot,
                    &HardState {
                        term: 1,
                        vote: 1,
                        commit: last,
                    },
                )
                .expect("snapshot");
            writeln!(out, "SNAP {}", last - 3).expect("stdout");
            out.flush().expect("flush");
        }
    }
}

fn check(dir: &Path, acked: u64, snapped: u64) -> u64 {
    let (_, rec) = DurableStore::open(dir).unwrap_or_else(|e| panic!("recovery failed: {e}"));
    let base = rec.snapshot.as_ref().map_or(0, |s| s.index);
    assert!(
        base >= snapped,
        "an acknowledged snapshot at {snapped} was lost (have {base})"
    );
    if let Some(s) = &rec.snapshot {
        assert_eq!(s.data, payload(s.index), "snapshot content");
    }
    for (i, e) in rec.entries.iter().enumerate() {
        assert_eq!(
            *e,
            entry(base + 1 + i as u64),
            "entry {} is corrupt or out of place",
            base + 1 + i as u64
        );
    }
    assert!(
        rec.last_index() >= acked,
        "acknowledged entry {acked} lost: recovered up to {}",
        rec.last_index()
    );
    assert!(rec.hard_state.commit <= rec.last_index().max(acked));
    rec.last_index()
}

#[test]
fn sigkill_at_random_moments_keeps_every_acknowledged_entry() {
    let dir: PathBuf = std::env::temp_dir().join(format!("resolute-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().expect("test binary");
    let mut seed = 0x9e37_79b9_u64;
    let mut acked = 0u64;
    let mut snapped = 0u64;
    let mut total_acks = 0u64;
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Read the child's acknowledgements as they come. Kill it at a random moment
        // after it made progress (a loaded machine may take a while to start it),
        // and now and then only after a snapshot install.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want_snapshot = kill % 25 == 24;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        while std::time::Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    let ready = if want_snapshot {
                        line.starts_with("SNAP ")
                    } else {
                        line.starts_with("ACK ")
                    };
                    lines.push(line);
                    if ready {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let delay_us = (seed >> 33) % 20_000;
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        reader.join().expect("reader");
        lines.extend(rx.try_iter());
        for line in lines {
            if let Some(n) = line
                .strip_prefix("ACK ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                acked = acked.max(n);
                total_acks += 1;
            }
            if let Some(n) = line
                .strip_prefix("SNAP ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                snapped = snapped.max(n);
            }
        }
        let recovered = check(&dir, acked, snapped);
        if kill % 50 == 0 {
            eprintln!(
                "kill {kill}: acknowledged {acked}, recovered {recovered}, snapshot {snapped}"
            );
        }
    }
    eprintln!("{KILLS} kills, {total_acks} acknowledged fsyncs, last acknowledged entry {acked}, last snapshot {snapped}");
    assert!(
        total_acks > u64::from(KILLS),
        "the child made progress ({total_acks} acknowledged batches)"
    );
    assert!(snapped > 0, "snapshot installs were exercised");
    std::fs::remove_dir_all(&dir).ok();
}
