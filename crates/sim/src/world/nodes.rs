//! The simulated machines: each runs a real `agent::Driver` (the node and its
//! agent) from a simulated disk, and the world carries out its actions the way
//! the production shell does, against simulated parts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_core::RngCore;

use resolute_agent::{Action, AgentConfig, Driver, Event};
use resolute_core::{NodeConfig, NodeId, NodeInfo};
use resolute_storage::{CrashMode, SimStore};

use super::{mix, Occurrence, World};

/// One machine.
pub(super) struct SimNode {
    pub(super) id: NodeId,
    pub(super) name: String,
    pub(super) site: usize,
    pub(super) gpus: u32,
    pub(super) speed: f64,
    pub(super) preemptible: bool,
    pub(super) cfg: NodeConfig,
    /// The running node and its agent (None while down).
    pub(super) driver: Option<Driver>,
    pub(super) store: SimStore,
    /// Writes handed to the disk and not yet done.
    pub(super) writes: VecDeque<Action>,
    /// Bumped at every start and crash: events of an earlier life are ignored.
    pub(super) epoch: u64,
    /// Permanently gone (left, disk replaced, spot instance reclaimed).
    pub(super) gone: bool,
    /// Down until restarted.
    pub(super) down: bool,
    /// Blobs (checkpoints) on this machine's disk.
    pub(super) blobs: BTreeSet<String>,
    /// GPUs that failed (a `gpu_failure` fault) and have not recovered.
    pub(super) gpu_failed: Vec<bool>,
    pub(super) drift: f64,
    /// Its pool in the scenario.
    pub(super) group: usize,
}

impl SimNode {
    /// The GPU uuids NVML would list on this machine.
    pub(super) fn gpu_uuids(&self) -> Vec<String> {
        (0..self.gpus)
            .map(|g| format!("GPU-sim-{:04x}-{g}", self.id))
            .collect()
    }
}

