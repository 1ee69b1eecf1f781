//! A trial incarnation's process on disk and in the OS: its working directory
//! (a copy of the model directory), its inputs unpacked from the blob store,
//! its environment, its process group, its log file, and the group files that
//! let a restarted node kill what its previous life left running. Blocking file
//! work here runs off the actors' thread (the callers use `spawn_blocking`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};

use resolute_agent::LaunchSpec;
use resolute_storage::blob::BlobStore;

use crate::isolation::{self, Identity};
use crate::{pack, TrialError};

/// Lines of a trial's output kept in memory (the end of its log).
pub const LOG_TAIL_LINES: usize = 200;
/// Lines quoted in an errored trial's exit record.
pub const EXIT_MESSAGE_LINES: usize = 20;
/// Size at which a trial's log file is rotated (one older file is kept).
pub const LOG_FILE_MAX_BYTES: u64 = 8 << 20;
/// Lines one log request returns at most (the newest).
pub const LOG_LINES_SERVED_MAX: usize = 10_000;
/// Longest output line kept, in bytes: the rest of a longer line is dropped
/// (a process that prints without newlines cannot fill the node's memory).
pub const LOG_LINE_BYTES_MAX: usize = 16 << 10;
/// The node's environment variables a trial inherits; everything else (the
/// node's own secrets, a `RESOLUTE_TOKEN` its operator exported) is cleared.
pub const ENV_INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "HF_HOME",
    "TORCH_HOME",
];
/// Prefixes of inherited variables (locale, CUDA and NVIDIA settings, conda).
pub const ENV_INHERITED_PREFIXES: &[&str] = &["LC_", "CUDA_", "NVIDIA_", "NCCL_", "CONDA_"];

/// Whether a trial inherits the node's variable `name`.
pub fn inherits(name: &str) -> bool {
    ENV_INHERITED.contains(&name) || ENV_INHERITED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One captured output line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch when it was read.
    pub time_ms: u64,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    /// The line (without its newline).
    pub line: String,
}

/// The end of a trial's output, shared by its capture tasks and its actor.
pub(crate) type Tail = Arc<Mutex<VecDeque<LogLine>>>;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A trial's directory under the node's work root.
pub fn trial_dir(work_root: &Path, trial: u64) -> PathBuf {
    work_root.join(format!("trial-{trial}"))
}

/// Where a trial's log file is (every incarnation that ran on this node).
pub fn log_path(work_root: &Path, trial: u64) -> PathBuf {
    trial_dir(work_root, trial).join("trial.log")
}

/// 32 random bytes (the kernel's randomness).
pub(crate) fn random_key() -> Result<[u8; 32], TrialError> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| TrialError::Io(format!("/dev/urandom: {e}")))?;
    Ok(b)
}

/// 32 random bytes as hex (the kernel's randomness).
pub(crate) fn secret() -> Result<String, TrialError> {
    Ok(random_key()?.iter().map(|x| format!("{x:02x}")).collect())
}

/// The directories an incarnation runs in.
#[derive(Debug, Clone)]
pub(crate) struct Dirs {
    /// The trial's directory (logs, checkpoints, staging).
    pub(crate) trial: PathBuf,
    /// This incarnation's working copy of the model directory.
    pub(crate) work: PathBuf,
    /// What the training code learns through `det.get_cluster_info()` beyond
    /// its environment (`RESOLUTE_INFO_FILE`): the config, its `data`, the
    /// slots and the gang's hosts.
    pub(crate) info: PathBuf,
}

