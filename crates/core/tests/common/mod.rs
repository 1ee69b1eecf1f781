//! An in-process cluster over a deterministic test network (seeded delays, drops,
//! partitions) with one simulated or durable store per node.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use resolute_core::node::Effect;
use resolute_core::{
    Command, Input, Node, NodeConfig, NodeError, NodeId, NodeInfo, Output, PeerMessage, ProposalId,
    Reply,
};
use resolute_storage::{CrashMode, DurableStore, LogStore, Recovered, SimStore};

/// A node's store: in memory or on real files.
pub enum Store {
    Sim(SimStore),
    Durable(DurableStore, PathBuf),
}

impl Store {
    fn as_dyn(&mut self) -> &mut dyn LogStore {
        match self {
            Store::Sim(s) => s,
            Store::Durable(s, _) => s,
        }
    }
}

pub struct Member {
    pub node: Node,
    pub store: Store,
    pub cfg: NodeConfig,
    pub up: bool,
}

pub struct Cluster {
    pub members: BTreeMap<NodeId, Member>,
    /// (deliver at, sequence, from, to, message)
    queue: Vec<(u64, u64, NodeId, NodeId, PeerMessage)>,
    seq: u64,
    pub now_ms: u64,
    rng: u64,
    /// Directed links that drop everything.
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    /// Probability (per mille) that a message is dropped.
    pub drop_per_mille: u64,
    pub replies: BTreeMap<ProposalId, Result<Reply, NodeError>>,
    pub effects: Vec<(NodeId, Effect)>,
    /// What each node handed its tracking store, in order.
    pub tracks: Vec<(NodeId, resolute_core::track::TrackBatch)>,
    pub durable_root: Option<PathBuf>,
    /// When set, every message sent is also recorded here (up to
    /// `TAP_MESSAGES_MAX`), for tests that replay and mutate real traffic.
    pub tap: Option<Vec<(NodeId, NodeId, PeerMessage)>>,
    next_proposal: u128,
    /// Carry out writes later (as a real shell's write thread does) instead of at
    /// once, so nodes keep stepping while their writes are in flight.
    pub defer_writes: bool,
    deferred: VecDeque<(NodeId, Output)>,
}

pub const TICK_MS: u64 = 100;
/// Most messages a tap records.
pub const TAP_MESSAGES_MAX: usize = 5_000;

pub fn info(site: &str, slots: u32) -> NodeInfo {
    NodeInfo {
        site: site.to_string(),
        slots,
        ..Default::default()
    }
}

impl Cluster {
    pub fn new(seed: u64) -> Self {
        Cluster {
            members: BTreeMap::new(),
            queue: Vec::new(),
            seq: 0,
            now_ms: 0,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            blocked: BTreeSet::new(),
            drop_per_mille: 0,
            replies: BTreeMap::new(),
            effects: Vec::new(),
            tracks: Vec::new(),
            durable_root: None,
            tap: None,
            next_proposal: 1,
            // Odd seeds defer writes: both Ready paths get exercised.
            defer_writes: seed % 2 == 1,
            deferred: VecDeque::new(),
        }
    }

