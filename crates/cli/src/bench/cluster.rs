//! An in-process cluster of real `core::Node`s for the benchmarks of the log and
//! the state: each node has a real `DurableStore` in a temp dir (fsync for
//! real) and, when asked, a real tracking store (SQLite) written as the node
//! actor writes it. Messages are delivered in rounds; per round each node writes
//! everything pending with one fsync (group commit) on a thread of its own, as
//! separate machines would.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use resolute_core::command::{Command, ProposalId};
use resolute_core::track::TrackBatch;
use resolute_core::{Input, Node, NodeConfig, NodeInfo, Output, Reply};
use resolute_storage::{DurableStore, LogStore};
use resolute_tracking::background::Background;
use resolute_tracking::{Slice, Tracker};

/// Wall time between ticks, as a node would tick.
const TICK_EVERY: Duration = Duration::from_millis(100);
/// How long a cluster may take to form, or a node to join.
const FORM_TIMEOUT_S: u64 = 60;

/// How the nodes are made.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Slots nodes 1, 2 and 3 offer (a node that joins later offers none).
    pub slots: [u32; 3],
    /// Whether each node keeps a tracking store.
    pub track: bool,
    /// Entries between snapshots (`NodeConfig::snapshot_entries`).
    pub snapshot_entries: u64,
    /// Bytes of entries between snapshots (`NodeConfig::snapshot_log_bytes`).
    pub snapshot_log_bytes: u64,
}

pub(super) struct Member {
    pub(super) node: Node,
    store: DurableStore,
    persists: Vec<Output>,
    pub(super) fsyncs: u64,
    /// Its tracking store's writer thread, as a node has one.
    tracker: Option<Background>,
    tracks: Vec<TrackBatch>,
    /// When its tracking batches were last written.
    tracked_at: Instant,
}

/// Carries out a node's pending writes with one fsync (its tracking batches
/// first, in one transaction); returns what to acknowledge.
fn write_round(id: u64, m: &mut Member) -> anyhow::Result<(u64, Vec<u64>)> {
    let snapshot_next = m.persists.iter().any(|p| {
        matches!(
            p,
            Output::Persist {
                snapshot: Some(_),
                ..
            }
        )
    });
    // As the node actor does: handed to the writer thread every
    // `WRITE_EVERY_MS`, and written (and fsynced) before a snapshot.
    let due = m.tracked_at.elapsed() >= Duration::from_millis(resolute_tracking::WRITE_EVERY_MS)
        || m.tracks.len() >= resolute_tracking::WRITE_BATCHES_MAX;
    if let Some(t) = &m.tracker {
        if (!m.tracks.is_empty() && due) || snapshot_next {
            let batches = std::mem::take(&mut m.tracks);
            let slice = Slice::of(&batches, m.node.state());
            if snapshot_next {
                t.write_and_wait(batches, slice, true);
            } else {
                t.write(batches, slice);
            }
            m.tracked_at = Instant::now();
        }
    }
    let mut seqs = Vec::new();
    for p in std::mem::take(&mut m.persists) {
        if let Output::Persist {
            seq,
            snapshot,
            entries,
            hard_state,
        } = p
        {
            if let Some(s) = &snapshot {
                m.store
                    .install_snapshot(s, &hard_state.unwrap_or_default())?;
            }
            m.store.append(&entries, hard_state.as_ref())?;
            seqs.push(seq);
        }
    }
    if !seqs.is_empty() {
        m.store.sync()?;
        m.fsyncs += 1;
    }
    Ok((id, seqs))
}

/// The cluster.
pub struct Cluster {
    pub(super) members: BTreeMap<u64, Member>,
    queue: VecDeque<(u64, u64, resolute_core::PeerMessage)>,
    start: Instant,
    last_tick: Instant,
    pub(super) replies: BTreeMap<ProposalId, Reply>,
    next_id: u128,
    dir: PathBuf,
    shape: Shape,
}

