//! [`TrialSupervisor`]: the node's trials. It serves the report endpoint,
//! starts one [`TrialActor`] per launched incarnation, routes the node's
//! controls to them, and at its own start kills what a previous life of the
//! node left running. It and its trial actors run on an arbiter (a thread) of
//! their own, so that starting a trial never waits for the node actor (a log
//! write, a burst of peer messages) and the node never waits for a trial.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use actix::prelude::*;

use resolute_agent::LaunchSpec;
use resolute_storage::blob::BlobStore;

use crate::actor::{self, Control, TrialActor};
use crate::endpoint::{self, Registry};
use crate::isolation::{self, Allocator, RunAs};
use crate::{process, Report, TrialError};

/// Where the supervisor keeps its files.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Per-trial working copies, logs, checkpoint staging.
    pub work_root: PathBuf,
    /// The node's data dir (the blob store).
    pub data_dir: PathBuf,
    /// Who the trials run as (`[trial]` in the node config).
    pub run_as: RunAs,
    /// The cluster's key, from which every node of a gang derives the same
    /// secret for its processes' collectives. Without one (a keyless
    /// loopback cluster) the supervisor draws a key of its own: the
    /// processes of one node still meet, a gang's across nodes cannot.
    pub cluster_key: Option<[u8; 32]>,
    /// Who answers a trial's `get_experiment_best_validation` (the node
    /// actor); None: trials are told it is not served.
    pub best_validation: Option<Recipient<crate::BestValidation>>,
}

/// The secret that authenticates the Core API's collectives between the
/// processes of incarnation `incarnation` of `trial` (hex): a key derived
/// from `key`, so that every node of its gang computes the same one, no
/// other incarnation's processes know it, and it tells nothing of `key`.
pub fn collectives_secret(key: &[u8; 32], trial: u64, incarnation: u64) -> String {
    let mut h =
        blake3::Hasher::new_derive_key("resolute 2026-12 collectives of a trial incarnation");
    h.update(key);
    h.update(&trial.to_le_bytes());
    h.update(&incarnation.to_le_bytes());
    h.finalize().to_hex().to_string()
}

/// Start an incarnation (its inputs are in the blob store, its slots are free).
#[derive(Debug, Clone)]
pub struct Launch {
    /// What the node's agent decided.
    pub spec: LaunchSpec,
    /// The hosts of a gang's nodes in rank order (the first is
    /// `MASTER_ADDR`); empty when all its slots are on this node.
    pub hosts: Vec<String>,
}

impl Message for Launch {
    type Result = ();
}

/// A control for one incarnation.
#[derive(Debug, Clone)]
pub struct Signal {
    /// The trial.
    pub trial: u64,
    /// The incarnation.
    pub incarnation: u64,
    /// What.
    pub control: Control,
}

impl Message for Signal {
    type Result = ();
}

/// Kill every incarnation now (the node is stopping).
#[derive(Debug, Clone, Copy)]
pub struct KillAll;

impl Message for KillAll {
    type Result = ();
}

/// The node's trials.
pub struct TrialSupervisor {
    cfg: SupervisorConfig,
    store: BlobStore,
    registry: Registry,
    endpoint: SocketAddr,
    node: Recipient<Report>,
    actors: BTreeMap<(u64, u64), Addr<TrialActor>>,
    /// The uids the running incarnations hold.
    uids: Allocator,
    /// What the collectives' secrets are derived from.
    collectives_key: [u8; 32],
    /// The arbiter the supervisor and its trial actors run on: it lives as long
    /// as the supervisor does.
    _thread: Arbiter,
}

