//! The event loop and everything it simulates.
//!
//! One thread, a priority queue of (virtual time, sequence, occurrence), and one
//! seed from which each component's RNG is derived (so that, say, more network
//! traffic does not shift the fault schedule). Each node is a real
//! `agent::Driver`: the unchanged `core::Node` and node agent that production
//! runs. The world is their shell, and simulates only what is outside them:
//!
//! - `nodes`: machines that start from their disks, crash and are replaced;
//!   how a node's actions are carried out;
//! - `network`: latency, loss, duplication, partitions, connection resets,
//!   blob transfers;
//! - `disks`: writes that complete after a sampled fsync, and are lost or torn
//!   by a crash;
//! - `processes`: training processes that follow learning curves, report,
//!   checkpoint, and obey signals;
//! - `gpus`: GPUs that fail and recover, and what NVML says of them;
//! - `clients`: users who submit experiments and retry;
//! - `faults`: the scenario's fault plan and random faults;
//! - `invariants`: what must hold after every event, and in the liveness phase;
//! - `stats`: what the report measures (goodput, recoveries, queue waits).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use resolute_agent::Event;
use resolute_core::command::ProposalId;
use resolute_core::{NodeId, PeerMessage};

use crate::report::Report;
use crate::scenario::{FaultEvent, Scenario};

mod clients;
mod disks;
mod faults;
mod gpus;
mod invariants;
mod network;
mod nodes;
mod processes;
mod stats;

use nodes::SimNode;

/// Period of the sampler (queue waits, expensive invariants, liveness), in ms.
const SAMPLE_EVERY_MS: u64 = 5_000;
/// Period of the random-fault draw, in ms.
const FAULT_DRAW_EVERY_MS: u64 = 60_000;

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

/// Something that happens at a moment of virtual time.
#[derive(Debug)]
enum Occurrence {
    /// A node's clock ticks.
    Tick { node: usize, epoch: u64 },
    /// A message arrives.
    Deliver {
        from: NodeId,
        to: usize,
        msg: Box<PeerMessage>,
    },
    /// A node's queued writes are durable.
    DiskDone { node: usize, epoch: u64 },
    /// A training process reaches its next interesting moment.
    TrialStep { process: u64 },
    /// A training process finished writing a checkpoint.
    CheckpointDone {
        process: u64,
        units: u64,
        then: processes::AfterCheckpoint,
    },
    /// A blob transfer to `to` ended.
    FetchDone {
        to: usize,
        epoch: u64,
        digest: String,
        ok: Result<(), String>,
    },
    /// A user submits an experiment (again, with the same id, after a failure).
    Submit {
        arrival: usize,
        retry: Option<ProposalId>,
    },
    /// A user gives up waiting for an answer.
    SubmitTimeout {
        arrival: usize,
        id: ProposalId,
        attempt: u64,
    },
    /// The administrator's next set-up step (users and roles).
    SetUpUsers { retry: Option<ProposalId> },
    /// The administrator gives up waiting for a set-up step's answer.
    SetUpTimeout { step: usize, id: ProposalId },
    /// A scheduled fault.
    Fault(FaultEvent),
    /// A node's machine starts (again).
    Restart { node: usize },
    /// `to`'s connections to `node` were reset (its process died; its kernel
    /// closed its sockets).
    ConnectionsReset { to: usize, node: NodeId },
    /// A node's partition heals.
    Unblock { node: usize },
    /// A failed GPU works again.
    GpuRecovered { node: usize, gpu: usize },
    /// A spot machine is reclaimed (or a leaving node's time is up).
    SpotGone { node: usize },
    /// The next node of a rolling restart goes down.
    RollingStep { next: usize, gap_s: u64 },
    /// Random faults are drawn.
    DrawFaults,
    /// Invariants and statistics are sampled.
    Sample,
    /// The fault phase ends: every fault heals.
    EndFaults,
}

