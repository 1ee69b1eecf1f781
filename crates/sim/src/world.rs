//! The event loop and everything it simulates.
//!
//! One thread, a priority queue of (virtual time, sequence, event), and one seed
//! from which each component's RNG is derived (so that, say, more network traffic
//! does not shift the fault schedule). Nodes are real `core::Node`s; the world is
//! their shell: it delivers messages with sampled latency, loss, duplication and
//! partitions; completes their disk writes after a sampled fsync time (a crash
//! before that loses or tears them); runs their trials on simulated GPUs; and
//! injects faults from the scenario's plan.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use resolute_core::command::{Command, MetricKind, MetricRecord, ProposalId, TrialOutcome};
use resolute_core::node::Effect;
use resolute_core::state::{ClusterState, Signal, TrialState};
use resolute_core::{Input, Node, NodeConfig, NodeId, NodeInfo, Output, PeerMessage, Reply};
use resolute_storage::{CrashMode, LogStore, SimStore};
use resolute_types::Value;

use crate::report::{quantile, Report};
use crate::scenario::{FaultEvent, FaultKind, Scenario};
use crate::trial::Curve;

/// How long the last events are remembered for a violation report.
const RECENT_EVENTS: usize = 40;
/// Period of the sampler (queue waits, expensive invariants, liveness), in ms.
const SAMPLE_EVERY_MS: u64 = 5_000;
/// Period of the random-fault draw, in ms.
const FAULT_DRAW_EVERY_MS: u64 = 60_000;
/// How long a client waits before retrying a submission, in ms.
const RETRY_MS: u64 = 2_000;
/// How long a client waits for any answer before retrying elsewhere, in ms.
const CLIENT_TIMEOUT_MS: u64 = 30_000;
/// How often a node's daemon asks NVML about its GPUs (as in crates/node): a GPU
/// that recovers while its node is down is noticed this long after it is up.
const GPU_HEALTH_CHECK_MS: u64 = 10_000;
/// How long a live trial's latest checkpoint may have a single copy while a
/// holder and another member are up.
const REPLICA_BOUND_MS: u64 = 600_000;

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed of everything.
    pub seed: u64,
    /// Record a Chrome trace.
    pub trace: bool,
    /// Give up after this many events (a guard against a run that never ends).
    pub max_events: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 0,
            trace: false,
            max_events: 200_000_000,
        }
    }
}

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
        epoch: u64,
    },
    Deliver {
        from: NodeId,
        to: usize,
        msg: Box<PeerMessage>,
    },
    DiskDone {
        node: usize,
        epoch: u64,
    },
    TrialStep {
        process: u64,
    },
    CheckpointDone {
        process: u64,
        units: u64,
        exit: Option<TrialOutcome>,
    },
    ReplicaDone {
        uuid: String,
        to: usize,
        epoch: u64,
    },
    Submit {
        arrival: usize,
    },
    Resubmit {
        arrival: usize,
        id: ProposalId,
    },
    SubmitTimeout {
        arrival: usize,
        id: ProposalId,
        attempt: u64,
    },
    Retry {
        id: ProposalId,
    },
    Fault(FaultEvent),
    Restart {
        node: usize,
    },
    /// `to`'s connections to `node` were reset (its process died; its kernel
    /// closed its sockets).
    ConnectionsReset {
        to: usize,
        node: NodeId,
    },
    Unblock {
        node: usize,
    },
    /// A failed GPU works again.
    GpuRecovered {
        node: usize,
        gpu: usize,
    },
    SpotGone {
        node: usize,
    },
    RollingStep {
        next: usize,
        gap_s: u64,
    },
    DrawFaults,
    Sample,
    EndFaults,
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    id: NodeId,
    name: String,
    site: usize,
    gpus: u32,
    speed: f64,
    preemptible: bool,
    cfg: NodeConfig,
    node: Option<Node>,
    store: SimStore,
    /// Writes handed to the disk and not yet done.
    writes: VecDeque<Output>,
    epoch: u64,
    /// Permanently gone (left, disk replaced, spot instance reclaimed).
    gone: bool,
    /// Down until restarted.
    down: bool,
    /// Checkpoint blobs on this node's disk.
    blobs: BTreeSet<String>,
    /// GPU index of each slot in use (for the trace).
    gpu_busy: Vec<bool>,
    /// GPUs that failed (a `gpu_failure` fault) and have not recovered.
    gpu_failed: Vec<bool>,
    drift: f64,
    /// Its pool in the scenario.
    group: usize,
}

struct Process {
    node: usize,
    epoch: u64,
    trial: u64,
    incarnation: u64,
    slots: u32,
    gpus: Vec<usize>,
    rate: f64,
    units: u64,
    target: u64,
    seg_start_ms: u64,
    seg_units: u64,
    started_ms: u64,
    train_start_ms: u64,
    next_validate: u64,
    next_checkpoint_ms: u64,
    last_checkpoint_ms: u64,
    stopping: bool,
    final_loss: f64,
    curve: usize,
    time_metric: String,
}

/// Runs `scenario` with `opts`. Returns the report (`wall_s` is left for the
/// caller to fill in) and the Chrome trace (empty unless `opts.trace`).
pub fn run(scenario: &Scenario, opts: &Options) -> (Report, serde_json::Value) {
    let mut w = World::new(scenario, opts);
    w.run();
    let report = w.report();
    (report, w.trace_json())
}

struct World<'a> {
    sc: &'a Scenario,
    opts: Options,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Scheduled>,
    net_rng: ChaCha8Rng,
    fault_rng: ChaCha8Rng,
    disk_rng: ChaCha8Rng,
    nodes: Vec<SimNode>,
    by_id: BTreeMap<NodeId, usize>,
    next_node_id: NodeId,
    blocked: BTreeSet<(NodeId, NodeId)>,
    muted: BTreeSet<NodeId>,
    digest: u64,
    events: u64,
    messages: u64,
    bytes_moved: u64,
    processes: BTreeMap<u64, Process>,
    next_process: u64,
    curves: Vec<(u64, resolute_types::config::ExperimentConfig, Curve)>,
    inputs: VecDeque<(usize, Input)>,
    reliable: BTreeMap<ProposalId, (usize, u64, Command)>,
    stepping: bool,
    submissions: BTreeMap<ProposalId, usize>,
    attempts: BTreeMap<ProposalId, u64>,
    submitted: u64,
    next_proposal: u128,
    metric_proposals: BTreeMap<ProposalId, (u64, u64)>,
    accepted_incarnation: BTreeMap<u64, u64>,
    leaders: BTreeMap<u64, NodeId>,
    log_hashes: BTreeMap<u64, u64>,
    violations: Vec<String>,
    recent: VecDeque<String>,
    interrupted: BTreeMap<u64, u64>,
    recoveries: Vec<f64>,
    queued_since: BTreeMap<u64, u64>,
    queue_waits: Vec<f64>,
    allocated_gpu_ms: f64,
    useful_gpu_ms: f64,
    fault_phase: bool,
    finished: bool,
    best_loss: BTreeMap<u64, f64>,
    group_gpu_ms: BTreeMap<String, f64>,
    /// Slot-milliseconds placed per scenario pool (sampled).
    pool_gpu_ms: BTreeMap<usize, f64>,
    /// Trials placed across more than one node (gang placements seen).
    multi_node_placements: BTreeSet<(u64, u64)>,
    /// GPU failures injected so far.
    gpu_failures: u64,
    trace: Vec<serde_json::Value>,
    /// When each checkpoint was first seen as a live trial's latest (sampled).
    latest_since: BTreeMap<String, u64>,
}

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(5)
}

