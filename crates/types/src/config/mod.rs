//! Determined's experiment configuration, read from YAML.
//!
//! [`load`] and [`parse_str`] accept Determined's experiment config unchanged: every
//! field of its schema is either honoured or accepted with a warning that says it
//! has no effect here; anything else is an error that names the file, line, column
//! and key path, and suggests the nearest valid key. Defaults are filled in, so the
//! returned [`ExperimentConfig`] is the normalized form that `resolute config check`
//! prints.

pub mod diag;
mod emit;
pub mod hparams;
mod read;
pub mod searcher;

use serde::Serialize;

pub use diag::Diagnostic;
use diag::{Diag, Fields, Known};
pub use emit::to_yaml;
pub use hparams::{Hyperparameter, Hyperparameters};
pub use searcher::{AdaptiveMode, Budget, SearchMethod, SearcherConfig};

use crate::value::Value;
use crate::yaml::{self, Key, Node, NodeKind, Pos};

/// Largest config file accepted, in bytes (Determined's own context limit is 95 MiB;
/// a config is a few kilobytes).
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
/// Largest grid accepted, in trials.
pub const GRID_POINTS_MAX: u64 = 100_000;
/// Most restarts of a failing trial.
pub const MAX_RESTARTS_MAX: u64 = 1_000;
/// Most checkpoint copies kept on peers.
pub const REPLICAS_MAX: u64 = 7;
/// Default number of peers holding each checkpoint (the node that made it plus one).
pub const REPLICAS_DEFAULT: u32 = 2;
/// Default grace period for a trial to checkpoint and exit after a stop, in seconds
/// (Determined's default).
pub const PREEMPTION_TIMEOUT_DEFAULT_S: u64 = 3600;
/// Default scheduling priority (1 runs first, 99 last).
pub const PRIORITY_DEFAULT: u8 = 42;
/// Most slots one trial may ask for.
pub const SLOTS_PER_TRIAL_MAX: u64 = 4096;

/// A normalized experiment configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentConfig {
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The command a trial runs, as an argument list (a string is split on whitespace
    /// by the trial runner, as Determined does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Entrypoint>,
    /// Free labels.
    pub labels: Vec<String>,
    /// The team the experiment belongs to (fair-share group).
    pub workspace: String,
    /// The project within the workspace.
    pub project: String,
    /// How many times a failing trial is restarted before it errors.
    pub max_restarts: u32,
    /// Seeds.
    pub reproducibility: Reproducibility,
    /// Where checkpoints live and which are kept.
    pub checkpoint_storage: CheckpointStorage,
    /// Which checkpoints a trial saves: `best`, `all` or `none`.
    pub checkpoint_policy: CheckpointPolicy,
    /// Validate at least this often (deprecated by Determined, passed to trials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_validation_period: Option<Length>,
    /// Checkpoint at least this often (deprecated by Determined, passed to trials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_checkpoint_period: Option<Length>,
    /// Seconds a trial has to checkpoint and exit after a stop or preemption.
    pub preemption_timeout: u64,
    /// Validate before training starts.
    pub perform_initial_validation: bool,
    /// Batches between the training metrics a Trial-class harness reports
    /// (Determined's `scheduling_unit`; a Core API script reports when it likes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduling_unit: Option<u64>,
    /// The trial environment.
    pub environment: Environment,
    /// What each trial needs and how it is scheduled.
    pub resources: Resources,
    /// The search space.
    pub hyperparameters: Hyperparameters,
    /// The search method.
    pub searcher: SearcherConfig,
    /// Free-form data passed to the training code.
    #[serde(skip_serializing_if = "is_null")]
    pub data: Value,
}

fn is_null(v: &Value) -> bool {
    matches!(v, Value::Null)
}

/// The trial command: a shell-style string or an argument list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Entrypoint {
    /// `python3 train.py --epochs 1`
    Command(String),
    /// `[python3, train.py, --epochs, "1"]`
    Args(Vec<String>),
    /// `model_def:MyTrial`: a `det.pytorch.PyTorchTrial` subclass, which the
    /// node runs through the Python harness (`determined.exec.harness`).
    TrialClass(String),
}

/// The `reproducibility` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reproducibility {
    /// The seed of every searcher draw and trial seed. When absent, the node that
    /// accepts the experiment picks one and records it in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment_seed: Option<u32>,
}

