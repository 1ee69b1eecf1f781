//! [`NodeActor`]: the node. It owns the [`Driver`] (`core::Node` and the node
//! agent, where every decision is made) and the durable log store, feeds the
//! driver what happens (ticks, swarm events, trial reports, fetch results,
//! NVML's answers, API proposals) and carries out its actions: sends and
//! gossip through the [`NetActor`], writes to the store (fsync before the
//! acknowledgement), launches and signals through the [`TrialSupervisor`],
//! health checks through the [`GpuMonitor`]. It also keeps what only this node
//! knows: its connections, the peers' gossiped records and addresses.
//!
//! Failure: a log store that fails to write leaves the node unable to keep its
//! promises, so the process exits with code 3 rather than acknowledge what is
//! not durable; it restarts from its data dir.

mod messages;
mod peer_blobs;
mod tracking;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use libp2p::Multiaddr;
use tokio::sync::oneshot;

use resolute_agent::{Action, Driver, Event};
use resolute_core::command::{ProposalId, Reply};
use resolute_core::{NodeError, NodeId};
use resolute_net::{Announcement, NetEvent};
use resolute_storage::blob::BlobStore;
use resolute_storage::{DurableStore, LogStore};
use resolute_trial::{Control, KillAll, Launch, Report, Signal, TrialSupervisor};

use crate::gpu_monitor::{CheckGpus, GpuMonitor};
use crate::net_actor::{self, NetActor, Outbox, Publish, SetMembers};
use crate::setup::{host_of, write_atomically, PEERS_FILE};

pub use messages::{
    local_log_lines, Access, Allowed, BlobUnavailable, Checkpoint, ClusterView, Denied, DiskLowNow,
    ExperimentTrials, ExperimentView, Leave, LogSources, Propose, ReadableWorkspaces, TokenOwner,
    TokenOwnerInfo, TrackingFlushed, TrialLogSources, TrialView, UsersView,
};

/// Mailbox of the node: swarm events, trial reports, API calls.
pub const NODE_MAILBOX: usize = 1024;
/// Ticks between this node's gossiped records.
pub const ANNOUNCE_EVERY_TICKS: u64 = 10;
/// How long a gossiped record is believed.
pub const ANNOUNCEMENT_TTL_MS: u64 = 10_000;
/// How often a node waiting to be admitted says what admits it.
pub const JOIN_WAIT_LOG_EVERY_MS: u64 = 30_000;
pub use peer_blobs::{
    PEER_BLOBS_FETCHING_MAX, PEER_BLOBS_KEPT_MAX, PEER_BLOB_KEEP_MS, PEER_INLINE_MAX_BYTES,
};
pub use tracking::{TRACK_COPY_ASK_EVERY_TICKS, TRACK_PENDING_BATCHES_MAX};
/// `MASTER_ADDR` when rank 0's address is unknown.
pub const LOOPBACK_HOST: &str = "127.0.0.1";

/// What only this node knows.
pub struct Local {
    /// This node's id.
    pub node: NodeId,
    /// Where the REST API listens.
    pub api: String,
    /// Its multiaddrs.
    pub listen: Vec<Multiaddr>,
    /// The peers it has a connection to now.
    pub connected: BTreeSet<NodeId>,
    /// How it is connected to each (as the swarm last said).
    pub links: Vec<resolute_net::PeerLink>,
    /// Whether other sites can dial it (as the swarm last said).
    pub reachability: resolute_net::Reachability,
    /// Each node's latest gossiped record (this node's own included).
    pub records: BTreeMap<NodeId, Announcement>,
    /// Gossiped records ignored (not a member's) or trimmed (an API address
    /// the member may not claim).
    pub ignored_records: u64,
    /// Requests from non-members the swarm refused (removed nodes, strangers
    /// with the cluster key).
    pub denied_requests: u64,
    /// Where its trials' files are.
    pub work_root: PathBuf,
    /// Its latest blob fetches, oldest first (at most [`FETCHES_SHOWN_MAX`]).
    pub fetches: VecDeque<serde_json::Value>,
    /// The latency class its timing was chosen for (`[node] latency`).
    pub latency: resolute_core::node::LatencyClass,
}

