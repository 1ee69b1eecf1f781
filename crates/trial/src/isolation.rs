//! Who a trial's processes run as, and what they can reach on disk.
//!
//! By default a trial runs as the node's own user: it cannot read the node's
//! environment (cleared to an allow-list, see `process::ENV_INHERITED`), but
//! the operating system lets it read whatever that user can, other trials'
//! `/proc/<pid>/environ` (their tokens) included. The node config's `[trial]`
//! table closes that (the node must run as root, as Slurm's slurmd does):
//! - `run_as = "user[:group]"`: every trial runs as that user; the node's
//!   data dir, keys and log are out of its reach, but trials still share a uid.
//! - `uid_range = "FIRST-LAST"`: every running incarnation gets a uid of its
//!   own from the range (and a gid of the same number): trials cannot read
//!   each other's processes or files either. Before a uid is given out again,
//!   whatever still runs under it is killed.
//!
//! On disk (see [`lock_down`]): the data dir is `0711` (passable, not
//! listable) and everything in it but the trials' root is `0700`/`0600`
//! root's; a trial's directory is root's `0711`; its working copy and its
//! checkpoint staging directories are its own ([`hand_over`]); checkpoints it
//! may read are root's with its group ([`share`]); a staged checkpoint is
//! taken back ([`seize`]) before the node packs it, so that the trial cannot
//! swap a file for a link to a node secret while it is read.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::TrialError;

/// Uids a `uid_range` may hold, at most.
pub const UID_RANGE_MAX: u32 = 65_536;
/// The lowest uid a trial may be given (below are the system's accounts).
pub const TRIAL_UID_MIN: u32 = 1_000;

/// Who the trials run as (the node config's `[trial]` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunAs {
    /// The node's own user.
    #[default]
    Node,
    /// One user and group for every trial.
    User(Identity),
    /// A uid of its own (gid the same) for every running incarnation.
    Range {
        /// The first uid.
        first: u32,
        /// How many.
        count: u32,
    },
}

/// A uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

impl RunAs {
    /// Reads `run_as` and `uid_range` (at most one of them); errors name the key.
    pub fn parse(run_as: Option<&str>, uid_range: Option<&str>) -> Result<RunAs, String> {
        match (run_as, uid_range) {
            (None, None) => Ok(RunAs::Node),
            (Some(_), Some(_)) => Err("trial.run_as and trial.uid_range exclude each other".into()),
            (Some(spec), None) => parse_user(spec)
                .map(RunAs::User)
                .map_err(|e| format!("trial.run_as: {e}")),
            (None, Some(spec)) => parse_range(spec).map_err(|e| format!("trial.uid_range: {e}")),
        }
    }

    /// Whether trials run as someone other than the node.
    pub fn isolates(&self) -> bool {
        *self != RunAs::Node
    }

    /// Refuses to go on when the node cannot switch users (it is not root).
    pub fn check_privileges(&self) -> Result<(), TrialError> {
        let euid = nix::unistd::geteuid().as_raw();
        if self.isolates() && euid != 0 {
            return Err(TrialError::Io(format!(
                "trial.run_as and trial.uid_range need the node to run as root (it runs as uid \
                 {euid}): start it as root, or remove them from the config's [trial] table (trials \
                 then run as the node's own user and can read each other's tokens)"
            )));
        }
        Ok(())
    }
}

/// The `(name, id, gid)` fields of each line of `/etc/passwd` or `/etc/group`
/// (`name:x:id:gid:...`; a group's "gid" field is its member list, unused).
fn entries(database: &str) -> Result<Vec<(String, u32, Option<u32>)>, String> {
    let text =
        std::fs::read_to_string(database).map_err(|e| format!("{database}: cannot read: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            Some((f[0].to_string(), id, f.get(3).and_then(|g| g.parse().ok())))
        })
        .collect())
}