/// Where checkpoints are stored, and the garbage-collection policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointStorage {
    /// The backend.
    #[serde(flatten)]
    pub kind: StorageKind,
    /// Keep this many best checkpoints of the whole experiment.
    pub save_experiment_best: u32,
    /// Keep this many best checkpoints of each trial.
    pub save_trial_best: u32,
    /// Keep this many latest checkpoints of each trial.
    pub save_trial_latest: u32,
}

/// Checkpoint storage backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StorageKind {
    /// Resolute's default: content-addressed blobs replicated across peers.
    Peers {
        /// How many peers hold each checkpoint.
        replicas: u32,
    },
    /// A directory that every node mounts at the same path.
    SharedFs {
        /// The mount point on each node.
        host_path: String,
        /// A subdirectory of `host_path`.
        #[serde(skip_serializing_if = "Option::is_none")]
        storage_path: Option<String>,
    },
    /// A directory on each node.
    Directory {
        /// The directory.
        container_path: String,
    },
}

/// Which checkpoints trials keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointPolicy {
    /// Checkpoint when validation improves (and at the end).
    Best,
    /// Checkpoint after every validation.
    All,
    /// Only the final checkpoint (and on preemption).
    None,
}

/// A training length in Determined's legacy units, written `{batches: 100}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Length {
    /// `batches`, `records` or `epochs`.
    pub unit: String,
    /// How many.
    pub units: u64,
}

impl Serialize for Length {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(&self.unit, &self.units)?;
        map.end()
    }
}

/// The `environment` section (only what applies to local processes).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Environment {
    /// `KEY=VALUE` pairs per device type.
    pub environment_variables: EnvironmentVariables,
}

/// Environment variables for trials, per device type (a plain list applies to all).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EnvironmentVariables {
    /// For CPU-slot trials.
    pub cpu: Vec<String>,
    /// For NVIDIA GPU trials.
    pub cuda: Vec<String>,
    /// For AMD GPU trials.
    pub rocm: Vec<String>,
}

/// The `resources` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resources {
    /// Slots (GPUs or CPU slots) per trial; 0 runs without a device.
    pub slots_per_trial: u32,
    /// Cap on the experiment's slots at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_slots: Option<u32>,
    /// Fair-share weight.
    pub weight: f64,
    /// 1 (first) to 99 (last).
    pub priority: u8,
    /// Which pool of nodes; empty is the default pool.
    pub resource_pool: String,
}

/// A config that parsed, with its warnings.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The normalized config.
    pub config: ExperimentConfig,
    /// Fields accepted without effect, deprecated spellings, and similar.
    pub warnings: Vec<Diagnostic>,
}

/// A config that did not parse: every error found, plus the warnings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(.errors))]
pub struct ConfigErrors {
    /// The errors, in file order.
    pub errors: Vec<Diagnostic>,
    /// Warnings seen before giving up.
    pub warnings: Vec<Diagnostic>,
}

fn render(errors: &[Diagnostic]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses config bytes (which must be UTF-8) named `file` in messages.
pub fn parse_bytes(file: &str, bytes: &[u8], overrides: &[String]) -> Result<Loaded, ConfigErrors> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_str(file, text, overrides),
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let col = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            Err(ConfigErrors {
                errors: vec![Diagnostic {
                    location: format!("{file}:{line}:{col}"),
                    path: String::new(),
                    message: "not UTF-8 text: a config must be a YAML file".to_string(),
                }],
                warnings: Vec::new(),
            })
        }
    }
}

/// Parses config text named `file` in messages, applying `overrides`.
pub fn parse_str(file: &str, text: &str, overrides: &[String]) -> Result<Loaded, ConfigErrors> {
    let mut diag = Diag::new(file, overrides);
    let root = match yaml::parse(text, 0) {
        Ok(root) => root,
        Err(e) => {
            diag.error(e.pos, "", e.message);
            return Err(finish_err(diag));
        }
    };
    let root = apply_overrides(&mut diag, root, overrides);
    let config = match root {
        Some(root) => parse_root(&mut diag, &root),
        None => None,
    };
    match config {
        Some(config) if diag.errors.is_empty() => Ok(Loaded {
            config,
            warnings: diag.warnings,
        }),
        _ => Err(finish_err(diag)),
    }
}