/// Makes the working copy and unpacks the checkpoint to resume from (both
/// verified blobs in the local store): blocking, call it off the actors' thread.
/// Returns the directories and where the checkpoint is.
/// With `identity`, the working copy is the trial's own and the checkpoint
/// readable by it alone (see `isolation`).
pub(crate) fn prepare(
    work_root: &Path,
    store: &BlobStore,
    spec: &LaunchSpec,
    identity: Option<Identity>,
) -> Result<(Dirs, Option<PathBuf>), TrialError> {
    let trial = trial_dir(work_root, spec.trial);
    let work = trial.join(format!("work-{}", spec.incarnation));
    std::fs::create_dir_all(&work)
        .map_err(|e| TrialError::Io(format!("{}: {e}", work.display())))?;
    if let Some(digest) = &spec.model_digest {
        let model = unpack(store, &work_root.join("models"), digest)?;
        copy_dir(&model, &work)?;
    }
    let latest = match &spec.latest_checkpoint {
        Some(digest) => Some(unpack(store, &trial, digest)?),
        None => None,
    };
    if let Some(id) = identity {
        isolation::passable(&trial)?;
        isolation::passable(&trial.join("checkpoints"))?;
        isolation::passable(&trial.join("staging"))?;
        isolation::hand_over(&work, id)?;
        if let Some(path) = &latest {
            isolation::share(path, id)?;
        }
    }
    let info = trial.join(format!("info-{}.json", spec.incarnation));
    Ok((Dirs { trial, work, info }, latest))
}

/// Removes what an ended incarnation leaves that nothing reads again: its
/// working copy of the model directory, the checkpoints unpacked for it (each
/// is a blob in the store, unpacked again where a later incarnation needs it)
/// and its staging area. Its log stays: `trial.log` serves every incarnation's
/// lines. Blocking; errors are ignored (a leftover costs disk, not
/// correctness, and the next incarnation makes fresh directories).
pub(crate) fn tidy(dirs: &Dirs) {
    let _ = std::fs::remove_dir_all(&dirs.work);
    let _ = std::fs::remove_file(&dirs.info);
    for sub in ["checkpoints", "staging"] {
        let _ = std::fs::remove_dir_all(dirs.trial.join(sub));
    }
}

/// What the process needs besides its spec.
pub(crate) struct Runtime<'a> {
    pub(crate) dirs: &'a Dirs,
    /// The node's Python client (first on the trial's `PYTHONPATH`).
    pub(crate) client: &'a Path,
    pub(crate) checkpoint: Option<&'a Path>,
    pub(crate) report_url: String,
    pub(crate) token: &'a str,
    /// The hosts of a multi-node gang's nodes, rank 0's (`MASTER_ADDR`) first.
    pub(crate) hosts: &'a [String],
    /// Who the process runs as (`None`: the node's user).
    pub(crate) identity: Option<Identity>,
    /// The key that authenticates the frames of the Core API's collectives
    /// between the incarnation's processes (every node of a gang derives the
    /// same one; see `supervisor::collectives_secret`).
    pub(crate) collectives_secret: &'a str,
}

/// Writes the incarnation's info file (readable by the trial's identity).
fn write_info(spec: &LaunchSpec, rt: &Runtime<'_>) -> Result<(), TrialError> {
    let hosts: Vec<&str> = if rt.hosts.is_empty() {
        vec!["127.0.0.1"]
    } else {
        rt.hosts.iter().map(String::as_str).collect()
    };
    let info = serde_json::json!({
        "config": &*spec.config,
        "user_data": &spec.config.data,
        "slot_ids": &spec.slots,
        "gpu_uuids": &spec.gpus,
        "container_addrs": hosts,
        "container_rank": spec.gang.as_ref().map_or(0, |g| g.group_rank),
        // The global rank of this node's first process and the gang's slots
        // (a launcher numbers its processes from them).
        "first_rank": spec.gang.as_ref().map_or(0, |g| g.rank),
        "world_size": spec.gang.as_ref().map_or(spec.slots_here, |g| g.world_size),
    });
    let path = &rt.dirs.info;
    let io = |e: std::io::Error| TrialError::Io(format!("{}: {e}", path.display()));
    std::fs::write(path, serde_json::to_vec(&info).unwrap_or_default()).map_err(io)?;
    if let Some(id) = rt.identity {
        isolation::share(path, id)?;
    }
    Ok(())
}

