//! [`TrialActor`]: one running trial incarnation. It owns the incarnation's
//! process group, its log capture, its staged checkpoints and its stop, target
//! and go-on state; the report endpoint hands it the trial's calls (already
//! authenticated), and it reports to the node what the trial did.
//!
//! Failure: the process group is a guard that SIGKILLs it when the actor goes
//! away for any reason (stopped, or dropped by a panic), and the task waiting
//! for the process reports its exit to the node directly when the actor is no
//! longer there, so the node's agent always learns that the incarnation ended.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::{json, Value as Json};
use tokio::sync::watch;

use resolute_agent::{EarlyExit, LaunchSpec, ProcessExit, TrialReport};
use resolute_core::command::MetricKind;
use resolute_storage::blob::BlobStore;
use resolute_types::Value;

use crate::endpoint::Registry;
use crate::isolation::{self, Identity};
use crate::process::{self, Dirs, Group, LogFile, Tail};
use crate::{Report, TrialError};

/// What the node tells an incarnation (through the supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Checkpoint and stop (the preemption signal the trial polls).
    Preempt,
    /// The searcher changed the target.
    Retarget(u64),
    /// The answer to the trial at its target: go on to this target, or finish.
    Proceed(Option<u64>),
    /// SIGTERM to the process group.
    Terminate,
    /// SIGKILL to the process group.
    Kill,
}

impl Message for Control {
    type Result = ();
}

/// The trial's answer to "may I go on?" (`GET .../searcher/next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The steps it reached when it asked.
    pub(crate) reached: u64,
    /// Go on to this target (None: finish).
    pub(crate) target: Option<u64>,
}

/// One incarnation.
pub struct TrialActor {
    spec: LaunchSpec,
    hosts: Vec<String>,
    work_root: PathBuf,
    store: BlobStore,
    registry: Registry,
    token: String,
    report_url: String,
    node: Recipient<Report>,
    /// Who the process runs as (`None`: the node's user).
    identity: Option<Identity>,
    /// Authenticates its processes' collectives (`process::Runtime`).
    collectives_secret: String,
    dirs: Option<Dirs>,
    group: Option<Group>,
    tail: Tail,
    preempt: watch::Sender<bool>,
    target: watch::Sender<Option<u64>>,
    answer: watch::Sender<Option<Answer>>,
    /// The steps of the last `Reached` told to the node (asked once per target).
    asked: Option<u64>,
    /// Staged checkpoint directories by storage id, with their metadata.
    staging: BTreeMap<String, (PathBuf, Json)>,
    /// Committed checkpoints: storage id to uuid.
    committed: BTreeMap<String, String>,
}

/// What the supervisor gives a new actor.
pub(crate) struct Start {
    pub(crate) spec: LaunchSpec,
    pub(crate) hosts: Vec<String>,
    pub(crate) work_root: PathBuf,
    pub(crate) store: BlobStore,
    pub(crate) registry: Registry,
    pub(crate) token: String,
    pub(crate) endpoint: std::net::SocketAddr,
    pub(crate) node: Recipient<Report>,
    pub(crate) identity: Option<Identity>,
    pub(crate) collectives_secret: String,
}

impl TrialActor {
    pub(crate) fn new(s: Start) -> TrialActor {
        let url = format!(
            "http://{}/trials/{}/{}",
            s.endpoint, s.spec.trial, s.spec.incarnation
        );
        let target = s.spec.target;
        TrialActor {
            spec: s.spec,
            hosts: s.hosts,
            work_root: s.work_root,
            store: s.store,
            registry: s.registry,
            token: s.token,
            report_url: url,
            node: s.node,
            identity: s.identity,
            collectives_secret: s.collectives_secret,
            dirs: None,
            group: None,
            tail: Arc::new(Mutex::new(Default::default())),
            preempt: watch::channel(false).0,
            target: watch::channel(target).0,
            answer: watch::channel(None).0,
            asked: None,
            staging: BTreeMap::new(),
            committed: BTreeMap::new(),
        }
    }

    fn key(&self) -> (u64, u64) {
        (self.spec.trial, self.spec.incarnation)
    }

    /// Reports to the node without holding the actor up (the node's mailbox is
    /// bounded: a full one delays this report, never drops it). The send is a
    /// task of its own, not of the actor's context: a report made just before
    /// the actor stops (its exit) still arrives.
    fn report(&self, _ctx: &mut Context<Self>, report: TrialReport) {
        let node = self.node.clone();
        actix::spawn(async move {
            let _ = node.send(Report(report)).await;
        });
    }