fn finish_err(diag: Diag) -> ConfigErrors {
    let mut errors = diag.errors;
    if errors.is_empty() {
        // Defensive: a parse that produced no config must say why.
        errors.push(Diagnostic {
            location: String::new(),
            path: String::new(),
            message: "invalid config".to_string(),
        });
    }
    ConfigErrors {
        errors,
        warnings: diag.warnings,
    }
}

/// Sets each `a.b.c=value` override into the tree (values are parsed as YAML).
fn apply_overrides(diag: &mut Diag, mut root: Node, overrides: &[String]) -> Option<Node> {
    if root.kind == NodeKind::Null {
        root.kind = NodeKind::Map(Vec::new());
    }
    for (i, text) in overrides.iter().enumerate() {
        let source = u16::try_from(i + 1).unwrap_or(u16::MAX);
        let pos = Pos {
            line: 1,
            col: 1,
            source,
        };
        let Some((path, value)) = text.split_once('=') else {
            diag.error(pos, "", "expected KEY.PATH=VALUE");
            continue;
        };
        let keys: Vec<&str> = path.trim().split('.').collect();
        if keys.iter().any(|k| k.is_empty()) {
            diag.error(pos, path, "empty key in path");
            continue;
        }
        let value = match yaml::parse(value, source) {
            Ok(v) => v,
            Err(e) => {
                diag.error(pos, path, e.message);
                continue;
            }
        };
        if let Err(at) = set_path(&mut root, &keys, value, pos) {
            diag.error(
                pos,
                &keys[..=at].join("."),
                "cannot set a key inside a value that is not a map",
            );
        }
    }
    Some(root)
}

fn set_path(node: &mut Node, keys: &[&str], value: Node, pos: Pos) -> Result<(), usize> {
    let mut cur = node;
    for (depth, key) in keys.iter().enumerate() {
        if cur.kind == NodeKind::Null {
            cur.kind = NodeKind::Map(Vec::new());
        }
        let NodeKind::Map(entries) = &mut cur.kind else {
            return Err(depth.saturating_sub(1));
        };
        let idx = match entries.iter().position(|(k, _)| k.name == *key) {
            Some(idx) => idx,
            None => {
                entries.push((
                    Key {
                        name: (*key).to_string(),
                        pos,
                    },
                    Node {
                        kind: NodeKind::Null,
                        pos,
                    },
                ));
                entries.len() - 1
            }
        };
        if depth + 1 == keys.len() {
            entries[idx].0.pos = pos;
            entries[idx].1 = value;
            return Ok(());
        }
        cur = &mut entries[idx].1;
    }
    Ok(())
}

const IGNORED_TOP: [(&str, &str); 14] = [
    (
        "bind_mounts",
        "trials run as local processes and see the node's filesystem",
    ),
    (
        "records_per_epoch",
        "deprecated by Determined; lengths are counted by the training code",
    ),
    (
        "optimizations",
        "deprecated by Determined; configure these in the training code",
    ),
    (
        "profiling",
        "no built-in profiler; use the training framework's",
    ),
    ("debug", "set RUST_LOG on the node instead"),
    ("integrations", "no external integrations"),
    (
        "log_policies",
        "trial logs are kept, but no log-pattern policies are applied",
    ),
    (
        "retention_policy",
        "logs are kept for the life of the experiment",
    ),
    ("tensorboard_storage", "no TensorBoard service"),
    (
        "security",
        "access is controlled by the cluster key and user tokens",
    ),
    ("slurm", "no Slurm launcher: nodes run trials themselves"),
    ("pbs", "no PBS launcher: nodes run trials themselves"),
    (
        "data_layer",
        "removed from Determined; use `data` or the training code",
    ),
    ("internal", "reserved by Determined"),
];

const USED_TOP: [&str; 20] = [
    "name",
    "description",
    "entrypoint",
    "labels",
    "workspace",
    "project",
    "max_restarts",
    "reproducibility",
    "checkpoint_storage",
    "checkpoint_policy",
    "min_validation_period",
    "min_checkpoint_period",
    "preemption_timeout",
    "perform_initial_validation",
    "scheduling_unit",
    "environment",
    "resources",
    "hyperparameters",
    "searcher",
    "data",
];

