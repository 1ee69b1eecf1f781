//! The trial service of one node: it launches trial processes, serves their
//! report endpoint (HTTP on loopback, one secret token per trial incarnation),
//! captures their logs, packs their checkpoints into blobs, delivers stop and
//! preemption, and tells the node what happened through a bounded channel.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use resolute_core::command::{MetricKind, TrialOutcome};
use resolute_storage::blob::BlobStore;
use resolute_types::Value;

use crate::pack;
use crate::{EarlyExit, Launch, TrialError, TrialEvent};

/// Lines of a trial's output kept in memory (the end of its log).
pub const LOG_TAIL_LINES: usize = 200;
/// Lines quoted in an errored trial's exit record.
pub const EXIT_MESSAGE_LINES: usize = 20;
/// Size at which a trial's log file is rotated (one older file is kept).
pub const LOG_FILE_MAX_BYTES: u64 = 8 << 20;
/// Lines one log request returns at most (the newest).
pub const LOG_LINES_SERVED_MAX: usize = 10_000;
/// Seconds between SIGTERM and SIGKILL once `preemption_timeout` has passed.
pub const KILL_GRACE_DEFAULT_MS: u64 = 10_000;
/// Longest a preemption long-poll waits.
pub const PREEMPTION_POLL_MAX_S: u64 = 60;
/// Largest report body the endpoint reads.
const REPORT_BODY_MAX_BYTES: usize = 4 << 20;
/// Depth of the event channel to the node.
pub const EVENT_CHANNEL_DEPTH: usize = 1024;

/// Where the service keeps its files, and its limits.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Per-trial working copies, logs, checkpoint staging.
    pub work_root: PathBuf,
    /// The node's data dir (the blob store).
    pub data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace_ms: u64,
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

/// A running (or just exited) incarnation.
struct Entry {
    incarnation: u64,
    token: String,
    preempt: watch::Sender<bool>,
    early_exit: Option<EarlyExit>,
    pgid: Option<i32>,
    tail: VecDeque<LogLine>,
    /// Staging directories by storage id, and what they became.
    staging: BTreeMap<String, (PathBuf, serde_json::Value)>,
    committed: BTreeMap<String, String>,
    dir: PathBuf,
    done: bool,
}

struct Shared {
    config: ServiceConfig,
    store: BlobStore,
    trials: Mutex<BTreeMap<u64, Entry>>,
    events: mpsc::Sender<TrialEvent>,
    addr: SocketAddr,
}

