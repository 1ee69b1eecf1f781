//! The commands that talk to a running node over its REST API (`-m/--node URL`,
//! `--master` as Determined's `det` spells it, or `RESOLUTE_NODE`, else
//! Determined's `DET_MASTER`). Exit codes: 0 success, 1 user error, 2 cluster
//! unavailable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::table::{cell, timestamp, Rows};
use resolute_types::config::Entrypoint;

/// Exit code when the node cannot be reached or the cluster has no quorum.
pub const EXIT_UNAVAILABLE: u8 = 2;

/// The node's API when neither `-m` nor `RESOLUTE_NODE` names one.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:8080";

/// The node the CLI talks to without `-m`/`RESOLUTE_NODE`: Determined's
/// `DET_MASTER` where it is set (scripts written for `det` export it).
fn default_node() -> String {
    match std::env::var("DET_MASTER") {
        Ok(m) if !m.trim().is_empty() => node_url(&m).unwrap_or(m),
        _ => DEFAULT_NODE.to_string(),
    }
}

/// A node address as a URL: `host:port` (as `det -m` takes it) gets `http://`.
fn node_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty node address".into());
    }
    if text.starts_with("http://") || text.starts_with("https://") {
        Ok(text.to_string())
    } else if text.contains("://") {
        Err(format!("{text}: the node's API is http:// or https://"))
    } else {
        Ok(format!("http://{text}"))
    }
}

/// Where the node's API is.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The node's REST API (`host:port` or a URL; default: $DET_MASTER, else
    /// http://127.0.0.1:8080).
    #[arg(
        short = 'm',
        long = "node",
        visible_alias = "master",
        env = "RESOLUTE_NODE",
        default_value_t = default_node(),
        hide_default_value = true,
        value_parser = node_url,
        global = true
    )]
    pub node: String,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print lists as CSV (a header line, then one record per row).
    #[arg(long, global = true, conflicts_with = "json")]
    pub csv: bool,
    /// The API token (default: the one `resolute login` saved).
    #[arg(long, env = "RESOLUTE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// For an `https://` node: a PEM file of the certificates (a private CA,
    /// or the node's own self-signed one) to trust instead of the public CAs.
    #[arg(long, env = "RESOLUTE_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

impl Target {
    /// The token to send: `--token`/`RESOLUTE_TOKEN`, else the saved one.
    fn bearer(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(crate::access::saved_token)
            .map(|t| format!("Bearer {}", t.trim()))
    }

    /// A GET request with the token.
    fn get(
        &self,
        agent: &ureq::Agent,
        url: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let r = agent.get(url);
        match self.bearer() {
            Some(b) => r.header("authorization", &b),
            None => r,
        }
    }

    /// A POST request with the token.
    fn post(
        &self,
        agent: &ureq::Agent,
        url: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let r = agent.post(url);
        match self.bearer() {
            Some(b) => r.header("authorization", &b),
            None => r,
        }
    }
}

/// `resolute experiment ...`
#[derive(Subcommand)]
pub enum ExperimentCommand {
    /// Submits an experiment (and its model directory, uploaded once as a blob).
    Create {
        /// The experiment config (Determined's format).
        file: PathBuf,
        /// The model directory the entrypoint runs in.
        dir: Option<PathBuf>,
        /// Overrides `key.path=value`.
        #[arg(long = "config")]
        overrides: Vec<String>,
        /// Wait until it ends, showing progress.
        #[arg(long)]
        follow: bool,
    },
    /// Lists experiments (from the node's tracking store), filtered, sorted
    /// and paged.
    List(ListArgs),
    /// Describes one.
    Describe {
        /// Its id.
        id: u64,
    },
    /// Its trials; with --sort (or --limit, --offset, --order) sorted and
    /// paged from the tracking store.
    Trials {
        /// Its id.
        id: u64,
        /// id, best_metric, latest_metric, steps, hp.NAME (a hyperparameter,
        /// dotted when nested) or metric.NAME (its latest validation value).
        #[arg(long)]
        sort: Option<String>,
        /// Order and page.
        #[command(flatten)]
        page: PageArgs,
    },
    /// Stops scheduling its trials (they checkpoint and pause).
    Pause {
        /// Its id.
        id: u64,
    },
    /// Resumes a paused experiment.
    Activate {
        /// Its id.
        id: u64,
    },
    /// Ends it; trials checkpoint and stop.
    Cancel {
        /// Its id.
        id: u64,
    },
    /// Ends it at once.
    Kill {
        /// Its id.
        id: u64,
    },
    /// Hides an ended experiment from lists (keeps everything).
    Archive {
        /// Its id.
        id: u64,
    },
    /// Shows an archived experiment in lists again.
    Unarchive {
        /// Its id.
        id: u64,
    },
    /// Deletes an ended experiment: its trials, checkpoints (their blobs on
    /// every node) and metrics.
    Delete {
        /// Its id.
        id: u64,
    },
    /// Waits until it ends, with a progress line.
    Wait {
        /// Its id.
        id: u64,
    },
    /// The output of all its trials (each line prefixed with its trial).
    Logs {
        /// Its id.
        id: u64,
    },
}