fn parse_root(diag: &mut Diag, root: &Node) -> Option<ExperimentConfig> {
    let mut known: Vec<Known<'_>> = USED_TOP.iter().map(|k| Known::Used(k)).collect();
    known.extend(IGNORED_TOP.iter().map(|(k, why)| Known::Ignored(k, why)));
    let f = Fields::read(diag, root, "", &known)?;

    let string = |diag: &mut Diag, key: &str| f.get(key).and_then(|n| read::string(diag, n, key));
    let name = string(diag, "name");
    let description = string(diag, "description");
    let workspace = string(diag, "workspace").unwrap_or_default();
    let project = string(diag, "project").unwrap_or_default();
    let entrypoint = f.get("entrypoint").and_then(|n| entrypoint(diag, n));
    let labels = f
        .get("labels")
        .and_then(|n| read::strings(diag, n, "labels"))
        .unwrap_or_default();
    let max_restarts = f
        .get("max_restarts")
        .map_or(Some(5), |n| {
            read::uint(diag, n, "max_restarts", 0, MAX_RESTARTS_MAX)
        })
        .map(|v| v as u32);
    let reproducibility = reproducibility(diag, f.get("reproducibility"));
    let checkpoint_storage = checkpoint_storage(diag, f.get("checkpoint_storage"));
    let checkpoint_policy = f
        .get("checkpoint_policy")
        .map_or(Some(CheckpointPolicy::Best), |n| policy(diag, n));
    let min_validation_period = f
        .get("min_validation_period")
        .and_then(|n| length(diag, n, "min_validation_period"));
    let min_checkpoint_period = f
        .get("min_checkpoint_period")
        .and_then(|n| length(diag, n, "min_checkpoint_period"));
    let preemption_timeout = f
        .get("preemption_timeout")
        .map_or(Some(PREEMPTION_TIMEOUT_DEFAULT_S), |n| {
            read::uint(diag, n, "preemption_timeout", 0, u64::from(u32::MAX))
        });
    let perform_initial_validation = f
        .get("perform_initial_validation")
        .map_or(Some(false), |n| {
            read::boolean(diag, n, "perform_initial_validation")
        });
    let scheduling_unit = f.get("scheduling_unit").and_then(|n| {
        let units = read::uint(diag, n, "scheduling_unit", 1, searcher::TIME_MAX)?;
        if !matches!(entrypoint, Some(Entrypoint::TrialClass(_))) {
            diag.warn(
                n.pos,
                "scheduling_unit",
                "read only by the Trial-class harness (`entrypoint: module:Class`); a Core API \
                 script reports its metrics when it likes",
            );
        }
        Some(units)
    });
    let environment = environment(diag, f.get("environment"));
    let resources = resources(diag, f.get("resources"));
    let hyperparameters = f
        .get("hyperparameters")
        .map(|n| hparams::parse(diag, n, "hyperparameters"))
        .unwrap_or_default();
    let searcher = match f.get("searcher") {
        Some(n) => searcher::parse(diag, n, "searcher"),
        None => {
            f.missing(
                diag,
                "searcher",
                " (e.g. `searcher: {name: single, metric: validation_loss}`)",
            );
            None
        }
    };
    let data = f.get("data").map(Node::to_value).unwrap_or(Value::Null);

    let searcher = searcher?;
    if let SearchMethod::Grid { .. } = searcher.method {
        let points = hparams::check_grid(
            diag,
            &hyperparameters,
            f.get("hyperparameters"),
            "hyperparameters",
        );
        if points > GRID_POINTS_MAX {
            let pos = f.get("hyperparameters").map_or(root.pos, |n| n.pos);
            diag.error(
                pos,
                "hyperparameters",
                format!(
                    "the grid has {points} points; at most {GRID_POINTS_MAX} trials are allowed"
                ),
            );
        }
    }
    Some(ExperimentConfig {
        name,
        description,
        entrypoint,
        labels,
        workspace,
        project,
        max_restarts: max_restarts?,
        reproducibility: reproducibility?,
        checkpoint_storage: checkpoint_storage?,
        checkpoint_policy: checkpoint_policy?,
        min_validation_period,
        min_checkpoint_period,
        preemption_timeout: preemption_timeout?,
        perform_initial_validation: perform_initial_validation?,
        scheduling_unit,
        environment: environment?,
        resources: resources?,
        hyperparameters,
        searcher,
        data,
    })
}