    /// The launch could not happen: say why, and stop.
    fn failed(&mut self, ctx: &mut Context<Self>, reason: String) {
        let (trial, incarnation) = self.key();
        self.report(
            ctx,
            TrialReport::LaunchFailed {
                trial,
                incarnation,
                reason,
            },
        );
        ctx.stop();
    }

    /// Starts the process (its directories are ready).
    fn spawn(&mut self, ctx: &mut Context<Self>, dirs: Dirs, checkpoint: Option<PathBuf>) {
        let client = crate::client::dir(&self.work_root);
        let rt = process::Runtime {
            dirs: &dirs,
            client: &client,
            checkpoint: checkpoint.as_deref(),
            report_url: self.report_url.clone(),
            token: &self.token,
            hosts: &self.hosts,
            identity: self.identity,
            collectives_secret: &self.collectives_secret,
        };
        let mut child = match process::spawn(&self.spec, &rt) {
            Ok(c) => c,
            Err(e) => return self.failed(ctx, e.to_string()),
        };
        self.group = child.id().map(|p| Group::new(p as i32));
        let log = Arc::new(Mutex::new(LogFile::open(&dirs.trial.join("trial.log"))));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(process::capture(
                "stdout",
                out,
                log.clone(),
                self.tail.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(process::capture(
                "stderr",
                err,
                log,
                self.tail.clone(),
            )));
        }
        let (me, node, tail) = (ctx.address(), self.node.clone(), self.tail.clone());
        let (trial, incarnation) = self.key();
        let group_file = process::group_file(&dirs.trial, incarnation);
        self.dirs = Some(dirs);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().await.ok();
            for r in readers {
                let _ = r.await;
            }
            let _ = std::fs::remove_file(group_file);
            let exit = ProcessExit {
                code: status.and_then(|s| s.code()),
                signal: status.and_then(|s| s.signal()),
                last_lines: process::last_lines(&tail),
            };
            if let Err(SendError::Closed(Ended(exit))) = me.try_send(Ended(exit)) {
                // The actor is gone: the node hears of the exit all the same.
                let report = TrialReport::Exited {
                    trial,
                    incarnation,
                    exit,
                };
                let _ = node.send(Report(report)).await;
            }
        });
        self.report(ctx, TrialReport::Launched { trial, incarnation });
    }
}