/// Blob fetches `cluster status` lists.
pub const FETCHES_SHOWN_MAX: usize = 16;

impl Local {
    /// Remembers a finished fetch for the operator: from whom, how each
    /// holder was connected, how much a relay carried, how long it took.
    pub fn note_fetch(&mut self, digest: &str, r: &resolute_net::FetchReport, took: Duration) {
        let from: BTreeMap<String, serde_json::Value> = r
            .chunks_by_holder
            .iter()
            .map(|(node, chunks)| {
                let via = r.links.get(node).map(|k| k.as_str());
                (
                    format!("{node:016x}"),
                    serde_json::json!({"chunks": chunks, "via": via}),
                )
            })
            .collect();
        if self.fetches.len() >= FETCHES_SHOWN_MAX {
            self.fetches.pop_front();
        }
        self.fetches.push_back(serde_json::json!({
            "digest": digest,
            "from": from,
            "chunks_resumed": r.chunks_resumed,
            "relayed_chunks": r.relayed_chunks,
            // The blob's size (its rate is bytes over ms).
            "bytes": std::fs::metadata(&r.path).map(|m| m.len()).ok(),
            "ms": u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        }));
    }
}

/// The other actors, as the node addresses them.
pub struct Peers {
    /// The swarm's bridge.
    pub net: Addr<NetActor>,
    /// Its fast lane for peer messages.
    pub outbox: Outbox,
    /// The trials.
    pub trials: Addr<TrialSupervisor>,
    /// NVML.
    pub gpus: Addr<GpuMonitor>,
}

/// Everything the node actor starts with.
pub struct Parts {
    /// The node and its agent.
    pub driver: Driver,
    /// Actions to carry out first (a bootstrap write).
    pub first: Vec<Action>,
    /// The durable log store.
    pub store: DurableStore,
    /// The blob store.
    pub blobs: BlobStore,
    /// The other actors.
    pub peers: Peers,
    /// What only this node knows.
    pub local: Local,
    /// GPU uuid of each slot (empty: CPU slots).
    pub gpu_uuids: Vec<String>,
    /// Every GPU NVML listed at start, for the gossiped record.
    pub gpu_records: Vec<resolute_net::Gpu>,
    /// The labels the record gossips.
    pub labels: BTreeMap<String, String>,
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Whether this node has yet to join (a fresh node that did not bootstrap).
    pub joining: bool,
    /// Where known nodes listen (from gossip and `peers.json`).
    pub addrs: BTreeMap<NodeId, Vec<String>>,
    /// The addresses this node joins through.
    pub join: Vec<Multiaddr>,
    /// The data dir.
    pub data_dir: PathBuf,
    /// The log's reserve of disk space (`[disk] log_reserve_mib`), in bytes.
    pub log_reserve_bytes: u64,
    /// Largest peer message sent inline (larger ones go as blobs).
    pub peer_inline_max_bytes: usize,
    /// The swarm's events.
    pub events: tokio::sync::mpsc::Receiver<NetEvent>,
    /// The experiment-tracking store (its writer thread) and its file.
    pub tracker: (resolute_tracking::background::Background, PathBuf),
}

/// The node.
pub struct NodeActor {
    driver: Driver,
    store: DurableStore,
    blobs: BlobStore,
    peers: Peers,
    local: Local,
    gpu_uuids: Vec<String>,
    gpu_records: Vec<resolute_net::Gpu>,
    labels: BTreeMap<String, String>,
    tick_ms: u64,
    joining: bool,
    addrs: BTreeMap<NodeId, Vec<String>>,
    addrs_dirty: bool,
    /// The drop and refusal counts last logged.
    hostility_logged: (u64, u64),
    /// When (ms) this joining node last said what admits it.
    join_wait_logged_ms: Option<u64>,
    join: Vec<Multiaddr>,
    data_dir: PathBuf,
    log_reserve_bytes: u64,
    /// How often the log had given up its reserve when this node last looked.
    reserve_released_seen: u64,
    first: Vec<Action>,
    /// API proposals waiting for their reply.
    waiting: BTreeMap<ProposalId, oneshot::Sender<Result<Reply, NodeError>>>,
    /// The Raft members last given to the swarm.
    members: Vec<NodeId>,
    ticks: u64,
    announce_seq: u64,
    /// Who waits for the graceful stop to end.
    leaving: Vec<oneshot::Sender<()>>,
    left: bool,
    /// The swarm's events, until the node starts reading them.
    events: Option<tokio::sync::mpsc::Receiver<NetEvent>>,
    /// The tracking store, its pending batches, the copies it serves and asks for.
    tracking: tracking::Tracking,
    /// Largest peer message sent inline.
    peer_inline_max_bytes: usize,
    /// Peer messages that travel as blobs.
    peer_blobs: peer_blobs::PeerBlobs,
}

