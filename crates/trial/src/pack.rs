//! Directories as single files: a checkpoint or a model directory is packed into
//! one file (stored as a content-addressed blob) and unpacked where a trial needs
//! it.
//!
//! The format is deterministic, so the same files give the same digest: a magic,
//! then per regular file in sorted path order `path length (u32 LE), path bytes,
//! mode (u32 LE), size (u64 LE), bytes`. Only regular files and the directories
//! that hold them are kept (symlinks and special files are refused: a trial must
//! not smuggle a link to `/etc` into a checkpoint). Unpacking refuses absolute
//! paths, `..`, and anything beyond the limits below.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Identifies the format.
const MAGIC: &[u8; 16] = b"resolute-pack-v1";
/// Files in one packed directory.
pub const PACK_FILES_MAX: usize = 100_000;
/// Bytes of one path inside a pack.
pub const PACK_PATH_MAX_BYTES: usize = 4096;

/// Why packing or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// Something that is neither a regular file nor a directory.
    #[error("{0}: only regular files and directories can be packed")]
    NotAFile(String),
    /// The pack is malformed or hostile.
    #[error("pack {path}: {reason}")]
    Bad {
        /// The pack file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which paths under a directory go into its pack: called with each path
/// relative to the directory and whether it is a directory (a directory left
/// out is not walked).
pub type Keep<'a> = &'a dyn Fn(&Path, bool) -> bool;

/// Every regular file under `dir` that `keep` keeps, as sorted relative paths.
fn walk(dir: &Path, keep: Keep<'_>) -> Result<Vec<PathBuf>, PackError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for entry in fs::read_dir(&here).map_err(io_err(&here))? {
            let entry = entry.map_err(io_err(&here))?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(io_err(&here))?;
            if !keep(&path, kind.is_dir()) {
                continue;
            }
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.push(path);
            } else {
                return Err(PackError::NotAFile(dir.join(path).display().to_string()));
            }
            if out.len() > PACK_FILES_MAX {
                return Err(PackError::Bad {
                    path: dir.display().to_string(),
                    reason: format!("more than {PACK_FILES_MAX} files"),
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Packs the regular files under `dir` into the file `out`; returns its size.
pub fn pack_dir(dir: &Path, out: &Path) -> Result<u64, PackError> {
    pack_dir_keeping(dir, out, &|_, _| true)
}

/// [`pack_dir`] with only the paths `keep` keeps (a model directory's
/// `.detignore`).
pub fn pack_dir_keeping(dir: &Path, out: &Path, keep: Keep<'_>) -> Result<u64, PackError> {
    let files = walk(dir, keep)?;
    let mut w = BufWriter::new(File::create(out).map_err(io_err(out))?);
    let mut size = 0u64;
    let put = |w: &mut BufWriter<File>, size: &mut u64, b: &[u8]| -> Result<(), PackError> {
        *size += b.len() as u64;
        w.write_all(b).map_err(io_err(out))
    };
    put(&mut w, &mut size, MAGIC)?;
    for rel in files {
        let path = dir.join(&rel);
        let name = rel.to_string_lossy().into_owned();
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        put(&mut w, &mut size, &(name.len() as u32).to_le_bytes())?;
        put(&mut w, &mut size, name.as_bytes())?;
        put(
            &mut w,
            &mut size,
            &(meta.permissions().mode() & 0o777).to_le_bytes(),
        )?;
        put(&mut w, &mut size, &meta.len().to_le_bytes())?;
        let mut input = File::open(&path).map_err(io_err(&path))?;
        let copied = io::copy(&mut input, &mut w).map_err(io_err(&path))?;
        if copied != meta.len() {
            return Err(PackError::Bad {
                path: path.display().to_string(),
                reason: "the file changed while it was packed".into(),
            });
        }
        size += copied;
    }
    let mut f = w.into_inner().map_err(|e| PackError::Io {
        path: out.display().to_string(),
        source: e.into_error(),
    })?;
    f.flush().map_err(io_err(out))?;
    f.sync_data().map_err(io_err(out))?;
    Ok(size)
}

/// A relative path made only of normal components.
fn safe_relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    let ok = !name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

/// Unpacks the pack file `pack` into `dest` (created; must not exist yet, so a
/// half-unpacked directory is never mistaken for a whole one: unpack into a
/// temporary name and rename).
pub fn unpack(pack: &Path, dest: &Path) -> Result<(), PackError> {
    let bad = |reason: String| PackError::Bad {
        path: pack.display().to_string(),
        reason,
    };
    let mut r = BufReader::new(File::open(pack).map_err(io_err(pack))?);
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic).map_err(io_err(pack))?;
    if &magic != MAGIC {
        return Err(bad("not a resolute pack".into()));
    }
    fs::create_dir_all(dest).map_err(io_err(dest))?;
    let mut files = 0usize;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err(pack)(e)),
        }
        files += 1;
        if files > PACK_FILES_MAX {
            return Err(bad(format!("more than {PACK_FILES_MAX} files")));
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > PACK_PATH_MAX_BYTES {
            return Err(bad(format!("path of {len} bytes")));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name).map_err(io_err(pack))?;
        let name = String::from_utf8(name).map_err(|_| bad("a path is not UTF-8".into()))?;
        let rel = safe_relative(&name).ok_or_else(|| bad(format!("unsafe path {name:?}")))?;
        let mut head = [0u8; 12];
        r.read_exact(&mut head).map_err(io_err(pack))?;
        let mode = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) & 0o777;
        let mut size = [0u8; 8];
        size.copy_from_slice(&head[4..]);
        let size = u64::from_le_bytes(size);
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut out = File::create(&path).map_err(io_err(&path))?;
        let copied = io::copy(&mut (&mut r).take(size), &mut out).map_err(io_err(&path))?;
        if copied != size {
            return Err(bad(format!("{name} is truncated")));
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o600))
            .map_err(io_err(&path))?;
    }
}
