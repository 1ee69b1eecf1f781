//! The node actor's typed messages from the REST API: proposals, queries (each
//! answered from the node's state on the actor), a checkpoint download, and
//! the graceful stop.

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use resolute_agent::{Event, FETCH_ATTEMPTS, FETCH_RETRY_MS};
use resolute_core::command::{Command, Reply};
pub use resolute_core::state::auth::{Access, Denied};
use resolute_core::state::TrialState;
use resolute_core::{NodeError, NodeId};

use super::NodeActor;
use crate::net_actor::{self, NetActor};
use crate::views;

/// Propose a command on a user's authority (the API authenticated them; `None`
/// only for what the node asks for itself); the answer once it applied (or
/// why not).
#[derive(Debug)]
pub struct Propose(pub Command, pub Option<String>);

impl Message for Propose {
    type Result = Result<Reply, NodeError>;
}

impl Handler<Propose> for NodeActor {
    type Result = ResponseFuture<Result<Reply, NodeError>>;

    fn handle(&mut self, Propose(command, user): Propose, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let id = self.driver.next_id();
        self.waiting.insert(id, tx);
        self.step(ctx, Event::Propose { id, command, user });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(NodeError::Refused("the node is stopping".into())))
        })
    }
}

/// Declares a query: a message whose answer the node computes on the spot.
macro_rules! query {
    ($(#[$doc:meta])* $name:ident $(($arg:ty))?, $result:ty, |$act:ident $(, $a:ident)?| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name $((pub $arg))?;

        impl Message for $name {
            type Result = $result;
        }

        impl Handler<$name> for NodeActor {
            type Result = MessageResult<$name>;

            #[allow(unused_variables)]
            fn handle(&mut self, msg: $name, _ctx: &mut Context<Self>) -> Self::Result {
                let $act = &*self;
                $(let $a = msg.0;)?
                MessageResult($body)
            }
        }
    };
}

query!(
    /// The workspaces whose experiments a user may read (None: all).
    ReadableWorkspaces(String), Option<std::collections::BTreeSet<String>>,
    |act, user| act.driver.node().state().readable_workspaces(Some(&user))
);
query!(
    /// Whose a live token is (`None`: unknown, revoked, expired, or its user
    /// deactivated).
    TokenOwner(String), Option<TokenOwnerInfo>, |act, id| {
        let state = act.driver.node().state();
        state.live_token(&id, crate::wall_ms()).map(|t| TokenOwnerInfo {
            user: t.user.clone(),
            hash: t.hash.clone(),
            cluster_admin: state.is_cluster_admin(Some(&t.user)),
        })
    }
);
query!(
    /// Whether a user may do something (see [`Access`]).
    Allowed((String, Access)), Result<(), Denied>, |act, asked| {
        act.driver.node().state().check_access(&asked.0, &asked.1)
    }
);
query!(
    /// The users (for a cluster admin) and the caller's own tokens (all
    /// tokens for a cluster admin), without their hashes.
    UsersView(String), Value, |act, user| views::users(act.driver.node().state(), &user)
);

/// A live token's user, and the hash to check its secret against.
#[derive(Debug, Clone)]
pub struct TokenOwnerInfo {
    /// The user.
    pub user: String,
    /// The argon2 hash from the log.
    pub hash: String,
    /// Whether the user administers the cluster.
    pub cluster_admin: bool,
}

query!(
    /// One experiment.
    ExperimentView(u64), Option<Value>, |act, id| views::experiment(act.driver.node(), id)
);
query!(
    /// An experiment's trials.
    ExperimentTrials(u64), Option<Value>,
    |act, id| views::experiment_trials(act.driver.node(), act.driver.agent(), id)
);
query!(
    /// One trial.
    TrialView(u64), Option<Value>,
    |act, id| views::trial(act.driver.node(), act.driver.agent(), id)
);
query!(
    /// The cluster as this node sees it.
    ClusterView, Value, |act| {
        let agent = act.driver.agent();
        let disk = json!({
            "free_mib": agent.disk_free_bytes().map(|b| b >> 20),
            "low_water_mib": agent.disk_low_water_bytes() >> 20,
            "low": agent.disk_low().is_some(),
            "log_reserve_mib": act.log_reserve_bytes >> 20,
            "log_reserve_kept": act.store.has_reserve(),
            "log_reserve_released": act.store.reserve_released(),
        });
        views::cluster(act.driver.node(), &act.local, disk)
    }
);
query!(
    /// Whether this node's disk is below its low-water mark (uploads are
    /// refused then), with what it measured.
    DiskLowNow, Option<resolute_core::command::DiskLow>, |act| act.driver.agent().disk_low()
);
query!(
    /// Where a trial's log lines are: this node's file, the other nodes' APIs.
    TrialLogSources(u64), Option<LogSources>, |act, id| act.log_sources(id)
);

/// Where to read a trial's log from.
#[derive(Clone)]
pub struct LogSources {
    /// This node's id (hex), for the lines it serves.
    pub me: String,
    /// This node's log file of the trial.
    pub path: PathBuf,
    /// The other members, asked for their lines over the cluster's own
    /// authenticated channel (libp2p), never over HTTP to an address a record
    /// claims.
    pub peers: Vec<NodeId>,
    /// The swarm, to ask them.
    pub net: resolute_net::NetHandle,
    /// Whether the trial has ended.
    pub ended: bool,
}

impl NodeActor {
    fn log_sources(&self, id: u64) -> Option<LogSources> {
        let t = self.driver.node().state().trials.get(&id)?;
        let me = self.local.node;
        Some(LogSources {
            me: format!("{me:016x}"),
            path: resolute_trial::log_path(&self.local.work_root, id),
            peers: self
                .driver
                .node()
                .state()
                .nodes
                .keys()
                .copied()
                .filter(|n| *n != me)
                .collect(),
            net: self.peers.outbox.handle(),
            ended: matches!(t.state, TrialState::Done(_)),
        })
    }
}

/// Why a checkpoint cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobUnavailable {
    /// No such checkpoint was ever recorded.
    NotFound,
    /// It exists, but no holder could be reached.
    Unreachable(String),
}

