//! The REST API under `/api/v1` (every node serves it; writes are proposed to the
//! local node, which forwards them to the leader). Errors are JSON objects with a
//! `code` and a `message`.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use resolute_core::command::{Command, Control};
use resolute_core::node::NodeError;
use resolute_core::state::TrialState;
use resolute_core::{Node, Reply};
use resolute_storage::blob::BlobStore;

use crate::daemon::{ApiCall, BlobUnavailable, Local};

/// Largest model directory upload, in bytes.
pub const UPLOAD_MAX_BYTES: usize = 1 << 30;
/// How long another node may take to send its share of a trial's logs.
const PEER_LOGS_TIMEOUT_MS: u64 = 2_000;
/// How often a followed log looks for new lines.
const FOLLOW_POLL_MS: u64 = 500;
/// Bytes per piece of a checkpoint download.
const DOWNLOAD_PIECE_BYTES: usize = 1 << 20;

type Res = (StatusCode, Json<Value>);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Res {
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
}

/// What the handlers share: the daemon loop's mailbox, and the blob store that
/// uploads are written to directly (a large write must not stall the loop).
#[derive(Clone)]
struct ApiState {
    calls: mpsc::Sender<ApiCall>,
    blobs: BlobStore,
}

impl FromRef<ApiState> for mpsc::Sender<ApiCall> {
    fn from_ref(s: &ApiState) -> Self {
        s.calls.clone()
    }
}

impl FromRef<ApiState> for BlobStore {
    fn from_ref(s: &ApiState) -> Self {
        s.blobs.clone()
    }
}