/// The node's handle on its trials.
#[derive(Clone)]
pub struct TrialService {
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 32 random bytes as hex (the kernel's randomness).
fn secret() -> Result<String, TrialError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| TrialError::Io(format!("/dev/urandom: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl TrialService {
    /// Binds the report endpoint on 127.0.0.1 and starts serving it.
    pub async fn start(
        config: ServiceConfig,
    ) -> Result<(TrialService, mpsc::Receiver<TrialEvent>), TrialError> {
        std::fs::create_dir_all(&config.work_root)
            .map_err(|e| TrialError::Io(format!("{}: {e}", config.work_root.display())))?;
        let leftovers = kill_leftovers(&config.work_root);
        if leftovers > 0 {
            eprintln!(
                "killed {leftovers} trial process group(s) left running by this node's previous life"
            );
        }
        let store = BlobStore::open(&config.data_dir).map_err(|e| TrialError::Io(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| TrialError::Io(format!("report endpoint: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TrialError::Io(e.to_string()))?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_DEPTH);
        let shared = Arc::new(Shared {
            config,
            store,
            trials: Mutex::new(BTreeMap::new()),
            events: tx,
            addr,
        });
        let app = router(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((TrialService { shared }, rx))
    }

    /// The report endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The blob store checkpoints go into.
    pub fn store(&self) -> &BlobStore {
        &self.shared.store
    }

    /// The end of a trial's output.
    pub fn logs(&self, trial: u64) -> Vec<LogLine> {
        let trials = self.shared.trials.lock().unwrap_or_else(|p| p.into_inner());
        trials
            .get(&trial)
            .map(|e| e.tail.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Everything this node captured of a trial (see [`read_logs`]).
    pub fn logs_since(&self, trial: u64, since_ms: u64) -> Vec<LogLine> {
        read_logs(&self.log_path(trial), since_ms)
    }

    /// Where a trial's log file is.
    pub fn log_path(&self, trial: u64) -> PathBuf {
        self.shared
            .config
            .work_root
            .join(format!("trial-{trial}"))
            .join("trial.log")
    }

    /// Starts an incarnation (a newer one replaces an older one, which is killed).
    pub async fn launch(&self, launch: Launch) -> Result<(), TrialError> {
        let shared = &self.shared;
        let dir = shared
            .config
            .work_root
            .join(format!("trial-{}", launch.trial));
        let work = dir.join(format!("work-{}", launch.incarnation));
        std::fs::create_dir_all(&work)
            .map_err(|e| TrialError::Io(format!("{}: {e}", work.display())))?;
        if let Some(model) = &launch.model_dir {
            copy_dir(model, &work)?;
        }
        if let Some(digest) = &launch.model_digest {
            let models = shared.config.work_root.join("models");
            let model = unpack_checkpoint(&shared.store, &models, digest)?;
            copy_dir(&model, &work)?;
        }
        let latest = match &launch.latest_checkpoint {
            Some(digest) => Some(unpack_checkpoint(&shared.store, &dir, digest)?),
            None => None,
        };
        let token = secret()?;
        let (preempt, _) = watch::channel(false);
        {
            let mut trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = trials.get(&launch.trial) {
                if old.incarnation > launch.incarnation {
                    return Err(TrialError::Stale {
                        trial: launch.trial,
                        incarnation: launch.incarnation,
                    });
                }
                if old.incarnation == launch.incarnation {
                    return Ok(()); // Already running: a repeated start is a no-op.
                }
                if let Some(pgid) = old.pgid {
                    kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            trials.insert(
                launch.trial,
                Entry {
                    incarnation: launch.incarnation,
                    token: token.clone(),
                    preempt,
                    early_exit: None,
                    pgid: None,
                    tail: VecDeque::new(),
                    staging: BTreeMap::new(),
                    committed: BTreeMap::new(),
                    dir: dir.clone(),
                    done: false,
                },
            );
        }
        let url = format!(
            "http://{}/trials/{}/{}",
            shared.addr, launch.trial, launch.incarnation
        );
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&launch.entrypoint)
            .current_dir(&work)
            .envs(&launch.env)
            .env("RESOLUTE_TRIAL_ID", launch.trial.to_string())
            .env("RESOLUTE_EXPERIMENT_ID", launch.experiment.to_string())
            .env("RESOLUTE_INCARNATION", launch.incarnation.to_string())
            .env("RESOLUTE_HPARAMS", launch.hparams.to_string())
            .env("RESOLUTE_TRIAL_SEED", launch.seed.to_string())
            .env("RESOLUTE_REPORT_URL", &url)
            .env("RESOLUTE_TOKEN", &token)
            .env("RESOLUTE_TIME_METRIC", &launch.time_metric)
            .env("CUDA_VISIBLE_DEVICES", launch.gpus.join(","))
            .env_remove("RESOLUTE_LATEST_CHECKPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(t) = launch.target {
            cmd.env("RESOLUTE_TARGET_LENGTH", t.to_string());
        }
        if let Some(path) = &latest {
            cmd.env("RESOLUTE_LATEST_CHECKPOINT", path);
        }
        if let Some(d) = &launch.distributed {
            cmd.env("RANK", d.rank.to_string())
                .env("LOCAL_RANK", "0")
                .env("WORLD_SIZE", d.world_size.to_string())
                .env("LOCAL_WORLD_SIZE", d.local_world_size.to_string())
                .env("GROUP_RANK", d.group_rank.to_string())
                .env("MASTER_ADDR", &d.master_addr)
                .env("MASTER_PORT", d.master_port.to_string());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TrialError::Io(format!("starting {:?}: {e}", launch.entrypoint)))?;
        let pgid = child.id().map(|p| p as i32);
        if let Some(p) = pgid {
            // Remembered on disk: if this node dies with SIGKILL, its next life
            // kills the group (see `kill_leftovers`).
            remember_group(&dir, launch.incarnation, p);
        }
        {
            let mut trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = trials.get_mut(&launch.trial) {
                e.pgid = pgid;
            }
        }
        let log = Arc::new(Mutex::new(LogFile::open(&dir.join("trial.log"))));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(capture(
                self.shared.clone(),
                launch.trial,
                "stdout",
                out,
                log.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(capture(
                self.shared.clone(),
                launch.trial,
                "stderr",
                err,
                log,
            )));
        }
        let shared = self.shared.clone();
        let (trial, incarnation) = (launch.trial, launch.incarnation);
        tokio::spawn(async move {
            let status = child.wait().await;
            for r in readers {
                let _ = r.await;
            }
            exited(&shared, trial, incarnation, status.ok()).await;
        });
        Ok(())
    }

    /// Asks an incarnation to checkpoint and stop (through its preemption signal);
    /// after `timeout_ms` its process group gets SIGTERM, then SIGKILL.
    pub fn stop(&self, trial: u64, incarnation: u64, timeout_ms: u64) {
        let pgid = {
            let trials = self.shared.trials.lock().unwrap_or_else(|p| p.into_inner());
            match trials.get(&trial) {
                Some(e) if e.incarnation == incarnation && !e.done => {
                    e.preempt.send_replace(true);
                    e.pgid
                }
                _ => return,
            }
        };
        let Some(pgid) = pgid else { return };
        let shared = self.shared.clone();
        let grace = shared.config.kill_grace_ms;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
            if !still_running(&shared, trial, incarnation) {
                return;
            }
            kill_group(pgid, nix::sys::signal::Signal::SIGTERM);
            tokio::time::sleep(Duration::from_millis(grace)).await;
            if still_running(&shared, trial, incarnation) {
                kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
            }
        });
    }

    /// Kills an incarnation's process group at once.
    pub fn kill(&self, trial: u64, incarnation: u64) {
        let trials = self.shared.trials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = trials.get(&trial) {
            if e.incarnation == incarnation && !e.done {
                if let Some(pgid) = e.pgid {
                    kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }

    /// Kills every running trial (the node lost its lease, or is shutting down).
    pub fn kill_all(&self) {
        let trials = self.shared.trials.lock().unwrap_or_else(|p| p.into_inner());
        for e in trials.values().filter(|e| !e.done) {
            if let Some(pgid) = e.pgid {
                kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn still_running(shared: &Shared, trial: u64, incarnation: u64) -> bool {
    let trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
    trials
        .get(&trial)
        .is_some_and(|e| e.incarnation == incarnation && !e.done)
}

/// Everything a node captured of a trial, read back from its log file `path`
/// and the rotated one before it: every incarnation that ran there (so it
/// survives a restart of the node), oldest first, from `since_ms` on, at most the
/// newest [`LOG_LINES_SERVED_MAX`] lines. It reads files: call it off the node's
/// loop.
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
fn group_file(dir: &Path, incarnation: u64) -> PathBuf {
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
fn kill_leftovers(work_root: &Path) -> usize {
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

fn kill_group(pgid: i32, signal: nix::sys::signal::Signal) {
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

/// A trial's log file, rotated at [`LOG_FILE_MAX_BYTES`] (one older file kept).
struct LogFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl LogFile {
    fn open(path: &Path) -> LogFile {
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

/// Reads one output stream line by line into the log file and the tail.
async fn capture(
    shared: Arc<Shared>,
    trial: u64,
    stream: &'static str,
    pipe: impl tokio::io::AsyncRead + Unpin,
    log: Arc<Mutex<LogFile>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let entry = LogLine {
            time_ms: now_ms(),
            stream,
            line,
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).write(&entry);
        let mut trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = trials.get_mut(&trial) {
            e.tail.push_back(entry);
            while e.tail.len() > LOG_TAIL_LINES {
                e.tail.pop_front();
            }
        }
    }
}

/// The process ended: decide how, and tell the node.
async fn exited(
    shared: &Shared,
    trial: u64,
    incarnation: u64,
    status: Option<std::process::ExitStatus>,
) {
    use std::os::unix::process::ExitStatusExt;
    let event = {
        let mut trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = trials.get_mut(&trial) else {
            return;
        };
        if e.incarnation != incarnation {
            return; // A newer incarnation replaced this one.
        }
        e.done = true;
        let dir = shared.config.work_root.join(format!("trial-{trial}"));
        let _ = std::fs::remove_file(group_file(&dir, incarnation));
        let exit_code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        let preempted = *e.preempt.borrow();
        let last: Vec<String> = e
            .tail
            .iter()
            .rev()
            .take(EXIT_MESSAGE_LINES)
            .rev()
            .map(|l| l.line.clone())
            .collect();
        let outcome = match (e.early_exit, exit_code) {
            (Some(EarlyExit::InvalidHyperparameters), _) => TrialOutcome::InvalidHyperparameters,
            (_, Some(0)) if preempted => TrialOutcome::Stopped,
            (_, Some(0)) => TrialOutcome::Completed,
            // Killed after it was asked to stop: it stopped (its work since the
            // last checkpoint is lost, which the node knows).
            (_, None) if preempted => TrialOutcome::Stopped,
            _ => TrialOutcome::Errored {
                message: match signal {
                    Some(s) => format!("killed by signal {s}\n{}", last.join("\n")),
                    None => last.join("\n"),
                },
                exit_code,
            },
        };
        TrialEvent::Exited {
            trial,
            incarnation,
            outcome,
            exit_code,
            last_lines: last,
        }
    };
    let _ = shared.events.send(event).await;
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
fn unpack_checkpoint(store: &BlobStore, dir: &Path, digest: &str) -> Result<PathBuf, TrialError> {
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

// ----- the report endpoint ---------------------------------------------------

type Reply = (StatusCode, Json<serde_json::Value>);

fn refuse(status: StatusCode, reason: impl Into<String>) -> Reply {
    (status, Json(json!({ "error": reason.into() })))
}

fn ok(body: serde_json::Value) -> Reply {
    (StatusCode::OK, Json(body))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/trials/{trial}/{incarnation}/training", post(training))
        .route("/trials/{trial}/{incarnation}/validation", post(validation))
        .route("/trials/{trial}/{incarnation}/progress", post(progress))
        .route("/trials/{trial}/{incarnation}/exit", post(early_exit))
        .route(
            "/trials/{trial}/{incarnation}/checkpoints",
            post(checkpoint_begin),
        )
        .route(
            "/trials/{trial}/{incarnation}/checkpoints/commit",
            post(checkpoint_commit),
        )
        .route(
            "/trials/{trial}/{incarnation}/checkpoints/{id}",
            get(checkpoint_restore),
        )
        .route("/trials/{trial}/{incarnation}/preemption", get(preemption))
        .route(
            "/trials/{trial}/{incarnation}/preemption/ack",
            post(preemption_ack),
        )
        .layer(axum::extract::DefaultBodyLimit::max(REPORT_BODY_MAX_BYTES))
        .with_state(shared)
}

/// Checks the token and the incarnation; the request's trial entry on success.
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    trial: u64,
    incarnation: u64,
) -> Result<(), Reply> {
    let trials = shared.trials.lock().unwrap_or_else(|p| p.into_inner());
    let Some(e) = trials.get(&trial) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no trial {trial} on this node"),
        ));
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if e.incarnation != incarnation {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "stale incarnation {incarnation} of trial {trial} (current {})",
                e.incarnation
            ),
        ));
    }
    if token != Some(e.token.as_str()) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "missing or wrong token"));
    }
    Ok(())
}

/// Checks the token and incarnation, then parses the JSON body.
fn authorized_body<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    trial: u64,
    incarnation: u64,
    body: &str,
) -> Result<T, Reply> {
    authorize(shared, headers, trial, incarnation)?;
    parse(body)
}

/// Parses a JSON body, or says what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Reply> {
    serde_json::from_str(body).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsBody {
    steps_completed: u64,
    metrics: BTreeMap<String, Value>,
}

async fn metrics(
    shared: Arc<Shared>,
    headers: HeaderMap,
    trial: u64,
    incarnation: u64,
    body: String,
    kind: MetricKind,
) -> Reply {
    let b: MetricsBody = match authorized_body(&shared, &headers, trial, incarnation, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let event = TrialEvent::Metrics {
        trial,
        incarnation,
        kind,
        steps_completed: b.steps_completed,
        metrics: b.metrics,
    };
    match shared.events.send(event).await {
        Ok(()) => ok(json!({})),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down"),
    }
}

async fn training(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    metrics(s, headers, t, i, body, MetricKind::Training).await
}

async fn validation(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    metrics(s, headers, t, i, body, MetricKind::Validation).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    progress: f64,
}

async fn progress(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let b: ProgressBody = match authorized_body(&s, &headers, t, i, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !(0.0..=1.0).contains(&b.progress) {
        return refuse(StatusCode::BAD_REQUEST, "progress must be between 0 and 1");
    }
    let _ = s
        .events
        .send(TrialEvent::Progress {
            trial: t,
            incarnation: i,
            progress: b.progress,
        })
        .await;
    ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitBody {
    reason: EarlyExit,
}

async fn early_exit(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let b: ExitBody = match authorized_body(&s, &headers, t, i, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(e) = s
        .trials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&t)
    {
        e.early_exit = Some(b.reason);
    }
    let _ = s
        .events
        .send(TrialEvent::EarlyExit {
            trial: t,
            incarnation: i,
            reason: b.reason,
        })
        .await;
    ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginBody {
    #[serde(default)]
    metadata: serde_json::Value,
}

async fn checkpoint_begin(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let begin = match authorized_body::<BeginBody>(
        &s,
        &headers,
        t,
        i,
        if body.is_empty() { "{}" } else { &body },
    ) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let id = match secret() {
        Ok(x) => x[..32].to_string(),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
    let Some(e) = trials.get_mut(&t) else {
        return refuse(StatusCode::NOT_FOUND, "trial ended");
    };
    let path = e.dir.join("staging").join(&id);
    if let Err(err) = std::fs::create_dir_all(&path) {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {err}", path.display()),
        );
    }
    e.staging.insert(id.clone(), (path.clone(), begin.metadata));
    ok(json!({ "storage_id": id, "path": path }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    storage_id: String,
    steps_completed: u64,
    #[serde(default)]
    metadata: serde_json::Value,
}

async fn checkpoint_commit(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let mut b: CommitBody = match authorized_body(&s, &headers, t, i, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (staging, dir) = {
        let trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = trials.get(&t) else {
            return refuse(StatusCode::NOT_FOUND, "trial ended");
        };
        match e.staging.get(&b.storage_id) {
            Some((p, _)) => (p.clone(), e.dir.clone()),
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("unknown storage_id {:?}", b.storage_id),
                )
            }
        }
    };
    if b.metadata.is_null() {
        let trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = trials.get(&t).and_then(|e| e.staging.get(&b.storage_id)) {
            b.metadata = m.clone();
        }
    }
    // Pack and store off the async threads: checkpoints can be large.
    let store = s.store.clone();
    let packed = dir.join(format!(".{}.pack", b.storage_id));
    let staging2 = staging.clone();
    let result = tokio::task::spawn_blocking(move || {
        let size = pack::pack_dir(&staging2, &packed).map_err(|e| e.to_string())?;
        let m = store.put_file(&packed).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&packed);
        m.map(|m| (m.digest(), size))
    })
    .await;
    let (uuid, size) = match result {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("checkpoint: {e}")),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    // The staged files become the unpacked copy (restores need not unpack).
    let dest = dir.join("checkpoints").join(&uuid);
    let _ = std::fs::create_dir_all(dir.join("checkpoints"));
    if !dest.exists() {
        let _ = std::fs::rename(&staging, &dest);
    }
    {
        let mut trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = trials.get_mut(&t) {
            e.staging.remove(&b.storage_id);
            e.committed.insert(b.storage_id.clone(), uuid.clone());
        }
    }
    let _ = s
        .events
        .send(TrialEvent::CheckpointSaved {
            trial: t,
            incarnation: i,
            uuid: uuid.clone(),
            steps_completed: b.steps_completed,
            size,
            metadata: b.metadata,
        })
        .await;
    ok(json!({ "uuid": uuid }))
}

async fn checkpoint_restore(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i, id)): UrlPath<(u64, u64, String)>,
    headers: HeaderMap,
) -> Reply {
    if let Err(r) = authorize(&s, &headers, t, i) {
        return r;
    }
    let (digest, dir) = {
        let trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = trials.get(&t) else {
            return refuse(StatusCode::NOT_FOUND, "trial ended");
        };
        (e.committed.get(&id).cloned().unwrap_or(id), e.dir.clone())
    };
    match unpack_checkpoint(&s.store, &dir, &digest) {
        Ok(path) => ok(json!({ "uuid": digest, "path": path })),
        Err(TrialError::MissingCheckpoint(d)) => refuse(
            StatusCode::NOT_FOUND,
            format!("no checkpoint {d} on this node"),
        ),
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[derive(Deserialize)]
struct PollQuery {
    timeout_s: Option<u64>,
}

async fn preemption(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    Query(q): Query<PollQuery>,
    headers: HeaderMap,
) -> Reply {
    if let Err(r) = authorize(&s, &headers, t, i) {
        return r;
    }
    let mut rx = {
        let trials = s.trials.lock().unwrap_or_else(|p| p.into_inner());
        match trials.get(&t) {
            Some(e) => e.preempt.subscribe(),
            None => return refuse(StatusCode::NOT_FOUND, "trial ended"),
        }
    };
    let wait = Duration::from_secs(q.timeout_s.unwrap_or(0).min(PREEMPTION_POLL_MAX_S));
    let _ = tokio::time::timeout(wait, rx.wait_for(|p| *p)).await;
    let preempt = *rx.borrow();
    ok(json!({ "preempt": preempt }))
}

async fn preemption_ack(
    State(s): State<Arc<Shared>>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
) -> Reply {
    if let Err(r) = authorize(&s, &headers, t, i) {
        return r;
    }
    let _ = s
        .events
        .send(TrialEvent::PreemptAcked {
            trial: t,
            incarnation: i,
        })
        .await;
    ok(json!({}))
}