impl<'a> World<'a> {
    fn new(sc: &'a Scenario, opts: &Options) -> World<'a> {
        let seed = opts.seed;
        let derive =
            |k: u64| ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k);
        let mut w = World {
            sc,
            opts: opts.clone(),
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            net_rng: derive(1),
            fault_rng: derive(2),
            disk_rng: derive(3),
            nodes: Vec::new(),
            by_id: BTreeMap::new(),
            next_node_id: 1,
            blocked: BTreeSet::new(),
            muted: BTreeSet::new(),
            digest: 0xcbf2_9ce4_8422_2325 ^ seed,
            events: 0,
            messages: 0,
            bytes_moved: 0,
            processes: BTreeMap::new(),
            next_process: 1,
            curves: Vec::new(),
            inputs: VecDeque::new(),
            reliable: BTreeMap::new(),
            stepping: false,
            submissions: BTreeMap::new(),
            attempts: BTreeMap::new(),
            submitted: 0,
            next_proposal: 1,
            metric_proposals: BTreeMap::new(),
            accepted_incarnation: BTreeMap::new(),
            leaders: BTreeMap::new(),
            log_hashes: BTreeMap::new(),
            violations: Vec::new(),
            recent: VecDeque::new(),
            interrupted: BTreeMap::new(),
            recoveries: Vec::new(),
            queued_since: BTreeMap::new(),
            queue_waits: Vec::new(),
            allocated_gpu_ms: 0.0,
            useful_gpu_ms: 0.0,
            fault_phase: true,
            finished: false,
            best_loss: BTreeMap::new(),
            group_gpu_ms: BTreeMap::new(),
            pool_gpu_ms: BTreeMap::new(),
            multi_node_placements: BTreeSet::new(),
            gpu_failures: 0,
            trace: Vec::new(),
            latest_since: BTreeMap::new(),
        };
        let mut skew_rng = derive(4);
        for (pi, pool) in sc.pools.iter().enumerate() {
            let site = sc
                .sites
                .iter()
                .position(|s| s.name == pool.site)
                .unwrap_or(0);
            for n in 0..pool.nodes {
                let name = format!("{}-{}", pool.name, n + 1);
                let skew = sc.node.clock_skew_per_mille as f64 / 1000.0;
                let drift = if skew > 0.0 {
                    ((skew_rng.next_u64() % 2001) as f64 / 1000.0 - 1.0) * skew
                } else {
                    0.0
                };
                let idx = w.add_node(
                    name,
                    site,
                    pi,
                    pool.gpus,
                    pool.gpu_speed,
                    pool.preemptible,
                    drift,
                );
                let join_ms = pool.join_at_s * 1000 + idx as u64 * 7;
                if idx == 0 {
                    w.start_node(0, true);
                } else {
                    w.schedule(join_ms, Event::Restart { node: idx });
                    w.nodes[idx].down = true;
                }
            }
        }
        for (i, e) in sc.experiments.iter().enumerate() {
            for c in 0..e.count {
                let _ = c;
                w.schedule(
                    (e.arrive_s + u64::from(c) * e.every_s) * 1000,
                    Event::Submit { arrival: i },
                );
            }
        }
        for f in &sc.faults.events {
            w.schedule(f.at_s * 1000, Event::Fault(f.clone()));
        }
        w.schedule(FAULT_DRAW_EVERY_MS, Event::DrawFaults);
        w.schedule(SAMPLE_EVERY_MS, Event::Sample);
        w.schedule(sc.duration_s * 1000, Event::EndFaults);
        w
    }

    #[allow(clippy::too_many_arguments)]
    fn add_node(
        &mut self,
        name: String,
        site: usize,
        group: usize,
        gpus: u32,
        speed: f64,
        preemptible: bool,
        drift: f64,
    ) -> usize {
        let id = self.next_node_id;
        self.next_node_id += 1;
        let pool = &self.sc.pools[group];
        let info = NodeInfo {
            site: self.sc.sites[site].name.clone(),
            slots: gpus,
            pool: pool.resource_pool.clone(),
            preemptible,
            cost_per_slot_hour_micros: (pool.cost_per_gpu_hour * 1e6).round() as u64,
            pool_settings: Some(self.sc.scheduler.settings()),
            labels: BTreeMap::new(),
        };
        let mut cfg = NodeConfig::new(id, info);
        let n = &self.sc.node;
        cfg.tick_ms = n.tick_ms;
        cfg.voters = n.voters.clamp(1, 7);
        cfg.election_ticks = n.election_ticks;
        cfg.heartbeat_ticks = n.heartbeat_ticks;
        cfg.lease_timeout_ms = n.lease_timeout_ms;
        cfg.snapshot_entries = n.snapshot_entries;
        cfg.proposal_timeout_ms = 10 * n.lease_timeout_ms;
        cfg.seed = self.opts.seed ^ id.wrapping_mul(0xd6e8_feb8_6659_fd93);
        self.nodes.push(SimNode {
            id,
            name,
            site,
            gpus,
            speed,
            preemptible,
            cfg,
            node: None,
            store: SimStore::new(),
            writes: VecDeque::new(),
            epoch: 0,
            gone: false,
            down: false,
            blobs: BTreeSet::new(),
            gpu_busy: vec![false; gpus as usize],
            gpu_failed: vec![false; gpus as usize],
            drift,
            group,
        });
        self.by_id.insert(id, self.nodes.len() - 1);
        self.nodes.len() - 1
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn note(&mut self, what: String) {
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent
            .push_back(format!("{:>10.3}s {what}", self.now as f64 / 1000.0));
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            let recent: Vec<String> = self.recent.iter().cloned().collect();
            self.violations.push(format!(
                "at {:.3}s: {what}\n    last events:\n      {}",
                self.now as f64 / 1000.0,
                recent.join("\n      ")
            ));
        }
        self.finished = true;
    }