    /// Uses real files (DurableStore) under a fresh temp dir for nodes added later.
    pub fn durable(mut self, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("resolute-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        self.durable_root = Some(dir);
        self
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn open_store(&self, id: NodeId) -> (Store, Recovered) {
        match &self.durable_root {
            Some(root) => {
                let dir = root.join(format!("node-{id}"));
                let (s, rec) = DurableStore::open(&dir).expect("open durable store");
                (Store::Durable(s, dir), rec)
            }
            None => (Store::Sim(SimStore::new()), Recovered::default()),
        }
    }

    pub fn add(&mut self, cfg: NodeConfig, bootstrap: bool) {
        let id = cfg.id;
        let (store, rec) = self.open_store(id);
        let (node, outs) = Node::new(cfg.clone(), &rec, bootstrap).expect("node");
        self.members.insert(
            id,
            Member {
                node,
                store,
                cfg,
                up: true,
            },
        );
        self.handle(id, outs);
    }

    pub fn bootstrap(&mut self, id: NodeId, site: &str) {
        self.add(NodeConfig::new(id, info(site, 2)), true);
    }

    pub fn join(&mut self, id: NodeId, site: &str, via: NodeId) {
        self.join_cfg(NodeConfig::new(id, info(site, 2)), via);
    }

    pub fn join_cfg(&mut self, cfg: NodeConfig, via: NodeId) {
        let id = cfg.id;
        self.add(cfg, false);
        self.input(id, Input::Join { via });
    }

    /// Feeds one input to a node and carries out its outputs.
    pub fn input(&mut self, id: NodeId, input: Input) {
        let now = self.now_ms;
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        if !m.up {
            return;
        }
        let outs = m.node.step(now, input);
        self.handle(id, outs);
    }

    fn handle(&mut self, id: NodeId, outs: Vec<Output>) {
        let mut work: VecDeque<Output> = outs.into();
        while let Some(out) = work.pop_front() {
            match out {
                Output::Send { to, msg } => self.send(id, to, msg),
                Output::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } => {
                    let now = self.now_ms;
                    let m = self.members.get_mut(&id).expect("member");
                    let store = m.store.as_dyn();
                    if let Some(s) = &snapshot {
                        let hs = hard_state.unwrap_or_default();
                        store.install_snapshot(s, &hs).expect("install snapshot");
                    }
                    store.append(&entries, hard_state.as_ref()).expect("append");
                    store.sync().expect("sync");
                    if seq > 0 {
                        let more = m.node.step(now, Input::Persisted { seq });
                        work.extend(more);
                    }
                }
                Output::Effect(e) => self.effects.push((id, e)),
                Output::Track(batch) => self.tracks.push((id, *batch)),
                Output::Reply { id: pid, result } => {
                    self.replies.insert(pid, result);
                }
            }
        }
    }

    /// Carries out the deferred writes, in order.
    fn flush(&mut self) {
        let defer = std::mem::replace(&mut self.defer_writes, false);
        while let Some((id, p)) = self.deferred.pop_front() {
            if self.members.get(&id).is_some_and(|m| m.up) {
                self.handle(id, vec![p]);
            }
        }
        self.defer_writes = defer;
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: PeerMessage) {
        if let Some(tap) = &mut self.tap {
            if tap.len() < TAP_MESSAGES_MAX {
                tap.push((from, to, msg.clone()));
            }
        }
        if self.blocked.contains(&(from, to)) {
            return;
        }
        if self.drop_per_mille > 0 && self.rand() % 1000 < self.drop_per_mille {
            return;
        }
        let delay = 1 + self.rand() % 5;
        self.seq += 1;
        self.queue
            .push((self.now_ms + delay, self.seq, from, to, msg));
    }

    /// Runs the cluster for `ms` of virtual time.
    pub fn run(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            let next_tick = (self.now_ms / TICK_MS + 1) * TICK_MS;
            // Deliver everything due before the next tick, in (time, seq) order.
            loop {
                self.flush();
                let due = self
                    .queue
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.0 <= next_tick)
                    .min_by_key(|(_, q)| (q.0, q.1))
                    .map(|(i, _)| i);
                let Some(i) = due else { break };
                let (at, _, from, to, msg) = self.queue.remove(i);
                self.now_ms = self.now_ms.max(at);
                let up = self.members.get(&from).is_some_and(|m| m.up);
                if up && !self.blocked.contains(&(from, to)) {
                    self.input(to, Input::Peer { from, msg });
                }
            }
            self.now_ms = next_tick;
            let ids: Vec<NodeId> = self.members.keys().copied().collect();
            // Each node ticks at its own seeded phase, as real clocks drift apart:
            // lockstep ticks would make simultaneous elections split forever.
            let mut order = ids.clone();
            let spin = (self.rand() % ids.len().max(1) as u64) as usize;
            order.rotate_left(spin);
            for id in &order {
                self.now_ms += 1;
                self.input(*id, Input::Tick);
            }
            self.flush();
            // Gossip heartbeats between live, connected nodes.
            for a in &ids {
                for b in &ids {
                    let up = self.members[a].up && self.members[b].up;
                    if a != b && up && !self.blocked.contains(&(*a, *b)) {
                        self.input(*b, Input::Heartbeat { node: *a });
                    }
                }
            }
        }
    }

    /// Runs until `cond` holds (or panics after `limit_ms`).
    pub fn until(&mut self, limit_ms: u64, what: &str, cond: impl Fn(&Cluster) -> bool) {
        let end = self.now_ms + limit_ms;
        while !cond(self) {
            assert!(self.now_ms < end, "timed out waiting for: {what}");
            self.run(TICK_MS);
        }
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.members
            .values()
            .filter(|m| m.up && m.node.is_leader())
            .map(|m| m.node.id())
            .max_by_key(|id| self.members[id].node.term())
    }

    pub fn voters(&self, id: NodeId) -> Vec<NodeId> {
        self.members[&id].node.membership().0
    }

    pub fn propose_on(&mut self, id: NodeId, command: Command) -> ProposalId {
        self.propose_with(id, None, command)
    }

    /// Proposes on `id` on `user`'s authority.
    pub fn propose_as(&mut self, id: NodeId, user: &str, command: Command) -> ProposalId {
        self.propose_with(id, Some(user.to_string()), command)
    }

    fn propose_with(&mut self, id: NodeId, user: Option<String>, command: Command) -> ProposalId {
        let pid = ProposalId(self.next_proposal);
        self.next_proposal += 1;
        self.input(
            id,
            Input::Propose {
                id: pid,
                command,
                user,
            },
        );
        pid
    }

    pub fn repropose(&mut self, id: NodeId, pid: ProposalId, command: Command) {
        self.replies.remove(&pid);
        self.input(
            id,
            Input::Propose {
                id: pid,
                command,
                user: None,
            },
        );
    }

    /// Crashes a node: it stops, and its store loses what was not synced.
    pub fn crash(&mut self, id: NodeId) {
        let m = self.members.get_mut(&id).expect("member");
        m.up = false;
        // Writes not yet carried out are lost with the process.
        self.deferred.retain(|(n, _)| *n != id);
        let m = self.members.get_mut(&id).expect("member");
        if let Store::Sim(s) = &mut m.store {
            let mut r = Xor(7);
            s.crash(CrashMode::TearUnsynced, &mut r);
        }
        self.queue.retain(|q| q.3 != id);
    }

    /// Restarts a crashed node from its store.
    pub fn restart(&mut self, id: NodeId) {
        let m = self.members.get_mut(&id).expect("member");
        let rec = match &mut m.store {
            Store::Sim(s) => s.recover().expect("recover"),
            Store::Durable(_, dir) => {
                let dir = dir.clone();
                let (s, rec) = DurableStore::open(&dir).expect("reopen");
                m.store = Store::Durable(s, dir);
                rec
            }
        };
        let (node, outs) = Node::new(m.cfg.clone(), &rec, false).expect("restart");
        m.node = node;
        m.up = true;
        self.handle(id, outs);
    }

    /// Digests of every live node's state.
    pub fn digests(&self) -> BTreeMap<NodeId, String> {
        self.members
            .iter()
            .filter(|(_, m)| m.up)
            .map(|(id, m)| (*id, m.node.state().digest()))
            .collect()
    }

    pub fn converged(&self) -> bool {
        let applied: BTreeSet<u64> = self
            .members
            .values()
            .filter(|m| m.up)
            .map(|m| m.node.applied())
            .collect();
        applied.len() == 1 && self.digests().values().collect::<BTreeSet<_>>().len() == 1
    }
}