/// Whether `command` names a Trial class (`model_def:MyTrial`, Determined's
/// legacy entrypoint) rather than a command to run.
fn names_a_trial_class(command: &str) -> bool {
    let ident = |s: &str| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match command.trim().split_once(':') {
        Some((module, class)) => module.split('.').all(ident) && ident(class),
        None => false,
    }
}

fn entrypoint(diag: &mut Diag, node: &Node) -> Option<Entrypoint> {
    match &node.kind {
        NodeKind::Str(s) if names_a_trial_class(s) => {
            diag.warn(
                node.pos,
                "entrypoint",
                format!(
                    "{s:?} is a Trial class (deprecated since Determined 0.38): it runs \
                     through the PyTorchTrial harness, which needs torch on the nodes; a \
                     script (`python3 train.py` with det.pytorch.Trainer) is the newer form"
                ),
            );
            Some(Entrypoint::TrialClass(s.trim().to_string()))
        }
        NodeKind::Str(s) => Some(Entrypoint::Command(s.clone())),
        NodeKind::Seq(_) => read::strings(diag, node, "entrypoint").map(Entrypoint::Args),
        _ => {
            diag.error(
                node.pos,
                "entrypoint",
                format!(
                    "expected a string or a list of strings, found {}",
                    node.type_name()
                ),
            );
            None
        }
    }
}

fn reproducibility(diag: &mut Diag, node: Option<&Node>) -> Option<Reproducibility> {
    let Some(node) = node else {
        return Some(Reproducibility {
            experiment_seed: None,
        });
    };
    let f = Fields::read(
        diag,
        node,
        "reproducibility",
        &[Known::Used("experiment_seed")],
    )?;
    let seed = match f.get("experiment_seed") {
        Some(n) => Some(read::uint(
            diag,
            n,
            &f.path_of("experiment_seed"),
            0,
            u64::from(u32::MAX),
        )? as u32),
        None => None,
    };
    Some(Reproducibility {
        experiment_seed: seed,
    })
}

fn policy(diag: &mut Diag, node: &Node) -> Option<CheckpointPolicy> {
    match read::string(diag, node, "checkpoint_policy")?.as_str() {
        "best" => Some(CheckpointPolicy::Best),
        "all" => Some(CheckpointPolicy::All),
        "none" => Some(CheckpointPolicy::None),
        other => {
            diag.error(
                node.pos,
                "checkpoint_policy",
                format!("unknown policy `{other}` (expected best, all or none)"),
            );
            None
        }
    }
}

fn length(diag: &mut Diag, node: &Node, path: &str) -> Option<Length> {
    if let NodeKind::Map(entries) = &node.kind {
        if let [(key, value)] = entries.as_slice() {
            if matches!(key.name.as_str(), "batches" | "records" | "epochs") {
                let key_path = format!("{path}.{}", key.name);
                let units = read::uint(diag, value, &key_path, 0, searcher::TIME_MAX)?;
                return Some(Length {
                    unit: key.name.clone(),
                    units,
                });
            }
        }
    }
    diag.error(
        node.pos,
        path,
        "a length object must have one attribute named \"batches\", \"records\", or \"epochs\"",
    );
    None
}