/// Starts the entrypoint through `/bin/sh -c` (as Determined does) in its own
/// process group, with the trial's environment.
pub(crate) fn spawn(
    spec: &LaunchSpec,
    rt: &Runtime<'_>,
) -> Result<tokio::process::Child, TrialError> {
    write_info(spec, rt)?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(inherits)))
        .arg("-c")
        .arg(&spec.entrypoint)
        .current_dir(&rt.dirs.work)
        .envs(&spec.env)
        .env("PYTHONPATH", trial_python_path(spec, rt))
        .env("RESOLUTE_TRIAL_ID", spec.trial.to_string())
        .env("RESOLUTE_EXPERIMENT_ID", spec.experiment.to_string())
        .env("RESOLUTE_INCARNATION", spec.incarnation.to_string())
        .env(
            "RESOLUTE_HPARAMS",
            serde_json::to_string(&spec.hparams).unwrap_or_default(),
        )
        .env("RESOLUTE_TRIAL_SEED", spec.seed.to_string())
        .env("RESOLUTE_REPORT_URL", &rt.report_url)
        .env("RESOLUTE_TOKEN", rt.token)
        .env("RESOLUTE_TIME_METRIC", &spec.time_metric)
        .env("RESOLUTE_INFO_FILE", &rt.dirs.info)
        .env("CUDA_VISIBLE_DEVICES", spec.gpus.join(","))
        .env_remove("RESOLUTE_LATEST_CHECKPOINT")
        .env_remove("RESOLUTE_TARGET_LENGTH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(t) = spec.target {
        cmd.env("RESOLUTE_TARGET_LENGTH", t.to_string());
    }
    if let Some(id) = rt.identity {
        // Another user: its home is its working copy (the node's is not its
        // to write). Switching from root, std drops the supplementary groups.
        cmd.uid(id.uid)
            .gid(id.gid)
            .env("HOME", &rt.dirs.work)
            .env("USER", id.uid.to_string())
            .env("LOGNAME", id.uid.to_string());
    }
    if let Some(path) = rt.checkpoint {
        cmd.env("RESOLUTE_LATEST_CHECKPOINT", path);
    }
    rendezvous(&mut cmd, spec, rt);
    let child = cmd
        .spawn()
        .map_err(|e| TrialError::Io(format!("starting {:?}: {e}", spec.entrypoint)))?;
    if let Some(p) = child.id() {
        // Remembered on disk: if this node dies with SIGKILL, its next life
        // kills the group (see `kill_leftovers`).
        remember_group(&rt.dirs.trial, spec.incarnation, p as i32);
    }
    Ok(child)
}

/// The node's client first, then the config's `PYTHONPATH` (or the node's own).
fn trial_python_path(spec: &LaunchSpec, rt: &Runtime<'_>) -> String {
    let inherited = std::env::var("PYTHONPATH").ok();
    let given = spec.env.get("PYTHONPATH").cloned().or(inherited);
    crate::client::python_path(rt.client, given.as_deref())
}

/// The variables of the torchrun contract and of the Core API's
/// collectives. Every process of the trial's gang meets at rank 0's node
/// (`MASTER_ADDR`, `DET_CHIEF_IP`): torchrun's store on `MASTER_PORT`, the
/// collectives on `RESOLUTE_COLLECTIVES_PORT`. The per-process variables
/// (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`) are set only where
/// this node runs one slot of the trial, so that its process is that rank;
/// with more slots here a launcher (`determined.launch.torch_distributed`)
/// starts one process per slot and numbers them.
fn rendezvous(cmd: &mut tokio::process::Command, spec: &LaunchSpec, rt: &Runtime<'_>) {
    use resolute_agent::launch::{collectives_port, master_port};
    let chief = rt.hosts.first().map_or("127.0.0.1", String::as_str);
    let (rank, world_size, group_rank, nodes) = match &spec.gang {
        Some(g) => (g.rank, g.world_size, g.group_rank, g.nodes.len()),
        None => (0, spec.slots_here, 0, 1),
    };
    cmd.env("MASTER_ADDR", chief)
        .env("DET_CHIEF_IP", chief)
        .env(
            "MASTER_PORT",
            master_port(spec.trial, spec.incarnation).to_string(),
        )
        .env("GROUP_RANK", group_rank.to_string())
        .env("GROUP_WORLD_SIZE", nodes.to_string())
        .env(
            "RESOLUTE_COLLECTIVES_PORT",
            collectives_port(spec.trial, spec.incarnation).to_string(),
        )
        .env("RESOLUTE_COLLECTIVES_SECRET", rt.collectives_secret);
    for v in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"] {
        cmd.env_remove(v);
    }
    if spec.slots_here <= 1 {
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", "0")
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_WORLD_SIZE", "1");
    }
}