fn parse_user(spec: &str) -> Result<Identity, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // A number needs no account (its own gid unless the account says one);
    // a name must have one.
    let users = entries("/etc/passwd")?;
    let (uid, own_gid) = match user.parse::<u32>() {
        Ok(uid) => {
            let gid = users.iter().find(|e| e.1 == uid).and_then(|e| e.2);
            (uid, gid.unwrap_or(uid))
        }
        Err(_) => users
            .iter()
            .find(|e| e.0 == user)
            .map(|e| (e.1, e.2.unwrap_or(e.1)))
            .ok_or_else(|| format!("no user {user:?} in /etc/passwd"))?,
    };
    let gid = match group {
        None => own_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entries("/etc/group")?
                .iter()
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| format!("no group {g:?} in /etc/group"))?,
        },
    };
    if uid == 0 || gid == 0 {
        return Err("a trial never runs as root".into());
    }
    Ok(Identity { uid, gid })
}

fn parse_range(spec: &str) -> Result<RunAs, String> {
    let bad = || format!("{spec:?} is not FIRST-LAST (two uids)");
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (first, last): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if first < TRIAL_UID_MIN || last < first || last - first >= UID_RANGE_MAX {
        return Err(format!(
            "{spec:?}: uids from {TRIAL_UID_MIN} up, first <= last, at most {UID_RANGE_MAX} of them"
        ));
    }
    Ok(RunAs::Range {
        first,
        count: last - first + 1,
    })
}

/// The uids given to running incarnations (with `uid_range`).
#[derive(Debug, Default)]
pub struct Allocator {
    run_as: RunAs,
    taken: BTreeMap<(u64, u64), u32>,
}

impl Allocator {
    /// An allocator for `run_as`.
    pub fn new(run_as: RunAs) -> Allocator {
        Allocator {
            run_as,
            taken: BTreeMap::new(),
        }
    }

    /// Who incarnation `key` runs as (`None`: as the node). `live` says which
    /// incarnations still hold their uid.
    pub fn take(
        &mut self,
        key: (u64, u64),
        live: impl Fn(&(u64, u64)) -> bool,
    ) -> Result<Option<Identity>, TrialError> {
        match self.run_as {
            RunAs::Node => Ok(None),
            RunAs::User(id) => Ok(Some(id)),
            RunAs::Range { first, count } => {
                self.taken.retain(|k, _| live(k));
                if let Some(uid) = self.taken.get(&key) {
                    return Ok(Some(Identity {
                        uid: *uid,
                        gid: *uid,
                    }));
                }
                let used: std::collections::BTreeSet<u32> = self.taken.values().copied().collect();
                let uid = (first..first + count)
                    .find(|u| !used.contains(u))
                    .ok_or_else(|| {
                        TrialError::Io(format!("all {count} uids of trial.uid_range are in use"))
                    })?;
                // Whatever an earlier trial left running under it goes first.
                kill_uid(uid);
                self.taken.insert(key, uid);
                Ok(Some(Identity { uid, gid: uid }))
            }
        }
    }
}

/// SIGKILLs every process whose real uid is `uid`.
fn kill_uid(uid: u32) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let owner = std::fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|u| u.parse::<u32>().ok())
            });
        if owner == Some(uid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> TrialError {
    TrialError::Io(format!("{}: {e}", path.display()))
}

fn chmod(path: &Path, mode: u32) -> Result<(), TrialError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io(path, e))
}

/// Applies `f` to `root` and everything under it, links included (never
/// followed: `f` gets each entry's own metadata).
fn walk(
    root: &Path,
    f: &mut impl FnMut(&Path, &std::fs::Metadata) -> Result<(), TrialError>,
) -> Result<(), TrialError> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| io(root, e))?;
    f(root, &meta)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
            walk(&entry.map_err(|e| io(root, e))?.path(), f)?;
        }
    }
    Ok(())
}