/// The router, talking to the daemon loop through `calls`.
pub fn router(calls: mpsc::Sender<ApiCall>, blobs: BlobStore) -> Router {
    Router::new()
        .route("/api/v1/experiments", post(create).get(list))
        .route("/api/v1/experiments/{id}", get(describe))
        .route("/api/v1/experiments/{id}/{action}", post(control))
        .route("/api/v1/experiments/{id}/trials", get(trials))
        .route("/api/v1/trials/{id}", get(trial))
        .route("/api/v1/trials/{id}/metrics", get(metrics))
        .route("/api/v1/trials/{id}/logs", get(logs))
        .route("/api/v1/checkpoints/{uuid}", get(checkpoint))
        .route("/api/v1/blobs", post(upload))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .layer(axum::extract::DefaultBodyLimit::max(UPLOAD_MAX_BYTES))
        .with_state(ApiState { calls, blobs })
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

/// Whether the experiment's searcher metric is better when smaller.
fn smaller_is_better(node: &Node, experiment: u64) -> bool {
    node.state()
        .experiments
        .get(&experiment)
        .and_then(|e| e.config())
        .is_none_or(|c| c.searcher.smaller_is_better)
}

/// The better of two values of a searcher metric.
fn better(a: f64, b: f64, smaller: bool) -> f64 {
    if smaller {
        a.min(b)
    } else {
        a.max(b)
    }
}

/// A trial's best validation value of its experiment's searcher metric.
fn best_validation(node: &Node, trial: u64) -> Option<f64> {
    let experiment = node.state().trials.get(&trial)?.experiment;
    let metric = node
        .state()
        .experiments
        .get(&experiment)?
        .config()?
        .searcher
        .metric
        .clone();
    let smaller = smaller_is_better(node, experiment);
    node.state()
        .metrics
        .get(&trial)?
        .iter()
        .filter(|p| p.kind == resolute_core::command::MetricKind::Validation)
        .filter_map(|p| p.metrics.get(&metric).and_then(|v| v.as_f64()))
        .reduce(|a, b| better(a, b, smaller))
}

fn experiment_json(node: &Node, id: u64) -> Option<Value> {
    let e = node.state().experiments.get(&id)?;
    let trials: Vec<u64> = e.trials.values().copied().collect();
    let name = e.config().and_then(|c| c.name.clone()).unwrap_or_default();
    let metric = e
        .config()
        .map(|c| c.searcher.metric.clone())
        .unwrap_or_default();
    let smaller = smaller_is_better(node, id);
    let best = trials
        .iter()
        .filter_map(|t| best_validation(node, *t))
        .reduce(|a, b| better(a, b, smaller));
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
        "best_metric": best_validation(node, id),
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
    read(&calls, move |node, local| {
        let Some(mut t) = trial_json(node, id) else {
            return not_found(format!("no trial {id}"));
        };
        // Only the node that started it knows how long the start took.
        if let Some(l) = local.launches.get(&id) {
            t["launched_here"] = json!({"incarnation": l.incarnation, "fetch_ms": l.fetch_ms});
        }
        t
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

/// `GET /trials/{id}/logs` query.
#[derive(Deserialize, Default)]
struct LogQuery {
    /// Only this node's lines (what a node asks its peers for).
    #[serde(default)]
    local: bool,
    /// Keep the response open and stream new lines (NDJSON) until the trial ends.
    #[serde(default)]
    follow: bool,
    /// Only lines read at or after this time (ms since the Unix epoch).
    #[serde(default)]
    since_ms: u64,
}

/// A trial's log lines from every node that ran it (a trial that moved has
/// lines on several), oldest first, each with the node that read it.
async fn logs(
    State(calls): State<mpsc::Sender<ApiCall>>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<LogQuery>,
) -> Response {
    if q.follow {
        return follow_logs(calls, id, q.since_ms);
    }
    match gather_logs(&calls, id, q.local, q.since_ms).await {
        Ok((lines, _)) => Json(Value::Array(lines)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The lines, and whether the trial has ended.
async fn gather_logs(
    calls: &mpsc::Sender<ApiCall>,
    id: u64,
    local_only: bool,
    since_ms: u64,
) -> Result<(Vec<Value>, bool), Res> {
    let (status, Json(mine)) = read(calls, move |node, local| {
        let Some(t) = node.state().trials.get(&id) else {
            return not_found(format!("no trial {id}"));
        };
        let me = format!("{:016x}", local.node);
        let path = local.trials.log_path(id).display().to_string();
        // The other nodes' REST APIs, as their gossiped records announce them.
        let peers: Vec<String> = local
            .records
            .iter()
            .filter(|(n, r)| **n != local.node && !r.api.is_empty())
            .map(|(_, r)| r.api.clone())
            .collect();
        json!({"me": me, "path": path, "peers": peers, "ended": matches!(t.state, TrialState::Done(_))})
    })
    .await;
    if status != StatusCode::OK {
        return Err((status, Json(mine)));
    }
    // This node's lines come from its log files, read off the node's loop.
    let (path, me) = (
        std::path::PathBuf::from(mine["path"].as_str().unwrap_or_default()),
        mine["me"].as_str().unwrap_or_default().to_string(),
    );
    let mut lines: Vec<Value> = tokio::task::spawn_blocking(move || {
        resolute_trial::read_logs(&path, since_ms)
            .iter()
            .map(|l| json!({"time_ms": l.time_ms, "node": me, "stream": l.stream, "line": l.line}))
            .collect()
    })
    .await
    .unwrap_or_default();
    let ended = mine["ended"] == json!(true);
    if !local_only {
        let asks: Vec<_> = mine["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .map(|api| {
                let url =
                    format!("http://{api}/api/v1/trials/{id}/logs?local=true&since_ms={since_ms}");
                tokio::task::spawn_blocking(move || peer_lines(&url))
            })
            .collect();
        for ask in asks {
            // A peer that is down or slow only costs its share of the lines.
            lines.extend(ask.await.unwrap_or_default());
        }
    }
    lines.sort_by_key(|l| l["time_ms"].as_u64().unwrap_or(0));
    Ok((lines, ended))
}

fn peer_lines(url: &str) -> Vec<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_millis(PEER_LOGS_TIMEOUT_MS)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Streams a trial's log as NDJSON: what there is, then new lines as they come,
/// until the trial has ended (or the client goes away).
fn follow_logs(calls: mpsc::Sender<ApiCall>, id: u64, since_ms: u64) -> Response {
    struct Cursor {
        calls: mpsc::Sender<ApiCall>,
        since_ms: u64,
        /// Lines already sent that were read at `since_ms` (the next poll
        /// returns them again, as it includes that millisecond).
        at_edge: Vec<Value>,
        first: bool,
        done: bool,
    }
    let cursor = Cursor {
        calls,
        since_ms,
        at_edge: Vec::new(),
        first: true,
        done: false,
    };
    let stream = futures::stream::unfold(cursor, move |mut c| async move {
        if c.done {
            return None;
        }
        if !std::mem::take(&mut c.first) {
            tokio::time::sleep(std::time::Duration::from_millis(FOLLOW_POLL_MS)).await;
        }
        let (lines, ended) = match gather_logs(&c.calls, id, false, c.since_ms).await {
            Ok(x) => x,
            Err((_, Json(e))) => {
                c.done = true;
                return Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(format!("{e}\n"))),
                    c,
                ));
            }
        };
        let fresh: Vec<Value> = lines
            .into_iter()
            .filter(|l| !c.at_edge.contains(l))
            .collect();
        let mut out = String::new();
        for l in &fresh {
            out.push_str(&l.to_string());
            out.push('\n');
        }
        if let Some(last) = fresh.iter().filter_map(|l| l["time_ms"].as_u64()).max() {
            if last > c.since_ms {
                c.at_edge.clear();
                c.since_ms = last;
            }
            c.at_edge.extend(
                fresh
                    .into_iter()
                    .filter(|l| l["time_ms"].as_u64() == Some(last)),
            );
        }
        c.done = ended;
        Some((Ok(Bytes::from(out)), c))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET /checkpoints/{uuid}`: the checkpoint's packed blob (fetched from a holder
/// first when this node has no copy), verified, as `application/octet-stream`.
async fn checkpoint(
    State(calls): State<mpsc::Sender<ApiCall>>,
    UrlPath(uuid): UrlPath<String>,
) -> Response {
    if resolute_storage::blob::check_digest(&uuid).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("{uuid:?} is not a checkpoint uuid"),
        )
        .into_response();
    }
    let (tx, rx) = oneshot::channel();
    let asked = calls
        .send(ApiCall::Checkpoint {
            uuid: uuid.clone(),
            reply: tx,
        })
        .await;
    let path = match (asked, rx.await) {
        (Ok(()), Ok(Ok(path))) => path,
        (Ok(()), Ok(Err(BlobUnavailable::NotFound))) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no checkpoint {uuid}"),
            )
            .into_response()
        }
        (Ok(()), Ok(Err(BlobUnavailable::Unreachable(why)))) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("checkpoint {uuid}: {why}"),
            )
            .into_response()
        }
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the node is stopping",
            )
            .into_response()
        }
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "io",
                format!("{}: {e}", path.display()),
            )
            .into_response()
        }
    };
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; DOWNLOAD_PIECE_BYTES];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header("x-resolute-digest", uuid)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn upload(State(blobs): State<BlobStore>, body: axum::body::Bytes) -> Res {
    // Hashed and written off the daemon's loop and off the async workers.
    let stored = tokio::task::spawn_blocking(move || blobs.put_bytes(&body)).await;
    match stored {
        Ok(Ok(m)) => (
            StatusCode::OK,
            Json(json!({"digest": m.digest(), "size": m.size})),
        ),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, "blob", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "blob", e.to_string()),
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
                // GPUs and labels as the node last gossiped them (soft state).
                let record = local.records.get(id);
                json!({
                    "id": format!("{id:016x}"),
                    "site": n.info.site,
                    "pool": n.info.pool,
                    "state": format!("{:?}", n.state),
                    "slots": n.info.slots,
                    "slots_used": used.get(id).copied().unwrap_or(0),
                    "voter": voters.contains(id),
                    "gpus": record.map(|r| r.gpus.iter().map(|g| json!({
                        "uuid": g.uuid,
                        "model": g.model,
                        "memory_mib": g.memory_mib,
                        "disabled": g.disabled,
                    })).collect::<Vec<_>>()).unwrap_or_default(),
                    "labels": record.map(|r| r.labels.clone()).unwrap_or_default(),
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
