//! The REST API under `/api/v1` (every node serves it; writes are proposed to the
//! local node, which forwards them to the leader). Errors are JSON objects with a
//! `code` and a `message`.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use resolute_core::command::{Command, Control};
use resolute_core::node::NodeError;
use resolute_core::state::TrialState;
use resolute_core::{Node, Reply};

use crate::daemon::{ApiCall, Local};

/// Largest model directory upload, in bytes.
pub const UPLOAD_MAX_BYTES: usize = 1 << 30;

type Res = (StatusCode, Json<Value>);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Res {
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
}

/// The router, talking to the daemon loop through `calls`.
pub fn router(calls: mpsc::Sender<ApiCall>) -> Router {
    Router::new()
        .route("/api/v1/experiments", post(create).get(list))
        .route("/api/v1/experiments/{id}", get(describe))
        .route("/api/v1/experiments/{id}/{action}", post(control))
        .route("/api/v1/experiments/{id}/trials", get(trials))
        .route("/api/v1/trials/{id}", get(trial))
        .route("/api/v1/trials/{id}/metrics", get(metrics))
        .route("/api/v1/trials/{id}/logs", get(logs))
        .route("/api/v1/blobs", post(upload))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .layer(axum::extract::DefaultBodyLimit::max(UPLOAD_MAX_BYTES))
        .with_state(calls)
}

async fn read(
    calls: &mpsc::Sender<ApiCall>,
    f: impl FnOnce(&Node, &Local) -> Value + Send + 'static,
) -> Res {
    let (tx, rx) = oneshot::channel();
    let call = ApiCall::Read {
        read: Box::new(f),
        reply: tx,
    };
    if calls.send(call).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        );
    }
    match rx.await {
        Ok(v) if v.get("code").is_some() && v.get("message").is_some() => {
            (StatusCode::NOT_FOUND, Json(v))
        }
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        ),
    }
}

async fn propose(calls: &mpsc::Sender<ApiCall>, command: Command) -> Result<Reply, Res> {
    let (tx, rx) = oneshot::channel();
    calls
        .send(ApiCall::Propose { command, reply: tx })
        .await
        .map_err(|_| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the node is stopping",
            )
        })?;
    match rx.await {
        Ok(Ok(Reply::Rejected { reason })) => {
            Err(error(StatusCode::BAD_REQUEST, "rejected", reason))
        }
        Ok(Ok(r)) => Ok(r),
        Ok(Err(NodeError::Refused(m))) => Err(error(StatusCode::BAD_REQUEST, "refused", m)),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    config: String,
    #[serde(default)]
    overrides: Vec<String>,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    model_digest: String,
}

async fn create(State(calls): State<mpsc::Sender<ApiCall>>, body: String) -> Res {
    let b: CreateBody = match serde_json::from_str(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "malformed", format!("body: {e}")),
    };
    // Check the config here so that the user gets every error, with lines.
    if let Err(e) = resolute_types::config::parse_str("experiment.yaml", &b.config, &b.overrides) {
        return error(StatusCode::BAD_REQUEST, "invalid_config", e.to_string());
    }
    let seed = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()))
        % 1_000_000;
    let command = Command::ExperimentCreated {
        config_yaml: b.config,
        overrides: b.overrides,
        owner: if b.owner.is_empty() {
            "user".into()
        } else {
            b.owner
        },
        model_digest: b.model_digest,
        default_seed: seed,
    };
    match propose(&calls, command).await {
        Ok(Reply::ExperimentCreated { experiment }) => {
            (StatusCode::OK, Json(json!({"id": experiment})))
        }
        Ok(other) => (StatusCode::OK, Json(json!({"reply": format!("{other:?}")}))),
        Err(e) => e,
    }
}

fn experiment_json(node: &Node, id: u64) -> Option<Value> {
    let e = node.state().experiments.get(&id)?;
    let trials: Vec<u64> = e.trials.values().copied().collect();
    let name = e.config().and_then(|c| c.name.clone()).unwrap_or_default();
    let metric = e
        .config()
        .map(|c| c.searcher.metric.clone())
        .unwrap_or_default();
    let smaller = e.config().is_none_or(|c| c.searcher.smaller_is_better);
    let best = trials
        .iter()
        .filter_map(|t| {
            node.state().metrics.get(t).and_then(|s| {
                s.iter()
                    .filter(|p| p.kind == resolute_core::command::MetricKind::Validation)
                    .filter_map(|p| p.metrics.get(&metric).and_then(|v| v.as_f64()))
                    .fold(None, |acc: Option<f64>, v| {
                        Some(acc.map_or(v, |a| if smaller { a.min(v) } else { a.max(v) }))
                    })
            })
        })
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| if smaller { a.min(v) } else { a.max(v) }))
        });
    Some(json!({
        "id": id,
        "name": name,
        "state": format!("{:?}", e.state),
        "owner": e.owner,
        "progress": e.progress(),
        "trials": trials,
        "searcher_metric": metric,
        "best_metric": best,
        "last_error": e.last_error,
    }))
}

async fn list(State(calls): State<mpsc::Sender<ApiCall>>) -> Res {
    read(&calls, |node, _| {
        let ids: Vec<u64> = node.state().experiments.keys().copied().collect();
        Value::Array(
            ids.iter()
                .filter_map(|id| experiment_json(node, *id))
                .collect(),
        )
    })
    .await
}

fn not_found(what: String) -> Value {
    json!({"code": "not_found", "message": what})
}

