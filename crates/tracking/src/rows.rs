//! The rows a set of applied batches changed, taken from the replicated state
//! as plain values ([`Slice`]): built on the node's thread (where the state
//! is), written on the writer's (where SQLite is).

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::state::ClusterState;
use resolute_core::track::{RunEvent, TrackBatch};
use resolute_types::Value;

use crate::{node_hex, trial_state};

/// A trial's row.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRow {
    pub(crate) experiment: u64,
    pub(crate) request_id: String,
    pub(crate) state: String,
    pub(crate) node: Option<String>,
    pub(crate) incarnation: u64,
    pub(crate) restarts: u32,
    pub(crate) steps_completed: u64,
    pub(crate) target: Option<u64>,
    pub(crate) seed: u32,
    pub(crate) hparams: String,
    /// Its hyperparameters, dotted names: (name, JSON value, number).
    pub(crate) flat: Vec<(String, String, Option<f64>)>,
    pub(crate) latest_checkpoint: Option<String>,
    pub(crate) latest_validation: Option<f64>,
    pub(crate) best_validation: Option<f64>,
}

/// An experiment's row.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRow {
    pub(crate) name: String,
    pub(crate) owner: String,
    pub(crate) workspace: String,
    pub(crate) project: String,
    pub(crate) state: String,
    pub(crate) searcher: String,
    pub(crate) searcher_metric: String,
    pub(crate) smaller_is_better: bool,
    pub(crate) progress: f64,
    pub(crate) best_validation: Option<f64>,
    pub(crate) trials: u64,
    pub(crate) created_ms: u64,
    pub(crate) ended_ms: Option<u64>,
    pub(crate) seed: u32,
    pub(crate) model_digest: String,
    pub(crate) last_error: Option<String>,
    pub(crate) config_yaml: String,
    pub(crate) archived: bool,
}

/// A checkpoint's row.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub(crate) trial: u64,
    pub(crate) steps_completed: u64,
    pub(crate) size: u64,
    pub(crate) digest: String,
    pub(crate) holders: String,
}

/// The rows some batches may have changed, as the state has them now; `None`
/// where the record is gone. With `resync`, every row (a snapshot replaced
/// the state): rows of records not listed are removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slice {
    pub(crate) trials: BTreeMap<u64, Option<TrialRow>>,
    pub(crate) experiments: BTreeMap<u64, Option<ExperimentRow>>,
    pub(crate) checkpoints: BTreeMap<String, Option<CheckpointRow>>,
    pub(crate) resync: bool,
}

impl Slice {
    /// The rows `batches` may have changed, from `state` (the state after
    /// them); every row when one of them replaced the state.
    pub fn of(batches: &[TrackBatch], state: &ClusterState) -> Slice {
        if batches.iter().any(|b| b.replaced) {
            return Slice::whole(state);
        }
        let mut trials: BTreeSet<u64> = BTreeSet::new();
        let mut experiments: BTreeSet<u64> = BTreeSet::new();
        let mut checkpoints: BTreeSet<&str> = BTreeSet::new();
        for b in batches {
            trials.extend(b.trials.iter().copied());
            trials.extend(b.runs.iter().map(|r| match r {
                RunEvent::Started { trial, .. } | RunEvent::Ended { trial, .. } => *trial,
            }));
            experiments.extend(b.experiments.iter().copied());
            checkpoints.extend(b.checkpoints.iter().map(String::as_str));
        }
        let mut slice = Slice::default();
        for uuid in checkpoints {
            let row = checkpoint_row(state, uuid);
            if let Some(r) = &row {
                trials.insert(r.trial);
            }
            slice.checkpoints.insert(uuid.to_string(), row);
        }
        for id in trials {
            if let Some(t) = state.trials.get(&id) {
                experiments.insert(t.experiment);
            }
            slice.trials.insert(id, trial_row(state, id));
        }
        for id in experiments {
            slice.experiments.insert(id, experiment_row(state, id));
        }
        slice
    }

