//! The routes answered from the experiment-tracking store (`crates/tracking`):
//! experiment lists, a trial's metrics and run history, an experiment's trials
//! sorted by a metric or hyperparameter, and the store's summary.
//!
//! Each query opens a read-only connection on a blocking thread: SQLite's WAL
//! lets it read beside the node actor's writes, and a slow query never holds
//! the node up. Pages are JSON arrays; how many rows match in all and where the
//! next page starts come in the `x-total-count` and `x-next-offset` headers, so
//! that clients that read the arrays keep working.

use std::path::PathBuf;

use actix::Addr;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;

use resolute_tracking::{
    ExperimentFilter, ExperimentSort, MetricsQuery, Page, Reader, SortOrder, TrialSort,
};

use super::{allow, error, stopping, ApiState, Res};
use crate::auth::Caller;
use crate::node_actor::{self, Access, NodeActor};

/// Where the store is (the API's handle on it).
#[derive(Clone)]
pub(super) struct Store(pub PathBuf);

impl axum::extract::FromRef<ApiState> for Store {
    fn from_ref(s: &ApiState) -> Self {
        s.tracking.clone()
    }
}

/// Runs a read on a blocking thread and turns its error into a response: a
/// bad parameter is a 400 naming it, anything else a 500.
async fn read<T: Send + 'static>(
    node: &Addr<NodeActor>,
    store: &Store,
    f: impl FnOnce(&Reader) -> Result<T, resolute_tracking::Error> + Send + 'static,
) -> Result<T, Res> {
    // Everything this node applied before the query is in the store first.
    if let Ok(Some(written)) = node.send(node_actor::TrackingFlushed).await {
        let _ = tokio::task::spawn_blocking(move || written.recv()).await;
    }
    let path = store.0.clone();
    let done = tokio::task::spawn_blocking(move || Reader::open(&path).and_then(|r| f(&r))).await;
    match done {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(resolute_tracking::Error::Query { field, message })) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            format!("{field}: {message}"),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "tracking_store",
            e.to_string(),
        )),
        Err(_) => Err(stopping()),
    }
}

/// A page as a JSON array with its headers.
fn page(p: Page) -> Response {
    let mut response = Json(Value::Array(p.items)).into_response();
    let headers = response.headers_mut();
    headers.insert("x-total-count", HeaderValue::from(p.total));
    if let Some(next) = p.next_offset {
        headers.insert("x-next-offset", HeaderValue::from(next));
    }
    response
}

fn order(s: &Option<String>) -> Result<SortOrder, Res> {
    match s {
        None => Ok(SortOrder::Asc),
        Some(s) => SortOrder::parse(s).map_err(bad),
    }
}

fn bad(e: resolute_tracking::Error) -> Res {
    error(StatusCode::BAD_REQUEST, "bad_parameter", e.to_string())
}

/// `GET /experiments` parameters.
#[derive(Deserialize, Default)]
pub(super) struct ListQuery {
    state: Option<String>,
    owner: Option<String>,
    workspace: Option<String>,
    name: Option<String>,
    sort: Option<String>,
    order: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    offset: u64,
    /// Archived experiments too.
    #[serde(default)]
    archived: bool,
}