impl NodeActor {
    /// The actor, from its parts.
    pub fn new(p: Parts) -> NodeActor {
        NodeActor {
            driver: p.driver,
            store: p.store,
            blobs: p.blobs,
            peers: p.peers,
            local: p.local,
            gpu_uuids: p.gpu_uuids,
            gpu_records: p.gpu_records,
            labels: p.labels,
            tick_ms: p.tick_ms,
            joining: p.joining,
            addrs: p.addrs,
            addrs_dirty: false,
            hostility_logged: (0, 0),
            join_wait_logged_ms: None,
            join: p.join,
            data_dir: p.data_dir,
            log_reserve_bytes: p.log_reserve_bytes,
            reserve_released_seen: 0,
            first: p.first,
            waiting: BTreeMap::new(),
            members: Vec::new(),
            ticks: 0,
            announce_seq: 0,
            leaving: Vec::new(),
            left: false,
            events: Some(p.events),
            tracking: tracking::Tracking::new(p.tracker.0, p.tracker.1),
            peer_inline_max_bytes: p.peer_inline_max_bytes,
            peer_blobs: peer_blobs::PeerBlobs::default(),
        }
    }

    fn id(&self) -> NodeId {
        self.local.node
    }

    /// The leader stamps entries with this clock: wall time in milliseconds.
    fn now(&self) -> u64 {
        crate::wall_ms()
    }

    /// Steps the driver and carries out what it asks.
    fn step(&mut self, ctx: &mut Context<Self>, event: Event) {
        let now = self.now();
        let actions = self.driver.step(now, event);
        self.carry_out(ctx, actions);
    }