    /// Every row of `state`.
    pub fn whole(state: &ClusterState) -> Slice {
        Slice {
            trials: state
                .trials
                .keys()
                .map(|id| (*id, trial_row(state, *id)))
                .collect(),
            experiments: state
                .experiments
                .keys()
                .map(|id| (*id, experiment_row(state, *id)))
                .collect(),
            checkpoints: state
                .checkpoints
                .keys()
                .map(|uuid| (uuid.clone(), checkpoint_row(state, uuid)))
                .collect(),
            resync: true,
        }
    }
}

fn trial_row(state: &ClusterState, id: u64) -> Option<TrialRow> {
    let t = state.trials.get(&id)?;
    let (st, node) = trial_state(&t.state);
    let mut flat = Vec::new();
    flatten("", &t.hparams, &mut flat);
    Some(TrialRow {
        experiment: t.experiment,
        request_id: t.request_id.to_string(),
        state: st,
        node,
        incarnation: t.incarnation,
        restarts: t.restarts,
        steps_completed: t.steps_completed,
        target: t.target,
        seed: t.seed,
        hparams: serde_json::to_string(&t.hparams).unwrap_or_else(|_| "{}".into()),
        flat: flat
            .into_iter()
            .map(|(name, v)| {
                let text = serde_json::to_string(v).unwrap_or_default();
                (name, text, v.as_f64())
            })
            .collect(),
        latest_checkpoint: t.latest_checkpoint.clone(),
        latest_validation: t.latest_validation,
        best_validation: t.best_validation,
    })
}

fn experiment_row(state: &ClusterState, id: u64) -> Option<ExperimentRow> {
    let e = state.experiments.get(&id)?;
    let config = e.config();
    let smaller = config.is_none_or(|c| c.searcher.smaller_is_better);
    let best = e
        .trials
        .values()
        .filter_map(|t| state.trials.get(t).and_then(|t| t.best_validation))
        .reduce(|a, b| if smaller { a.min(b) } else { a.max(b) });
    let workspace =
        resolute_core::state::auth::workspace_or_default(config.map_or("", |c| &c.workspace));
    Some(ExperimentRow {
        name: config.and_then(|c| c.name.clone()).unwrap_or_default(),
        owner: e.owner.clone(),
        workspace: workspace.to_string(),
        project: config.map(|c| c.project.clone()).unwrap_or_default(),
        state: format!("{:?}", e.state),
        searcher: config.map_or("", |c| c.searcher.method.name()).to_string(),
        searcher_metric: config
            .map(|c| c.searcher.metric.clone())
            .unwrap_or_default(),
        smaller_is_better: smaller,
        progress: e.progress(),
        best_validation: best,
        trials: e.trials.len() as u64,
        created_ms: e.created_ms,
        ended_ms: e.ended_ms,
        seed: e.seed,
        model_digest: e.model_digest.clone(),
        last_error: e.last_error.clone(),
        config_yaml: e.config_yaml.clone(),
        archived: e.archived,
    })
}

fn checkpoint_row(state: &ClusterState, uuid: &str) -> Option<CheckpointRow> {
    let c = state.checkpoints.get(uuid)?;
    let holders: Vec<String> = c.holders.iter().map(|h| node_hex(*h)).collect();
    Some(CheckpointRow {
        trial: c.trial,
        steps_completed: c.steps_completed,
        size: c.size,
        digest: c.digest.clone(),
        holders: serde_json::to_string(&holders).unwrap_or_default(),
    })
}

/// Nested hyperparameters as dotted names (`optimizer.lr`), as Determined's
/// WebUI shows them.
fn flatten<'v>(prefix: &str, value: &'v Value, out: &mut Vec<(String, &'v Value)>) {
    match value {
        Value::Map(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        _ if !prefix.is_empty() => out.push((prefix.to_string(), value)),
        _ => {}
    }
}
