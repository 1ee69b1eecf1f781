//! Disk as a bounded resource, with real processes: node b's data dir is a
//! small tmpfs (the test mounts it: root only, "skipped" otherwise). Filled
//! below b's low-water mark, b says so, the cluster records it, uploads to b
//! are refused with a clear message (507), and an experiment runs on a alone;
//! b stays a member. Filled to the last byte, b's log takes its reserve and b
//! goes on applying (same digest as a: nothing acknowledged is lost). Freed,
//! b takes work again and makes its reserve anew.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use resolute_storage::space;
use resolute_tests::{bin, create_python_core, get, repo, start_with, token_of, until, NodeProc};
use serde_json::Value;

const FS_MIB: u64 = 64;
const LOW_WATER_MIB: u64 = 24;
const RESERVE_MIB: u64 = 4;
const MIB: u64 = 1024 * 1024;

/// A tmpfs of `FS_MIB` at `dir`, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path) -> Option<SmallFs> {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to this process's effective uid.
        if fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
            eprintln!("skipped: mounting a small file system needs root");
            return None;
        }
        fs::create_dir_all(dir).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_MIB}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Appends to `ballast` until the file system has `leave` bytes free (0: until
/// a write fails).
fn fill(ballast: &Path, leave: u64) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ballast)
        .expect("ballast");
    let chunk = vec![7u8; 256 * 1024];
    loop {
        let free = space::free_bytes(ballast.parent().expect("dir")).expect("statvfs");
        if leave > 0 && free <= leave {
            break;
        }
        let n = if leave > 0 {
            (free - leave).min(chunk.len() as u64) as usize
        } else {
            chunk.len()
        };
        if f.write_all(&chunk[..n]).is_err() {
            // Full: the last blocks too.
            while f.write_all(&[7u8; 512]).is_ok() {}
            break;
        }
    }
    let _ = f.sync_all();
}

/// A config like the laptop's with a low-water mark and a reserve that fit
/// the small file system.
fn config(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(repo().join("config/laptop.toml")).expect("laptop.toml");
    let text = text
        .replace(
            "low_water_mib = 1024",
            &format!("low_water_mib = {LOW_WATER_MIB}"),
        )
        .replace(
            "log_reserve_mib = 64",
            &format!("log_reserve_mib = {RESERVE_MIB}"),
        );
    assert!(text.contains(&format!("low_water_mib = {LOW_WATER_MIB}")));
    let path = dir.join("disk.toml");
    fs::write(&path, text).expect("config");
    path
}

fn node_record(from: &NodeProc, id: &str) -> Value {
    get(&from.api, &["cluster", "status"])["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_node_low_on_disk_takes_no_new_work_stays_in_the_cluster_and_survives_a_full_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(small) = SmallFs::mount(&dir.path().join("b")) else {
        return;
    };
    let cfg = config(dir.path());
    let a = start_with(&dir.path().join("a"), 91, None, &cfg);
    let b = start_with(&small.0, 92, Some(&a.listen), &cfg);
    until("two members", Duration::from_secs(30), || {
        get(&a.api, &["cluster", "status"])["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    let b_id = get(&b.api, &["cluster", "status"])["this_node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let status = get(&b.api, &["cluster", "status"]);
    assert_eq!(status["this_disk"]["log_reserve_kept"], true, "{status}");

    // Below the mark: b says so, and the cluster records it.
    let ballast = small.0.join("ballast");
    fill(&ballast, 10 * MIB);
    until("b is recorded low on disk", Duration::from_secs(30), || {
        !node_record(&a, &b_id)["disk_low"].is_null()
    });
    let record = node_record(&a, &b_id);
    assert_eq!(record["state"], "Alive", "b stays in the cluster: {record}");
    let message = record["disk_low"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("low-water mark"), "{record}");

    // An upload to b is refused, with the reason and what to do.
    let model = repo().join("examples/python-core");
    let out = Command::new(bin())
        .args(["experiment", "create"])
        .arg(model.join("experiment.yaml"))
        .arg(&model)
        .args(["-m", &b.api])
        .env("RESOLUTE_TOKEN", token_of(&b.api))
        .env("RESOLUTE_CONFIG_DIR", "/nonexistent/resolute-tests")
        .output()
        .expect("cli");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(
        stderr.contains("disk_low") && stderr.contains("low-water mark of 24 MiB"),
        "{stderr}"
    );

    // An experiment submitted to a runs on a alone.
    let id = create_python_core(
        &a.api,
        &[
            "searcher.max_trials=4",
            "searcher.max_time=200",
            "hyperparameters.checkpoint_every=100",
        ],
    );
    let mut placed_on_b = Vec::new();
    let mut full = false;
    until("the experiment completes", Duration::from_secs(240), || {
        let trials = get(&a.api, &["experiment", "trials", &id.to_string()]);
        for t in trials.as_array().into_iter().flatten() {
            if t["node"] == b_id.as_str() {
                placed_on_b.push(t["id"].clone());
            }
        }
        // Halfway, b's disk fills to the last byte: its log takes the reserve.
        if !full && trials.as_array().is_some_and(|t| t.len() >= 2) {
            fill(&ballast, 0);
            full = true;
        }
        get(&a.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    assert!(
        placed_on_b.is_empty(),
        "trials placed on b: {placed_on_b:?}"
    );

    // b applied everything through a full disk: same index, same digest.
    until("b agrees with a", Duration::from_secs(30), || {
        let (sa, sb) = (
            get(&a.api, &["cluster", "status"]),
            get(&b.api, &["cluster", "status"]),
        );
        sa["applied"] == sb["applied"] && sa["digest"] == sb["digest"]
    });
    let disk = get(&b.api, &["cluster", "status"])["this_disk"].clone();
    assert!(
        disk["log_reserve_released"].as_u64() >= Some(1),
        "the log used its reserve: {disk}"
    );

    // Space back: b takes work again, and its reserve is made anew.
    fs::remove_file(&ballast).expect("free space");
    until("b takes work again", Duration::from_secs(30), || {
        node_record(&a, &b_id)["disk_low"].is_null()
    });
    until("b's reserve is back", Duration::from_secs(30), || {
        get(&b.api, &["cluster", "status"])["this_disk"]["log_reserve_kept"] == true
    });
    drop(b);
    drop(a);
}
