//! Packing directories: deterministic, round-trips, refuses links and hostile packs.

use std::path::Path;

use resolute_trial::pack::{pack_dir, unpack, PackError};

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b")).expect("dirs");
    std::fs::write(root.join("top.txt"), b"top").expect("file");
    std::fs::write(root.join("a/b/deep.bin"), vec![7u8; 100_000]).expect("file");
    std::fs::write(root.join("a/empty"), b"").expect("file");
}

#[test]
fn packing_is_deterministic_and_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    tree(&src);
    let p1 = dir.path().join("one.pack");
    let p2 = dir.path().join("two.pack");
    pack_dir(&src, &p1).expect("pack");
    pack_dir(&src, &p2).expect("pack again");
    assert_eq!(
        std::fs::read(&p1).expect("read"),
        std::fs::read(&p2).expect("read")
    );
    let out = dir.path().join("out");
    unpack(&p1, &out).expect("unpack");
    assert_eq!(std::fs::read(out.join("top.txt")).expect("read"), b"top");
    assert_eq!(
        std::fs::read(out.join("a/b/deep.bin")).expect("read").len(),
        100_000
    );
    assert_eq!(std::fs::read(out.join("a/empty")).expect("read").len(), 0);
}

#[test]
fn symlinks_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    tree(&src);
    std::os::unix::fs::symlink("/etc/passwd", src.join("link")).expect("symlink");
    let err = pack_dir(&src, &dir.path().join("p")).expect_err("a link");
    assert!(matches!(err, PackError::NotAFile(_)), "{err}");
}

fn hostile(name: &str) -> Vec<u8> {
    let mut b = b"resolute-pack-v1".to_vec();
    b.extend_from_slice(&(name.len() as u32).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&0o644u32.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(b"bad");
    b
}

#[test]
fn hostile_packs_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, name) in ["../escape", "/etc/owned", "a/../../x", ""]
        .iter()
        .enumerate()
    {
        let p = dir.path().join(format!("h{i}"));
        std::fs::write(&p, hostile(name)).expect("write");
        let err = unpack(&p, &dir.path().join(format!("out{i}"))).expect_err(name);
        assert!(matches!(err, PackError::Bad { .. }), "{name}: {err}");
    }
    assert!(!dir.path().join("escape").exists());
    // Truncated and foreign files.
    let mut cut = hostile("ok.txt");
    cut.truncate(cut.len() - 2);
    let p = dir.path().join("cut");
    std::fs::write(&p, cut).expect("write");
    assert!(unpack(&p, &dir.path().join("cutout")).is_err());
    let p = dir.path().join("foreign");
    std::fs::write(&p, b"PK\x03\x04 not ours").expect("write");
    assert!(unpack(&p, &dir.path().join("foreignout")).is_err());
}