struct Scheduled {
    at: u64,
    seq: u64,
    occurrence: Occurrence,
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

/// Runs `scenario` with `opts`. Returns the report (`wall_s` is left for the
/// caller to fill in) and the Chrome trace (empty unless `opts.trace`).
pub fn run(scenario: &Scenario, opts: &Options) -> (Report, serde_json::Value) {
    let mut w = World::new(scenario, opts);
    w.run();
    let report = w.report();
    (report, w.stats.trace_json())
}

/// One seeded stream per component.
struct Rngs {
    net: ChaCha8Rng,
    fault: ChaCha8Rng,
    disk: ChaCha8Rng,
}

pub(crate) struct World<'a> {
    sc: &'a Scenario,
    opts: Options,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Scheduled>,
    rng: Rngs,
    nodes: Vec<SimNode>,
    by_id: BTreeMap<NodeId, usize>,
    next_node_id: NodeId,
    net: network::Net,
    procs: processes::Processes,
    clients: clients::Clients,
    checks: invariants::Checks,
    stats: stats::Stats,
    /// Events that arose while a node's actions were being carried out: they
    /// wait, so that its writes reach its disk in the order it emitted them.
    inputs: VecDeque<(usize, Event)>,
    stepping: bool,
    /// A hash of everything that happened: the same seed gives the same digest.
    digest: u64,
    events: u64,
    fault_phase: bool,
    finished: bool,
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
            rng: Rngs {
                net: derive(1),
                fault: derive(2),
                disk: derive(3),
            },
            nodes: Vec::new(),
            by_id: BTreeMap::new(),
            next_node_id: 1,
            net: network::Net::default(),
            procs: processes::Processes::default(),
            clients: clients::Clients::default(),
            checks: invariants::Checks::default(),
            stats: stats::Stats::new(opts.trace),
            inputs: VecDeque::new(),
            stepping: false,
            digest: 0xcbf2_9ce4_8422_2325 ^ seed,
            events: 0,
            fault_phase: true,
            finished: false,
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
                let idx = w.add_node(name, site, pi, drift);
                let join_ms = pool.join_at_s * 1000 + idx as u64 * 7;
                if idx == 0 {
                    w.start_node(0, true);
                } else {
                    w.schedule(join_ms, Occurrence::Restart { node: idx });
                    w.nodes[idx].down = true;
                }
            }
        }
        let owners: Vec<(String, String)> = sc
            .experiments
            .iter()
            .zip(&sc.experiment_workspaces)
            .map(|(e, w)| (e.owner.clone(), w.clone()))
            .collect();
        w.clients.plan_users(&owners);
        w.schedule(0, Occurrence::SetUpUsers { retry: None });
        for (i, e) in sc.experiments.iter().enumerate() {
            for c in 0..e.count {
                w.schedule(
                    (e.arrive_s + u64::from(c) * e.every_s) * 1000,
                    Occurrence::Submit {
                        arrival: i,
                        retry: None,
                    },
                );
            }
        }
        for f in &sc.faults.events {
            w.schedule(f.at_s * 1000, Occurrence::Fault(f.clone()));
        }
        w.schedule(FAULT_DRAW_EVERY_MS, Occurrence::DrawFaults);
        w.schedule(SAMPLE_EVERY_MS, Occurrence::Sample);
        w.schedule(sc.duration_s * 1000, Occurrence::EndFaults);
        w
    }

    fn schedule(&mut self, at: u64, occurrence: Occurrence) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            occurrence,
        });
    }

    fn run(&mut self) {
        while let Some(Scheduled { at, occurrence, .. }) = self.heap.pop() {
            if self.finished {
                break;
            }
            self.now = at;
            self.events += 1;
            if self.events > self.opts.max_events {
                self.violation(format!("event limit of {} reached", self.opts.max_events));
                break;
            }
            self.handle(occurrence);
        }
    }

    fn handle(&mut self, occurrence: Occurrence) {
        match occurrence {
            Occurrence::Tick { node, epoch } => self.tick(node, epoch),
            Occurrence::Deliver { from, to, msg } => self.deliver(from, to, *msg),
            Occurrence::DiskDone { node, epoch } => self.disk_done(node, epoch),
            Occurrence::ConnectionsReset { to, node } => {
                if !self.nodes[to].down {
                    self.step(to, Event::Disconnected { node });
                }
            }
            Occurrence::TrialStep { process } => self.trial_step(process),
            Occurrence::CheckpointDone {
                process,
                units,
                then,
            } => self.checkpoint_done(process, units, then),
            Occurrence::FetchDone {
                to,
                epoch,
                digest,
                ok,
            } => self.fetch_done(to, epoch, digest, ok),
            Occurrence::Submit { arrival, retry } => self.submit(arrival, retry),
            Occurrence::SubmitTimeout {
                arrival,
                id,
                attempt,
            } => self.submit_timed_out(arrival, id, attempt),
            Occurrence::SetUpUsers { retry } => self.set_up_users(retry),
            Occurrence::SetUpTimeout { step, id } => self.set_up_timed_out(step, id),
            Occurrence::Fault(f) => self.fault(&f),
            Occurrence::Restart { node } => self.restart(node),
            Occurrence::GpuRecovered { node, gpu } => self.gpu_recovered(node, gpu),
            Occurrence::Unblock { node } => self.unblock(node),
            Occurrence::SpotGone { node } => self.spot_gone(node),
            Occurrence::RollingStep { next, gap_s } => self.rolling_step(next, gap_s),
            Occurrence::DrawFaults => self.draw_faults(),
            Occurrence::Sample => self.sample(),
            Occurrence::EndFaults => self.end_faults(),
        }
    }

    /// A draw from `r` (inclusive) from the fault stream.
    fn range(&mut self, r: [u64; 2]) -> u64 {
        r[0] + self.rng.fault.next_u64() % (r[1] - r[0] + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        let draw = (self.rng.fault.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        p > 0.0 && draw < p
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }
}