    /// Carries out actions in order; a write's acknowledgement is stepped at
    /// once, and its actions join the queue.
    fn carry_out(&mut self, ctx: &mut Context<Self>, actions: Vec<Action>) {
        let mut work: VecDeque<Action> = actions.into();
        while let Some(action) = work.pop_front() {
            match action {
                Action::Send { to, msg } => self.send_peer(ctx, to, msg),
                Action::Track(batch) => self.tracking.tracks.push(*batch),
                Action::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } => {
                    if snapshot.is_some() {
                        // The snapshot compacts the log: the store must hold
                        // everything before it, durably.
                        self.write_tracking(tracking::Flush::Durable);
                    }
                    let result = (|| {
                        if let Some(s) = &snapshot {
                            self.store
                                .install_snapshot(s, &hard_state.unwrap_or_default())?;
                        }
                        self.store.append(&entries, hard_state.as_ref())?;
                        self.store.sync()
                    })();
                    if let Err(e) = result {
                        eprintln!("fatal: the log store failed: {e}");
                        std::process::exit(3);
                    }
                    if self.store.reserve_released() > self.reserve_released_seen {
                        self.reserve_released_seen = self.store.reserve_released();
                        eprintln!(
                            "node {:016x}: the disk is full: the log used its reserve of {} MiB",
                            self.id(),
                            self.log_reserve_bytes >> 20
                        );
                        // The agent hears of it now, not at its next check.
                        work.push_back(Action::CheckDisk);
                    }
                    if seq > 0 {
                        let now = self.now();
                        work.extend(self.driver.step(now, Event::Persisted { seq }));
                    }
                }
                Action::Reply { id, result } => {
                    // A client that was told its proposal applied may query
                    // the store next.
                    self.write_tracking(tracking::Flush::Wait);
                    if let Some(w) = self.waiting.remove(&id) {
                        let _ = w.send(result);
                    }
                }
                Action::Launch(spec) => {
                    let hosts = spec.gang.as_ref().map_or_else(Vec::new, |g| {
                        g.nodes.iter().map(|n| self.host_of_node(*n)).collect()
                    });
                    let launch = Launch { spec: *spec, hosts };
                    tell(ctx, self, &self.peers.trials.clone(), launch);
                }
                Action::Preempt { trial, incarnation } => {
                    self.control(ctx, trial, incarnation, Control::Preempt)
                }
                Action::Retarget {
                    trial,
                    incarnation,
                    target,
                } => self.control(ctx, trial, incarnation, Control::Retarget(target)),
                Action::Proceed {
                    trial,
                    incarnation,
                    target,
                } => self.control(ctx, trial, incarnation, Control::Proceed(target)),
                Action::Terminate { trial, incarnation } => {
                    self.control(ctx, trial, incarnation, Control::Terminate)
                }
                Action::Kill { trial, incarnation } => {
                    self.control(ctx, trial, incarnation, Control::Kill)
                }
                Action::Fetch { digest, holders } => self.fetch(ctx, digest, holders),
                Action::DeleteBlob { digest } => {
                    if let Err(e) = self.blobs.remove(&digest) {
                        eprintln!("node {:016x}: deleting blob {digest}: {e}", self.id());
                    }
                    // A model directory's unpacked copy goes with its blob.
                    resolute_trial::forget_model(&self.local.work_root, &digest);
                }
                Action::CheckGpus => self.check_gpus(ctx),
                Action::CheckDisk => {
                    let free_bytes = self.measure_disk();
                    let now = self.now();
                    work.extend(self.driver.step(now, Event::DiskSpace { free_bytes }));
                }
                Action::Settled { .. } => {}
                Action::Note(text) => eprintln!("node {:016x}: {text}", self.id()),
                Action::Left => self.finish_leaving(ctx),
            }
        }
        self.write_tracking(tracking::Flush::IfDue);
    }

    fn control(&mut self, ctx: &mut Context<Self>, trial: u64, incarnation: u64, control: Control) {
        let signal = Signal {
            trial,
            incarnation,
            control,
        };
        tell(ctx, self, &self.peers.trials.clone(), signal);
    }

    /// Fetches a blob (at once when the store has it) and tells the driver.
    fn fetch(&mut self, ctx: &mut Context<Self>, digest: String, holders: Vec<NodeId>) {
        if self.blobs.has(&digest) {
            self.step(
                ctx,
                Event::Fetched {
                    digest,
                    result: Ok(()),
                },
            );
            return;
        }
        let fetch = net_actor::Fetch {
            digest: digest.clone(),
            holders,
        };
        let asked = self.peers.net.send(fetch);
        let started = std::time::Instant::now();
        ctx.spawn(asked.into_actor(self).map(move |answer, act, ctx| {
            let result = answer.unwrap_or_else(|e| Err(e.to_string()));
            if let Ok(report) = &result {
                act.local.note_fetch(&digest, report, started.elapsed());
            }
            act.step(
                ctx,
                Event::Fetched {
                    digest,
                    result: result.map(|_| ()),
                },
            );
        }));
    }

    /// Asks NVML (off the actors' thread) and tells the driver.
    fn check_gpus(&mut self, ctx: &mut Context<Self>) {
        let asked = self.peers.gpus.send(CheckGpus(self.gpu_uuids.clone()));
        ctx.spawn(asked.into_actor(self).map(|answer, act, ctx| {
            act.step(ctx, Event::GpuHealth(answer.ok().flatten()));
        }));
    }

    /// The host of a node for a gang's `MASTER_ADDR`: the IP of its first
    /// listen address (this node's own, or what gossip told us).
    fn host_of_node(&self, node: NodeId) -> String {
        let addrs: Vec<String> = if node == self.id() {
            self.local.listen.iter().map(|a| a.to_string()).collect()
        } else {
            self.addrs.get(&node).cloned().unwrap_or_default()
        };
        addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .find_map(|a| host_of(&a))
            .unwrap_or_else(|| LOOPBACK_HOST.to_string())
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        self.step(ctx, Event::Tick);
        self.write_tracking(tracking::Flush::IfDue);
        // Every connected peer is alive (a lost connection stops the heartbeat).
        let peers: Vec<NodeId> = self.local.connected.iter().copied().collect();
        for node in peers {
            self.step(ctx, Event::Heartbeat { node });
        }
        self.follow_membership(ctx);
        if std::mem::take(&mut self.addrs_dirty) {
            if let Ok(bytes) = serde_json::to_vec(&self.addrs) {
                write_atomically(&self.data_dir.join(PEERS_FILE), &bytes);
            }
        }
        self.ticks += 1;
        if self.ticks % TRACK_COPY_ASK_EVERY_TICKS == 0 {
            self.ask_for_tracking_copy(ctx);
        }
        if self.ticks % ANNOUNCE_EVERY_TICKS == 1 {
            self.announce(ctx);
            self.redial();
            self.report_hostility();
        }
    }

    /// One log line when peers sent what was dropped, or proposed what was
    /// refused, since the last line (the counts are in `GET /cluster`).
    fn report_hostility(&mut self) {
        let node = self.driver.node();
        let seen = (node.dropped().total(), node.state().forbidden);
        if seen != self.hostility_logged {
            eprintln!(
                "node {:016x}: {} peer messages dropped before raft-rs {:?}, {} entries refused on apply",
                self.local.node,
                seen.0,
                node.dropped().counts(),
                seen.1
            );
            self.hostility_logged = seen;
        }
    }

    /// Gives the swarm the membership when it changed; joins until a member.
    fn follow_membership(&mut self, ctx: &mut Context<Self>) {
        let (v, l) = self.driver.node().membership();
        let mut members = [v, l].concat();
        members.sort_unstable();
        if members != self.members && !members.is_empty() {
            self.members = members.clone();
            tell(
                ctx,
                self,
                &self.peers.net.clone(),
                SetMembers(members.clone()),
            );
        }
        if self.joining && members.contains(&self.id()) {
            self.joining = false;
        }
        if !self.joining && !members.is_empty() && !members.contains(&self.id()) {
            // Out of the membership (removed; approved again since, perhaps):
            // ask to join again through the join addresses' nodes.
            self.joining = !self.join.is_empty();
        }
        let now = self.now();
        let quiet = self
            .join_wait_logged_ms
            .is_some_and(|t| now.saturating_sub(t) < JOIN_WAIT_LOG_EVERY_MS);
        if self.joining && !quiet {
            self.join_wait_logged_ms = Some(now);
            eprintln!(
                "node {:016x} waits to be admitted: a cluster with users admits it with a join \
                 token (--join-token), or after a cluster admin runs `resolute node approve {:016x}`",
                self.id(),
                self.id()
            );
        }
        if self.joining && (now / 1000) % 3 == 0 {
            // Ask again through anyone connected (the first try may have raced).
            if let Some(via) = self.local.connected.iter().next().copied() {
                self.step(ctx, Event::Join { via });
            }
        }
    }

    /// Dials members this node has no connection to, and the join addresses
    /// while it has no peer at all.
    fn redial(&mut self) {
        let me = self.id();
        let missing: Vec<Multiaddr> = self
            .members
            .iter()
            .filter(|n| **n != me && !self.local.connected.contains(n))
            .filter_map(|n| self.addrs.get(n))
            .flatten()
            .filter_map(|a| a.parse().ok())
            .collect();
        let alone = self.local.connected.is_empty();
        let join = self.join.iter().filter(|_| alone).cloned();
        for a in missing.into_iter().chain(join) {
            let _ = self.peers.net.try_send(net_actor::Dial(a));
        }
    }

    /// Gossips this node's record: how to reach it, its slots (as its agent
    /// counts them), its GPUs, its labels, what it holds.
    fn announce(&mut self, ctx: &mut Context<Self>) {
        // Sequence numbers outlive a restart (the clock's milliseconds, never
        // less than the last one plus one): peers keep the record with the
        // highest, and a restarted node's records, on its new port, must win
        // over its previous life's at once, not once it has announced as often.
        self.announce_seq = (self.announce_seq + 1).max(self.now());
        let agent = self.driver.agent();
        let failures = agent.gpu_failures();
        let mut blobs = self.blobs.list();
        blobs.truncate(resolute_net::gossip::ANNOUNCED_BLOBS_MAX);
        let a = Announcement {
            node: self.id(),
            seq: self.announce_seq,
            ttl_ms: ANNOUNCEMENT_TTL_MS,
            addrs: self.local.listen.iter().map(|a| a.to_string()).collect(),
            api: self.local.api.clone(),
            slots_total: agent.slots_offered(),
            slots_free: agent.slots_free(),
            gpus: self
                .gpu_records
                .iter()
                .map(|g| match failures.get(&g.uuid) {
                    Some(why) if g.disabled.is_none() => resolute_net::Gpu {
                        disabled: Some(format!("failed its health check: {why}")),
                        ..g.clone()
                    },
                    _ => g.clone(),
                })
                .collect(),
            labels: self.labels.clone(),
            blobs,
            // The swarm stamps what only it knows.
            reachability: Default::default(),
        };
        self.local.records.insert(a.node, a.clone());
        tell(ctx, self, &self.peers.net.clone(), Publish(a));
        // Connection kinds, RTTs and reachability, for `cluster status`.
        let net = self.peers.outbox.handle();
        let asked = async move { net.info().await.ok() };
        ctx.spawn(asked.into_actor(self).map(|info, act, _| {
            if let Some(info) = info {
                act.local.links = info.links;
                act.local.reachability = info.reachability;
            }
        }));
    }

    /// Out of the group: whatever still runs is killed, the swarm stops, and
    /// whoever waits for the stop hears of it.
    fn finish_leaving(&mut self, ctx: &mut Context<Self>) {
        if self.left {
            return;
        }
        self.left = true;
        tell(ctx, self, &self.peers.trials.clone(), KillAll);
        let stopped = self.peers.net.send(net_actor::Shutdown);
        ctx.spawn(stopped.into_actor(self).map(|_, act, _| {
            for w in act.leaving.drain(..) {
                let _ = w.send(());
            }
        }));
    }
}