impl Actor for TrialActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::TRIAL_MAILBOX);
        // Copying the model directory and unpacking the checkpoint are blocking
        // file work: off the actors' thread, and nothing else happens meanwhile.
        // With neither, making the working directory is all there is to do.
        if self.spec.model_digest.is_none() && self.spec.latest_checkpoint.is_none() {
            match process::prepare(&self.work_root, &self.store, &self.spec, self.identity) {
                Ok((dirs, checkpoint)) => self.spawn(ctx, dirs, checkpoint),
                Err(e) => self.failed(ctx, e.to_string()),
            }
            return;
        }
        let (root, store, spec, identity) = (
            self.work_root.clone(),
            self.store.clone(),
            self.spec.clone(),
            self.identity,
        );
        let prepare =
            tokio::task::spawn_blocking(move || process::prepare(&root, &store, &spec, identity));
        ctx.wait(
            prepare
                .into_actor(self)
                .map(|prepared, act, ctx| match prepared {
                    Ok(Ok((dirs, checkpoint))) => act.spawn(ctx, dirs, checkpoint),
                    Ok(Err(e)) => act.failed(ctx, e.to_string()),
                    Err(e) => act.failed(ctx, e.to_string()),
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.registry.remove(self.key());
        // Dropping the group SIGKILLs a process that is still running.
        self.group = None;
    }
}

/// The process ended.
struct Ended(ProcessExit);

impl Message for Ended {
    type Result = ();
}

impl Handler<Ended> for TrialActor {
    type Result = ();

    fn handle(&mut self, Ended(exit): Ended, ctx: &mut Context<Self>) {
        if let Some(g) = self.group.as_mut() {
            g.exited();
        }
        // Tidied before the exit is reported: the node may launch the next
        // incarnation here as soon as it hears of it, and that one unpacks
        // into the same trial directory.
        let dirs = self.dirs.take();
        let tidy = tokio::task::spawn_blocking(move || dirs.as_ref().map(process::tidy));
        ctx.wait(tidy.into_actor(self).map(move |_, act, ctx| {
            let (trial, incarnation) = act.key();
            act.report(
                ctx,
                TrialReport::Exited {
                    trial,
                    incarnation,
                    exit,
                },
            );
            ctx.stop();
        }));
    }
}

impl Handler<Control> for TrialActor {
    type Result = ();

    fn handle(&mut self, control: Control, _ctx: &mut Context<Self>) {
        use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
        match control {
            Control::Preempt => {
                self.preempt.send_replace(true);
            }
            Control::Retarget(t) => {
                self.target.send_replace(Some(t));
            }
            Control::Proceed(target) => {
                if target.is_some() {
                    self.target.send_replace(target);
                }
                let reached = self.asked.take().unwrap_or(0);
                self.answer.send_replace(Some(Answer { reached, target }));
            }
            Control::Terminate => {
                if let Some(g) = &self.group {
                    g.signal(SIGTERM);
                }
            }
            Control::Kill => {
                if let Some(g) = &self.group {
                    g.signal(SIGKILL);
                }
            }
        }
    }
}

// ----- the trial's calls (from the report endpoint) ---------------------------

/// A call of the trial's, already authenticated; the answer is JSON or an error
/// with its HTTP status.
pub(crate) enum Call {
    /// Training or validation metrics.
    Metrics {
        kind: MetricKind,
        steps_completed: u64,
        metrics: BTreeMap<String, Value>,
    },
    /// The code ends early, and why.
    EarlyExit(EarlyExit),
    /// A staging directory for a new checkpoint.
    CheckpointBegin { metadata: Json },
    /// The staged checkpoint is written: pack and store it.
    CheckpointCommit {
        storage_id: String,
        steps_completed: u64,
        metadata: Json,
    },
    /// A checkpoint's files, unpacked (a storage id of this trial, or a uuid).
    Restore { id: String },
    /// The preemption flag to wait on.
    Preemption,
    /// The trial trained to `steps` and asks whether to go on.
    Next { steps: u64 },
    /// The current target.
    Target,
}

/// The answer to a call.
pub(crate) enum Answered {
    /// A JSON body.
    Body(Json),
    /// A refusal: HTTP status and message.
    Refused(u16, String),
    /// The preemption flag.
    Preempt(watch::Receiver<bool>),
    /// The go-on answer to wait for.
    Next(watch::Receiver<Option<Answer>>),
}

impl Message for Call {
    type Result = Answered;
}

impl<A, M> actix::dev::MessageResponse<A, M> for Answered
where
    A: Actor,
    M: Message<Result = Answered>,
{
    fn handle(self, _ctx: &mut A::Context, tx: Option<actix::dev::OneshotSender<Answered>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl Handler<Call> for TrialActor {
    type Result = ResponseActFuture<Self, Answered>;

    fn handle(&mut self, call: Call, ctx: &mut Context<Self>) -> Self::Result {
        let (trial, incarnation) = self.key();
        let done =
            |a: Answered| Box::pin(actix::fut::ready(a)) as ResponseActFuture<Self, Answered>;
        match call {
            Call::Metrics {
                kind,
                steps_completed,
                metrics,
            } => {
                // Waits for room in the node's mailbox: a trial that reports
                // faster than the node takes reports is slowed, not dropped.
                let node = self.node.clone();
                let report = TrialReport::Metrics {
                    trial,
                    incarnation,
                    kind,
                    steps_completed,
                    metrics,
                };
                Box::pin(
                    async move { node.send(Report(report)).await }
                        .into_actor(self)
                        .map(|sent, _, _| match sent {
                            Ok(()) => Answered::Body(json!({})),
                            Err(_) => Answered::Refused(503, "the node is shutting down".into()),
                        }),
                )
            }
            Call::EarlyExit(reason) => {
                self.report(
                    ctx,
                    TrialReport::EarlyExit {
                        trial,
                        incarnation,
                        reason,
                    },
                );
                done(Answered::Body(json!({})))
            }
            Call::CheckpointBegin { metadata } => done(self.begin(metadata)),
            Call::CheckpointCommit {
                storage_id,
                steps_completed,
                metadata,
            } => self.commit(storage_id, steps_completed, metadata),
            Call::Restore { id } => self.restore(id),
            Call::Preemption => done(Answered::Preempt(self.preempt.subscribe())),
            Call::Next { steps } => {
                let answered = self.answer.borrow().is_some_and(|a| a.reached >= steps);
                if !answered && self.asked != Some(steps) {
                    self.asked = Some(steps);
                    self.report(
                        ctx,
                        TrialReport::Reached {
                            trial,
                            incarnation,
                            steps,
                        },
                    );
                }
                done(Answered::Next(self.answer.subscribe()))
            }
            Call::Target => done(Answered::Body(json!({ "length": *self.target.borrow() }))),
        }
    }
}

impl TrialActor {
    fn begin(&mut self, metadata: Json) -> Answered {
        let Some(dirs) = &self.dirs else {
            return Answered::Refused(409, "the trial has not started".into());
        };
        let id = match process::secret() {
            Ok(x) => x[..32].to_string(),
            Err(e) => return Answered::Refused(500, e.to_string()),
        };
        let path = dirs.trial.join("staging").join(&id);
        if let Err(err) = std::fs::create_dir_all(&path) {
            return Answered::Refused(500, format!("{}: {err}", path.display()));
        }
        if let Some(identity) = self.identity {
            if let Err(e) = isolation::hand_over(&path, identity) {
                return Answered::Refused(500, e.to_string());
            }
        }
        self.staging.insert(id.clone(), (path.clone(), metadata));
        Answered::Body(json!({ "storage_id": id, "path": path }))
    }

    fn commit(
        &mut self,
        storage_id: String,
        steps_completed: u64,
        _metadata: Json,
    ) -> ResponseActFuture<Self, Answered> {
        let (Some((staging, _)), Some(dirs)) = (self.staging.get(&storage_id).cloned(), &self.dirs)
        else {
            let refused = Answered::Refused(400, format!("unknown storage_id {storage_id:?}"));
            return Box::pin(actix::fut::ready(refused));
        };
        // Packing can take long (checkpoints are large): off the actors' thread.
        let (store, trial_dir, id) = (self.store.clone(), dirs.trial.clone(), storage_id.clone());
        let identity = self.identity;
        let packed = tokio::task::spawn_blocking(move || {
            process::commit_checkpoint(&store, &trial_dir, &id, &staging, identity)
        });
        Box::pin(packed.into_actor(self).map(move |result, act, ctx| {
            let (uuid, size) = match result {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return Answered::Refused(400, format!("checkpoint: {e}")),
                Err(e) => return Answered::Refused(500, e.to_string()),
            };
            act.staging.remove(&storage_id);
            act.committed.insert(storage_id, uuid.clone());
            let (trial, incarnation) = act.key();
            act.report(
                ctx,
                TrialReport::CheckpointSaved {
                    trial,
                    incarnation,
                    uuid: uuid.clone(),
                    steps_completed,
                    size,
                },
            );
            Answered::Body(json!({ "uuid": uuid }))
        }))
    }

    fn restore(&mut self, id: String) -> ResponseActFuture<Self, Answered> {
        let Some(dirs) = &self.dirs else {
            let refused = Answered::Refused(409, "the trial has not started".into());
            return Box::pin(actix::fut::ready(refused));
        };
        // Only what this trial saved, or the checkpoint it was started from
        // (its own earlier incarnation's, or the one the searcher gave it):
        // the node's blob store holds other experiments' checkpoints too.
        let digest = self.committed.get(&id).cloned().unwrap_or(id);
        let own = self.committed.values().any(|d| *d == digest)
            || self.spec.latest_checkpoint.as_deref() == Some(digest.as_str());
        if !own {
            let refused = Answered::Refused(
                403,
                format!("checkpoint {digest} is not this trial's to restore"),
            );
            return Box::pin(actix::fut::ready(refused));
        }
        let (store, trial_dir, identity) = (self.store.clone(), dirs.trial.clone(), self.identity);
        let d = digest.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            let path = process::unpack(&store, &trial_dir, &d)?;
            if let Some(id) = identity {
                isolation::share(&path, id)?;
            }
            Ok(path)
        });
        Box::pin(
            unpacked
                .into_actor(self)
                .map(move |result, _, _| match result {
                    Ok(Ok(path)) => Answered::Body(json!({ "uuid": digest, "path": path })),
                    Ok(Err(TrialError::MissingCheckpoint(d))) => {
                        Answered::Refused(404, format!("no checkpoint {d} on this node"))
                    }
                    Ok(Err(e)) => Answered::Refused(400, e.to_string()),
                    Err(e) => Answered::Refused(500, e.to_string()),
                }),
        )
    }
}