async fn describe(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<u64>) -> Res {
    read(&calls, move |node, _| {
        experiment_json(node, id).unwrap_or_else(|| not_found(format!("no experiment {id}")))
    })
    .await
}

async fn control(
    State(calls): State<mpsc::Sender<ApiCall>>,
    UrlPath((id, action)): UrlPath<(u64, String)>,
) -> Res {
    let action = match action.as_str() {
        "pause" => Control::Pause,
        "activate" => Control::Activate,
        "cancel" => Control::Cancel,
        "kill" => Control::Kill,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no action {other:?} (pause, activate, cancel, kill)"),
            )
        }
    };
    match propose(
        &calls,
        Command::ExperimentControl {
            experiment: id,
            action,
        },
    )
    .await
    {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(e) => e,
    }
}

fn trial_json(node: &Node, id: u64) -> Option<Value> {
    let t = node.state().trials.get(&id)?;
    let (state, node_id) = match &t.state {
        TrialState::Queued => ("Queued".to_string(), None),
        TrialState::Assigned { node } => ("Assigned".to_string(), Some(*node)),
        TrialState::Running { node } => ("Running".to_string(), Some(*node)),
        TrialState::Paused => ("Paused".to_string(), None),
        TrialState::Done(o) => (format!("Done({o:?})"), None),
    };
    Some(json!({
        "id": id,
        "experiment": t.experiment,
        "state": state,
        "node": node_id.map(|n| format!("{n:016x}")),
        "hparams": t.hparams,
        "seed": t.seed,
        "incarnation": t.incarnation,
        "restarts": t.restarts,
        "steps_completed": t.steps_completed,
        "target": t.target,
        "latest_checkpoint": t.latest_checkpoint,
    }))
}

async fn trials(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<u64>) -> Res {
    read(&calls, move |node, _| {
        match node.state().experiments.get(&id) {
            Some(e) => Value::Array(
                e.trials
                    .values()
                    .filter_map(|t| trial_json(node, *t))
                    .collect(),
            ),
            None => not_found(format!("no experiment {id}")),
        }
    })
    .await
}

async fn trial(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<u64>) -> Res {
    read(&calls, move |node, _| {
        trial_json(node, id).unwrap_or_else(|| not_found(format!("no trial {id}")))
    })
    .await
}

async fn metrics(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<u64>) -> Res {
    read(&calls, move |node, _| match node.state().metrics.get(&id) {
        Some(series) => Value::Array(
            series
                .iter()
                .map(|p| {
                    json!({"kind": format!("{:?}", p.kind), "steps_completed": p.steps_completed, "metrics": p.metrics})
                })
                .collect(),
        ),
        None if node.state().trials.contains_key(&id) => Value::Array(Vec::new()),
        None => not_found(format!("no trial {id}")),
    })
    .await
}

async fn logs(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<u64>) -> Res {
    read(&calls, move |_, local| {
        Value::Array(
            local
                .trials
                .logs(id)
                .iter()
                .map(|l| json!({"time_ms": l.time_ms, "stream": l.stream, "line": l.line}))
                .collect(),
        )
    })
    .await
}

async fn upload(State(calls): State<mpsc::Sender<ApiCall>>, body: axum::body::Bytes) -> Res {
    let bytes = body.to_vec();
    let (tx, rx) = oneshot::channel();
    let call = ApiCall::Read {
        read: Box::new(
            move |_, local| match local.trials.store().put_bytes(&bytes) {
                Ok(m) => json!({"digest": m.digest(), "size": m.size}),
                Err(e) => json!({"code": "blob", "message": e.to_string()}),
            },
        ),
        reply: tx,
    };
    if calls.send(call).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        );
    }
    match rx.await {
        Ok(v) if v.get("code").is_some() => (StatusCode::BAD_REQUEST, Json(v)),
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is stopping",
        ),
    }
}

async fn cluster(State(calls): State<mpsc::Sender<ApiCall>>) -> Res {
    read(&calls, |node, local| {
        let state = node.state();
        let (voters, learners) = node.membership();
        let mut used: BTreeMap<u64, u32> = BTreeMap::new();
        for t in state.trials.values().filter(|t| t.is_placed()) {
            for (n, s) in &t.layout {
                *used.entry(*n).or_default() += s;
            }
        }
        let nodes: Vec<Value> = state
            .nodes
            .iter()
            .map(|(id, n)| {
                json!({
                    "id": format!("{id:016x}"),
                    "site": n.info.site,
                    "pool": n.info.pool,
                    "state": format!("{:?}", n.state),
                    "slots": n.info.slots,
                    "slots_used": used.get(id).copied().unwrap_or(0),
                    "voter": voters.contains(id),
                })
            })
            .collect();
        let queue = state
            .trials
            .values()
            .filter(|t| t.state == TrialState::Queued)
            .count();
        json!({
            "this_node": format!("{:016x}", local.node),
            "api": local.api,
            "listen": local.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "connected": local.connected.iter().map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
            "leader": format!("{:016x}", node.leader_id()),
            "voters": voters.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
            "learners": learners.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
            "nodes": nodes,
            "queue": queue,
            "applied": node.applied(),
            "digest": state.digest(),
        })
    })
    .await
}

async fn drain(State(calls): State<mpsc::Sender<ApiCall>>, UrlPath(id): UrlPath<String>) -> Res {
    let Ok(node) = u64::from_str_radix(id.trim_start_matches("0x"), 16) else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("node id {id:?} is not hex"),
        );
    };
    match propose(&calls, Command::NodeDraining { node }).await {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(e) => e,
    }
}