/// Sends `msg` to `to` without holding the node up: into `to`'s mailbox at
/// once when it has room (an actor on another thread takes it while the node
/// goes on), else a send that waits, in the node's context, for room.
fn tell<A, M>(ctx: &mut Context<NodeActor>, node: &NodeActor, to: &Addr<A>, msg: M)
where
    A: Actor + Handler<M>,
    A::Context: actix::dev::ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    let msg = match to.try_send(msg) {
        Ok(()) | Err(SendError::Closed(_)) => return,
        Err(SendError::Full(msg)) => msg,
    };
    let sent = to.send(msg);
    ctx.spawn(
        async move {
            let _ = sent.await;
        }
        .into_actor(node),
    );
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(NODE_MAILBOX);
        if let Some(events) = self.events.take() {
            let stream = futures::stream::unfold(events, |mut rx| async move {
                rx.recv().await.map(|e| (e, rx))
            });
            ctx.add_stream(stream);
        }
        let first = std::mem::take(&mut self.first);
        self.carry_out(ctx, first);
        let period = Duration::from_millis(self.tick_ms.max(10));
        ctx.run_interval(period, |act, ctx| act.on_tick(ctx));
    }
}

/// The swarm's events, read one at a time (see `net_actor`).
impl StreamHandler<NetEvent> for NodeActor {
    fn handle(&mut self, event: NetEvent, ctx: &mut Context<Self>) {
        match event {
            NetEvent::Message { from, msg } => self.step(ctx, Event::Peer { from, msg }),
            NetEvent::Connected(n) => {
                self.local.connected.insert(n);
                if self.joining {
                    self.step(ctx, Event::Join { via: n });
                }
            }
            NetEvent::Disconnected(n) => {
                self.local.connected.remove(&n);
                self.step(ctx, Event::Disconnected { node: n });
            }
            NetEvent::Denied(_) => self.local.denied_requests += 1,
            NetEvent::PeerBlob { from, digest, size } => {
                self.receive_peer_blob(ctx, from, digest, size)
            }
            NetEvent::LogsWanted {
                from,
                trial,
                since_ms,
                user,
                reply,
            } => self.serve_peer_logs(from, trial, since_ms, user, reply),
            NetEvent::TrackingCopyWanted {
                from: _,
                min_index,
                reply,
            } => self.serve_tracking_copy(ctx, min_index, reply),
            NetEvent::Announcement(mut a) => {
                // Only members' records count, and a member's API address only
                // when it is one of its own listen hosts (or loopback): peers
                // send log requests there, with the caller's token.
                if !self.driver.node().state().nodes.contains_key(&a.node) {
                    self.local.ignored_records += 1;
                    return;
                }
                if !api_is_claimable(&a.api, &a.addrs) {
                    self.local.ignored_records += 1;
                    a.api.clear();
                }
                self.local.records.insert(a.node, a.clone());
                if self.addrs.get(&a.node) != Some(&a.addrs) {
                    self.addrs.insert(a.node, a.addrs);
                    self.addrs_dirty = true;
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        self.swarm_gone();
    }
}

/// Whether a record's API address is an IP literal and port on one of the
/// hosts the record lists as its own listen addresses, or on loopback.
fn api_is_claimable(api: &str, addrs: &[String]) -> bool {
    let Ok(api) = api.parse::<std::net::SocketAddr>() else {
        return false;
    };
    api.ip().is_loopback()
        || addrs
            .iter()
            .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok())
            .any(|m| {
                m.iter().any(|p| match p {
                    libp2p::multiaddr::Protocol::Ip4(ip) => std::net::IpAddr::V4(ip) == api.ip(),
                    libp2p::multiaddr::Protocol::Ip6(ip) => std::net::IpAddr::V6(ip) == api.ip(),
                    _ => false,
                })
            })
}

impl NodeActor {
    /// Free space on the data dir's file system (a syscall: cheap enough for
    /// the actor's thread every few seconds); the log's reserve is made again
    /// once the disk has recovered.
    fn measure_disk(&mut self) -> Option<u64> {
        let free = match resolute_storage::space::free_bytes(&self.data_dir) {
            Ok(free) => free,
            Err(e) => {
                eprintln!("node {:016x}: measuring free space: {e}", self.id());
                return None;
            }
        };
        // Made again only with room for it above the low-water mark, so that
        // making it does not take the node under the mark again.
        let agent = self.driver.agent();
        let room = agent.disk_low_water_bytes() + self.log_reserve_bytes;
        if agent.disk_low().is_none()
            && self.log_reserve_bytes > 0
            && !self.store.has_reserve()
            && free > room
        {
            match self.store.set_reserve(self.log_reserve_bytes) {
                Ok(()) => eprintln!(
                    "node {:016x}: the log's reserve of {} MiB is back",
                    self.id(),
                    self.log_reserve_bytes >> 20
                ),
                Err(e) => eprintln!("node {:016x}: the log's reserve: {e}", self.id()),
            }
        }
        Some(free)
    }

    /// The swarm's event stream ended: when the node did not stop it (its
    /// task died), the node cannot keep its promises and the process exits
    /// with code 3, to be started again from its data dir.
    fn swarm_gone(&mut self) {
        if !self.left {
            eprintln!("fatal: the network task stopped");
            std::process::exit(3);
        }
    }
}

impl Handler<Report> for NodeActor {
    type Result = ();

    fn handle(&mut self, Report(report): Report, ctx: &mut Context<Self>) {
        self.step(ctx, Event::Trial(report));
    }
}

#[cfg(test)]
mod tests {
    use super::api_is_claimable;

    #[test]
    fn a_record_claims_an_api_only_on_its_own_hosts() {
        let addrs = vec!["/ip4/10.0.0.5/tcp/4001".to_string()];
        assert!(api_is_claimable("10.0.0.5:8080", &addrs));
        assert!(api_is_claimable("127.0.0.1:8080", &addrs));
        assert!(!api_is_claimable("10.0.0.6:8080", &addrs), "another host");
        assert!(
            !api_is_claimable("169.254.169.254:80", &addrs),
            "cloud metadata"
        );
        assert!(
            !api_is_claimable("internal.example:80", &addrs),
            "a name to resolve"
        );
        assert!(!api_is_claimable("", &addrs));
    }
}