struct Xor(u64);

impl rand_core::RngCore for Xor {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill_bytes(&mut self, d: &mut [u8]) {
        for b in d {
            *b = self.next_u64() as u8;
        }
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(d);
        Ok(())
    }
}

/// An entry as an honest cluster would write it: proposed by the node a
/// node-scoped command is about (a trial's report by a node it runs on), and
/// appended by that node as the leader, so that the scope checks pass.
pub fn honest_envelope(
    state: &resolute_core::state::ClusterState,
    index: u64,
    time_ms: u64,
    command: Command,
) -> resolute_core::Envelope {
    let trial_node = |trial: &u64| {
        state
            .trials
            .get(trial)
            .and_then(|t| t.layout.first().map(|(n, _)| *n))
    };
    let proposer = match &command {
        Command::NodeCapacity { node, .. } | Command::NodeDraining { node } => Some(*node),
        Command::TrialStarted { trial, .. } | Command::TrialExited { trial, .. } => {
            trial_node(trial)
        }
        Command::CheckpointSaved { holder, .. }
        | Command::CheckpointReplicated { holder, .. }
        | Command::ModelKept { holder, .. } => Some(*holder),
        Command::Metrics { records } => records.first().and_then(|r| trial_node(&r.trial)),
        _ => None,
    }
    .unwrap_or(1);
    resolute_core::Envelope {
        version: resolute_core::command::COMMAND_VERSION,
        id: ProposalId(u128::from(index)),
        time_ms,
        proposer,
        leader: proposer,
        user: None,
        command,
    }
}

/// A three-voter cluster, formed and converged.
pub fn three(seed: u64) -> Cluster {
    let mut c = Cluster::new(seed);
    c.bootstrap(1, "a");
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    c.join(2, "b", 1);
    c.join(3, "c", 1);
    c.until(20_000, "three voters", |c| {
        let mut v = c.voters(1);
        v.sort();
        v == vec![1, 2, 3] && c.converged()
    });
    c
}