/// A running process group: killed with SIGKILL when dropped before it exited
/// (its actor stopped or failed), so that no trial outlives its actor.
#[derive(Debug)]
pub(crate) struct Group {
    pgid: i32,
    exited: bool,
}

impl Group {
    pub(crate) fn new(pgid: i32) -> Group {
        Group {
            pgid,
            exited: false,
        }
    }

    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        if !self.exited {
            kill_group(self.pgid, signal);
        }
    }

    /// The process ended: nothing to kill any more.
    pub(crate) fn exited(&mut self) {
        self.exited = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Reads one output stream line by line into the log file and the tail.
pub(crate) async fn capture(
    stream: &'static str,
    pipe: impl tokio::io::AsyncRead + Unpin,
    log: Arc<Mutex<LogFile>>,
    tail: Tail,
) {
    let mut reader = BufReader::new(pipe);
    while let Some(line) = read_capped_line(&mut reader, LOG_LINE_BYTES_MAX).await {
        let entry = LogLine {
            time_ms: now_ms(),
            stream,
            line,
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).write(&entry);
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.push_back(entry);
        while tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }
}

/// The next line (without its newline), its first `max_bytes` bytes only;
/// `None` at the end of the stream.
async fn read_capped_line(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    max_bytes: usize,
) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(b) => b,
            Err(_) => return None,
        };
        if buf.is_empty() {
            return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max_bytes.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// The last lines of a tail, for an exit report.
pub(crate) fn last_lines(tail: &Tail) -> Vec<String> {
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
    let skip = tail.len().saturating_sub(EXIT_MESSAGE_LINES);
    tail.iter().skip(skip).map(|l| l.line.clone()).collect()
}

/// Everything a node captured of a trial, read back from its log file `path`
/// and the rotated one before it: every incarnation that ran there (so it
/// survives a restart of the node), oldest first, from `since_ms` on, at most the
/// newest [`LOG_LINES_SERVED_MAX`] lines. It reads files: call it off the actors'
/// thread.
pub fn read_logs(path: &Path, since_ms: u64) -> Vec<LogLine> {
    let mut lines = Vec::new();
    for file in [path.with_extension("log.1"), path.to_path_buf()] {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        for l in String::from_utf8_lossy(&bytes).lines() {
            // `<time_ms> <stream> <line>`, as `LogFile::write` wrote it.
            let mut parts = l.splitn(3, ' ');
            let (Some(Ok(time_ms)), Some(stream)) =
                (parts.next().map(str::parse::<u64>), parts.next())
            else {
                continue;
            };
            if time_ms < since_ms {
                continue;
            }
            lines.push(LogLine {
                time_ms,
                stream: if stream == "stderr" {
                    "stderr"
                } else {
                    "stdout"
                },
                line: parts.next().unwrap_or("").to_string(),
            });
        }
    }
    let excess = lines.len().saturating_sub(LOG_LINES_SERVED_MAX);
    lines.drain(..excess);
    lines
}

/// File (in the trial's directory) naming a running incarnation's process group
/// and its start time: `running-<incarnation>.pgid`.
pub(crate) fn group_file(dir: &Path, incarnation: u64) -> PathBuf {
    dir.join(format!("running-{incarnation}.pgid"))
}

fn remember_group(dir: &Path, incarnation: u64, pgid: i32) {
    if let Some(start) = start_time(pgid) {
        let _ = std::fs::write(group_file(dir, incarnation), format!("{pgid} {start}\n"));
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22):
/// with the pid it names the process uniquely, so a reused pid is never killed.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; count fields after its ')'.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups that a previous life of this node left running (it
/// was SIGKILLed, so its trials were not): their incarnations were moved or will
/// be restarted, and a leftover would keep using the slots and the GPU. Returns
/// how many groups were still alive.
pub(crate) fn kill_leftovers(work_root: &Path) -> usize {
    let mut killed = 0;
    let trial_dirs = std::fs::read_dir(work_root).into_iter().flatten().flatten();
    for trial_dir in trial_dirs {
        let files = std::fs::read_dir(trial_dir.path())
            .into_iter()
            .flatten()
            .flatten();
        for f in files {
            let path = f.path();
            let is_group = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("running-") && n.ends_with(".pgid"));
            if !is_group {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut parts = text.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(pgid)), Some(Ok(start))) = (parts.next(), parts.next()) {
                let pgid = i32::try_from(pgid).unwrap_or(0);
                if pgid > 1 && start_time(pgid) == Some(start) {
                    kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
                    killed += 1;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    killed
}

pub(crate) fn kill_group(pgid: i32, signal: nix::sys::signal::Signal) {
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

/// A trial's log file, rotated at [`LOG_FILE_MAX_BYTES`] (one older file kept).
pub(crate) struct LogFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl LogFile {
    pub(crate) fn open(path: &Path) -> LogFile {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        LogFile {
            path: path.to_path_buf(),
            file,
            size,
        }
    }

    fn write(&mut self, line: &LogLine) {
        use std::io::Write;
        let text = format!("{} {} {}\n", line.time_ms, line.stream, line.line);
        if self.size + text.len() as u64 > LOG_FILE_MAX_BYTES {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            *self = LogFile::open(&self.path);
            self.size = 0;
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(text.as_bytes()).is_ok() {
                self.size += text.len() as u64;
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), TrialError> {
    let io = |p: &Path, e: std::io::Error| TrialError::Io(format!("{}: {e}", p.display()));
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type().map_err(|e| io(&src, e))?;
        if kind.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| io(&dst, e))?;
            copy_dir(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| io(&src, e))?;
        }
    }
    Ok(())
}

/// Unpacks a packed-directory blob (a checkpoint, a model directory) once under
/// `dir/checkpoints/`; returns where it is.
pub(crate) fn unpack(store: &BlobStore, dir: &Path, digest: &str) -> Result<PathBuf, TrialError> {
    resolute_storage::blob::check_digest(digest).map_err(|e| TrialError::Io(e.to_string()))?;
    let dest = dir.join("checkpoints").join(digest);
    if dest.exists() {
        return Ok(dest);
    }
    if !store.has(digest) {
        return Err(TrialError::MissingCheckpoint(digest.to_string()));
    }
    // A unique temporary name: two launches may unpack the same blob at once;
    // the first rename wins and the other copy is dropped.
    static UNPACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = UNPACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir
        .join("checkpoints")
        .join(format!(".{digest}.unpacking-{}-{n}", std::process::id()));
    pack::unpack(&store.path(digest), &tmp).map_err(|e| TrialError::Io(e.to_string()))?;
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dest.exists() {
            return Err(TrialError::Io(format!("{}: {e}", dest.display())));
        }
    }
    Ok(dest)
}

/// Removes the unpacked copy of model directory `digest` under `work_root`
/// (its blob is being deleted). Renamed away first, so that a launch never
/// finds half of it; the node deletes a model directory only when no
/// incarnation of its uses it, so none is unpacking it now. Blocking; errors
/// are ignored (a leftover costs disk, and `tidy_models` takes it at the
/// next start).
pub fn forget_model(work_root: &Path, digest: &str) {
    if resolute_storage::blob::check_digest(digest).is_err() {
        return;
    }
    let dir = work_root.join("models").join("checkpoints");
    let unpacked = dir.join(digest);
    let gone = dir.join(format!(".{digest}.removing-{}", std::process::id()));
    if std::fs::rename(&unpacked, &gone).is_ok() {
        let _ = std::fs::remove_dir_all(&gone);
    }
}

/// At a node's start: removes the unpacked model directories whose blob is
/// no longer in `store` and what an interrupted unpack or removal left.
/// Blocking; errors are ignored.
pub fn tidy_models(work_root: &Path, store: &BlobStore) {
    let dir = work_root.join("models").join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let leftover = name.starts_with('.');
        if leftover || !store.has(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Packs a staged checkpoint directory into the blob store; the staged files
/// become the unpacked copy (a restore need not unpack). Blocking. Returns the
/// checkpoint's uuid (its digest) and packed size. With `identity`, the
/// staged files are taken from the trial before they are read, and the
/// unpacked copy is readable by it afterwards.
pub(crate) fn commit_checkpoint(
    store: &BlobStore,
    trial_dir: &Path,
    storage_id: &str,
    staging: &Path,
    identity: Option<Identity>,
) -> Result<(String, u64), String> {
    if identity.is_some() {
        isolation::seize(staging).map_err(|e| e.to_string())?;
    }
    let packed = trial_dir.join(format!(".{storage_id}.pack"));
    let size = pack::pack_dir(staging, &packed).map_err(|e| e.to_string())?;
    let stored = store.put_file(&packed).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&packed);
    let uuid = stored?.digest();
    let dest = trial_dir.join("checkpoints").join(&uuid);
    let _ = std::fs::create_dir_all(trial_dir.join("checkpoints"));
    if !dest.exists() {
        let _ = std::fs::rename(staging, &dest);
    }
    if let Some(id) = identity {
        isolation::share(&dest, id).map_err(|e| e.to_string())?;
    }
    Ok((uuid, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Whether a process runs (a zombie waiting to be reaped does not).
    fn runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }

    #[test]
    fn a_group_dropped_before_its_process_exited_is_killed() {
        // What happens when a trial actor fails: its group goes with it.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 60 & wait"])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pgid = child.id() as i32;
        assert!(runs(pgid));
        drop(Group::new(pgid));
        let status = child.wait().expect("wait");
        assert!(!status.success(), "killed: {status:?}");
        // An exited group is left alone.
        let mut done = Group::new(pgid);
        done.exited();
        drop(done);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_read_on() {
        let mut text = vec![b'x'; 3 * LOG_LINE_BYTES_MAX];
        text.extend_from_slice(b"\nshort\r\nlast");
        let mut r = BufReader::with_capacity(1000, &text[..]);
        let first = read_capped_line(&mut r, LOG_LINE_BYTES_MAX)
            .await
            .expect("line");
        assert_eq!(first.len(), LOG_LINE_BYTES_MAX);
        assert_eq!(
            read_capped_line(&mut r, LOG_LINE_BYTES_MAX)
                .await
                .as_deref(),
            Some("short")
        );
        assert_eq!(
            read_capped_line(&mut r, LOG_LINE_BYTES_MAX)
                .await
                .as_deref(),
            Some("last")
        );
        assert_eq!(read_capped_line(&mut r, LOG_LINE_BYTES_MAX).await, None);
    }

    #[test]
    fn a_trial_inherits_only_the_allowed_variables() {
        for ok in ["PATH", "HOME", "LC_ALL", "CUDA_HOME", "NCCL_DEBUG"] {
            assert!(inherits(ok), "{ok}");
        }
        for secret in [
            "RESOLUTE_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "RESOLUTE_CLUSTER_KEY",
            "XPATH",
        ] {
            assert!(!inherits(secret), "{secret}");
        }
    }
}