fn checkpoint_storage(diag: &mut Diag, node: Option<&Node>) -> Option<CheckpointStorage> {
    let default = CheckpointStorage {
        kind: StorageKind::Peers {
            replicas: REPLICAS_DEFAULT,
        },
        save_experiment_best: 0,
        save_trial_best: 1,
        save_trial_latest: 1,
    };
    let Some(node) = node else {
        return Some(default);
    };
    let path = "checkpoint_storage";
    let kind = match node.get("type") {
        None => "peers".to_string(),
        Some(n) => read::string(diag, n, &format!("{path}.type"))?,
    };
    const GC: [&str; 3] = [
        "save_experiment_best",
        "save_trial_best",
        "save_trial_latest",
    ];
    let cloud =
        "cloud object stores are not used: checkpoints are replicated across peers (type: peers)";
    let mut known: Vec<Known<'_>> = vec![Known::Used("type")];
    known.extend(GC.iter().map(|k| Known::Used(k)));
    match kind.as_str() {
        "peers" => known.push(Known::Used("replicas")),
        "shared_fs" => {
            known.extend([Known::Used("host_path"), Known::Used("storage_path")]);
            for k in [
                "propagation",
                "container_path",
                "checkpoint_path",
                "tensorboard_path",
            ] {
                known.push(Known::Ignored(
                    k,
                    "trials see host_path directly; there are no containers",
                ));
            }
        }
        "directory" => known.push(Known::Used("container_path")),
        "s3" | "gcs" | "azure" => {
            // Accept the whole section so Determined configs work; say what happens instead.
            if let NodeKind::Map(entries) = &node.kind {
                for (key, _) in entries {
                    if key.name != "type" && !GC.contains(&key.name.as_str()) {
                        known.push(Known::Ignored(key.name.as_str(), cloud));
                    }
                }
            }
        }
        other => {
            let pos = node.get("type").map_or(node.pos, |n| n.pos);
            diag.error(pos, &format!("{path}.type"), format!("unknown storage type `{other}` (expected peers, shared_fs or directory; s3, gcs and azure are accepted and replaced by peers)"));
            return None;
        }
    }
    let f = Fields::read(diag, node, path, &known)?;
    let gc = |diag: &mut Diag, key: &str, default: u32| match f.get(key) {
        Some(n) => read::uint(diag, n, &f.path_of(key), 0, 1_000_000).map(|v| v as u32),
        None => Some(default),
    };
    let save_experiment_best = gc(diag, "save_experiment_best", 0);
    let save_trial_best = gc(diag, "save_trial_best", 1);
    let save_trial_latest = gc(diag, "save_trial_latest", 1);
    let required_string = |diag: &mut Diag, key: &str| match f.get(key) {
        Some(n) => read::string(diag, n, &f.path_of(key)),
        None => {
            f.missing(diag, key, "");
            None
        }
    };
    let storage = match kind.as_str() {
        "shared_fs" => {
            let host_path = required_string(diag, "host_path");
            let storage_path = f
                .get("storage_path")
                .and_then(|n| read::string(diag, n, &f.path_of("storage_path")));
            StorageKind::SharedFs {
                host_path: host_path?,
                storage_path,
            }
        }
        "directory" => StorageKind::Directory {
            container_path: required_string(diag, "container_path")?,
        },
        "peers" => {
            let replicas = match f.get("replicas") {
                Some(n) => read::uint(diag, n, &f.path_of("replicas"), 1, REPLICAS_MAX)? as u32,
                None => REPLICAS_DEFAULT,
            };
            StorageKind::Peers { replicas }
        }
        _ => {
            let pos = node.get("type").map_or(node.pos, |n| n.pos);
            diag.warn(
                pos,
                &f.path_of("type"),
                format!("`{kind}` has no effect here: {cloud}"),
            );
            StorageKind::Peers {
                replicas: REPLICAS_DEFAULT,
            }
        }
    };
    Some(CheckpointStorage {
        kind: storage,
        save_experiment_best: save_experiment_best?,
        save_trial_best: save_trial_best?,
        save_trial_latest: save_trial_latest?,
    })
}