/// `resolute experiment list` options.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Only in this state: Active, Paused, Completed, Canceled, Errored.
    #[arg(long)]
    state: Option<String>,
    /// Only this user's.
    #[arg(long)]
    owner: Option<String>,
    /// Only in this workspace.
    #[arg(long)]
    workspace: Option<String>,
    /// Only those whose name contains this.
    #[arg(long)]
    name: Option<String>,
    /// id, name, state, owner, progress, best_metric, started or ended.
    #[arg(long)]
    sort: Option<String>,
    /// Order and page (default 100 a page, at most 1,000).
    #[command(flatten)]
    page: PageArgs,
    /// Archived experiments too (`-a`/`--all`, as Determined's `det e list --all`).
    #[arg(long, short = 'a', visible_alias = "all")]
    archived: bool,
}

/// The order and page of a sorted list.
#[derive(clap::Args)]
pub struct PageArgs {
    /// asc or desc.
    #[arg(long)]
    order: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<u64>,
    /// Skip this many.
    #[arg(long)]
    offset: Option<u64>,
}

impl PageArgs {
    /// The query parameters they set.
    fn query(&self) -> [(&'static str, Option<String>); 3] {
        [
            ("order", self.order.clone()),
            ("limit", self.limit.map(|n| n.to_string())),
            ("offset", self.offset.map(|n| n.to_string())),
        ]
    }
}

/// `path?k=v&...` for the parameters that are set, percent-encoded.
fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let set: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if set.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", set.join("&"))
    }
}

/// `resolute trial ...`
#[derive(Subcommand)]
pub enum TrialCommand {
    /// Describes a trial.
    Describe {
        /// Its id.
        id: u64,
    },
    /// Its metric reports, by step.
    Metrics {
        /// Its id.
        id: u64,
        /// Only this group: training or validation.
        #[arg(long)]
        group: Option<String>,
        /// Only reports at or after this step.
        #[arg(long)]
        since_step: Option<u64>,
        /// At most this many (10,000 at most).
        #[arg(long)]
        limit: Option<u64>,
        /// The latest first.
        #[arg(long)]
        latest: bool,
    },
    /// Where it ran: each incarnation, its node, when and why it ended; and
    /// its checkpoints.
    Runs {
        /// Its id.
        id: u64,
    },
    /// Its output, from every node that ran it, oldest first.
    Logs {
        /// Its id.
        id: u64,
        /// Keep printing new lines until the trial ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Kills a trial at once (SIGKILL, no checkpoint): it ends stopped for
    /// good and the searcher goes on without it; the experiment's other
    /// trials run on.
    #[command(after_help = "Examples:\n  resolute trial kill 7\n  resolute t kill 7")]
    Kill {
        /// Its id.
        id: u64,
    },
}

/// `resolute checkpoint ...`
#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// The checkpoints an experiment's trials keep: uuid, trial, steps, size
    /// and the nodes holding a copy.
    #[command(
        after_help = "Examples:\n  resolute checkpoint list 3\n  resolute cp list 3 --csv > checkpoints.csv"
    )]
    List {
        /// The experiment's id.
        experiment: u64,
    },
    /// Downloads a checkpoint (from any node; it fetches the blob from a holder),
    /// verifies it against its uuid and unpacks its files into a directory.
    Download {
        /// The checkpoint's uuid (as `trial describe` shows it).
        uuid: String,
        /// The directory to unpack into (created; must not hold files yet).
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub(crate) enum Failure {
    User(String),
    Unavailable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::User(m) => write!(f, "{m}"),
            Failure::Unavailable(m) => write!(f, "cluster unavailable: {m}"),
        }
    }
}

/// GETs `/api/v1{path}` from the target node.
pub fn get_json(t: &Target, path: &str) -> anyhow::Result<Value> {
    call(t, "GET", path, None).map_err(|e| anyhow::anyhow!("{e}"))
}