    fn run(&mut self) {
        while let Some(Scheduled { at, event, .. }) = self.heap.pop() {
            if self.finished {
                break;
            }
            self.now = at;
            self.events += 1;
            if self.events > self.opts.max_events {
                self.violation(format!("event limit of {} reached", self.opts.max_events));
                break;
            }
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node, epoch } => {
                if self.nodes[node].epoch != epoch || self.nodes[node].down {
                    return;
                }
                let period =
                    (self.sc.node.tick_ms as f64 * (1.0 + self.nodes[node].drift)).max(1.0) as u64;
                self.schedule(self.now + period, Event::Tick { node, epoch });
                self.step(node, Input::Tick);
            }
            Event::Deliver { from, to, msg } => {
                if self.nodes[to].down {
                    return;
                }
                self.messages += 1;
                self.digest = mix(mix(self.digest, self.now), from ^ (self.nodes[to].id << 20));
                self.step(to, Input::Peer { from, msg: *msg });
            }
            Event::DiskDone { node, epoch } => self.disk_done(node, epoch),
            Event::ConnectionsReset { to, node } => {
                if !self.nodes[to].down {
                    self.step(to, Input::Disconnected { node });
                }
            }
            Event::TrialStep { process } => self.trial_step(process),
            Event::CheckpointDone {
                process,
                units,
                exit,
            } => self.checkpoint_done(process, units, exit),
            Event::ReplicaDone { uuid, to, epoch } => {
                if self.nodes[to].epoch == epoch && !self.nodes[to].down {
                    self.nodes[to].blobs.insert(uuid.clone());
                    let holder = self.nodes[to].id;
                    self.propose(to, Command::CheckpointReplicated { uuid, holder });
                }
            }
            Event::Submit { arrival } => self.submit(arrival, None),
            Event::Resubmit { arrival, id } => self.submit(arrival, Some(id)),
            Event::Retry { id } => self.retry(id),
            Event::SubmitTimeout {
                arrival,
                id,
                attempt,
            } => {
                // No answer (the node died with the request): retry elsewhere with the
                // same id; if it was applied, the retry returns the first result.
                if self.submissions.get(&id) == Some(&arrival)
                    && self.attempts.get(&id) == Some(&attempt)
                {
                    self.submissions.remove(&id);
                    self.submit(arrival, Some(id));
                }
            }
            Event::Fault(f) => self.fault(&f),
            Event::Restart { node } => self.restart(node),
            Event::GpuRecovered { node, gpu } => self.gpu_recovered(node, gpu),
            Event::Unblock { node } => {
                let id = self.nodes[node].id;
                self.blocked.retain(|(a, b)| *a != id && *b != id);
                self.muted.remove(&id);
                self.note(format!("{} reconnected", self.nodes[node].name));
            }
            Event::SpotGone { node } => {
                self.crash(node, "spot instance reclaimed", false);
                self.nodes[node].gone = true;
                // A replacement instance comes later, with a fresh disk and identity.
                let delay = self.range(self.sc.faults.restart_after_s) * 1000;
                let replacement = self.replace(node);
                self.schedule(self.now + delay, Event::Restart { node: replacement });
            }
            Event::RollingStep { next, gap_s } => {
                if next < self.nodes.len() {
                    if !self.nodes[next].gone && !self.nodes[next].down {
                        self.crash(next, "rolling restart", true);
                        self.schedule(self.now + gap_s * 500, Event::Restart { node: next });
                    }
                    self.schedule(
                        self.now + gap_s * 1000,
                        Event::RollingStep {
                            next: next + 1,
                            gap_s,
                        },
                    );
                }
            }
            Event::DrawFaults => self.draw_faults(),
            Event::Sample => self.sample(),
            Event::EndFaults => self.end_faults(),
        }
    }

    fn range(&mut self, r: [u64; 2]) -> u64 {
        r[0] + self.fault_rng.next_u64() % (r[1] - r[0] + 1)
    }

    // ----- nodes -------------------------------------------------------------

    fn node_now(&self, node: usize) -> u64 {
        (self.now as f64 * (1.0 + self.nodes[node].drift)) as u64
    }

    /// Feeds one input to a node and carries out its outputs. Inputs that arise
    /// while outputs are being carried out (a trial runner's proposal, a write's
    /// acknowledgement) wait until the current outputs are done: a node's writes
    /// must reach its disk in the order it emitted them.
    fn step(&mut self, node: usize, input: Input) {
        self.inputs.push_back((node, input));
        if self.stepping {
            return;
        }
        self.stepping = true;
        while let Some((node, input)) = self.inputs.pop_front() {
            let now = self.node_now(node);
            let Some(n) = self.nodes[node].node.as_mut() else {
                continue;
            };
            let outs = n.step(now, input);
            self.outputs(node, outs);
            self.check_node(node);
        }
        self.stepping = false;
    }

    fn start_node(&mut self, node: usize, bootstrap: bool) {
        let rec = match self.nodes[node].store.recover() {
            Ok(r) => r,
            Err(e) => {
                let name = self.nodes[node].name.clone();
                let records = self.nodes[node].store.describe().join("\n      ");
                self.violation(format!(
                    "{name}: recovery failed: {e}\n    its log:\n      {records}"
                ));
                return;
            }
        };
        let fresh = rec == resolute_storage::Recovered::default();
        match Node::new(self.nodes[node].cfg.clone(), &rec, bootstrap) {
            Ok((n, outs)) => {
                self.nodes[node].node = Some(n);
                self.nodes[node].down = false;
                self.nodes[node].epoch += 1;
                let epoch = self.nodes[node].epoch;
                let phase = self.net_rng.next_u64() % self.sc.node.tick_ms.max(1);
                self.schedule(self.now + phase + 1, Event::Tick { node, epoch });
                self.outputs(node, outs);
                if fresh && !bootstrap {
                    if let Some(via) = self.random_up_node(node) {
                        self.step(node, Input::Join { via });
                    }
                }
            }
            Err(e) => {
                let name = self.nodes[node].name.clone();
                self.violation(format!("{name}: node did not start: {e}"));
            }
        }
    }

    fn random_up_node(&mut self, except: usize) -> Option<NodeId> {
        let up: Vec<NodeId> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != except && !n.down && n.node.is_some())
            .map(|(_, n)| n.id)
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[(self.net_rng.next_u64() % up.len() as u64) as usize])
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    fn outputs(&mut self, node: usize, outs: Vec<Output>) {
        for out in outs {
            match out {
                Output::Send { to, msg } => self.send(node, to, msg),
                p @ Output::Persist { .. } => {
                    let first = self.nodes[node].writes.is_empty();
                    self.nodes[node].writes.push_back(p);
                    if first {
                        let at = self.now + self.fsync_time();
                        let epoch = self.nodes[node].epoch;
                        self.schedule(at, Event::DiskDone { node, epoch });
                    }
                }
                Output::Effect(e) => self.effect(node, e),
                Output::Reply { id, result } => self.reply(node, id, result),
            }
        }
    }

    fn fsync_time(&mut self) -> u64 {
        let r = self.sc.node.fsync_ms;
        r[0] + self.disk_rng.next_u64() % (r[1] - r[0] + 1)
    }

    /// Completes every write queued so far with one fsync (group commit).
    fn disk_done(&mut self, node: usize, epoch: u64) {
        if self.nodes[node].epoch != epoch || self.nodes[node].down {
            return;
        }
        let writes: Vec<Output> = self.nodes[node].writes.drain(..).collect();
        let fail = self.sc.faults.disk_error_rate > 0.0
            && (self.disk_rng.next_u64() % 1_000_000) as f64 / 1_000_000.0
                < self.sc.faults.disk_error_rate;
        let mut seqs = Vec::new();
        {
            let store = &mut self.nodes[node].store;
            for w in &writes {
                if let Output::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } = w
                {
                    let r = snapshot
                        .as_ref()
                        .map_or(Ok(()), |s| {
                            store.install_snapshot(s, &hard_state.unwrap_or_default())
                        })
                        .and_then(|()| store.append(entries, hard_state.as_ref()));
                    if r.is_err() {
                        break;
                    }
                    self.digest = mix(mix(self.digest, *seq), entries.len() as u64);
                    seqs.push(*seq);
                }
            }
            if fail {
                store.fail_next_sync();
            }
        }
        if self.nodes[node].store.sync().is_err() {
            // A failed fsync leaves the node's state unknown: it crashes.
            self.crash(node, "disk write failed", true);
            let delay = self.range(self.sc.faults.restart_after_s).max(1) * 1000;
            self.schedule(self.now + delay, Event::Restart { node });
            return;
        }
        for seq in seqs.into_iter().filter(|s| *s > 0) {
            self.step(node, Input::Persisted { seq });
        }
    }

    fn send(&mut self, from_idx: usize, to: NodeId, msg: PeerMessage) {
        let from = self.nodes[from_idx].id;
        if self.muted.contains(&from) || self.blocked.contains(&(from, to)) {
            return;
        }
        let Some(to_idx) = self.index_of(to) else {
            return;
        };
        let net = &self.sc.network;
        if net.loss > 0.0 && (self.net_rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 < net.loss {
            return;
        }
        let range = if self.nodes[from_idx].site == self.nodes[to_idx].site {
            self.sc.sites[self.nodes[from_idx].site].latency_ms
        } else {
            net.cross_site_latency_ms
        };
        let latency = range[0] + self.net_rng.next_u64() % (range[1].saturating_sub(range[0]) + 1);
        let dup = net.duplicate > 0.0
            && (self.net_rng.next_u64() % 1_000_000) as f64 / 1_000_000.0 < net.duplicate;
        if dup {
            let extra = latency + 1 + self.net_rng.next_u64() % (range[1] + 1);
            self.schedule(
                self.now + extra,
                Event::Deliver {
                    from,
                    to: to_idx,
                    msg: Box::new(msg.clone()),
                },
            );
        }
        self.schedule(
            self.now + latency.max(1),
            Event::Deliver {
                from,
                to: to_idx,
                msg: Box::new(msg),
            },
        );
    }

    fn crash(&mut self, node: usize, why: &str, resets: bool) {
        if self.nodes[node].down {
            return;
        }
        let name = self.nodes[node].name.clone();
        self.note(format!("{name} crashed ({why})"));
        self.trace_marker(node, why);
        let n = &mut self.nodes[node];
        n.down = true;
        n.epoch += 1;
        n.node = None;
        // Writes handed to the disk but not fsynced: a prefix of them reaches it,
        // maybe torn. A snapshot install is synced by itself, so the writes stop
        // before one (a log cannot skip what the install would have written).
        for w in n.writes.drain(..) {
            match w {
                Output::Persist {
                    entries,
                    hard_state,
                    snapshot: None,
                    ..
                } => {
                    let _ = n.store.append(&entries, hard_state.as_ref());
                }
                _ => break,
            }
        }
        n.store.crash(CrashMode::TearUnsynced, &mut self.disk_rng);
        self.kill_node_processes(node);
        let id = self.nodes[node].id;
        self.digest = mix(self.digest, id ^ 0xdead);
        if resets {
            self.reset_connections(node);
        }
    }

    /// A process that dies has its sockets reset by its kernel: every peer it
    /// can reach learns of it after one network latency (a machine that vanishes
    /// resets nothing, and its peers wait for the lease).
    fn reset_connections(&mut self, node: usize) {
        let id = self.nodes[node].id;
        for to in 0..self.nodes.len() {
            let peer = &self.nodes[to];
            if to == node || peer.down || peer.gone {
                continue;
            }
            if self.blocked.contains(&(id, peer.id)) || self.muted.contains(&id) {
                continue;
            }
            let range = if self.nodes[node].site == peer.site {
                self.sc.sites[peer.site].latency_ms
            } else {
                self.sc.network.cross_site_latency_ms
            };
            self.schedule(
                self.now + range[0].max(1),
                Event::ConnectionsReset { to, node: id },
            );
        }
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].gone || !self.nodes[node].down {
            return;
        }
        let name = self.nodes[node].name.clone();
        self.note(format!("{name} starts"));
        self.start_node(node, false);
    }

    /// Replaces a node's machine: a new identity with an empty disk on the same
    /// pool and site. Returns the new node's index (down until restarted).
    fn replace(&mut self, node: usize) -> usize {
        let (site, group, gpus, speed, pre, drift) = {
            let n = &self.nodes[node];
            (n.site, n.group, n.gpus, n.speed, n.preemptible, n.drift)
        };
        let name = format!("{}'", self.nodes[node].name);
        let idx = self.add_node(name, site, group, gpus, speed, pre, drift);
        self.nodes[idx].down = true;
        idx
    }

    // ----- clients -----------------------------------------------------------

    /// A trial runner's report: retried with the same proposal id (so applied at
    /// most once) until the node answers it, as long as the node lives.
    fn propose(&mut self, node: usize, command: Command) -> ProposalId {
        let id = ProposalId(self.next_proposal);
        self.next_proposal += 1;
        let epoch = self.nodes[node].epoch;
        self.reliable.insert(id, (node, epoch, command.clone()));
        self.step(node, Input::Propose { id, command });
        id
    }

    fn retry(&mut self, id: ProposalId) {
        let Some((node, epoch, command)) = self.reliable.get(&id).cloned() else {
            return;
        };
        if self.nodes[node].epoch != epoch || self.nodes[node].down {
            // The node died: its trials are requeued when it is declared lost.
            self.reliable.remove(&id);
            return;
        }
        self.step(node, Input::Propose { id, command });
    }

    fn submit(&mut self, arrival: usize, retry: Option<ProposalId>) {
        let Some(via) = self
            .random_up_node(usize::MAX)
            .and_then(|id| self.index_of(id))
        else {
            match retry {
                Some(id) => self.schedule(self.now + RETRY_MS, Event::Resubmit { arrival, id }),
                None => self.schedule(self.now + RETRY_MS, Event::Submit { arrival }),
            }
            return;
        };
        let e = &self.sc.experiments[arrival];
        let command = Command::ExperimentCreated {
            config_yaml: self.sc.experiment_texts[arrival].clone(),
            overrides: Vec::new(),
            owner: e.owner.clone(),
            model_digest: String::new(),
            default_seed: (self.opts.seed as u32) ^ arrival as u32,
        };
        let id = retry.unwrap_or_else(|| {
            let id = ProposalId(self.next_proposal);
            self.next_proposal += 1;
            self.submitted += 1;
            id
        });
        self.submissions.insert(id, arrival);
        let attempt = self.attempts.entry(id).or_default();
        *attempt += 1;
        let attempt = *attempt;
        self.schedule(
            self.now + CLIENT_TIMEOUT_MS,
            Event::SubmitTimeout {
                arrival,
                id,
                attempt,
            },
        );
        let e = &self.sc.experiments[arrival];
        self.note(format!(
            "submit experiment {} via {}",
            e.config, self.nodes[via].name
        ));
        self.step(via, Input::Propose { id, command });
    }

    fn reply(
        &mut self,
        _node: usize,
        id: ProposalId,
        result: Result<Reply, resolute_core::NodeError>,
    ) {
        if self.reliable.contains_key(&id) {
            if result.is_err() {
                self.schedule(self.now + RETRY_MS, Event::Retry { id });
                return;
            }
            self.reliable.remove(&id);
        }
        if let Some(arrival) = self.submissions.remove(&id) {
            if result.is_err() {
                // Retry with the same proposal id: applied at most once.
                self.schedule(self.now + RETRY_MS, Event::Resubmit { arrival, id });
            }
            return;
        }
        if let Some((trial, inc)) = self.metric_proposals.remove(&id) {
            if let Ok(Reply::Ok) = result {
                let seen = *self.accepted_incarnation.entry(trial).or_insert(inc);
                if seen > inc {
                    self.violation(format!("trial {trial}: incarnation {inc} committed progress after incarnation {seen}"));
                } else {
                    self.accepted_incarnation.insert(trial, inc);
                }
            }
        }
    }
}