fn environment(diag: &mut Diag, node: Option<&Node>) -> Option<Environment> {
    let Some(node) = node else {
        return Some(Environment::default());
    };
    let no_containers = "trials run as local processes, not in containers";
    let known = [
        Known::Used("environment_variables"),
        Known::Ignored("image", no_containers),
        Known::Ignored("proxy_ports", "no proxy; trials reach the network directly"),
        Known::Ignored("ports", "no proxy; trials reach the network directly"),
        Known::Ignored("force_pull_image", no_containers),
        Known::Ignored("registry_auth", no_containers),
        Known::Ignored("add_capabilities", no_containers),
        Known::Ignored("drop_capabilities", no_containers),
        Known::Ignored("pod_spec", "no Kubernetes"),
    ];
    let f = Fields::read(diag, node, "environment", &known)?;
    let Some(vars) = f.get("environment_variables") else {
        return Some(Environment::default());
    };
    let path = f.path_of("environment_variables");
    let env = match &vars.kind {
        NodeKind::Seq(_) => {
            let list = check_env_list(diag, vars, &path)?;
            EnvironmentVariables {
                cpu: list.clone(),
                cuda: list.clone(),
                rocm: list,
            }
        }
        NodeKind::Map(_) => {
            let keys = [
                Known::Used("cpu"),
                Known::Used("cuda"),
                Known::Used("rocm"),
                Known::Used("gpu"),
            ];
            let m = Fields::read(diag, vars, &path, &keys)?;
            let list = |diag: &mut Diag, key: &str| match m.get(key) {
                Some(n) => check_env_list(diag, n, &m.path_of(key)),
                None => Some(Vec::new()),
            };
            let cpu = list(diag, "cpu");
            let mut cuda = list(diag, "cuda");
            // Determined's old name for cuda.
            if let (Some(c), Some(g)) = (cuda.as_mut(), list(diag, "gpu")) {
                c.extend(g);
            }
            let rocm = list(diag, "rocm");
            EnvironmentVariables {
                cpu: cpu?,
                cuda: cuda?,
                rocm: rocm?,
            }
        }
        _ => {
            diag.error(
                vars.pos,
                &path,
                "is neither a list of strings nor a map of cpu, cuda, or rocm to lists of strings",
            );
            return None;
        }
    };
    Some(Environment {
        environment_variables: env,
    })
}

fn check_env_list(diag: &mut Diag, node: &Node, path: &str) -> Option<Vec<String>> {
    let list = read::strings(diag, node, path)?;
    let NodeKind::Seq(items) = &node.kind else {
        return None;
    };
    let mut ok = true;
    for (i, (text, item)) in list.iter().zip(items).enumerate() {
        if !matches!(text.split_once('='), Some((k, _)) if !k.is_empty()) {
            diag.error(
                item.pos,
                &format!("{path}[{i}]"),
                format!("expected KEY=VALUE, found `{text}`"),
            );
            ok = false;
        }
    }
    ok.then_some(list)
}

fn resources(diag: &mut Diag, node: Option<&Node>) -> Option<Resources> {
    let default = Resources {
        slots_per_trial: 1,
        max_slots: None,
        weight: 1.0,
        priority: PRIORITY_DEFAULT,
        resource_pool: String::new(),
    };
    let Some(node) = node else {
        return Some(default);
    };
    let known = [
        Known::Used("slots_per_trial"),
        Known::Used("max_slots"),
        Known::Used("weight"),
        Known::Used("priority"),
        Known::Used("resource_pool"),
        Known::Ignored("agent_label", "use resource_pool and node labels"),
        Known::Ignored(
            "devices",
            "trials run as local processes with CUDA_VISIBLE_DEVICES",
        ),
        Known::Ignored(
            "is_single_node",
            "multi-slot trials are placed on one node whenever one fits",
        ),
        Known::Ignored("native_parallel", "removed from Determined"),
        Known::Ignored("shm_size", "trials share the node's /dev/shm"),
        Known::Ignored("slots", "only for Determined's commands and notebooks"),
    ];
    let f = Fields::read(diag, node, "resources", &known)?;
    let slots_per_trial = match f.get("slots_per_trial") {
        Some(n) => read::uint(
            diag,
            n,
            &f.path_of("slots_per_trial"),
            0,
            SLOTS_PER_TRIAL_MAX,
        )
        .map(|v| v as u32),
        None => Some(1),
    };
    let max_slots = f.get("max_slots").map(|n| {
        read::uint(diag, n, &f.path_of("max_slots"), 0, u64::from(u32::MAX)).map(|v| v as u32)
    });
    let weight = match f.get("weight") {
        Some(n) => read::number_where(diag, n, &f.path_of("weight"), |w| {
            (w <= 0.0).then_some("greater than 0")
        }),
        None => Some(1.0),
    };
    let priority = match f.get("priority") {
        Some(n) => read::uint(diag, n, &f.path_of("priority"), 1, 99).map(|v| v as u8),
        None => Some(PRIORITY_DEFAULT),
    };
    let resource_pool = match f.get("resource_pool") {
        Some(n) => read::string(diag, n, &f.path_of("resource_pool")),
        None => Some(String::new()),
    };
    Some(Resources {
        slots_per_trial: slots_per_trial?,
        max_slots: match max_slots {
            Some(v) => Some(v?),
            None => None,
        },
        weight: weight?,
        priority: priority?,
        resource_pool: resource_pool?,
    })
}
