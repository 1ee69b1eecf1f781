//! The REST API under `/api/v1` (every node serves it; writes are proposed to the
//! local node, which forwards them to the leader). Errors are JSON objects with a
//! `code` and a `message`.
//!
//! Every route is in [`table`] and behind `auth::gate` (authentication, origin
//! and content-type checks); each handler then asks the node whether the
//! caller may do what it asks (`node_actor::Allowed`), and what it proposes
//! carries the caller, which every replica checks again on apply.

mod access;
mod tracking;

use actix::Addr;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRef, Path as UrlPath, Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use resolute_core::command::{Command, Control};
use resolute_core::node::NodeError;
use resolute_core::Reply;
use resolute_storage::blob::BlobStore;
use resolute_types::config::CONFIG_BYTES_MAX;

use crate::auth::{self, Caller, Gate};
use crate::node_actor::{self, Access, BlobUnavailable, Denied, NodeActor};

/// Largest model directory upload, in bytes.
pub const UPLOAD_MAX_BYTES: usize = 1 << 30;
/// Pieces of an upload's body queued between the connection and the task
/// that writes them (each as the connection delivered it, a few KiB to a
/// few hundred KiB).
const UPLOAD_PIECES_QUEUED_MAX: usize = 16;

/// An upload's body as a blocking reader, fed by the connection's task.
struct Pieces {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<axum::body::Bytes>>,
    piece: axum::body::Bytes,
}

impl std::io::Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(p)) => self.piece = p,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        Ok(n)
    }
}
/// Largest JSON body of any other route, in bytes: an experiment config (at
/// most `CONFIG_BYTES_MAX`) and its overrides, JSON-escaped.
pub const JSON_BODY_MAX_BYTES: usize = 3 * CONFIG_BYTES_MAX as usize;
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

/// What the handlers share: the node actor's address, and the blob store that
/// uploads are written to directly (a large write must not stall the node).
#[derive(Clone)]
struct ApiState {
    node: Addr<NodeActor>,
    blobs: BlobStore,
    tracking: tracking::Store,
}

impl FromRef<ApiState> for Addr<NodeActor> {
    fn from_ref(s: &ApiState) -> Self {
        s.node.clone()
    }
}

impl FromRef<ApiState> for BlobStore {
    fn from_ref(s: &ApiState) -> Self {
        s.blobs.clone()
    }
}

/// Every route: its method, its path and its handler. [`router`] serves
/// exactly these, behind the gate; [`route_list`] lists them for the test that
/// proves no route answers without a token.
fn table() -> Vec<(Method, &'static str, MethodRouter<ApiState>)> {
    let json = || DefaultBodyLimit::max(JSON_BODY_MAX_BYTES);
    vec![
        (
            Method::POST,
            "/api/v1/experiments",
            post(create).layer(json()),
        ),
        (Method::GET, "/api/v1/experiments", get(tracking::list)),
        (Method::GET, "/api/v1/experiments/{id}", get(describe)),
        (
            Method::POST,
            "/api/v1/experiments/{id}/{action}",
            post(control).layer(json()),
        ),
        (Method::GET, "/api/v1/experiments/{id}/trials", get(trials)),
        (Method::GET, "/api/v1/trials/{id}", get(trial)),
        (
            Method::POST,
            "/api/v1/trials/{id}/kill",
            post(kill_trial).layer(json()),
        ),
        (
            Method::GET,
            "/api/v1/trials/{id}/metrics",
            get(tracking::metrics),
        ),
        (Method::GET, "/api/v1/trials/{id}/runs", get(tracking::runs)),
        (Method::GET, "/api/v1/tracking", get(tracking::summary)),
        (Method::GET, "/api/v1/trials/{id}/logs", get(logs)),
        (Method::GET, "/api/v1/checkpoints/{uuid}", get(checkpoint)),
        (
            Method::POST,
            "/api/v1/blobs",
            post(upload).layer(DefaultBodyLimit::max(UPLOAD_MAX_BYTES)),
        ),
        (Method::GET, "/api/v1/cluster", get(cluster)),
        (
            Method::POST,
            "/api/v1/nodes/{id}/{action}",
            post(node_action).layer(json()),
        ),
        (Method::GET, "/api/v1/me", get(access::me)),
        (Method::GET, "/api/v1/users", get(access::users)),
        (
            Method::POST,
            "/api/v1/users",
            post(access::create_user).layer(json()),
        ),
        (
            Method::POST,
            "/api/v1/users/{name}/deactivate",
            post(access::deactivate).layer(json()),
        ),
        (
            Method::POST,
            "/api/v1/users/{name}/roles",
            post(access::grant).layer(json()),
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            post(access::create_token).layer(json()),
        ),
        (
            Method::POST,
            "/api/v1/tokens/{id}/revoke",
            post(access::revoke_token).layer(json()),
        ),
        (
            Method::POST,
            "/api/v1/join-tokens",
            post(access::create_join_token).layer(json()),
        ),
    ]
}