/// POSTs `body` to `/api/v1{path}` on the target node.
pub fn post_json(t: &Target, path: &str, body: Value) -> anyhow::Result<Value> {
    call(t, "POST", path, Some(body)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Validates an experiment config (errors name `label` and the line), uploads
/// the model directory if there is one, and creates the experiment; its id,
/// the config's warnings (what `config check` prints) and its resource pool.
fn submit(
    t: &Target,
    label: &str,
    config: &str,
    overrides: &[String],
    dir: Option<&Path>,
) -> Result<(u64, Vec<String>, String), Failure> {
    // Errors with the file's own name and lines, before anything is sent.
    let loaded = resolute_types::config::parse_str(label, config, overrides)
        .map_err(|e| Failure::User(e.to_string()))?;
    match (&loaded.config.entrypoint, dir) {
        (Some(Entrypoint::TrialClass(class)), Some(d)) => check_trial_module(class, d)?,
        (Some(Entrypoint::Command(line)), Some(d)) => {
            check_scripts(line.split_whitespace(), d)?;
        }
        (Some(Entrypoint::Args(args)), Some(d)) => {
            check_scripts(args.iter().map(String::as_str), d)?
        }
        _ => {}
    }
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    let model_digest = match dir {
        Some(d) => upload_dir(t, d)?,
        None => String::new(),
    };
    let body = json!({"config": config, "overrides": overrides, "model_digest": model_digest});
    let v = call(t, "POST", "/experiments", Some(body))?;
    let id = v["id"]
        .as_u64()
        .ok_or_else(|| Failure::User(format!("no experiment id in {v}")))?;
    Ok((id, warnings, loaded.config.resources.resource_pool.clone()))
}

/// A warning when no node that is not lost serves `pool`: the experiment's
/// trials then wait until one joins (a shipped config once served "gpu",
/// and every experiment that named no pool waited).
fn unserved_pool(cluster: &Value, pool: &str) -> Option<String> {
    let nodes = cluster["nodes"].as_array()?;
    let served = nodes
        .iter()
        .any(|n| n["state"] != "Lost" && n["pool"].as_str() == Some(pool));
    if served {
        return None;
    }
    let mut pools: Vec<&str> = nodes.iter().filter_map(|n| n["pool"].as_str()).collect();
    pools.sort_unstable();
    pools.dedup();
    let name = |p: &str| {
        if p.is_empty() {
            "the default pool".to_string()
        } else {
            format!("pool {p:?}")
        }
    };
    let named: Vec<String> = pools.iter().map(|p| name(p)).collect();
    Some(format!(
        "resources.resource_pool: no node serves {}, so its trials wait until one joins \
         (the nodes serve: {})",
        name(pool),
        if named.is_empty() {
            "nothing".to_string()
        } else {
            named.join(", ")
        }
    ))
}

/// Fails when the entrypoint names a Python script (`python3 train.py`,
/// also after a launcher) that is not in the model directory, where the
/// entrypoint runs, before anything is uploaded. Only plain relative
/// `*.py` words are checked: flags, `KEY=VALUE`, absolute paths and shell
/// expansions are the command's own business.
fn check_scripts<'a>(words: impl Iterator<Item = &'a str>, dir: &Path) -> Result<(), Failure> {
    let plain = |w: &str| {
        w.ends_with(".py")
            && !w.starts_with('-')
            && !w.starts_with('/')
            && !w.contains(['=', '$', '*', '?', '~', '`', '"', '\''])
    };
    for word in words.filter(|w| plain(w)) {
        if !dir.join(word).is_file() {
            return Err(Failure::User(format!(
                "entrypoint: {word} is not in the model directory {} (the entrypoint runs there)",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Fails when the module of a Trial-class entrypoint (`model_def:MyTrial`)
/// is not in the model directory, before anything is uploaded.
fn check_trial_module(class: &str, dir: &Path) -> Result<(), Failure> {
    let module = class.split(':').next().unwrap_or_default();
    let rel: PathBuf = module.split('.').collect();
    let file = dir.join(&rel).with_extension("py");
    let package = dir.join(&rel).join("__init__.py");
    if file.is_file() || package.is_file() {
        return Ok(());
    }
    Err(Failure::User(format!(
        "entrypoint {class}: neither {} nor {} is in the model directory {}",
        rel.with_extension("py").display(),
        rel.join("__init__.py").display(),
        dir.display()
    )))
}

/// Creates an experiment from config text (see `submit`); its id.
pub fn create_experiment(
    t: &Target,
    label: &str,
    config: &str,
    overrides: &[String],
    dir: Option<&Path>,
) -> anyhow::Result<u64> {
    let (id, warnings, _) =
        submit(t, label, config, overrides, dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(id)
}

/// An HTTP client for `t`'s node; `timeout` bounds a whole call.
fn agent(t: &Target, timeout: Option<Duration>) -> Result<ureq::Agent, Failure> {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout);
    if let Some(path) = &t.ca_cert {
        let bad = |e: String| Failure::User(format!("--ca-cert {}: {e}", path.display()));
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in the file".into()));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .build();
        config = config.tls_config(tls);
    }
    Ok(config.build().into())
}

/// How long one API call may take, at most.
const CALL_TIMEOUT_S: u64 = 60;

pub(crate) fn call(
    t: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let url = format!("{}/api/v1{path}", t.node.trim_end_matches('/'));
    let a = agent(t, Some(Duration::from_secs(CALL_TIMEOUT_S)))?;
    let resp = match (method, body) {
        ("GET", _) => t.get(&a, &url).call(),
        (_, Some(b)) => t.post(&a, &url).send_json(b),
        (_, None) => t.post(&a, &url).send_json(json!({})),
    };
    let mut resp = resp.map_err(|e| Failure::Unavailable(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    let v: Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| Failure::Unavailable(format!("{url}: {e}")))?;
    match status {
        200..=299 => Ok(v),
        _ => Err(failure(status, &v)),
    }
}

/// What a node's JSON error body (`{"code", "message"}`) with `status` means for
/// the exit code: 503 is the cluster being unavailable, anything else the user's.
fn failure(status: u16, v: &Value) -> Failure {
    let message = v["message"].as_str().unwrap_or("");
    if status == 503 {
        Failure::Unavailable(message.to_string())
    } else {
        Failure::User(format!(
            "{}: {message}",
            v["code"].as_str().unwrap_or("error")
        ))
    }
}

/// GETs `/api/v1{path}` and hands back the open response to read as a stream,
/// with no overall timeout (a followed log or a large checkpoint takes as long
/// as it takes); an error status becomes its `Failure`.
fn open_stream(
    t: &Target,
    path: &str,
) -> Result<(String, ureq::http::Response<ureq::Body>), Failure> {
    let url = format!("{}/api/v1{path}", t.node.trim_end_matches('/'));
    let agent = agent(t, None)?;
    let mut resp = t
        .get(&agent, &url)
        .call()
        .map_err(|e| Failure::Unavailable(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    if status >= 300 {
        let v: Value = resp.body_mut().read_json().unwrap_or_default();
        return Err(failure(status, &v));
    }
    Ok((url, resp))
}

pub(crate) fn finish(r: Result<(), Failure>) -> anyhow::Result<ExitCode> {
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Failure::User(m)) => {
            eprintln!("error: {m}");
            Ok(ExitCode::from(1))
        }
        Err(Failure::Unavailable(m)) => {
            eprintln!("error: cluster unavailable: {m}");
            Ok(ExitCode::from(EXIT_UNAVAILABLE))
        }
    }
}

pub(crate) fn print(t: &Target, v: &Value, human: impl FnOnce(&Value)) {
    if t.json {
        println!("{v}");
    } else {
        human(v);
    }
}

/// The file in a model directory that names what not to upload
/// (`.gitignore` syntax, as Determined's).
pub const IGNORE_FILE: &str = ".detignore";

/// The model directory's `.detignore` as a matcher (None: there is none).
fn detignore(dir: &Path) -> Result<Option<ignore::gitignore::Gitignore>, Failure> {
    let path = dir.join(IGNORE_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let mut builder = ignore::gitignore::GitignoreBuilder::new(dir);
    if let Some(e) = builder.add(&path) {
        return Err(Failure::User(format!("{}: {e}", path.display())));
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| Failure::User(format!("{}: {e}", path.display())))
}

/// Packs the model directory (less what its `.detignore` names) into a
/// file, then streams it to the node from disk, with a progress bar when
/// stderr is a terminal; the blob's digest.
fn upload_dir(t: &Target, dir: &Path) -> Result<String, Failure> {
    use std::io::IsTerminal;
    let ignored = detignore(dir)?;
    let keep = |rel: &Path, is_dir: bool| {
        ignored.as_ref().is_none_or(|g| {
            !g.matched_path_or_any_parents(dir.join(rel), is_dir)
                .is_ignore()
        })
    };
    let tmp = std::env::temp_dir().join(format!("resolute-upload-{}.pack", std::process::id()));
    let sent = (|| {
        let size = resolute_trial::pack::pack_dir_keeping(dir, &tmp, &keep)
            .map_err(|e| Failure::User(e.to_string()))?;
        let file = std::fs::File::open(&tmp)
            .map_err(|e| Failure::User(format!("{}: {e}", tmp.display())))?;
        let bar = if !t.json && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(size);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>."),
            );
            bar.set_message(dir.display().to_string());
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut reader = bar.wrap_read(file);
        let url = format!("{}/api/v1/blobs", t.node.trim_end_matches('/'));
        let resp = t
            .post(
                &agent(t, Some(Duration::from_secs(UPLOAD_TIMEOUT_S)))?,
                &url,
            )
            .header("content-type", "application/octet-stream")
            .header("content-length", &size.to_string())
            .send(ureq::SendBody::from_reader(&mut reader))
            .map_err(|e| Failure::Unavailable(format!("{url}: {e}")));
        bar.finish_and_clear();
        resp
    })();
    let _ = std::fs::remove_file(&tmp);
    let mut resp = sent?;
    let status = resp.status().as_u16();
    let v: Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    if status >= 300 {
        // A node low on disk (507) says why and where to go instead.
        return Err(failure(status, &v));
    }
    v["digest"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::User(format!("upload: {v}")))
}

/// How long a model directory's upload may take, at most.
const UPLOAD_TIMEOUT_S: u64 = 3_600;

fn wait(t: &Target, id: u64) -> Result<(), Failure> {
    loop {
        let v = call(t, "GET", &format!("/experiments/{id}"), None)?;
        let state = v["state"].as_str().unwrap_or("");
        let progress = v["progress"].as_f64().unwrap_or(0.0);
        if !t.json {
            let width = 30;
            let filled = (progress * width as f64).round() as usize;
            eprint!(
                "\rexperiment {id} [{}{}] {:>5.1}% {state:<10}",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width)),
                progress * 100.0
            );
        }
        if matches!(state, "Completed" | "Canceled" | "Errored") {
            if !t.json {
                eprintln!();
            }
            print(t, &v, |v| {
                println!(
                    "experiment {id}: {state}, best {} {}",
                    v["searcher_metric"], v["best_metric"]
                )
            });
            return if state == "Completed" {
                Ok(())
            } else {
                Err(Failure::User(format!("experiment {id} ended {state}")))
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `resolute experiment ...`.
pub fn experiment(t: &Target, cmd: &ExperimentCommand) -> anyhow::Result<ExitCode> {
    let r = (|| -> Result<(), Failure> {
        match cmd {
            ExperimentCommand::Create {
                file,
                dir,
                overrides,
                follow,
            } => {
                let config = std::fs::read_to_string(file)
                    .map_err(|e| Failure::User(format!("{}: {e}", file.display())))?;
                let label = file.display().to_string();
                let (id, mut warnings, pool) =
                    submit(t, &label, &config, overrides, dir.as_deref())?;
                // What a user at the command line should know (not asked on
                // the benchmarks' submissions, which time the submit path).
                if let Ok(cluster) = call(t, "GET", "/cluster", None) {
                    warnings.extend(unserved_pool(&cluster, &pool));
                }
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                print(t, &json!({"id": id, "warnings": warnings}), |_| {
                    println!("created experiment {id}")
                });
                if *follow {
                    wait(t, id)?;
                }
                Ok(())
            }
            ExperimentCommand::List(a) => {
                let path = with_query(
                    "/experiments",
                    &[
                        ("state", a.state.clone()),
                        ("owner", a.owner.clone()),
                        ("workspace", a.workspace.clone()),
                        ("name", a.name.clone()),
                        ("sort", a.sort.clone()),
                        ("archived", a.archived.then(|| "true".to_string())),
                    ]
                    .into_iter()
                    .chain(a.page.query())
                    .collect::<Vec<_>>(),
                );
                let v = call(t, "GET", &path, None)?;
                print(t, &v, |v| {
                    let mut rows = Rows::new(&["ID", "Name", "Owner", "State", "Progress", "Best"])
                        .numeric(&[0, 4, 5]);
                    for e in v.as_array().into_iter().flatten() {
                        rows.push(vec![
                            cell(&e["id"]),
                            cell(&e["name"]),
                            cell(&e["owner"]),
                            cell(&e["state"]),
                            format!("{:.1}%", e["progress"].as_f64().unwrap_or(0.0) * 100.0),
                            cell(&e["best_metric"]),
                        ]);
                    }
                    rows.print(t.csv);
                });
                Ok(())
            }
            ExperimentCommand::Describe { id } => {
                let v = call(t, "GET", &format!("/experiments/{id}"), None)?;
                print(t, &v, |v| {
                    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
                });
                Ok(())
            }
            ExperimentCommand::Trials { id, sort, page } => {
                let params: Vec<_> = [("sort", sort.clone())]
                    .into_iter()
                    .chain(page.query())
                    .collect();
                let path = with_query(&format!("/experiments/{id}/trials"), &params);
                let v = call(t, "GET", &path, None)?;
                print(t, &v, |v| {
                    let mut rows =
                        Rows::new(&["Trial", "State", "Steps", "Restarts", "Best", "Sort key"])
                            .numeric(&[0, 2, 3, 4]);
                    for tr in v.as_array().into_iter().flatten() {
                        rows.push(vec![
                            cell(&tr["id"]),
                            cell(&tr["state"]),
                            cell(&tr["steps_completed"]),
                            cell(&tr["restarts"]),
                            cell(&tr["best_metric"]),
                            tr.get("sort_key").map(cell).unwrap_or_default(),
                        ]);
                    }
                    rows.print(t.csv);
                });
                Ok(())
            }
            ExperimentCommand::Pause { id }
            | ExperimentCommand::Activate { id }
            | ExperimentCommand::Cancel { id }
            | ExperimentCommand::Kill { id }
            | ExperimentCommand::Archive { id }
            | ExperimentCommand::Unarchive { id }
            | ExperimentCommand::Delete { id } => {
                let action = match cmd {
                    ExperimentCommand::Pause { .. } => "pause",
                    ExperimentCommand::Activate { .. } => "activate",
                    ExperimentCommand::Cancel { .. } => "cancel",
                    ExperimentCommand::Archive { .. } => "archive",
                    ExperimentCommand::Unarchive { .. } => "unarchive",
                    ExperimentCommand::Delete { .. } => "delete",
                    _ => "kill",
                };
                call(t, "POST", &format!("/experiments/{id}/{action}"), None)?;
                Ok(())
            }
            ExperimentCommand::Wait { id } => wait(t, *id),
            ExperimentCommand::Logs { id } => {
                let trials = call(t, "GET", &format!("/experiments/{id}/trials"), None)?;
                let mut all = Vec::new();
                for tr in trials.as_array().into_iter().flatten() {
                    let tid = tr["id"].as_u64().unwrap_or(0);
                    let lines = call(t, "GET", &format!("/trials/{tid}/logs"), None)?;
                    for mut l in lines.as_array().cloned().unwrap_or_default() {
                        l["trial"] = json!(tid);
                        all.push(l);
                    }
                }
                all.sort_by_key(|l| l["time_ms"].as_u64().unwrap_or(0));
                let v = Value::Array(all);
                print(t, &v, |v| {
                    for l in v.as_array().into_iter().flatten() {
                        println!("{}", log_line(l, l["trial"].as_u64()));
                    }
                });
                Ok(())
            }
        }
    })();
    finish(r)
}

/// Runs `resolute trial ...`.
pub fn trial(t: &Target, cmd: &TrialCommand) -> anyhow::Result<ExitCode> {
    let r = (|| -> Result<(), Failure> {
        let path = match cmd {
            TrialCommand::Kill { id } => {
                let v = call(t, "POST", &format!("/trials/{id}/kill"), None)?;
                print(t, &v, |_| println!("trial {id} killed"));
                return Ok(());
            }
            TrialCommand::Describe { id } => format!("/trials/{id}"),
            TrialCommand::Metrics {
                id,
                group,
                since_step,
                limit,
                latest,
            } => with_query(
                &format!("/trials/{id}/metrics"),
                &[
                    ("group", group.clone()),
                    ("since_step", since_step.map(|n| n.to_string())),
                    ("limit", limit.map(|n| n.to_string())),
                    ("order", latest.then(|| "desc".to_string())),
                ],
            ),
            TrialCommand::Runs { id } => format!("/trials/{id}/runs"),
            TrialCommand::Logs { id, follow: true } => return follow_logs(t, *id),
            TrialCommand::Logs { id, .. } => format!("/trials/{id}/logs"),
        };
        let v = call(t, "GET", &path, None)?;
        print(t, &v, |v| match cmd {
            TrialCommand::Logs { .. } => {
                for l in v.as_array().into_iter().flatten() {
                    println!("{}", log_line(l, None));
                }
            }
            _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        });
        Ok(())
    })();
    finish(r)
}

/// One log line for people: when (UTC), the node that read it, the stream,
/// the text.
fn log_line(l: &Value, trial: Option<u64>) -> String {
    let node = l["node"].as_str().unwrap_or("");
    let prefix = trial.map_or(String::new(), |t| format!("[trial {t}] "));
    let at = l["time_ms"].as_u64().map(timestamp).unwrap_or_default();
    format!(
        "{prefix}{at} {} {} {}",
        &node[..node.len().min(8)],
        l["stream"].as_str().unwrap_or(""),
        l["line"].as_str().unwrap_or("")
    )
}

/// Streams a trial's log (NDJSON from the node) until the trial ends.
fn follow_logs(t: &Target, id: u64) -> Result<(), Failure> {
    use std::io::BufRead;
    let (url, mut resp) = open_stream(t, &format!("/trials/{id}/logs?follow=true"))?;
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    for line in reader.lines() {
        let line = line.map_err(|e| Failure::Unavailable(format!("{url}: {e}")))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v.get("code").is_some() && v.get("line").is_none() {
            return Err(Failure::User(
                v["message"].as_str().unwrap_or("").to_string(),
            ));
        }
        if t.json {
            println!("{v}");
        } else {
            println!("{}", log_line(&v, None));
        }
    }
    Ok(())
}

/// Runs `resolute checkpoint ...`.
pub fn checkpoint(t: &Target, cmd: &CheckpointCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CheckpointCommand::Download { uuid, output } => {
            finish(download_checkpoint(t, uuid, output))
        }
        CheckpointCommand::List { experiment } => finish(list_checkpoints(t, *experiment)),
    }
}

fn list_checkpoints(t: &Target, experiment: u64) -> Result<(), Failure> {
    let trials = call(t, "GET", &format!("/experiments/{experiment}/trials"), None)?;
    let mut all = Vec::new();
    for tr in trials.as_array().into_iter().flatten() {
        let id = tr["id"].as_u64().unwrap_or(0);
        let runs = call(t, "GET", &format!("/trials/{id}/runs"), None)?;
        for mut c in runs["checkpoints"].as_array().cloned().unwrap_or_default() {
            c["trial"] = json!(id);
            all.push(c);
        }
    }
    let v = Value::Array(all);
    print(t, &v, |v| {
        let mut rows =
            Rows::new(&["UUID", "Trial", "Steps", "Bytes", "Holders"]).numeric(&[1, 2, 3]);
        for c in v.as_array().into_iter().flatten() {
            let holders = c["holders"].as_array().map_or(0, Vec::len);
            rows.push(vec![
                cell(&c["uuid"]),
                cell(&c["trial"]),
                cell(&c["steps_completed"]),
                cell(&c["size"]),
                holders.to_string(),
            ]);
        }
        rows.print(t.csv);
    });
    Ok(())
}

fn download_checkpoint(t: &Target, uuid: &str, output: &Path) -> Result<(), Failure> {
    if output.exists()
        && output
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Failure::User(format!(
            "{}: exists and is not an empty directory",
            output.display()
        )));
    }
    let (url, mut resp) = open_stream(t, &format!("/checkpoints/{uuid}"))?;
    // Into a scratch blob store beside the output: the store recomputes the
    // digest, so nothing unverified is unpacked.
    let scratch = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(format!(".resolute-download-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Failure::User(format!("{}: {e}", scratch.display())))?;
        let packed = scratch.join("download.pack");
        let mut file = std::fs::File::create(&packed)
            .map_err(|e| Failure::User(format!("{}: {e}", packed.display())))?;
        let bytes = std::io::copy(&mut resp.body_mut().as_reader(), &mut file)
            .map_err(|e| Failure::Unavailable(format!("{url}: {e}")))?;
        drop(file);
        let store = resolute_storage::blob::BlobStore::open(&scratch)
            .map_err(|e| Failure::User(e.to_string()))?;
        let manifest = store
            .put_file(&packed)
            .map_err(|e| Failure::User(e.to_string()))?;
        if manifest.digest() != uuid {
            return Err(Failure::Unavailable(format!(
                "the node sent {bytes} bytes that do not match checkpoint {uuid} (digest {})",
                manifest.digest()
            )));
        }
        resolute_trial::pack::unpack(&store.path(uuid), output)
            .map_err(|e| Failure::User(format!("{}: {e}", output.display())))?;
        Ok(bytes)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let bytes = result?;
    print(
        t,
        &json!({"uuid": uuid, "bytes": bytes, "output": output.display().to_string()}),
        |_| {
            println!(
                "checkpoint {uuid} ({bytes} bytes, verified) unpacked into {}",
                output.display()
            )
        },
    );
    Ok(())
}

/// Runs `resolute cluster status`.
pub fn cluster_status(t: &Target) -> anyhow::Result<ExitCode> {
    let r = call(t, "GET", "/cluster", None).map(|v| {
        print(t, &v, |v| {
            println!(
                "leader {}  queue {}  applied {}",
                v["leader"], v["queue"], v["applied"]
            );
            let d = &v["this_disk"];
            println!(
                "this node's disk: {} MiB free, low-water mark {} MiB, log reserve {} MiB ({})",
                d["free_mib"],
                d["low_water_mib"],
                d["log_reserve_mib"],
                if d["log_reserve_kept"] == json!(true) {
                    "kept"
                } else {
                    "not kept: used by a full disk, or no room yet"
                }
            );
            for n in v["nodes"].as_array().into_iter().flatten() {
                println!(
                    "  {} {:<8} site {:<10} slots {}/{} {:<7} {:<8} {}",
                    n["id"].as_str().unwrap_or(""),
                    n["state"].as_str().unwrap_or(""),
                    n["site"].as_str().unwrap_or(""),
                    n["slots_used"],
                    n["slots"],
                    if n["voter"] == json!(true) {
                        "voter"
                    } else {
                        "learner"
                    },
                    n["reachability"].as_str().unwrap_or("unknown"),
                    connection_words(&n["connection"], n["id"] == v["this_node"]),
                );
                if let Some(why) = n["disk_low"]["message"].as_str() {
                    println!("      disk low, takes no new work: {why}");
                }
                // GPUs as the node last gossiped them, a disabled one with why.
                for g in n["gpus"].as_array().into_iter().flatten() {
                    let state = match g["disabled"].as_str() {
                        Some(why) => format!("disabled: {why}"),
                        None => "offered".to_string(),
                    };
                    println!(
                        "      {} {} {} MiB  {state}",
                        g["uuid"].as_str().unwrap_or(""),
                        g["model"].as_str().unwrap_or(""),
                        g["memory_mib"]
                    );
                }
            }
            for w in v["warnings"].as_array().into_iter().flatten() {
                println!("warning: {}", w.as_str().unwrap_or(""));
            }
        })
    });
    finish(r)
}

/// How the node that answered reaches a peer: "direct 41 ms", "relayed",
/// "this node", "not connected".
fn connection_words(c: &Value, itself: bool) -> String {
    if itself {
        return "this node".to_string();
    }
    match (c["kind"].as_str(), c["rtt_ms"].as_u64()) {
        (Some(kind), Some(rtt)) => format!("{kind} {rtt} ms"),
        (Some(kind), None) => kind.to_string(),
        _ => "not connected".to_string(),
    }
}

/// Runs `resolute cluster tracking`: what the node's tracking store holds.
pub fn cluster_tracking(t: &Target) -> anyhow::Result<ExitCode> {
    let r = call(t, "GET", "/tracking", None).map(|v| {
        print(t, &v, |v| {
            println!(
                "applied {}  digest {}",
                v["applied_index"],
                v["digest"].as_str().unwrap_or("")
            );
            for row in v["rows"].as_array().into_iter().flatten() {
                println!("  {:<16} {}", row[0].as_str().unwrap_or(""), row[1]);
            }
            for gap in v["gaps"].as_array().into_iter().flatten() {
                println!(
                    "  {} reports of entries {} to {} came with a snapshot: not kept here",
                    gap["reports"], gap["from_index"], gap["to_index"]
                );
            }
        })
    });
    finish(r)
}

/// Runs `resolute node drain|approve|remove ID`.
pub fn node_action(t: &Target, id: &str, action: &str) -> anyhow::Result<ExitCode> {
    finish(call(t, "POST", &format!("/nodes/{id}/{action}"), None).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_experiment_for_a_pool_no_node_serves_is_warned_of() {
        let cluster = json!({"nodes": [
            {"pool": "gpu", "state": "Alive"},
            {"pool": "", "state": "Lost"},
        ]});
        let w = unserved_pool(&cluster, "").expect("a warning");
        assert!(
            w.contains("no node serves the default pool")
                && w.contains("the nodes serve: the default pool, pool \"gpu\""),
            "{w}"
        );
        assert_eq!(unserved_pool(&cluster, "gpu"), None);
    }
}
