//! The trial report endpoint: HTTP on loopback, Determined's Core API shape
//! (training and validation metrics, checkpoints, progress, early exit, the
//! preemption long-poll and its acknowledgement, the searcher's next target).
//! Every call carries its incarnation's secret token; a call from an older
//! incarnation is refused. An authenticated call goes to the incarnation's
//! [`TrialActor`] as a typed message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, Recipient};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use resolute_agent::EarlyExit;
use resolute_core::command::MetricKind;
use resolute_types::Value;

use crate::actor::{Answered, Call, TrialActor};
use crate::BestValidation;

/// Largest report body the endpoint reads.
pub const REPORT_BODY_MAX_BYTES: usize = 4 << 20;
/// Longest a preemption or next-target long-poll waits.
pub const LONG_POLL_MAX_S: u64 = 60;

/// One running incarnation as the endpoint knows it.
#[derive(Clone)]
struct Entry {
    incarnation: u64,
    experiment: u64,
    token: String,
    actor: Addr<TrialActor>,
}

/// The running incarnations, by trial (the newest incarnation only), and
/// who answers their questions about the cluster.
#[derive(Clone, Default)]
pub struct Registry {
    by_trial: Arc<Mutex<BTreeMap<u64, Entry>>>,
    best_validation: Option<Recipient<BestValidation>>,
}

impl Registry {
    pub(crate) fn new(best_validation: Option<Recipient<BestValidation>>) -> Registry {
        Registry {
            by_trial: Arc::default(),
            best_validation,
        }
    }

    pub(crate) fn insert(
        &self,
        key: (u64, u64),
        experiment: u64,
        token: String,
        actor: Addr<TrialActor>,
    ) {
        let mut m = self.by_trial.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(
            key.0,
            Entry {
                incarnation: key.1,
                experiment,
                token,
                actor,
            },
        );
    }

    pub(crate) fn remove(&self, key: (u64, u64)) {
        let mut m = self.by_trial.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&key.0).is_some_and(|e| e.incarnation == key.1) {
            m.remove(&key.0);
        }
    }

    fn get(&self, trial: u64) -> Option<Entry> {
        let m = self.by_trial.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&trial).cloned()
    }
}

type Reply = (StatusCode, Json<serde_json::Value>);

fn refuse(status: StatusCode, reason: impl Into<String>) -> Reply {
    (status, Json(json!({ "error": reason.into() })))
}

fn ok(body: serde_json::Value) -> Reply {
    (StatusCode::OK, Json(body))
}

/// The endpoint's routes.
pub(crate) fn router(registry: Registry) -> Router {
    Router::new()
        .route("/trials/{trial}/{incarnation}/training", post(training))
        .route("/trials/{trial}/{incarnation}/validation", post(validation))
        .route(
            "/trials/{trial}/{incarnation}/metrics/{group}",
            post(group_metrics),
        )
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
        .route("/trials/{trial}/{incarnation}/searcher", get(searcher))
        .route("/trials/{trial}/{incarnation}/searcher/next", get(next))
        .route(
            "/trials/{trial}/{incarnation}/best_validation",
            get(best_validation),
        )
        .layer(axum::extract::DefaultBodyLimit::max(REPORT_BODY_MAX_BYTES))
        .with_state(registry)
}

/// Compares secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the incarnation and the token; the incarnation's actor on success.
fn authorize(
    registry: &Registry,
    headers: &HeaderMap,
    trial: u64,
    incarnation: u64,
) -> Result<Addr<TrialActor>, Reply> {
    let Some(e) = registry.get(trial) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no trial {trial} on this node"),
        ));
    };
    if e.incarnation != incarnation {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "stale incarnation {incarnation} of trial {trial} (current {})",
                e.incarnation
            ),
        ));
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same_secret(token.as_bytes(), e.token.as_bytes()) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "missing or wrong token"));
    }
    Ok(e.actor)
}

/// Parses a JSON body, or says what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Reply> {
    serde_json::from_str(body).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