impl Cluster {
    /// Three nodes in `dir`, node 1 bootstrapping; call [`Cluster::form`] next.
    pub fn new(dir: &Path, shape: Shape) -> anyhow::Result<Cluster> {
        let mut c = Cluster {
            members: BTreeMap::new(),
            queue: VecDeque::new(),
            start: Instant::now(),
            last_tick: Instant::now(),
            replies: BTreeMap::new(),
            next_id: 1,
            dir: dir.to_path_buf(),
            shape,
        };
        for id in 1..=3u64 {
            c.add(id, id == 1)?;
        }
        Ok(c)
    }

    /// Starts node `id` from its (possibly empty) data dir.
    fn add(&mut self, id: u64, bootstrap: bool) -> anyhow::Result<()> {
        let dir = self.dir.join(format!("node-{id}"));
        let (store, rec) = DurableStore::open(&dir)?;
        let info = NodeInfo {
            site: format!("site-{id}"),
            slots: usize::try_from(id)
                .ok()
                .and_then(|i| self.shape.slots.get(i.wrapping_sub(1)))
                .copied()
                .unwrap_or(0),
            ..Default::default()
        };
        let mut cfg = NodeConfig::new(id, info);
        cfg.snapshot_entries = self.shape.snapshot_entries;
        cfg.snapshot_log_bytes = self.shape.snapshot_log_bytes;
        cfg.track = self.shape.track;
        let tracker = if self.shape.track {
            let t = Tracker::open(&dir.join(resolute_tracking::FILE_NAME))?;
            Some(Background::spawn(t)?)
        } else {
            None
        };
        let (node, outs) =
            Node::new(cfg, &rec, bootstrap).map_err(|e| anyhow::anyhow!("node {id}: {e}"))?;
        self.members.insert(
            id,
            Member {
                node,
                store,
                persists: Vec::new(),
                fsyncs: 0,
                tracker,
                tracks: Vec::new(),
                tracked_at: Instant::now(),
            },
        );
        self.handle(id, outs);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn input(&mut self, id: u64, input: Input) {
        let now = self.now_ms();
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        let outs = m.node.step(now, input);
        self.handle(id, outs);
    }

    fn handle(&mut self, id: u64, outs: Vec<Output>) {
        for out in outs {
            match out {
                Output::Send { to, msg } => self.queue.push_back((id, to, msg)),
                p @ Output::Persist { .. } => {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.persists.push(p);
                    }
                }
                Output::Track(batch) => {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.tracks.push(*batch);
                    }
                }
                Output::Reply {
                    id: pid,
                    result: Ok(reply),
                } => {
                    self.replies.insert(pid, reply);
                }
                // Failed proposals stay in flight and fail the run's accounting
                // visibly (they are never counted as committed).
                Output::Reply { result: Err(_), .. } | Output::Effect(_) => {}
            }
        }
    }

    /// One round: deliver messages, then per node write everything pending with
    /// one fsync, then acknowledge; tick when due.
    pub fn round(&mut self) -> anyhow::Result<()> {
        while let Some((from, to, msg)) = self.queue.pop_front() {
            self.input(to, Input::Peer { from, msg });
        }
        let acks: Vec<(u64, Vec<u64>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .members
                .iter_mut()
                .filter(|(_, m)| !m.persists.is_empty() || !m.tracks.is_empty())
                .map(|(id, m)| {
                    let id = *id;
                    scope.spawn(move || write_round(id, m))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a writer thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        for (id, seqs) in acks {
            for seq in seqs.into_iter().filter(|s| *s > 0) {
                self.input(id, Input::Persisted { seq });
            }
        }
        if self.last_tick.elapsed() >= TICK_EVERY {
            self.last_tick = Instant::now();
            let ids: Vec<u64> = self.members.keys().copied().collect();
            for id in &ids {
                self.input(*id, Input::Tick);
                for other in &ids {
                    if other != id {
                        self.input(*other, Input::Heartbeat { node: *id });
                    }
                }
            }
        }
        Ok(())
    }

    /// The leader, if there is one.
    pub fn leader(&self) -> Option<u64> {
        self.members
            .values()
            .find(|m| m.node.is_leader())
            .map(|m| m.node.id())
    }

    /// Joins nodes 2 and 3 and waits for three voters and a leader.
    pub fn form(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(FORM_TIMEOUT_S);
        self.input(2, Input::Join { via: 1 });
        self.input(3, Input::Join { via: 1 });
        while self.members[&1].node.membership().0.len() < 3 || self.leader().is_none() {
            if Instant::now() > deadline {
                bail!("the 3-node cluster did not form in {FORM_TIMEOUT_S} s");
            }
            self.round()?;
        }
        Ok(())
    }

    /// Starts a fresh node `id` that joins through node 1 and waits until it
    /// has applied what the leader had applied when it started, with the same
    /// digest; the seconds that took.
    pub fn join_fresh(&mut self, id: u64) -> anyhow::Result<f64> {
        let leader = self.leader().context("no leader")?;
        let target = self.members[&leader].node.applied();
        let start = Instant::now();
        self.add(id, false)?;
        self.input(id, Input::Join { via: 1 });
        let deadline = start + Duration::from_secs(FORM_TIMEOUT_S * 5);
        loop {
            let caught_up = self.members[&id].node.applied() >= target;
            if caught_up {
                let leader = self.leader().context("no leader")?;
                if self.members[&id].node.applied() == self.members[&leader].node.applied()
                    && self.members[&id].node.state().digest()
                        == self.members[&leader].node.state().digest()
                {
                    return Ok(start.elapsed().as_secs_f64());
                }
            }
            if Instant::now() > deadline {
                bail!("node {id} did not catch up in {} s", FORM_TIMEOUT_S * 5);
            }
            self.round()?;
        }
    }

    /// Proposes `command` on node `on` (forwarded to the leader from a follower).
    pub fn propose_on(&mut self, on: u64, command: Command) -> ProposalId {
        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.input(
            on,
            Input::Propose {
                id,
                command,
                user: None,
            },
        );
        id
    }

    /// Proposes `command` on the leader.
    pub fn propose(&mut self, command: Command) -> anyhow::Result<ProposalId> {
        let leader = self.leader().context("no leader")?;
        Ok(self.propose_on(leader, command))
    }

    /// Writes every node's pending tracking batches now, and waits for them.
    pub fn flush_tracking(&mut self) -> anyhow::Result<()> {
        for m in self.members.values_mut() {
            if let Some(t) = &m.tracker {
                let batches = std::mem::take(&mut m.tracks);
                let slice = Slice::of(&batches, m.node.state());
                t.write_and_wait(batches, slice, false);
                if let Some(e) = t.status().failed {
                    bail!("a tracking store failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// Fills node `id`'s tracking gap as a node does (`node_actor/tracking.rs`),
    /// without the network: a copy of node `from`'s store, installed, then
    /// `id`'s pending batches on top. Whether it installed one.
    pub fn fill_gap_from(&mut self, id: u64, from: u64) -> anyhow::Result<bool> {
        self.flush_tracking()?;
        let src = self.tracking_file(from);
        let copy = self.dir.join(format!("copy-for-{id}.sqlite"));
        resolute_tracking::copy_store(&src, &copy)?;
        let m = self.members.get_mut(&id).context("no such node")?;
        let Some(t) = &m.tracker else {
            return Ok(false);
        };
        let Some(at_least) = t.status().wants_copy else {
            return Ok(false);
        };
        let installed = t
            .install_copy(copy.clone(), at_least)
            .recv()
            .map_err(|_| anyhow::anyhow!("the tracking writer is gone"))?
            .map_err(|e| anyhow::anyhow!(e))?
            .is_some();
        std::fs::remove_file(&copy).ok();
        Ok(installed)
    }

    /// Node `id`'s tracking writer: (seconds busy, reports handed), in all.
    pub fn writer_load(&self, id: u64) -> Option<(f64, u64)> {
        let s = self.members.get(&id)?.tracker.as_ref()?.status();
        Some((s.busy_us as f64 / 1e6, s.reports))
    }

    /// Node `id`'s tracking store file.
    pub fn tracking_file(&self, id: u64) -> PathBuf {
        self.dir
            .join(format!("node-{id}"))
            .join(resolute_tracking::FILE_NAME)
    }

    /// Node `id`'s core.
    pub fn node(&self, id: u64) -> Option<&Node> {
        self.members.get(&id).map(|m| &m.node)
    }
}
