//! Faults: the scenario's scheduled events, random draws at the scenario's
//! rates (kept within what Raft tolerates), and healing everything for the
//! liveness phase.

use resolute_agent::{Event, LEAVE_DRAIN_MS, LEAVE_REMOVE_MS};
use resolute_core::NodeId;

use super::{Occurrence, World, FAULT_DRAW_EVERY_MS};
use crate::scenario::{FaultEvent, FaultKind};

impl World<'_> {
    fn node_named(&self, name: &Option<String>) -> Option<usize> {
        let name = name.as_ref()?;
        self.nodes.iter().position(|n| &n.name == name)
    }

    fn site_named(&self, name: &Option<String>) -> Option<usize> {
        self.sc
            .sites
            .iter()
            .position(|s| Some(&s.name) == name.as_ref())
    }

    pub(super) fn fault(&mut self, f: &FaultEvent) {
        let target = self.node_named(&f.node);
        match f.kind {
            FaultKind::Crash => {
                if let Some(n) = target {
                    self.crash(n, "scheduled crash", false);
                    if let Some(s) = f.restart_after_s {
                        self.schedule(self.now + s * 1000, Occurrence::Restart { node: n });
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
                        self.net.muted.insert(id);
                    } else {
                        self.isolate(id);
                    }
                    self.note(format!("{} partitioned ({:?})", self.nodes[n].name, f.kind));
                    self.stats.marker(self.now, id, "partitioned");
                    if let Some(s) = f.restart_after_s {
                        self.schedule(self.now + s * 1000, Occurrence::Unblock { node: n });
                    }
                }
            }
            FaultKind::SplitSite => {
                if let Some(site) = self.site_named(&f.site) {
                    let (inside, outside): (Vec<&super::SimNode>, Vec<&super::SimNode>) =
                        self.nodes.iter().partition(|n| n.site == site);
                    let inside: Vec<NodeId> = inside.iter().map(|n| n.id).collect();
                    let outside: Vec<NodeId> = outside.iter().map(|n| n.id).collect();
                    for a in &inside {
                        for b in &outside {
                            self.net.blocked.insert((*a, *b));
                            self.net.blocked.insert((*b, *a));
                        }
                    }
                    self.note(format!("site {} split off", self.sc.sites[site].name));
                }
            }
            FaultKind::SiteOutage => {
                if let Some(site) = self.site_named(&f.site) {
                    let members: Vec<usize> = (0..self.nodes.len())
                        .filter(|i| self.nodes[*i].site == site)
                        .collect();
                    for n in members {
                        self.crash(n, "site outage", false);
                        if let Some(s) = f.restart_after_s {
                            self.schedule(self.now + s * 1000, Occurrence::Restart { node: n });
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
                    if !self.nodes[n].down {
                        self.note(format!("{} leaves", self.nodes[n].name));
                        self.step(n, Event::Leave);
                        // Its agent drains, leaves and stops it; a machine that
                        // is cut off meanwhile is switched off when its time is up.
                        let grace = LEAVE_DRAIN_MS
                            + LEAVE_REMOVE_MS
                            + self.sc.node.timing().lease_timeout_ms;
                        self.schedule(self.now + grace, Occurrence::SpotGone { node: n });
                    }
                }
            }
            FaultKind::RollingRestart => {
                let gap = f.restart_after_s.unwrap_or(30);
                self.schedule(
                    self.now,
                    Occurrence::RollingStep {
                        next: 0,
                        gap_s: gap,
                    },
                );
            }
        }
    }

    pub(super) fn rolling_step(&mut self, next: usize, gap_s: u64) {
        if next >= self.nodes.len() {
            return;
        }
        if !self.nodes[next].gone && !self.nodes[next].down {
            self.crash(next, "rolling restart", true);
            self.schedule(self.now + gap_s * 500, Occurrence::Restart { node: next });
        }
        self.schedule(
            self.now + gap_s * 1000,
            Occurrence::RollingStep {
                next: next + 1,
                gap_s,
            },
        );
    }

    fn disk_loss(&mut self, node: usize, after_s: u64) {
        self.crash(node, "disk lost", false);
        self.nodes[node].gone = true;
        self.nodes[node].blobs.clear();
        let replacement = self.replace(node);
        self.schedule(
            self.now + after_s * 1000,
            Occurrence::Restart { node: replacement },
        );
    }

    /// A spot notice: the node drains (its agent proposes it), and its machine
    /// is reclaimed when the notice is up.
    fn spot(&mut self, node: usize) {
        if self.nodes[node].down || self.nodes[node].gone {
            return;
        }
        self.note(format!("{} gets a spot notice", self.nodes[node].name));
        let id = self.nodes[node].id;
        self.stats.marker(self.now, id, "spot notice");
        self.step(node, Event::Drain);
        self.schedule(
            self.now + self.sc.faults.spot_notice_s * 1000,
            Occurrence::SpotGone { node },
        );
    }

    /// A reclaimed spot machine, or a leaving node whose time is up.
    pub(super) fn spot_gone(&mut self, node: usize) {
        self.retire(node, "spot instance reclaimed", false);
    }

    fn heal_all(&mut self) {
        self.net.blocked.clear();
        self.net.muted.clear();
        self.note("all faults healed".into());
        for n in 0..self.nodes.len() {
            if self.nodes[n].down && !self.nodes[n].gone && !self.heap_has_restart(n) {
                self.schedule(self.now + 1 + n as u64, Occurrence::Restart { node: n });
            }
        }
    }

    fn heap_has_restart(&self, node: usize) -> bool {
        self.heap
            .iter()
            .any(|s| matches!(s.occurrence, Occurrence::Restart { node: n } if n == node))
    }

    pub(super) fn draw_faults(&mut self) {
        if !self.fault_phase {
            return;
        }
        self.schedule(self.now + FAULT_DRAW_EVERY_MS, Occurrence::DrawFaults);
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
                    self.schedule(self.now + after * 1000, Occurrence::Restart { node: n });
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
                let pick = (rand_core::RngCore::next_u64(&mut self.rng.fault)
                    % candidates.len() as u64) as usize;
                let n = candidates[pick];
                let id = self.nodes[n].id;
                self.isolate(id);
                self.note(format!("{} isolated", self.nodes[n].name));
                self.stats.marker(self.now, id, "isolated");
                let after = self.range(f.partition_s).max(1);
                self.schedule(self.now + after * 1000, Occurrence::Unblock { node: n });
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
            .filter_map(|n| n.driver.as_ref())
            .max_by_key(|d| d.node().applied())
            .map(|d| d.node().membership().0)
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

    pub(super) fn end_faults(&mut self) {
        self.fault_phase = false;
        self.note("fault phase over: liveness phase".into());
        self.heal_all();
    }
}