impl World<'_> {
    pub(super) fn add_node(
        &mut self,
        name: String,
        site: usize,
        group: usize,
        drift: f64,
    ) -> usize {
        let id = self.next_node_id;
        self.next_node_id += 1;
        let pool = &self.sc.pools[group];
        let info = NodeInfo {
            site: self.sc.sites[site].name.clone(),
            slots: pool.gpus,
            pool: pool.resource_pool.clone(),
            preemptible: pool.preemptible,
            cost_per_slot_hour_micros: (pool.cost_per_gpu_hour * 1e6).round() as u64,
            pool_settings: Some(self.sc.scheduler.settings()),
            labels: BTreeMap::new(),
        };
        let mut cfg = NodeConfig::new(id, info);
        cfg.join_token = Some(super::clients::join_token());
        // Simulated nodes keep no tracking store: the control state and its
        // digest are the real ones, the SQL rows would only cost time.
        cfg.track = false;
        let n = &self.sc.node;
        cfg.tick_ms = n.tick_ms;
        cfg.voters = n.voters.clamp(1, 7);
        cfg.set_timing(n.timing());
        cfg.snapshot_entries = n.snapshot_entries;
        cfg.proposal_timeout_ms = 10 * cfg.lease_timeout_ms;
        cfg.seed = self.opts.seed ^ id.wrapping_mul(0xd6e8_feb8_6659_fd93);
        let (gpus, speed, preemptible) = (pool.gpus, pool.gpu_speed, pool.preemptible);
        self.nodes.push(SimNode {
            id,
            name,
            site,
            gpus,
            speed,
            preemptible,
            cfg,
            driver: None,
            store: SimStore::new(),
            writes: VecDeque::new(),
            epoch: 0,
            gone: false,
            down: false,
            blobs: BTreeSet::new(),
            gpu_failed: vec![false; gpus as usize],
            drift,
            group,
        });
        self.by_id.insert(id, self.nodes.len() - 1);
        self.nodes.len() - 1
    }

    /// The node's clock (virtual time, skewed by its drift).
    pub(super) fn node_now(&self, node: usize) -> u64 {
        (self.now as f64 * (1.0 + self.nodes[node].drift)) as u64
    }

    /// A proposal id base no earlier life of this node used, from the seed.
    fn proposal_base(&self, node: usize) -> u128 {
        let n = &self.nodes[node];
        let mut x = self.opts.seed ^ n.id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (u128::from(x ^ (x >> 31)) << 64) | (u128::from(n.epoch) << 40)
    }

    pub(super) fn start_node(&mut self, node: usize, bootstrap: bool) {
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
        self.nodes[node].epoch += 1;
        let now = self.node_now(node);
        let n = &self.nodes[node];
        let agent = AgentConfig::new(n.id, n.gpu_uuids(), 0, self.proposal_base(node));
        let blobs: Vec<String> = n.blobs.iter().cloned().collect();
        match Driver::new(n.cfg.clone(), agent, &rec, bootstrap, blobs, now) {
            Ok((driver, actions)) => {
                self.nodes[node].driver = Some(driver);
                self.nodes[node].down = false;
                let epoch = self.nodes[node].epoch;
                let phase = self.rng.net.next_u64() % self.sc.node.tick_ms.max(1);
                self.schedule(self.now + phase + 1, Occurrence::Tick { node, epoch });
                self.actions(node, actions);
                if fresh && !bootstrap {
                    if let Some(via) = self.random_up_node(node) {
                        self.step(node, Event::Join { via });
                    }
                }
            }
            Err(e) => {
                let name = self.nodes[node].name.clone();
                self.violation(format!("{name}: node did not start: {e}"));
            }
        }
    }

    pub(super) fn tick(&mut self, node: usize, epoch: u64) {
        if self.nodes[node].epoch != epoch || self.nodes[node].down {
            return;
        }
        let period = (self.sc.node.tick_ms as f64 * (1.0 + self.nodes[node].drift)).max(1.0) as u64;
        self.schedule(self.now + period, Occurrence::Tick { node, epoch });
        self.step(node, Event::Tick);
    }

    pub(super) fn random_up_node(&mut self, except: usize) -> Option<NodeId> {
        let up: Vec<NodeId> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != except && !n.down && n.driver.is_some())
            .map(|(_, n)| n.id)
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[(self.rng.net.next_u64() % up.len() as u64) as usize])
    }

    /// Feeds one event to a node and carries out its actions. Events that arise
    /// while actions are being carried out (a process's report, a write's
    /// acknowledgement) wait until the current actions are done: a node's writes
    /// must reach its disk in the order it emitted them.
    pub(super) fn step(&mut self, node: usize, event: Event) {
        self.inputs.push_back((node, event));
        if self.stepping {
            return;
        }
        self.stepping = true;
        while let Some((node, event)) = self.inputs.pop_front() {
            let now = self.node_now(node);
            let Some(d) = self.nodes[node].driver.as_mut() else {
                continue;
            };
            let actions = d.step(now, event);
            self.actions(node, actions);
            self.check_node(node);
        }
        self.stepping = false;
    }

    /// Carries out a node's actions, in order.
    pub(super) fn actions(&mut self, node: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => self.send(node, to, msg),
                p @ Action::Persist { .. } => self.persist(node, p),
                // Not emitted: `cfg.track` is off.
                Action::Track(_) => {}
                Action::DeleteBlob { digest } => {
                    self.nodes[node].blobs.remove(&digest);
                }
                Action::Reply { id, result } => self.reply(id, result),
                Action::Launch(spec) => self.launch(node, *spec),
                Action::Preempt { trial, incarnation } => self.preempt(node, trial, incarnation),
                Action::Retarget {
                    trial,
                    incarnation,
                    target,
                } => self.retarget(node, trial, incarnation, target),
                Action::Proceed {
                    trial,
                    incarnation,
                    target,
                } => self.proceed(node, trial, incarnation, target),
                Action::Terminate { trial, incarnation } => {
                    self.signal_process(node, trial, incarnation, 15)
                }
                Action::Kill { trial, incarnation } => {
                    self.signal_process(node, trial, incarnation, 9)
                }
                Action::Fetch { digest, holders } => self.fetch(node, digest, holders),
                // NVML answers at once (the answer waits in the step queue).
                Action::CheckGpus => self.gpu_answer(node, self.nodes[node].epoch),
                // Simulated disks do not fill: their agents watch no low-water
                // mark (`disk_low_water_bytes` 0) and never ask.
                Action::CheckDisk => {}
                Action::Settled { command, reply } => self.settled(command, reply),
                Action::Note(text) => {
                    let name = self.nodes[node].name.clone();
                    self.note(format!("{name}: {text}"));
                }
                Action::Left => self.retire(node, "left the cluster", true),
            }
        }
    }

    pub(super) fn crash(&mut self, node: usize, why: &str, resets: bool) {
        if self.nodes[node].down {
            return;
        }
        let name = self.nodes[node].name.clone();
        self.note(format!("{name} crashed ({why})"));
        self.stats.marker(self.now, self.nodes[node].id, why);
        let n = &mut self.nodes[node];
        n.down = true;
        n.epoch += 1;
        n.driver = None;
        self.lose_unsynced_writes(node);
        self.kill_node_processes(node);
        let id = self.nodes[node].id;
        self.digest = mix(self.digest, id ^ 0xdead);
        if resets {
            self.reset_connections(node);
        }
    }

    pub(super) fn restart(&mut self, node: usize) {
        if self.nodes[node].gone || !self.nodes[node].down {
            return;
        }
        let name = self.nodes[node].name.clone();
        self.note(format!("{name} starts"));
        self.start_node(node, false);
    }

    /// Replaces a node's machine: a new identity with an empty disk on the same
    /// pool and site. Returns the new node's index (down until restarted).
    pub(super) fn replace(&mut self, node: usize) -> usize {
        let (site, group, drift) = {
            let n = &self.nodes[node];
            (n.site, n.group, n.drift)
        };
        let name = format!("{}'", self.nodes[node].name);
        let idx = self.add_node(name, site, group, drift);
        self.nodes[idx].down = true;
        idx
    }

    /// A machine leaves for good (reclaimed, or its node left the cluster); a
    /// replacement with a fresh disk and identity comes later. A process that
    /// exits resets its connections; a machine that vanishes does not.
    pub(super) fn retire(&mut self, node: usize, why: &str, resets: bool) {
        if self.nodes[node].gone {
            return;
        }
        self.crash(node, why, resets);
        self.nodes[node].gone = true;
        let delay = self.range(self.sc.faults.restart_after_s) * 1000;
        let replacement = self.replace(node);
        self.schedule(self.now + delay, Occurrence::Restart { node: replacement });
    }

    /// Loses the unsynced part of a crashed node's disk.
    fn lose_unsynced_writes(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        // Writes handed to the disk but not fsynced: a prefix of them reaches it,
        // maybe torn. A snapshot install is synced by itself, so the writes stop
        // before one (a log cannot skip what the install would have written).
        for w in n.writes.drain(..) {
            match w {
                Action::Persist {
                    entries,
                    hard_state,
                    snapshot: None,
                    ..
                } => {
                    let _ = resolute_storage::LogStore::append(
                        &mut n.store,
                        &entries,
                        hard_state.as_ref(),
                    );
                }
                _ => break,
            }
        }
        n.store.crash(CrashMode::TearUnsynced, &mut self.rng.disk);
    }
}