/// Every route's method and path.
pub fn route_list() -> Vec<(Method, &'static str)> {
    table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The router, talking to the node actor, every route behind `gate`.
pub fn router(
    node: Addr<NodeActor>,
    blobs: BlobStore,
    tracking: std::path::PathBuf,
    gate: Gate,
) -> Router {
    let mut r = Router::new();
    for (_, path, route) in table() {
        r = r.route(path, route);
    }
    r.with_state(ApiState {
        node,
        blobs,
        tracking: tracking::Store(tracking),
    })
    .layer(axum::middleware::from_fn_with_state(gate, auth::gate))
}

/// Whether `caller` may do `access`: nothing, or the 404 or 403 to answer.
async fn allow(node: &Addr<NodeActor>, caller: &Caller, access: Access) -> Result<(), Res> {
    match node
        .send(node_actor::Allowed((caller.user.clone(), access)))
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Denied::NotFound(m))) => Err(error(StatusCode::NOT_FOUND, "not_found", m)),
        Ok(Err(Denied::Forbidden(m))) => Err(error(StatusCode::FORBIDDEN, "forbidden", m)),
        Err(_) => Err(stopping()),
    }
}

fn stopping() -> Res {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "stopping",
        "the node is stopping",
    )
}

/// Asks the node a query once `caller` may (`access`); `None` is a 404 with
/// `missing`'s message.
async fn query<M>(
    node: &Addr<NodeActor>,
    caller: &Caller,
    access: Access,
    msg: M,
    missing: impl FnOnce() -> String,
) -> Res
where
    M: actix::Message<Result = Option<Value>> + Send + 'static,
    NodeActor: actix::Handler<M>,
{
    if let Err(e) = allow(node, caller, access).await {
        return e;
    }
    match node.send(msg).await {
        Ok(Some(v)) => (StatusCode::OK, Json(v)),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", missing()),
        Err(_) => stopping(),
    }
}

/// A JSON body, or the 400 that names what is wrong with it.
fn parse_body<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Res> {
    serde_json::from_str(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "malformed", format!("body: {e}")))
}

/// Proposes `command` on `caller`'s authority.
async fn propose(node: &Addr<NodeActor>, caller: &Caller, command: Command) -> Result<Reply, Res> {
    let asked = node.send(node_actor::Propose(command, Some(caller.user.clone())));
    match asked.await {
        Ok(Ok(Reply::Rejected { reason })) => {
            Err(error(StatusCode::BAD_REQUEST, "rejected", reason))
        }
        Ok(Ok(Reply::Forbidden { reason })) => {
            Err(error(StatusCode::FORBIDDEN, "forbidden", reason))
        }
        Ok(Ok(r)) => Ok(r),
        Ok(Err(NodeError::Refused(m))) => Err(error(StatusCode::BAD_REQUEST, "refused", m)),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
        Err(_) => Err(stopping()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    config: String,
    #[serde(default)]
    overrides: Vec<String>,
    /// Ignored: the owner is the authenticated caller (older clients send it).
    #[serde(default)]
    #[allow(dead_code)]
    owner: String,
    #[serde(default)]
    model_digest: String,
}

async fn create(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Res {
    let b: CreateBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let size = b.config.len() + b.overrides.iter().map(String::len).sum::<usize>();
    if size as u64 > CONFIG_BYTES_MAX {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("config: {size} bytes with its overrides; the limit is {CONFIG_BYTES_MAX}"),
        );
    }
    // Check the config here so that the user gets every error, with lines,
    // and every warning with the reply.
    let warnings: Vec<String> =
        match resolute_types::config::parse_str("experiment.yaml", &b.config, &b.overrides) {
            Ok(loaded) => loaded.warnings.iter().map(ToString::to_string).collect(),
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_config", e.to_string()),
        };
    let seed = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()))
        % 1_000_000;
    let command = Command::ExperimentCreated {
        config_yaml: b.config,
        overrides: b.overrides,
        owner: caller.user.clone(),
        model_digest: b.model_digest,
        default_seed: seed,
    };
    match propose(&node, &caller, command).await {
        Ok(Reply::ExperimentCreated { experiment }) => (
            StatusCode::OK,
            Json(json!({"id": experiment, "warnings": warnings})),
        ),
        Ok(other) => (StatusCode::OK, Json(json!({"reply": format!("{other:?}")}))),
        Err(e) => e,
    }
}