/// Sends an authenticated call to its actor and turns the answer into a reply.
async fn call(actor: Addr<TrialActor>, call: Call) -> Result<Answered, Reply> {
    actor
        .send(call)
        .await
        .map_err(|_| refuse(StatusCode::NOT_FOUND, "trial ended"))
}

fn reply(answered: Answered) -> Reply {
    match answered {
        Answered::Body(b) => ok(b),
        Answered::Refused(status, why) => refuse(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            why,
        ),
        Answered::Preempt(_) | Answered::Next(_) => ok(json!({})),
    }
}

/// Authenticates, parses the body, makes the call (or refuses the body with
/// a 400 that says why), answers.
async fn simple<T: serde::de::DeserializeOwned>(
    registry: Registry,
    headers: HeaderMap,
    (trial, incarnation): (u64, u64),
    body: &str,
    make: impl FnOnce(T) -> Result<Call, String>,
) -> Reply {
    let actor = match authorize(&registry, &headers, trial, incarnation) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let parsed: T = match parse(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let made = match make(parsed) {
        Ok(c) => c,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    match call(actor, made).await {
        Ok(a) => reply(a),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsBody {
    steps_completed: u64,
    metrics: BTreeMap<String, Value>,
}

/// Training or validation metrics.
async fn metrics(
    r: Registry,
    key: (u64, u64),
    headers: HeaderMap,
    body: String,
    kind: MetricKind,
) -> Reply {
    simple(r, headers, key, &body, |b: MetricsBody| {
        resolute_core::command::MetricRecord::check_metrics(&b.metrics)?;
        Ok(Call::Metrics {
            kind,
            steps_completed: b.steps_completed,
            metrics: b.metrics,
        })
    })
    .await
}

async fn training(
    State(r): State<Registry>,
    UrlPath(key): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    metrics(r, key, headers, body, MetricKind::Training).await
}

async fn validation(
    State(r): State<Registry>,
    UrlPath(key): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    metrics(r, key, headers, body, MetricKind::Validation).await
}

/// Metrics of a named group (`report_metrics(group, ...)`): training,
/// validation, or another group (kept and served, not read by the searcher).
async fn group_metrics(
    State(r): State<Registry>,
    UrlPath((t, i, group)): UrlPath<(u64, u64, String)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let kind = match MetricKind::of_group(&group) {
        Ok(k) => k,
        Err(why) => {
            // Authentication first: a caller without the token learns nothing.
            if let Err(e) = authorize(&r, &headers, t, i) {
                return e;
            }
            return refuse(StatusCode::BAD_REQUEST, why);
        }
    };
    metrics(r, (t, i), headers, body, kind).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    progress: f64,
}

async fn progress(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    // Progress is the trial's own business (the searcher's progress comes from
    // validations); it is checked and acknowledged.
    if let Err(e) = authorize(&r, &headers, t, i) {
        return e;
    }
    match parse::<ProgressBody>(&body) {
        Ok(b) if (0.0..=1.0).contains(&b.progress) => ok(json!({})),
        Ok(_) => refuse(StatusCode::BAD_REQUEST, "progress must be between 0 and 1"),
        Err(e) => e,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitBody {
    reason: EarlyExit,
}

async fn early_exit(
    State(r): State<Registry>,
    UrlPath(key): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    simple(r, headers, key, &body, |b: ExitBody| {
        Ok(Call::EarlyExit(b.reason))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginBody {
    #[serde(default)]
    metadata: serde_json::Value,
}

async fn checkpoint_begin(
    State(r): State<Registry>,
    UrlPath(key): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    let body = if body.is_empty() { "{}" } else { &body };
    simple(r, headers, key, body, |b: BeginBody| {
        Ok(Call::CheckpointBegin {
            metadata: b.metadata,
        })
    })
    .await
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
    State(r): State<Registry>,
    UrlPath(key): UrlPath<(u64, u64)>,
    headers: HeaderMap,
    body: String,
) -> Reply {
    simple(r, headers, key, &body, |b: CommitBody| {
        Ok(Call::CheckpointCommit {
            storage_id: b.storage_id,
            steps_completed: b.steps_completed,
            metadata: b.metadata,
        })
    })
    .await
}

async fn checkpoint_restore(
    State(r): State<Registry>,
    UrlPath((t, i, id)): UrlPath<(u64, u64, String)>,
    headers: HeaderMap,
) -> Reply {
    let actor = match authorize(&r, &headers, t, i) {
        Ok(a) => a,
        Err(e) => return e,
    };
    match call(actor, Call::Restore { id }).await {
        Ok(a) => reply(a),
        Err(e) => e,
    }
}

#[derive(Deserialize)]
struct PollQuery {
    timeout_s: Option<u64>,
}

async fn preemption(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    Query(q): Query<PollQuery>,
    headers: HeaderMap,
) -> Reply {
    let actor = match authorize(&r, &headers, t, i) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let mut rx = match call(actor, Call::Preemption).await {
        Ok(Answered::Preempt(rx)) => rx,
        Ok(other) => return reply(other),
        Err(e) => return e,
    };
    // The wait happens here, not in the actor.
    let wait = Duration::from_secs(q.timeout_s.unwrap_or(0).min(LONG_POLL_MAX_S));
    let _ = tokio::time::timeout(wait, rx.wait_for(|p| *p)).await;
    let preempt = *rx.borrow();
    ok(json!({ "preempt": preempt }))
}

async fn preemption_ack(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
) -> Reply {
    match authorize(&r, &headers, t, i) {
        Ok(_) => ok(json!({})),
        Err(e) => e,
    }
}

async fn searcher(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
) -> Reply {
    let actor = match authorize(&r, &headers, t, i) {
        Ok(a) => a,
        Err(e) => return e,
    };
    match call(actor, Call::Target).await {
        Ok(a) => reply(a),
        Err(e) => e,
    }
}

#[derive(Deserialize)]
struct NextQuery {
    steps: u64,
    timeout_s: Option<u64>,
}

/// `GET .../searcher/next?steps=N`: the trial trained to its target `N`; the
/// answer is `{"length": L}` to train on to `L`, `{"length": null}` to finish,
/// or `{"pending": true}` when the node has not decided within the timeout
/// (ask again).
async fn next(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    Query(q): Query<NextQuery>,
    headers: HeaderMap,
) -> Reply {
    let actor = match authorize(&r, &headers, t, i) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let mut rx = match call(actor, Call::Next { steps: q.steps }).await {
        Ok(Answered::Next(rx)) => rx,
        Ok(other) => return reply(other),
        Err(e) => return e,
    };
    let wait = Duration::from_secs(q.timeout_s.unwrap_or(LONG_POLL_MAX_S).min(LONG_POLL_MAX_S));
    let steps = q.steps;
    let answered =
        tokio::time::timeout(wait, rx.wait_for(|a| a.is_some_and(|a| a.reached >= steps))).await;
    match answered {
        Ok(Ok(a)) => match *a {
            Some(a) => ok(json!({ "length": a.target })),
            None => ok(json!({ "pending": true })),
        },
        _ => ok(json!({ "pending": true })),
    }
}

/// The experiment's best validation of the searcher's metric so far (None
/// before any), from the node's replicated state.
async fn best_validation(
    State(r): State<Registry>,
    UrlPath((t, i)): UrlPath<(u64, u64)>,
    headers: HeaderMap,
) -> Reply {
    if let Err(e) = authorize(&r, &headers, t, i) {
        return e;
    }
    let (Some(entry), Some(node)) = (r.get(t), r.best_validation.clone()) else {
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "this node does not serve the experiment's best validation",
        );
    };
    let asked = BestValidation {
        experiment: entry.experiment,
    };
    match node.send(asked).await {
        Ok(best) => ok(json!({ "best_validation": best })),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "the node is not answering"),
    }
}