impl TrialSupervisor {
    /// Opens the blob store, kills leftovers of the node's previous life, binds
    /// the report endpoint on 127.0.0.1 and starts serving it, and starts the
    /// supervisor; what the trials do is reported to `node`.
    pub async fn start(
        cfg: SupervisorConfig,
        node: Recipient<Report>,
    ) -> Result<(Addr<TrialSupervisor>, SocketAddr), TrialError> {
        std::fs::create_dir_all(&cfg.work_root)
            .map_err(|e| TrialError::Io(format!("{}: {e}", cfg.work_root.display())))?;
        cfg.run_as.check_privileges()?;
        if cfg.run_as.isolates() {
            isolation::lock_down(&cfg.data_dir, &cfg.work_root)?;
        }
        crate::client::install(&crate::client::dir(&cfg.work_root))?;
        let leftovers = process::kill_leftovers(&cfg.work_root);
        if leftovers > 0 {
            eprintln!(
                "killed {leftovers} trial process group(s) left running by this node's previous life"
            );
        }
        let store = BlobStore::open(&cfg.data_dir).map_err(|e| TrialError::Io(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| TrialError::Io(format!("report endpoint: {e}")))?;
        let endpoint = listener
            .local_addr()
            .map_err(|e| TrialError::Io(e.to_string()))?;
        let registry = Registry::new(cfg.best_validation.clone());
        let app = endpoint::router(registry.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let arbiter =
            Arbiter::try_new().map_err(|e| TrialError::Io(format!("the trials' thread: {e}")))?;
        let handle = arbiter.handle();
        let collectives_key = match cfg.cluster_key {
            Some(k) => k,
            None => process::random_key()?,
        };
        let supervisor = TrialSupervisor {
            uids: Allocator::new(cfg.run_as),
            collectives_key,
            cfg,
            store,
            registry,
            endpoint,
            node,
            actors: BTreeMap::new(),
            _thread: arbiter,
        };
        let addr = TrialSupervisor::start_in_arbiter(&handle, |_| supervisor);
        Ok((addr, endpoint))
    }
}

impl Actor for TrialSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::SUPERVISOR_MAILBOX);
    }
}

impl Handler<Launch> for TrialSupervisor {
    type Result = ();

    fn handle(&mut self, launch: Launch, ctx: &mut Context<Self>) {
        let key = (launch.spec.trial, launch.spec.incarnation);
        let experiment = launch.spec.experiment;
        self.actors.retain(|_, a| a.connected());
        if self.actors.contains_key(&key) {
            return; // Already running: a repeated launch changes nothing.
        }
        let actors = &self.actors;
        let identity = self.uids.take(key, |k| actors.contains_key(k));
        let launched = identity.and_then(|id| Ok((id, process::secret()?)));
        let (identity, token) = match launched {
            Ok(t) => t,
            Err(e) => {
                let report = resolute_agent::TrialReport::LaunchFailed {
                    trial: key.0,
                    incarnation: key.1,
                    reason: e.to_string(),
                };
                let node = self.node.clone();
                ctx.spawn(
                    async move {
                        let _ = node.send(Report(report)).await;
                    }
                    .into_actor(self),
                );
                return;
            }
        };
        let actor = TrialActor::new(actor::Start {
            spec: launch.spec,
            hosts: launch.hosts,
            work_root: self.cfg.work_root.clone(),
            store: self.store.clone(),
            registry: self.registry.clone(),
            token: token.clone(),
            endpoint: self.endpoint,
            node: self.node.clone(),
            identity,
            collectives_secret: collectives_secret(&self.collectives_key, key.0, key.1),
        })
        .start();
        self.registry.insert(key, experiment, token, actor.clone());
        self.actors.insert(key, actor);
    }
}

impl Handler<Signal> for TrialSupervisor {
    type Result = ();

    fn handle(&mut self, s: Signal, _ctx: &mut Context<Self>) {
        if let Some(actor) = self.actors.get(&(s.trial, s.incarnation)) {
            // A control the actor cannot take (stopped, or its mailbox full) is
            // not lost: the agent escalates a stop that has no effect.
            let _ = actor.try_send(s.control);
        }
    }
}

impl Handler<KillAll> for TrialSupervisor {
    type Result = ();

    fn handle(&mut self, _: KillAll, _ctx: &mut Context<Self>) {
        for actor in self.actors.values() {
            let _ = actor.try_send(Control::Kill);
        }
    }
}

/// Forwards trial reports into a channel: for tools and tests that drive
/// trials without a node.
pub struct ReportSink {
    tx: tokio::sync::mpsc::Sender<resolute_agent::TrialReport>,
}

impl ReportSink {
    /// A sink and the channel it fills (`depth` reports deep; a full channel
    /// holds the reporting trial up, as a busy node would).
    pub fn start(
        depth: usize,
    ) -> (
        Addr<ReportSink>,
        tokio::sync::mpsc::Receiver<resolute_agent::TrialReport>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (ReportSink { tx }.start(), rx)
    }
}

impl Actor for ReportSink {
    type Context = Context<Self>;
}

impl Handler<Report> for ReportSink {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, Report(report): Report, _ctx: &mut Context<Self>) -> Self::Result {
        let tx = self.tx.clone();
        Box::pin(async move {
            let _ = tx.send(report).await;
        })
    }
}