async fn describe(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
) -> Res {
    query(
        &node,
        &caller,
        Access::ReadExperiment(id),
        node_actor::ExperimentView(id),
        || format!("no experiment {id}"),
    )
    .await
}

async fn control(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath((id, action)): UrlPath<(u64, String)>,
) -> Res {
    let action = match action.as_str() {
        "pause" => Control::Pause,
        "activate" => Control::Activate,
        "cancel" => Control::Cancel,
        "kill" => Control::Kill,
        "archive" => Control::Archive,
        "unarchive" => Control::Unarchive,
        "delete" => Control::Delete,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                "no action {other:?} (pause, activate, cancel, kill, archive, unarchive, delete)"
            ),
            )
        }
    };
    if let Err(e) = allow(&node, &caller, Access::ControlExperiment(id)).await {
        return e;
    }
    match propose(
        &node,
        &caller,
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

/// An experiment's trials: as the node sees them now (with where they
/// launched on this node), or, with `sort`, `order`, `limit` or `offset`,
/// sorted and paged from the tracking store.
async fn trials(
    State(node): State<Addr<NodeActor>>,
    State(store): State<tracking::Store>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<tracking::TrialsParams>,
) -> Response {
    if q.any() {
        if let Err(e) = allow(&node, &caller, Access::ReadExperiment(id)).await {
            return e.into_response();
        }
        return tracking::sorted_trials(&node, store, id, q).await;
    }
    query(
        &node,
        &caller,
        Access::ReadExperiment(id),
        node_actor::ExperimentTrials(id),
        || format!("no experiment {id}"),
    )
    .await
    .into_response()
}

async fn trial(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
) -> Res {
    query(
        &node,
        &caller,
        Access::ReadTrial(id),
        node_actor::TrialView(id),
        || format!("no trial {id}"),
    )
    .await
}

/// `POST /trials/{id}/kill`: the trial is killed at once and ends for good
/// (`Command::TrialKill`); its experiment goes on.
async fn kill_trial(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
) -> Res {
    if let Err(e) = allow(&node, &caller, Access::ControlTrial(id)).await {
        return e;
    }
    match propose(&node, &caller, Command::TrialKill { trial: id }).await {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(e) => e,
    }
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
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<LogQuery>,
) -> Response {
    if let Err(e) = allow(&node, &caller, Access::ReadTrial(id)).await {
        return e.into_response();
    }
    if q.follow {
        return follow_logs(node, caller.user, id, q.since_ms);
    }
    match gather_logs(&node, &caller.user, id, q.local, q.since_ms).await {
        Ok((lines, _)) => Json(Value::Array(lines)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The lines, and whether the trial has ended.
async fn gather_logs(
    node: &Addr<NodeActor>,
    user: &str,
    id: u64,
    local_only: bool,
    since_ms: u64,
) -> Result<(Vec<Value>, bool), Res> {
    let sources = match node.send(node_actor::TrialLogSources(id)).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no trial {id}"),
            ))
        }
        Err(_) => return Err(stopping()),
    };
    // This node's lines come from its log files, read off the node's thread.
    let (path, me) = (sources.path.clone(), sources.me.clone());
    let mut lines =
        tokio::task::spawn_blocking(move || node_actor::local_log_lines(&path, &me, since_ms))
            .await
            .unwrap_or_default();
    let ended = sources.ended;
    if !local_only {
        // The other members' lines come over the cluster's authenticated
        // channel; each checks that the user may read them.
        let asks: Vec<_> = sources
            .peers
            .into_iter()
            .map(|peer| {
                let (net, user) = (sources.net.clone(), user.to_string());
                tokio::spawn(async move {
                    let wait = std::time::Duration::from_millis(PEER_LOGS_TIMEOUT_MS);
                    let answer = tokio::time::timeout(wait, net.logs(peer, id, since_ms, user));
                    match answer.await {
                        Ok(Ok(bytes)) => {
                            serde_json::from_slice::<Vec<Value>>(&bytes).unwrap_or_default()
                        }
                        _ => Vec::new(),
                    }
                })
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

/// Streams a trial's log as NDJSON: what there is, then new lines as they come,
/// until the trial has ended (or the client goes away).
fn follow_logs(node: Addr<NodeActor>, user: String, id: u64, since_ms: u64) -> Response {
    struct Cursor {
        node: Addr<NodeActor>,
        user: String,
        since_ms: u64,
        /// Lines already sent that were read at `since_ms` (the next poll
        /// returns them again, as it includes that millisecond).
        at_edge: Vec<Value>,
        first: bool,
        done: bool,
    }
    let cursor = Cursor {
        node,
        user,
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
        let (lines, ended) = match gather_logs(&c.node, &c.user, id, false, c.since_ms).await {
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
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
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
    if let Err(e) = allow(&node, &caller, Access::ReadCheckpoint(uuid.clone())).await {
        return e.into_response();
    }
    let path = match node.send(node_actor::Checkpoint(uuid.clone())).await {
        Ok(Ok(path)) => path,
        Ok(Err(BlobUnavailable::NotFound)) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no checkpoint {uuid}"),
            )
            .into_response()
        }
        Ok(Err(BlobUnavailable::Unreachable(why))) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("checkpoint {uuid}: {why}"),
            )
            .into_response()
        }
        Err(_) => return stopping().into_response(),
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

async fn upload(
    State(node): State<Addr<NodeActor>>,
    State(blobs): State<BlobStore>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> Res {
    if let Err(e) = allow(&node, &caller, Access::Write).await {
        return e;
    }
    match node.send(node_actor::DiskLowNow).await {
        Ok(Some(low)) => {
            return error(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_low",
                format!("this node takes no uploads: {low}; submit to another node, or free space"),
            )
        }
        Ok(None) => {}
        Err(_) => return stopping(),
    }
    // Streamed: the body's pieces go through a bounded channel to a blocking
    // task that hashes and writes them (off the node actor's thread and the
    // async workers), so an upload never sits whole in memory.
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_PIECES_QUEUED_MAX);
    let stored = tokio::task::spawn_blocking(move || {
        let mut reader = Pieces {
            rx,
            piece: axum::body::Bytes::new(),
        };
        blobs.put_reader(&mut reader, std::path::Path::new("the upload"))
    });
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    while let Some(piece) = futures::StreamExt::next(&mut stream).await {
        // An error (a broken connection, too many bytes) ends the blob's
        // write with it; the writer gone (it failed) ends the loop.
        let piece = match piece {
            Ok(p) => {
                received += p.len();
                if received > UPLOAD_MAX_BYTES {
                    Err(std::io::Error::other(format!(
                        "more than {UPLOAD_MAX_BYTES} bytes"
                    )))
                } else {
                    Ok(p)
                }
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let last = piece.is_err();
        if tx.send(piece).await.is_err() || last {
            break;
        }
    }
    drop(tx);
    if received > UPLOAD_MAX_BYTES {
        let _ = stored.await;
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("an upload is at most {UPLOAD_MAX_BYTES} bytes"),
        );
    }
    match stored.await {
        Ok(Ok(m)) => (
            StatusCode::OK,
            Json(json!({"digest": m.digest(), "size": m.size})),
        ),
        Ok(Err(resolute_storage::blob::BlobError::Io { path, source }))
            if resolute_storage::space::is_disk_full(&source) =>
        {
            error(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!("this node's disk is full ({path}: {source}); submit to another node, or free space"),
            )
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, "blob", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "blob", e.to_string()),
    }
}

async fn cluster(State(node): State<Addr<NodeActor>>) -> Res {
    match node.send(node_actor::ClusterView).await {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(_) => stopping(),
    }
}

/// `POST /nodes/{id}/drain|approve|remove` (cluster admin).
async fn node_action(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath((id, action)): UrlPath<(String, String)>,
) -> Res {
    if let Err(e) = allow(&node, &caller, Access::ClusterAdmin).await {
        return e;
    }
    let node_addr = node;
    let Ok(node) = u64::from_str_radix(id.trim_start_matches("0x"), 16) else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("node id {id:?} is not hex"),
        );
    };
    let command = match action.as_str() {
        "drain" => Command::NodeDraining { node },
        "approve" => Command::NodeApproved { node },
        "remove" => Command::NodeRemoved { node },
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no node action {other:?} (drain, approve, remove)"),
            )
        }
    };
    match propose(&node_addr, &caller, command).await {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(e) => e,
    }
}