/// A checkpoint's packed blob on this node's disk, fetched from a holder first
/// when this node has no copy.
#[derive(Debug)]
pub struct Checkpoint(pub String);

impl Message for Checkpoint {
    type Result = Result<PathBuf, BlobUnavailable>;
}

impl Handler<Checkpoint> for NodeActor {
    type Result = ResponseFuture<Result<PathBuf, BlobUnavailable>>;

    fn handle(&mut self, Checkpoint(uuid): Checkpoint, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.blobs.clone();
        if store.has(&uuid) {
            return Box::pin(async move { Ok(store.path(&uuid)) });
        }
        let me = self.local.node;
        let holders: Option<Vec<u64>> = self
            .driver
            .node()
            .state()
            .checkpoints
            .get(&uuid)
            .map(|c| c.holders.iter().copied().filter(|n| *n != me).collect());
        let Some(holders) = holders else {
            return Box::pin(async { Err(BlobUnavailable::NotFound) });
        };
        let net = self.peers.net.clone();
        Box::pin(async move {
            fetch_patiently(&net, &uuid, holders)
                .await
                .map(|()| store.path(&uuid))
                .map_err(BlobUnavailable::Unreachable)
        })
    }
}

/// Fetches a blob for a download, trying as patiently as a launch does (the
/// agent's `FETCH_ATTEMPTS`, pauses growing by `FETCH_RETRY_MS`): a holder's
/// address may not have reached this node yet, or a holder may be restarting.
async fn fetch_patiently(
    net: &Addr<NetActor>,
    digest: &str,
    holders: Vec<u64>,
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..FETCH_ATTEMPTS {
        let asked = net
            .send(net_actor::Fetch {
                digest: digest.to_string(),
                holders: holders.clone(),
            })
            .await;
        match asked {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(e) => last = e.to_string(),
        }
        let pause = FETCH_RETRY_MS * u64::from(attempt + 1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Err(last)
}

/// Stop gracefully: drain, let the trials checkpoint and move, leave the Raft
/// group, stop the swarm. Answered when that is done (the agent bounds it).
#[derive(Debug)]
pub struct Leave;

impl Message for Leave {
    type Result = ();
}

impl Handler<Leave> for NodeActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Leave, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.left {
            let _ = tx.send(());
        } else {
            self.leaving.push(tx);
            self.step(ctx, Event::Leave);
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Most bytes of log lines one node sends a peer in one answer (the newest
/// lines that fit): under the wire's message limit.
pub const PEER_LOG_BYTES_MAX: usize = 8 << 20;

/// A trial's lines on this node as JSON objects, each with the node that read it.
pub fn local_log_lines(path: &std::path::Path, me: &str, since_ms: u64) -> Vec<Value> {
    resolute_trial::read_logs(path, since_ms)
        .iter()
        .map(|l| json!({"time_ms": l.time_ms, "node": me, "stream": l.stream, "line": l.line}))
        .collect()
}

impl NodeActor {
    /// A member asks for a trial's lines here, for a user: the member must be
    /// one, and the user must be allowed to read the trial here too.
    pub(super) fn serve_peer_logs(
        &self,
        from: NodeId,
        trial: u64,
        since_ms: u64,
        user: String,
        reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, String>>,
    ) {
        let state = self.driver.node().state();
        if !state.nodes.contains_key(&from) {
            let _ = reply.send(Err(format!("node {from:016x} is not a member")));
            return;
        }
        if let Err(e) = state.check_access(&user, &Access::ReadTrial(trial)) {
            let _ = reply.send(Err(format!("{e:?}")));
            return;
        }
        let path = resolute_trial::log_path(&self.local.work_root, trial);
        let me = format!("{:016x}", self.local.node);
        tokio::task::spawn_blocking(move || {
            // The newest lines that fit (a long log is followed, not dumped):
            // each line's JSON and its comma, plus the array's brackets.
            let encoded: Vec<Vec<u8>> = local_log_lines(&path, &me, since_ms)
                .iter()
                .map(|l| serde_json::to_vec(l).unwrap_or_default())
                .collect();
            let mut size = 2;
            let keep = encoded
                .iter()
                .rev()
                .take_while(|l| {
                    size += l.len() + 1;
                    size <= PEER_LOG_BYTES_MAX
                })
                .count();
            let newest = &encoded[encoded.len() - keep..];
            let mut bytes = Vec::with_capacity(size);
            bytes.push(b'[');
            bytes.extend(newest.join(&b','));
            bytes.push(b']');
            let _ = reply.send(Ok(bytes));
        });
    }
}

/// Hands the node's applied batches to its tracking writer; the answer says
/// when they are written (queries of the store wait for it first).
#[derive(Debug)]
pub struct TrackingFlushed;

impl Message for TrackingFlushed {
    type Result = Option<std::sync::mpsc::Receiver<()>>;
}

impl Handler<TrackingFlushed> for NodeActor {
    type Result = Option<std::sync::mpsc::Receiver<()>>;

    fn handle(&mut self, _: TrackingFlushed, _ctx: &mut Context<Self>) -> Self::Result {
        Some(self.flush_for_query())
    }
}

/// A trial's `get_experiment_best_validation` (asked through its report
/// endpoint).
impl Handler<resolute_trial::BestValidation> for NodeActor {
    type Result = MessageResult<resolute_trial::BestValidation>;

    fn handle(
        &mut self,
        msg: resolute_trial::BestValidation,
        _ctx: &mut Context<Self>,
    ) -> Self::Result {
        MessageResult(views::experiment_best(self.driver.node(), msg.experiment))
    }
}