/// The experiments the caller may read: filtered (`state`, `owner`,
/// `workspace`, `name` contains; archived ones only with `archived=true`), sorted (`sort`: id, name, state, owner,
/// progress, best_metric, started, ended; `order`: asc or desc) and paged
/// (`limit`, default 100, at most 1,000; `offset`).
pub(super) async fn list(
    State(node): State<Addr<NodeActor>>,
    State(store): State<Store>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Response {
    let readable = match node
        .send(node_actor::ReadableWorkspaces(caller.user.clone()))
        .await
    {
        Ok(r) => r,
        Err(_) => return stopping().into_response(),
    };
    let filter = (|| -> Result<ExperimentFilter, Res> {
        Ok(ExperimentFilter {
            state: q.state,
            owner: q.owner,
            workspace: q.workspace,
            name: q.name,
            readable,
            archived: q.archived,
            sort: match &q.sort {
                None => ExperimentSort::Id,
                Some(s) => ExperimentSort::parse(s).map_err(bad)?,
            },
            order: order(&q.order)?,
            limit: q.limit,
            offset: q.offset,
        })
    })();
    let filter = match filter {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    match read(&node, &store, move |r| r.experiments(&filter)).await {
        Ok(p) => page(p),
        Err(e) => e.into_response(),
    }
}

/// `GET /trials/{id}/metrics` parameters.
#[derive(Deserialize, Default)]
pub(super) struct MetricsParams {
    group: Option<String>,
    since_step: Option<u64>,
    limit: Option<usize>,
    order: Option<String>,
}

/// A trial's metric reports: `group` (training, validation), `since_step`,
/// `limit` (at most 10,000), `order` by step (asc, or desc for the latest).
pub(super) async fn metrics(
    State(node): State<Addr<NodeActor>>,
    State(store): State<Store>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
    Query(q): Query<MetricsParams>,
) -> Response {
    if let Err(e) = allow(&node, &caller, Access::ReadTrial(id)).await {
        return e.into_response();
    }
    let order = match order(&q.order) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let query = MetricsQuery {
        group: q.group,
        since_step: q.since_step,
        limit: q.limit,
        order,
    };
    match read(&node, &store, move |r| r.trial_metrics(id, &query)).await {
        Ok(p) => page(p),
        Err(e) => e.into_response(),
    }
}

/// `GET /experiments/{id}/trials` parameters: with any of them, the trials
/// come from the store, sorted and paged.
#[derive(Deserialize, Default)]
pub(super) struct TrialsParams {
    pub(super) sort: Option<String>,
    pub(super) order: Option<String>,
    pub(super) limit: Option<usize>,
    pub(super) offset: Option<u64>,
}

impl TrialsParams {
    pub(super) fn any(&self) -> bool {
        self.sort.is_some() || self.order.is_some() || self.limit.is_some() || self.offset.is_some()
    }
}

/// An experiment's trials from the store: `sort` (id, best_metric,
/// latest_metric, steps, hp.NAME, metric.NAME), `order`, `limit`, `offset`.
pub(super) async fn sorted_trials(
    node: &Addr<NodeActor>,
    store: Store,
    id: u64,
    q: TrialsParams,
) -> Response {
    let sort = match &q.sort {
        None => TrialSort::Id,
        Some(s) => match TrialSort::parse(s) {
            Ok(s) => s,
            Err(e) => return bad(e).into_response(),
        },
    };
    let order = match order(&q.order) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let offset = q.offset.unwrap_or(0);
    match read(node, &store, move |r| {
        r.trials(id, &sort, order, q.limit, offset)
    })
    .await
    {
        Ok(p) => page(p),
        Err(e) => e.into_response(),
    }
}

/// A trial's run history and checkpoints: each incarnation, the node it ran
/// on, when and why it ended.
pub(super) async fn runs(
    State(node): State<Addr<NodeActor>>,
    State(store): State<Store>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<u64>,
) -> Response {
    if let Err(e) = allow(&node, &caller, Access::ReadTrial(id)).await {
        return e.into_response();
    }
    match read(&node, &store, move |r| {
        Ok(serde_json::json!({"runs": r.runs(id)?, "checkpoints": r.checkpoints(id)?}))
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// What this node's store holds: its applied index, rows per table, a digest
/// over them (equal on every node at the same index) and its gaps. Cluster
/// admins only.
pub(super) async fn summary(
    State(node): State<Addr<NodeActor>>,
    State(store): State<Store>,
    Extension(caller): Extension<Caller>,
) -> Response {
    if let Err(e) = allow(&node, &caller, Access::ClusterAdmin).await {
        return e.into_response();
    }
    match read(&node, &store, |r| r.summary()).await {
        Ok(s) => Json(serde_json::json!(s)).into_response(),
        Err(e) => e.into_response(),
    }
}