impl World<'_> {
    // ----- trials ------------------------------------------------------------

    fn curve_index(&mut self, node: usize, experiment: u64) -> Option<usize> {
        if let Some(i) = self.curves.iter().position(|(e, _, _)| *e == experiment) {
            return Some(i);
        }
        let config = self.nodes[node]
            .node
            .as_ref()?
            .state()
            .experiments
            .get(&experiment)?
            .config()?
            .clone();
        let max = config
            .searcher
            .method
            .budget()
            .map_or(self.sc.trials.default_length, |b| b.max_time);
        let curve = Curve::new(
            &config.hyperparameters,
            self.opts.seed ^ experiment.wrapping_mul(0x2545_f491_4f6c_dd1d),
            max as f64 / 4.0,
        );
        self.curves.push((experiment, config, curve));
        Some(self.curves.len() - 1)
    }

    fn effect(&mut self, node: usize, effect: Effect) {
        match effect {
            Effect::StartTrial {
                trial,
                incarnation,
                experiment,
                hparams,
                target,
                latest_checkpoint,
                node_rank,
                layout,
                ..
            } => {
                // The simulated process of a multi-node gang runs on its rank-0
                // node at the speed of all its slots; the other nodes only hold
                // their slots (and kill nothing: a lost member requeues the gang).
                if node_rank > 0 {
                    return;
                }
                let slots = layout.iter().map(|(_, s)| *s).sum();
                let running = self
                    .processes
                    .values()
                    .any(|p| p.node == node && p.trial == trial && p.incarnation == incarnation);
                if !running {
                    self.start_process(
                        node,
                        trial,
                        incarnation,
                        experiment,
                        &hparams,
                        slots,
                        target,
                        latest_checkpoint,
                    );
                }
            }
            Effect::Reconcile { keep } => {
                let extra: Vec<u64> = self
                    .processes
                    .iter()
                    .filter(|(_, p)| p.node == node && !keep.contains(&(p.trial, p.incarnation)))
                    .map(|(k, _)| *k)
                    .collect();
                for k in extra {
                    self.kill_process(k, false);
                }
            }
            Effect::SignalTrial {
                trial,
                incarnation,
                signal,
            } => {
                let found = self
                    .processes
                    .iter()
                    .find(|(_, p)| {
                        p.node == node && p.trial == trial && p.incarnation == incarnation
                    })
                    .map(|(k, _)| *k);
                let Some(key) = found else { return };
                match signal {
                    Signal::Pause | Signal::Stop => self.begin_exit(key, TrialOutcome::Stopped),
                    Signal::Kill => {
                        self.kill_process(key, false);
                        let n = self.nodes[node].node.is_some();
                        if n {
                            self.propose(
                                node,
                                Command::TrialExited {
                                    trial,
                                    incarnation,
                                    outcome: TrialOutcome::Stopped,
                                },
                            );
                        }
                    }
                    Signal::Target(length) => {
                        if let Some(p) = self.processes.get_mut(&key) {
                            p.target = length;
                        }
                        self.reschedule(key);
                    }
                }
            }
            Effect::StopAllTrials => {
                let name = self.nodes[node].name.clone();
                self.note(format!("{name} fenced itself"));
                self.kill_node_processes(node);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_process(
        &mut self,
        node: usize,
        trial: u64,
        incarnation: u64,
        experiment: u64,
        hparams: &Value,
        slots: u32,
        target: Option<u64>,
        checkpoint: Option<String>,
    ) {
        let Some(curve) = self.curve_index(node, experiment) else {
            return;
        };
        let mut start_units = 0;
        let mut restore_ms = 0.0;
        if let Some(uuid) = &checkpoint {
            let state = self.nodes[node].node.as_ref().map(|n| n.state());
            let Some(ck) = state.and_then(|s| s.checkpoints.get(uuid)).cloned() else {
                self.violation(format!(
                    "trial {trial} resumed from checkpoint {uuid}, which is not committed"
                ));
                return;
            };
            start_units = ck.steps_completed;
            restore_ms = self.sc.trials.restore_s * 1000.0;
            if !self.nodes[node].blobs.contains(uuid) {
                let holder = ck
                    .holders
                    .iter()
                    .filter_map(|h| self.index_of(*h))
                    .find(|i| {
                        !self.nodes[*i].down
                            && self.nodes[*i].blobs.contains(uuid)
                            && self.reachable(*i, node)
                    });
                match holder {
                    Some(h) => {
                        let latency = if self.nodes[h].site == self.nodes[node].site {
                            2.0
                        } else {
                            self.sc.network.cross_site_latency_ms[1] as f64
                        };
                        restore_ms += self.sc.trials.checkpoint_mb / self.sc.network.bandwidth_mb_s
                            * 1000.0
                            + latency;
                        self.bytes_moved += (self.sc.trials.checkpoint_mb * 1e6) as u64;
                        self.nodes[node].blobs.insert(uuid.clone());
                    }
                    // Every copy is gone: start over (the work is lost).
                    None => start_units = 0,
                }
            }
        }
        let (max, time_metric) = {
            let (_, config, _) = &self.curves[curve];
            let b = config.searcher.method.budget();
            (
                b.as_ref()
                    .map_or(self.sc.trials.default_length, |b| b.max_time),
                b.map_or("batches".to_string(), |b| b.time_metric),
            )
        };
        let final_loss = {
            let (_, config, c) = &self.curves[curve];
            c.final_loss(&config.hyperparameters, hparams)
        };
        let mut gpus = Vec::new();
        let n = &mut self.nodes[node];
        for (i, busy) in n.gpu_busy.iter_mut().enumerate() {
            let failed = n.gpu_failed.get(i).copied().unwrap_or(false);
            if gpus.len() < slots as usize && !*busy && !failed {
                *busy = true;
                gpus.push(i);
            }
        }
        let rate =
            self.sc.trials.units_per_gpu_s * self.nodes[node].speed * f64::from(slots.max(1))
                / 1000.0;
        let train_start = self.now + restore_ms as u64;
        let key = self.next_process;
        self.next_process += 1;
        let every = self.sc.trials.validate_every.max(1);
        self.processes.insert(
            key,
            Process {
                node,
                epoch: self.nodes[node].epoch,
                trial,
                incarnation,
                slots,
                gpus,
                rate,
                units: start_units,
                target: target.unwrap_or(max).max(1),
                seg_start_ms: train_start,
                seg_units: start_units,
                started_ms: self.now,
                train_start_ms: train_start,
                next_validate: (start_units / every + 1) * every,
                next_checkpoint_ms: train_start + self.sc.trials.checkpoint_every_s * 1000,
                last_checkpoint_ms: train_start,
                stopping: false,
                final_loss,
                curve,
                time_metric,
            },
        );
        if let Some(t) = self.queued_since.remove(&trial) {
            self.queue_waits.push((self.now - t) as f64 / 1000.0);
        }
        if let Some(t) = self.interrupted.remove(&trial) {
            self.recoveries.push((self.now - t) as f64 / 1000.0);
        }
        let name = self.nodes[node].name.clone();
        self.note(format!(
            "trial {trial}.{incarnation} starts on {name} at {start_units}"
        ));
        self.propose(node, Command::TrialStarted { trial, incarnation });
        self.reschedule(key);
    }

    /// Brings a process's progress up to now.
    fn advance(&mut self, key: u64) {
        let now = self.now;
        if let Some(p) = self.processes.get_mut(&key) {
            if now > p.seg_start_ms {
                let units = p.seg_units + ((now - p.seg_start_ms) as f64 * p.rate) as u64;
                p.units = units.min(p.target.max(p.seg_units));
            }
        }
    }

    /// Schedules the process's next interesting moment.
    fn reschedule(&mut self, key: u64) {
        self.advance(key);
        let Some(p) = self.processes.get_mut(&key) else {
            return;
        };
        if p.stopping {
            return;
        }
        p.seg_start_ms = p.seg_start_ms.max(self.now);
        p.seg_units = p.units;
        let goal = p.next_validate.min(p.target);
        let until_goal = if goal > p.units {
            ((goal - p.units) as f64 / p.rate).ceil() as u64
        } else {
            0
        };
        let at = (p.seg_start_ms + until_goal)
            .min(p.next_checkpoint_ms.max(p.seg_start_ms))
            .max(self.now + 1);
        self.schedule(at, Event::TrialStep { process: key });
    }

    fn trial_step(&mut self, key: u64) {
        self.advance(key);
        let Some(p) = self.processes.get(&key) else {
            return;
        };
        if p.stopping || self.nodes[p.node].epoch != p.epoch || self.nodes[p.node].down {
            return;
        }
        let (node, trial, inc, units, target) = (p.node, p.trial, p.incarnation, p.units, p.target);
        if units >= p.next_validate.min(target) {
            let (_, _, curve) = &self.curves[p.curve];
            let loss = curve.loss(p.final_loss, units);
            let mut metrics = BTreeMap::new();
            metrics.insert("validation_loss".to_string(), Value::Float(loss));
            metrics.insert("loss".to_string(), Value::Float(loss));
            metrics.insert(p.time_metric.clone(), Value::Int(units as i64));
            let exp = self.curves[p.curve].0;
            let best = self.best_loss.entry(exp).or_insert(f64::INFINITY);
            *best = best.min(loss);
            let every = self.sc.trials.validate_every.max(1);
            if let Some(p) = self.processes.get_mut(&key) {
                p.next_validate = (units / every + 1) * every;
            }
            let record = MetricRecord {
                trial,
                incarnation: inc,
                kind: MetricKind::Validation,
                steps_completed: units,
                metrics,
            };
            let id = self.propose(
                node,
                Command::Metrics {
                    records: vec![record],
                },
            );
            self.metric_proposals.insert(id, (trial, inc));
        }
        let Some(p) = self.processes.get(&key) else {
            return;
        };
        if p.units >= p.target {
            self.begin_exit(key, TrialOutcome::Completed);
            return;
        }
        if self.now >= p.next_checkpoint_ms {
            let units = p.units;
            if let Some(p) = self.processes.get_mut(&key) {
                p.next_checkpoint_ms = self.now + self.sc.trials.checkpoint_every_s * 1000;
            }
            let at = self.now + (self.sc.trials.checkpoint_write_s * 1000.0) as u64;
            self.schedule(
                at,
                Event::CheckpointDone {
                    process: key,
                    units,
                    exit: None,
                },
            );
        }
        self.reschedule(key);
    }

    /// Checkpoint, then exit with `outcome`.
    fn begin_exit(&mut self, key: u64, outcome: TrialOutcome) {
        self.advance(key);
        let Some(p) = self.processes.get_mut(&key) else {
            return;
        };
        if p.stopping {
            return;
        }
        p.stopping = true;
        let units = p.units;
        let at = self.now + (self.sc.trials.checkpoint_write_s * 1000.0) as u64;
        self.schedule(
            at,
            Event::CheckpointDone {
                process: key,
                units,
                exit: Some(outcome),
            },
        );
    }

    fn checkpoint_done(&mut self, key: u64, units: u64, exit: Option<TrialOutcome>) {
        let Some(p) = self.processes.get(&key) else {
            return;
        };
        if self.nodes[p.node].epoch != p.epoch || self.nodes[p.node].down {
            return;
        }
        let (node, trial, inc) = (p.node, p.trial, p.incarnation);
        let uuid = format!("ck-{trial}-{inc}-{units}");
        let size = (self.sc.trials.checkpoint_mb * 1e6) as u64;
        self.nodes[node].blobs.insert(uuid.clone());
        let holder = self.nodes[node].id;
        self.propose(
            node,
            Command::CheckpointSaved {
                uuid: uuid.clone(),
                trial,
                incarnation: inc,
                steps_completed: units,
                size,
                digest: format!("{units:x}"),
                holder,
            },
        );
        if let Some(p) = self.processes.get_mut(&key) {
            p.last_checkpoint_ms = self.now;
        }
        self.replicate(node, uuid);
        if let Some(outcome) = exit {
            self.end_process(key, true);
            if self.nodes[node].node.is_some() {
                self.propose(
                    node,
                    Command::TrialExited {
                        trial,
                        incarnation: inc,
                        outcome,
                    },
                );
            }
        }
    }

    /// Whether a blob can move from `a` to `b` now (partitions block transfers too).
    fn reachable(&self, a: usize, b: usize) -> bool {
        let (x, y) = (self.nodes[a].id, self.nodes[b].id);
        !self.blocked.contains(&(x, y)) && !self.muted.contains(&x)
    }

    /// Copies a checkpoint to another reachable node (another site first).
    fn replicate(&mut self, from: usize, uuid: String) {
        let site = self.nodes[from].site;
        let mut candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                *i != from
                    && !self.nodes[*i].down
                    && !self.nodes[*i].gone
                    && self.reachable(from, *i)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        candidates.sort_by_key(|i| (self.nodes[*i].site == site, *i));
        let other_site = candidates
            .iter()
            .take_while(|i| self.nodes[**i].site != site)
            .count();
        let pool = if other_site > 0 {
            other_site
        } else {
            candidates.len()
        };
        let to = candidates[(self.net_rng.next_u64() % pool as u64) as usize];
        let latency = if self.nodes[to].site == site {
            2
        } else {
            self.sc.network.cross_site_latency_ms[1]
        };
        let transfer = (self.sc.trials.checkpoint_mb / self.sc.network.bandwidth_mb_s * 1000.0)
            as u64
            + latency;
        self.bytes_moved += (self.sc.trials.checkpoint_mb * 1e6) as u64;
        let epoch = self.nodes[to].epoch;
        self.schedule(self.now + transfer, Event::ReplicaDone { uuid, to, epoch });
    }

    /// Every process on `node` dies (crash, fence).
    fn kill_node_processes(&mut self, node: usize) {
        let procs: Vec<u64> = self
            .processes
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(k, _)| *k)
            .collect();
        for p in procs {
            self.kill_process(p, true);
        }
    }

    /// One GPU of `node` fails, and the node does what its daemon does when NVML
    /// says so: it proposes its smaller capacity naming the trial on that GPU,
    /// whose process dies and is reported preempted (not the trial's fault).
    fn gpu_failure(&mut self, node: usize, recover_after_s: Option<u64>) {
        let n = &self.nodes[node];
        if n.down || n.gone || n.node.is_none() {
            return;
        }
        let healthy: Vec<usize> = (0..n.gpu_failed.len())
            .filter(|g| !n.gpu_failed[*g])
            .collect();
        let on_gpu = |g: usize| {
            self.processes
                .iter()
                .find(|(_, p)| p.node == node && p.gpus.contains(&g))
                .map(|(k, p)| (*k, p.trial, p.incarnation))
        };
        let gpu = healthy
            .iter()
            .copied()
            .find(|g| on_gpu(*g).is_some())
            .or(healthy.first().copied());
        let Some(gpu) = gpu else {
            return;
        };
        let victim = on_gpu(gpu);
        self.gpu_failures += 1;
        self.nodes[node].gpu_failed[gpu] = true;
        let slots = (healthy.len() - 1) as u32;
        let id = self.nodes[node].id;
        self.note(format!(
            "{} GPU {gpu} failed (trial on it: {:?})",
            self.nodes[node].name,
            victim.map(|v| v.1)
        ));
        self.trace_marker(node, "GPU failed");
        self.propose(
            node,
            Command::NodeCapacity {
                node: id,
                slots,
                stop_first: victim.map(|v| vec![v.1]).unwrap_or_default(),
            },
        );
        if let Some((key, trial, incarnation)) = victim {
            self.kill_process(key, true);
            self.propose(
                node,
                Command::TrialExited {
                    trial,
                    incarnation,
                    outcome: TrialOutcome::Preempted,
                },
            );
        }
        if let Some(s) = recover_after_s {
            self.schedule(self.now + s * 1000, Event::GpuRecovered { node, gpu });
        }
    }

    /// A failed GPU works again: the node proposes its capacity back (when it is
    /// down, at its next health check after it is up again).
    fn gpu_recovered(&mut self, node: usize, gpu: usize) {
        let n = &self.nodes[node];
        if n.gone || !n.gpu_failed.get(gpu).copied().unwrap_or(false) {
            return;
        }
        if n.down || n.node.is_none() {
            self.schedule(
                self.now + GPU_HEALTH_CHECK_MS,
                Event::GpuRecovered { node, gpu },
            );
            return;
        }
        self.nodes[node].gpu_failed[gpu] = false;
        let n = &self.nodes[node];
        let slots = n.gpu_failed.iter().filter(|f| !**f).count() as u32;
        let id = n.id;
        self.note(format!("{} GPU {gpu} recovered", self.nodes[node].name));
        self.propose(
            node,
            Command::NodeCapacity {
                node: id,
                slots,
                stop_first: Vec::new(),
            },
        );
    }

    /// A process dies without a clean exit (crash, fence, kill).
    fn kill_process(&mut self, key: u64, interrupted: bool) {
        if let Some(p) = self.processes.get(&key) {
            if interrupted {
                self.interrupted.entry(p.trial).or_insert(self.now);
            }
        }
        self.end_process(key, false);
    }

    fn end_process(&mut self, key: u64, clean: bool) {
        let Some(p) = self.processes.remove(&key) else {
            return;
        };
        let allocated = (self.now - p.started_ms) as f64 * f64::from(p.slots.max(1));
        let useful_until = if clean {
            self.now
        } else {
            p.last_checkpoint_ms.max(p.train_start_ms)
        };
        let useful =
            useful_until.saturating_sub(p.train_start_ms) as f64 * f64::from(p.slots.max(1));
        self.allocated_gpu_ms += allocated;
        self.useful_gpu_ms += useful.min(allocated);
        for g in &p.gpus {
            if let Some(b) = self.nodes[p.node].gpu_busy.get_mut(*g) {
                *b = false;
            }
        }
        if self.opts.trace {
            for g in &p.gpus {
                self.trace.push(serde_json::json!({
                    "name": format!("trial {} #{}", p.trial, p.incarnation),
                    "ph": "X", "ts": p.started_ms * 1000, "dur": (self.now - p.started_ms) * 1000,
                    "pid": self.nodes[p.node].id, "tid": g,
                    "args": {"clean": clean, "units": p.units},
                }));
            }
        }
    }

    fn trace_marker(&mut self, node: usize, what: &str) {
        if self.opts.trace {
            self.trace.push(serde_json::json!({"name": what, "ph": "i", "s": "p", "ts": self.now * 1000, "pid": self.nodes[node].id, "tid": 0}));
        }
    }

    // ----- faults ------------------------------------------------------------

    fn node_named(&self, name: &Option<String>) -> Option<usize> {
        let name = name.as_ref()?;
        self.nodes.iter().position(|n| &n.name == name)
    }

    fn fault(&mut self, f: &FaultEvent) {
        let target = self.node_named(&f.node);
        match f.kind {
            FaultKind::Crash => {
                if let Some(n) = target {
                    self.crash(n, "scheduled crash", false);
                    if let Some(s) = f.restart_after_s {
                        self.schedule(self.now + s * 1000, Event::Restart { node: n });
                    }
                }
            }
            FaultKind::DiskLoss => {
                if let Some(n) = target {
                    self.disk_loss(n, f.restart_after_s.unwrap_or(60));
                }
            }
            FaultKind::Isolate | FaultKind::MuteOutgoing => {
                if let Some(n) = target {
                    let id = self.nodes[n].id;
                    if f.kind == FaultKind::MuteOutgoing {
                        self.muted.insert(id);
                    } else {
                        self.isolate(id);
                    }
                    self.note(format!("{} partitioned ({:?})", self.nodes[n].name, f.kind));
                    self.trace_marker(n, "partitioned");
                    if let Some(s) = f.restart_after_s {
                        self.schedule(self.now + s * 1000, Event::Unblock { node: n });
                    }
                }
            }
            FaultKind::SplitSite => {
                let site = self
                    .sc
                    .sites
                    .iter()
                    .position(|s| Some(&s.name) == f.site.as_ref());
                if let Some(site) = site {
                    let inside: Vec<NodeId> = self
                        .nodes
                        .iter()
                        .filter(|n| n.site == site)
                        .map(|n| n.id)
                        .collect();
                    let outside: Vec<NodeId> = self
                        .nodes
                        .iter()
                        .filter(|n| n.site != site)
                        .map(|n| n.id)
                        .collect();
                    for a in &inside {
                        for b in &outside {
                            self.blocked.insert((*a, *b));
                            self.blocked.insert((*b, *a));
                        }
                    }
                    self.note(format!("site {} split off", self.sc.sites[site].name));
                }
            }
            FaultKind::SiteOutage => {
                let site = self
                    .sc
                    .sites
                    .iter()
                    .position(|s| Some(&s.name) == f.site.as_ref());
                if let Some(site) = site {
                    let members: Vec<usize> = (0..self.nodes.len())
                        .filter(|i| self.nodes[*i].site == site)
                        .collect();
                    for n in members {
                        self.crash(n, "site outage", false);
                        if let Some(s) = f.restart_after_s {
                            self.schedule(self.now + s * 1000, Event::Restart { node: n });
                        }
                    }
                }
            }
            FaultKind::HealAll => self.heal_all(),
            FaultKind::GpuFailure => {
                if let Some(n) = target {
                    self.gpu_failure(n, f.restart_after_s);
                }
            }
            FaultKind::Spot => {
                if let Some(n) = target {
                    self.spot(n);
                }
            }
            FaultKind::Leave => {
                if let Some(n) = target {
                    let id = ProposalId(self.next_proposal);
                    self.next_proposal += 1;
                    self.note(format!("{} leaves", self.nodes[n].name));
                    self.step(n, Input::Leave { id });
                    // It stops once its removal is applied, or after a grace period.
                    self.schedule(
                        self.now + self.sc.node.lease_timeout_ms * 5,
                        Event::SpotGone { node: n },
                    );
                }
            }
            FaultKind::RollingRestart => {
                let gap = f.restart_after_s.unwrap_or(30);
                self.schedule(
                    self.now,
                    Event::RollingStep {
                        next: 0,
                        gap_s: gap,
                    },
                );
            }
        }
    }

    fn isolate(&mut self, id: NodeId) {
        for other in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            if other != id {
                self.blocked.insert((id, other));
                self.blocked.insert((other, id));
            }
        }
    }

    fn disk_loss(&mut self, node: usize, after_s: u64) {
        self.crash(node, "disk lost", false);
        self.nodes[node].gone = true;
        self.nodes[node].blobs.clear();
        let replacement = self.replace(node);
        self.schedule(
            self.now + after_s * 1000,
            Event::Restart { node: replacement },
        );
    }

    fn spot(&mut self, node: usize) {
        if self.nodes[node].down || self.nodes[node].gone {
            return;
        }
        let id = self.nodes[node].id;
        self.note(format!("{} gets a spot notice", self.nodes[node].name));
        self.trace_marker(node, "spot notice");
        self.propose(node, Command::NodeDraining { node: id });
        self.schedule(
            self.now + self.sc.faults.spot_notice_s * 1000,
            Event::SpotGone { node },
        );
    }

    fn heal_all(&mut self) {
        self.blocked.clear();
        self.muted.clear();
        self.note("all faults healed".into());
        for n in 0..self.nodes.len() {
            if self.nodes[n].down && !self.nodes[n].gone && !self.heap_has_restart(n) {
                self.schedule(self.now + 1 + n as u64, Event::Restart { node: n });
            }
        }
    }

    fn heap_has_restart(&self, node: usize) -> bool {
        self.heap
            .iter()
            .any(|s| matches!(s.event, Event::Restart { node: n } if n == node))
    }

    fn draw_faults(&mut self) {
        if !self.fault_phase {
            return;
        }
        self.schedule(self.now + FAULT_DRAW_EVERY_MS, Event::DrawFaults);
        let f = self.sc.faults.clone();
        let per_draw = FAULT_DRAW_EVERY_MS as f64 / 3_600_000.0;
        for n in 0..self.nodes.len() {
            if self.nodes[n].down || self.nodes[n].gone {
                continue;
            }
            if self.chance(f.crash_rate_per_node_hour * per_draw) {
                if self.chance(f.disk_loss_probability) && self.disk_loss_allowed(n) {
                    let after = self.range(f.restart_after_s);
                    self.disk_loss(n, after);
                } else {
                    self.crash(n, "random crash", true);
                    let after = self.range(f.restart_after_s).max(1);
                    self.schedule(self.now + after * 1000, Event::Restart { node: n });
                }
            } else if self.nodes[n].preemptible
                && self.chance(f.spot_rate_per_node_hour * per_draw)
                && self.disk_loss_allowed(n)
            {
                self.spot(n);
            }
        }
        if self.chance(f.partition_rate_per_hour * per_draw) {
            let candidates: Vec<usize> = (0..self.nodes.len())
                .filter(|i| !self.nodes[*i].down)
                .collect();
            if !candidates.is_empty() {
                let n = candidates[(self.fault_rng.next_u64() % candidates.len() as u64) as usize];
                let id = self.nodes[n].id;
                self.isolate(id);
                self.note(format!("{} isolated", self.nodes[n].name));
                self.trace_marker(n, "isolated");
                let after = self.range(f.partition_s).max(1);
                self.schedule(self.now + after * 1000, Event::Unblock { node: n });
            }
        }
    }

    /// Random faults stay within what Raft tolerates (as TigerBeetle's simulator
    /// keeps one valid copy): a disk is destroyed only while a majority of the
    /// voters would still have theirs. A scheduled disk loss is always carried out.
    fn disk_loss_allowed(&self, node: usize) -> bool {
        let Some(voters) = self
            .nodes
            .iter()
            .filter(|n| !n.down)
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.applied())
            .map(|n| n.membership().0)
        else {
            return false;
        };
        let victim = self.nodes[node].id;
        let lost = voters
            .iter()
            .filter(|v| **v == victim || self.nodes.iter().any(|n| n.id == **v && n.gone))
            .count();
        lost < voters.len().div_ceil(2)
    }

    fn chance(&mut self, p: f64) -> bool {
        let draw = (self.fault_rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        p > 0.0 && draw < p
    }

    fn end_faults(&mut self) {
        self.fault_phase = false;
        self.note("fault phase over: liveness phase".into());
        self.heal_all();
    }

    // ----- invariants --------------------------------------------------------

    /// Cheap invariants after every step of a node.
    fn check_node(&mut self, node: usize) {
        let Some(n) = self.nodes[node].node.as_ref() else {
            return;
        };
        let id = n.id();
        let term = n.leader_term();
        let (index, hash) = n.log_hash();
        if term > 0 {
            match self.leaders.get(&term) {
                Some(other) if *other != id => {
                    let other = *other;
                    self.violation(format!(
                        "two leaders in term {term}: nodes {other} and {id}"
                    ));
                    return;
                }
                _ => {
                    self.leaders.insert(term, id);
                }
            }
        }
        if index > 0 {
            match self.log_hashes.get(&index) {
                Some(h) if *h != hash => {
                    self.violation(format!(
                        "node {id} applied a different log prefix at index {index}"
                    ));
                }
                Some(_) => {}
                None => {
                    self.log_hashes.insert(index, hash);
                    self.digest = mix(self.digest, index ^ hash);
                }
            }
        }
    }

    /// The most advanced live node's state.
    fn freshest(&self) -> Option<&ClusterState> {
        self.nodes
            .iter()
            .filter(|n| !n.down)
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.applied())
            .map(|n| n.state())
    }

    fn sample(&mut self) {
        if self.finished {
            return;
        }
        self.schedule(self.now + SAMPLE_EVERY_MS, Event::Sample);
        let mut problems = Vec::new();
        let mut queued = Vec::new();
        let mut share_acc: BTreeMap<String, f64> = BTreeMap::new();
        let mut pool_acc: BTreeMap<usize, f64> = BTreeMap::new();
        let mut gangs = Vec::new();
        let mut done = None;
        let mut first_seen = Vec::new();
        if let Some(state) = self.freshest() {
            // No node's slots are over-allocated.
            let mut used: BTreeMap<NodeId, u32> = BTreeMap::new();
            // The scheduler's bookkeeping: every unfinished trial is live (it is
            // what placement looks at) and every queued trial has a queue clock
            // (checked every minute).
            let check_books = (self.now / SAMPLE_EVERY_MS) % 12 == 0;
            for (id, t) in state.trials.iter().filter(|_| check_books) {
                let done = matches!(t.state, TrialState::Done(_));
                if done == state.live_trials().contains(id) {
                    problems.push(format!("trial {id} ({:?}) live-set mismatch", t.state));
                }
                if t.state == TrialState::Queued && t.queued_ms.is_none() {
                    problems.push(format!("queued trial {id} has no queue clock"));
                }
            }
            for t in state.trials.values().filter(|t| t.is_placed()) {
                let total: u32 = t.layout.iter().map(|(_, s)| *s).sum();
                if total != t.slots.max(1) {
                    problems.push(format!(
                        "trial of {} slots placed as {:?} (half a gang)",
                        t.slots, t.layout
                    ));
                }
                for (node, slots) in &t.layout {
                    *used.entry(*node).or_default() += slots;
                    if let Some(&i) = self.by_id.get(node) {
                        *pool_acc.entry(self.nodes[i].group).or_default() +=
                            f64::from(*slots) * SAMPLE_EVERY_MS as f64;
                    }
                }
                if t.layout.len() > 1 {
                    gangs.push((t.experiment, t.request_id.0));
                }
            }
            for (node, u) in &used {
                let slots = state.nodes.get(node).map_or(0, |n| n.info.slots);
                // After a GPU failure the node holds more than its new capacity
                // until the trials it stopped have exited; those are the only
                // excess allowed.
                let shrunk = self
                    .by_id
                    .get(node)
                    .is_some_and(|i| self.nodes[*i].gpu_failed.iter().any(|f| *f));
                let staying: u32 = state
                    .trials
                    .values()
                    .filter(|t| shrunk && t.is_placed() && !t.preempting)
                    .flat_map(|t| t.layout.iter())
                    .filter(|(n, _)| n == node)
                    .map(|(_, s)| *s)
                    .sum();
                let over = if shrunk { staying > slots } else { *u > slots };
                if over {
                    problems.push(format!("node {node} has {u} slots allocated of {slots}"));
                }
            }
            // A committed checkpoint survives while a holder does (checked every
            // minute: blobs only disappear with a whole disk).
            let check_blobs = (self.now / SAMPLE_EVERY_MS) % 12 == 0;
            for (uuid, ck) in state.checkpoints.iter().filter(|_| check_blobs) {
                for h in &ck.holders {
                    if let Some(&i) = self.by_id.get(h) {
                        let n = &self.nodes[i];
                        if !n.gone && !n.down && !n.blobs.contains(uuid) {
                            problems.push(format!(
                                "checkpoint {uuid} is committed on node {h}, which lost it"
                            ));
                        }
                    }
                }
            }
            // Every live trial's latest checkpoint gets a second copy on another
            // node once it has been the latest for a while, as long as one of its
            // holders is up to copy from and another member is up to copy to (a
            // single copy dies with its disk).
            if check_blobs {
                for (id, t) in state.live_trial_entries() {
                    let Some(uuid) = &t.latest_checkpoint else {
                        continue;
                    };
                    let Some(ck) = state.checkpoints.get(uuid) else {
                        continue;
                    };
                    let Some(&since) = self.latest_since.get(uuid) else {
                        first_seen.push(uuid.clone());
                        continue;
                    };
                    let up = |n: &NodeId| {
                        self.by_id
                            .get(n)
                            .is_some_and(|i| !self.nodes[*i].down && !self.nodes[*i].gone)
                    };
                    let a_holder_is_up = ck.holders.iter().any(up);
                    let up_members = state.nodes.keys().filter(|n| up(n)).count();
                    if ck.holders.len() < 2
                        && a_holder_is_up
                        && up_members >= 2
                        && self.now.saturating_sub(since) > REPLICA_BOUND_MS
                    {
                        problems.push(format!(
                            "trial {id}: its latest checkpoint {uuid} has one copy after {} s",
                            (self.now - since) / 1000
                        ));
                    }
                }
            }
            // GPU time per group while every group has work waiting in the queue:
            // then each wants more than it holds, and max-min fair share promises
            // each its weighted share. (A group whose demand is below its share
            // leaves the rest to others, which is fair and not counted.)
            let group_of = |exp: u64| {
                state
                    .experiments
                    .get(&exp)
                    .and_then(|e| e.config())
                    .map(|c| c.workspace.clone())
                    .filter(|w| !w.is_empty())
                    .unwrap_or_else(|| format!("experiment {exp}"))
            };
            let mut waiting: BTreeMap<String, u32> = BTreeMap::new();
            let mut running: BTreeMap<String, u32> = BTreeMap::new();
            for (exp, e) in &state.experiments {
                if !e.state.is_finished() {
                    waiting.entry(group_of(*exp)).or_default();
                }
            }
            for t in state.trials.values() {
                let g = group_of(t.experiment);
                match t.state {
                    TrialState::Queued => *waiting.entry(g).or_default() += 1,
                    TrialState::Assigned { .. } | TrialState::Running { .. } => {
                        *running.entry(g).or_default() += t.slots.max(1);
                    }
                    _ => {}
                }
            }
            if waiting.len() > 1 && waiting.values().all(|d| *d > 0) {
                for (g, slots) in running {
                    *share_acc.entry(g).or_default() += f64::from(slots) * SAMPLE_EVERY_MS as f64;
                }
            }
            queued = state
                .trials
                .iter()
                .filter(|(_, t)| t.state == TrialState::Queued)
                .map(|(id, _)| *id)
                .collect();
            let finished = state
                .experiments
                .values()
                .filter(|e| e.state.is_finished())
                .count() as u64;
            done = Some((finished, state.experiments.len() as u64));
        }
        for (p, ms) in pool_acc {
            *self.pool_gpu_ms.entry(p).or_default() += ms;
        }
        self.multi_node_placements.extend(gangs);
        for (g, ms) in share_acc {
            *self.group_gpu_ms.entry(g).or_default() += ms;
        }
        for p in problems {
            self.violation(p);
        }
        for t in queued {
            self.queued_since.entry(t).or_insert(self.now);
        }
        for uuid in first_seen {
            self.latest_since.insert(uuid, self.now);
        }
        // Prune the log-hash map below what every live node has applied.
        let floor = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| n.applied())
            .min()
            .unwrap_or(0);
        let keep = self.log_hashes.split_off(&floor.saturating_sub(1));
        self.log_hashes = keep;
        if !self.fault_phase {
            let deadline = (self.sc.duration_s + self.sc.liveness_bound_s) * 1000;
            let all_in =
                self.submissions.is_empty() && self.submitted == self.expected_submissions();
            if let Some((finished, total)) = done {
                if all_in && total >= self.submitted && finished == total {
                    self.finished = true;
                    return;
                }
                if self.now >= deadline {
                    let detail = self.unfinished_detail();
                    self.violation(format!("liveness: {} of {total} experiments unfinished {} s after every fault healed{detail}", total - finished, self.sc.liveness_bound_s));
                }
            } else if self.now >= deadline {
                self.violation("liveness: no node is up".into());
            }
        }
    }

    /// What the unfinished experiments' trials are doing (for a liveness report).
    fn unfinished_detail(&self) -> String {
        let Some(state) = self.freshest() else {
            return String::new();
        };
        let mut out = String::new();
        for (id, e) in &state.experiments {
            if e.state.is_finished() {
                continue;
            }
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for t in state.trials.values().filter(|t| t.experiment == *id) {
                let key = match &t.state {
                    TrialState::Done(o) => format!("done {o:?}"),
                    other => format!("{other:?} pending {:?}", t.pending),
                };
                *counts.entry(key).or_default() += 1;
            }
            out.push_str(&format!(
                "\n    experiment {id} ({:?}, progress {:.2}, last error {:?}): {counts:?}",
                e.state,
                e.progress(),
                e.last_error
            ));
        }
        for n in &self.nodes {
            if let Some(x) = n.node.as_ref() {
                let (v, l) = x.membership();
                out.push_str(&format!("\n    {} (id {}): leader {} term {} applied {} committed {} voters {v:?} learners {l:?} snapshot {}", n.name, n.id, x.leader_id(), x.term(), x.applied(), x.committed(), x.snapshot_index()));
            }
        }
        let live: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.down)
            .map(|n| n.name.clone())
            .collect();
        out.push_str(&format!(
            "\n    live nodes: {live:?}, running processes: {}",
            self.processes.len()
        ));
        out
    }

    fn expected_submissions(&self) -> u64 {
        self.sc.experiments.iter().map(|e| u64::from(e.count)).sum()
    }

    fn report(&mut self) -> Report {
        let state = self.freshest();
        let unfinished_exits = state.map_or(0, |s| s.unfinished_exits);
        let (completed, trials, restarts) = state.map_or((0, 0, 0), |s| {
            let c = s
                .experiments
                .values()
                .filter(|e| e.state.is_finished())
                .count() as u64;
            let r = s.trials.values().map(|t| u64::from(t.restarts)).sum();
            (c, s.trials.len() as u64, r)
        });
        // Processes still running count until now.
        let keys: Vec<u64> = self.processes.keys().copied().collect();
        for k in keys {
            self.end_process(k, true);
        }
        let mut rec = self.recoveries.clone();
        let mut rec2 = rec.clone();
        let mut qw = self.queue_waits.clone();
        let mut qw2 = qw.clone();
        Report {
            scenario: self.sc.name.clone(),
            seed: self.opts.seed,
            digest: format!("{:016x}", mix(self.digest, self.events)),
            violations: self.violations.clone(),
            experiments_submitted: self.submitted,
            experiments_completed: completed,
            trials,
            gpu_goodput: if self.allocated_gpu_ms > 0.0 {
                self.useful_gpu_ms / self.allocated_gpu_ms
            } else {
                1.0
            },
            work_lost_gpu_s: (self.allocated_gpu_ms - self.useful_gpu_ms) / 1000.0,
            recoveries: self.recoveries.len() as u64,
            recovery_s_p50: quantile(&mut rec, 0.5),
            recovery_s_p99: quantile(&mut rec2, 0.99),
            queue_wait_s_p50: quantile(&mut qw, 0.5),
            queue_wait_s_p99: quantile(&mut qw2, 0.99),
            messages: self.messages,
            bytes_moved: self.bytes_moved,
            simulated_s: self.now as f64 / 1000.0,
            wall_s: 0.0,
            sim_s_per_wall_s: 0.0,
            events: self.events,
            best_loss: self.best_loss.values().copied().collect(),
            group_share: {
                let total: f64 = self.group_gpu_ms.values().sum();
                self.group_gpu_ms
                    .iter()
                    .map(|(g, ms)| (g.clone(), if total > 0.0 { ms / total } else { 0.0 }))
                    .collect()
            },
            gpu_s_by_pool: self
                .pool_gpu_ms
                .iter()
                .map(|(p, ms)| (self.sc.pools[*p].name.clone(), ms / 1000.0))
                .collect(),
            gpu_cost: self
                .pool_gpu_ms
                .iter()
                .map(|(p, ms)| ms / 3_600_000.0 * self.sc.pools[*p].cost_per_gpu_hour)
                .sum(),
            multi_node_trials: self.multi_node_placements.len() as u64,
            gpu_failures: self.gpu_failures,
            restarts_charged: restarts,
            unfinished_exits,
        }
    }

    /// The Chrome trace-event timeline (empty unless `Options::trace`).
    fn trace_json(&self) -> serde_json::Value {
        serde_json::json!({ "traceEvents": self.trace, "displayTimeUnit": "ms" })
    }
}