/// Makes the data dir passable but not readable for trials, and everything in
/// it but `work_root` root's alone; `work_root` passable, its `models` root's.
pub fn lock_down(data_dir: &Path, work_root: &Path) -> Result<(), TrialError> {
    chmod(data_dir, 0o711)?;
    for entry in std::fs::read_dir(data_dir).map_err(|e| io(data_dir, e))? {
        let path = entry.map_err(|e| io(data_dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        if path == work_root || meta.file_type().is_symlink() {
            continue;
        }
        chmod(&path, if meta.is_dir() { 0o700 } else { 0o600 })?;
    }
    chmod(work_root, 0o711)?;
    let models = work_root.join("models");
    std::fs::create_dir_all(&models).map_err(|e| io(&models, e))?;
    chmod(&models, 0o700)
}

/// A directory of the node's that a trial passes through (its trial dir, the
/// staging and checkpoint parents): root's, `0711`.
pub fn passable(dir: &Path) -> Result<(), TrialError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    std::os::unix::fs::lchown(dir, Some(0), Some(0)).map_err(|e| io(dir, e))?;
    chmod(dir, 0o711)
}

/// Gives `dir` and everything in it to `id` (the trial's working copy, a
/// staging directory); `dir` itself becomes `0700`.
pub fn hand_over(dir: &Path, id: Identity) -> Result<(), TrialError> {
    walk(dir, &mut |p, _| {
        std::os::unix::fs::lchown(p, Some(id.uid), Some(id.gid)).map_err(|e| io(p, e))
    })?;
    chmod(dir, 0o700)
}

/// Lets `id` read `dir` and not write it (a checkpoint it restores): root's,
/// with `id`'s group; directories `0750`, files `0640` (`0750` if executable).
pub fn share(dir: &Path, id: Identity) -> Result<(), TrialError> {
    walk(dir, &mut |p, meta| {
        std::os::unix::fs::lchown(p, Some(0), Some(id.gid)).map_err(|e| io(p, e))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let exec = meta.is_dir() || meta.mode() & 0o100 != 0;
        chmod(p, if exec { 0o750 } else { 0o640 })
    })
}

/// Takes a staged checkpoint back from the trial before the node reads it:
/// everything root's and closed to others, top first, so that once a
/// directory is visited the trial can no longer change what is in it.
pub fn seize(dir: &Path) -> Result<(), TrialError> {
    walk(dir, &mut |p, meta| {
        std::os::unix::fs::lchown(p, Some(0), Some(0)).map_err(|e| io(p, e))?;
        if meta.file_type().is_symlink() {
            return Ok(()); // Refused by the packer.
        }
        chmod(
            p,
            if meta.is_dir() {
                0o700
            } else {
                meta.mode() & 0o700
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_name_their_key() {
        assert_eq!(RunAs::parse(None, None), Ok(RunAs::Node));
        assert_eq!(
            RunAs::parse(Some("1234:2345"), None),
            Ok(RunAs::User(Identity {
                uid: 1234,
                gid: 2345
            }))
        );
        assert_eq!(
            RunAs::parse(None, Some("61000-61009")),
            Ok(RunAs::Range {
                first: 61_000,
                count: 10
            })
        );
        for (run_as, range, key) in [
            (Some("0:0"), None, "trial.run_as"),
            (Some("no-such-user-here"), None, "trial.run_as"),
            (None, Some("10-20"), "trial.uid_range"),
            (None, Some("61000"), "trial.uid_range"),
            (None, Some("62000-61000"), "trial.uid_range"),
            (Some("1234"), Some("61000-61001"), "trial.uid_range"),
        ] {
            let e = RunAs::parse(run_as, range).expect_err("refused");
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn a_range_gives_each_live_incarnation_its_own_uid() {
        let mut a = Allocator::new(RunAs::Range {
            first: 61_000,
            count: 2,
        });
        let all = |_: &(u64, u64)| true;
        let one = a.take((1, 1), all).expect("uid").expect("some");
        let two = a.take((2, 1), all).expect("uid").expect("some");
        assert_ne!(one.uid, two.uid);
        assert_eq!(a.take((1, 1), all).expect("same").expect("some"), one);
        assert!(a.take((3, 1), all).is_err(), "the range is used up");
        // Once (1, 1) ended, its uid is free again.
        let three = a
            .take((3, 1), |k| *k != (1, 1))
            .expect("uid")
            .expect("some");
        assert_eq!(three.uid, one.uid);
    }
}
