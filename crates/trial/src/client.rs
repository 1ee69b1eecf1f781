//! The Python client a node gives its trials: the `determined` compatibility
//! package (the Core API, the launchers) and `resolute`, compiled into the
//! binary so that the client a trial imports is the one its node speaks to.
//! The supervisor writes it under the work root at start ([`install`]) and
//! every trial finds it first on its `PYTHONPATH`; nothing is installed into
//! the machine's Python, so a real `determined` installation there is left
//! alone. `resolute client path` writes the same files for a run off a
//! cluster.

use std::path::{Path, PathBuf};

use crate::TrialError;

/// The client's files: path under the client directory, contents.
pub const FILES: &[(&str, &str)] = &[
    (
        "determined/__init__.py",
        include_str!("../../../python/determined/__init__.py"),
    ),
    (
        "determined/core/__init__.py",
        include_str!("../../../python/determined/core/__init__.py"),
    ),
    (
        "determined/exec/__init__.py",
        include_str!("../../../python/determined/exec/__init__.py"),
    ),
    (
        "determined/exec/harness.py",
        include_str!("../../../python/determined/exec/harness.py"),
    ),
    (
        "determined/launch/__init__.py",
        include_str!("../../../python/determined/launch/__init__.py"),
    ),
    (
        "determined/launch/torch_distributed.py",
        include_str!("../../../python/determined/launch/torch_distributed.py"),
    ),
    (
        "determined/launch/wrap_rank.py",
        include_str!("../../../python/determined/launch/wrap_rank.py"),
    ),
    (
        "determined/pytorch/__init__.py",
        include_str!("../../../python/determined/pytorch/__init__.py"),
    ),
    (
        "determined/pytorch/_context.py",
        include_str!("../../../python/determined/pytorch/_context.py"),
    ),
    (
        "determined/pytorch/_data.py",
        include_str!("../../../python/determined/pytorch/_data.py"),
    ),
    (
        "determined/pytorch/_lr_scheduler.py",
        include_str!("../../../python/determined/pytorch/_lr_scheduler.py"),
    ),
    (
        "determined/pytorch/_trainer.py",
        include_str!("../../../python/determined/pytorch/_trainer.py"),
    ),
    (
        "resolute/__init__.py",
        include_str!("../../../python/resolute/__init__.py"),
    ),
    (
        "resolute/_checkpoint.py",
        include_str!("../../../python/resolute/_checkpoint.py"),
    ),
    (
        "resolute/_collectives.py",
        include_str!("../../../python/resolute/_collectives.py"),
    ),
    (
        "resolute/_distributed.py",
        include_str!("../../../python/resolute/_distributed.py"),
    ),
    (
        "resolute/_harness/__init__.py",
        include_str!("../../../python/resolute/_harness/__init__.py"),
    ),
    (
        "resolute/_harness/loop.py",
        include_str!("../../../python/resolute/_harness/loop.py"),
    ),
    (
        "resolute/_harness/trial.py",
        include_str!("../../../python/resolute/_harness/trial.py"),
    ),
    (
        "resolute/_harness/units.py",
        include_str!("../../../python/resolute/_harness/units.py"),
    ),
    (
        "resolute/_local.py",
        include_str!("../../../python/resolute/_local.py"),
    ),
    (
        "resolute/_values.py",
        include_str!("../../../python/resolute/_values.py"),
    ),
    (
        "resolute/core.py",
        include_str!("../../../python/resolute/core.py"),
    ),
];

/// Where a node's trials find the client under its work root.
pub fn dir(work_root: &Path) -> PathBuf {
    work_root.join("client")
}

/// Writes the client into `dest` (replacing what is there), readable by
/// every user: it is the same public code for every trial. Written beside
/// and renamed into place, so that no process finds half of it.
pub fn install(dest: &Path) -> Result<(), TrialError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path, e: std::io::Error| TrialError::Io(format!("{}: {e}", p.display()));
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let tmp = parent.join(format!(".client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, text) in FILES {
        let path = tmp.join(rel);
        let folder = path.parent().unwrap_or(&tmp);
        std::fs::create_dir_all(folder).map_err(|e| io(folder, e))?;
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io(&path, e))?;
    }
    let mut dirs = vec![tmp.clone()];
    while let Some(d) = dirs.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(&d, e))?;
        for entry in std::fs::read_dir(&d).map_err(|e| io(&d, e))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    let old = parent.join(format!(".client-old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(|e| io(dest, e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| io(dest, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The `PYTHONPATH` of a trial: the client first, then what the trial's
/// config or the node's environment gave.
pub fn python_path(client: &Path, given: Option<&str>) -> String {
    match given {
        Some(g) if !g.is_empty() => format!("{}:{g}", client.display()),
        _ => client.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Python file of the repository's client is compiled in (a new
    /// module must be listed in `FILES`); `python/tests` is not the client.
    #[test]
    fn every_client_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("python dir").flatten() {
                let p = entry.path();
                if p.is_dir() {
                    if p != root.join("tests") {
                        dirs.push(p);
                    }
                } else if p.extension().is_some_and(|e| e == "py") {
                    let rel = p.strip_prefix(&root).expect("under root");
                    on_disk.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn install_writes_a_readable_client_and_replaces_an_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("client");
        install(&dest).expect("install");
        std::fs::write(dest.join("stale.py"), "x").expect("stale");
        install(&dest).expect("again");
        assert!(!dest.join("stale.py").exists());
        let core = dest.join("determined/core/__init__.py");
        assert!(std::fs::read_to_string(&core)
            .expect("core")
            .contains("init"));
        let mode = std::fs::metadata(&core).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(
            python_path(&dest, Some("/a")),
            format!("{}:/a", dest.display())
        );
    }
}
