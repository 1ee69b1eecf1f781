//! The simulated network: per-link latency (within a site, across sites), loss,
//! duplication, partitions (both ways, or a node's outgoing traffic muted),
//! connection resets when a process dies, and blob transfers at the scenario's
//! bandwidth.

use std::collections::BTreeSet;

use rand_core::RngCore;

use resolute_agent::Event;
use resolute_core::{NodeId, PeerMessage};

use super::{mix, Occurrence, World};

/// The network's state.
#[derive(Debug, Default)]
pub(super) struct Net {
    /// Directed links that drop everything.
    pub(super) blocked: BTreeSet<(NodeId, NodeId)>,
    /// Nodes whose outgoing messages are all dropped.
    pub(super) muted: BTreeSet<NodeId>,
    /// Messages delivered.
    pub(super) messages: u64,
    /// Bytes of blobs moved between nodes.
    pub(super) bytes_moved: u64,
}

impl World<'_> {
    /// One-way latency bounds between two nodes.
    fn latency_range(&self, a: usize, b: usize) -> [u64; 2] {
        if self.nodes[a].site == self.nodes[b].site {
            self.sc.sites[self.nodes[a].site].latency_ms
        } else {
            self.sc.network.cross_site_latency_ms
        }
    }

    fn lost(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.net.next_u64() % 1_000_000) as f64 / 1_000_000.0 < p
    }

    pub(super) fn send(&mut self, from_idx: usize, to: NodeId, msg: PeerMessage) {
        let from = self.nodes[from_idx].id;
        if self.net.muted.contains(&from) || self.net.blocked.contains(&(from, to)) {
            return;
        }
        let Some(to_idx) = self.index_of(to) else {
            return;
        };
        if self.lost(self.sc.network.loss) {
            return;
        }
        let range = self.latency_range(from_idx, to_idx);
        let latency = range[0] + self.rng.net.next_u64() % (range[1].saturating_sub(range[0]) + 1);
        if self.lost(self.sc.network.duplicate) {
            let extra = latency + 1 + self.rng.net.next_u64() % (range[1] + 1);
            self.schedule(
                self.now + extra,
                Occurrence::Deliver {
                    from,
                    to: to_idx,
                    msg: Box::new(msg.clone()),
                },
            );
        }
        self.schedule(
            self.now + latency.max(1),
            Occurrence::Deliver {
                from,
                to: to_idx,
                msg: Box::new(msg),
            },
        );
    }

    pub(super) fn deliver(&mut self, from: NodeId, to: usize, msg: PeerMessage) {
        if self.nodes[to].down {
            return;
        }
        self.net.messages += 1;
        self.digest = mix(mix(self.digest, self.now), from ^ (self.nodes[to].id << 20));
        self.step(to, Event::Peer { from, msg });
    }

    /// A process that dies has its sockets reset by its kernel: every peer it
    /// can reach learns of it after one network latency (a machine that vanishes
    /// resets nothing, and its peers wait for the lease).
    pub(super) fn reset_connections(&mut self, node: usize) {
        let id = self.nodes[node].id;
        for to in 0..self.nodes.len() {
            let peer = &self.nodes[to];
            if to == node || peer.down || peer.gone {
                continue;
            }
            if self.net.blocked.contains(&(id, peer.id)) || self.net.muted.contains(&id) {
                continue;
            }
            let range = self.latency_range(node, to);
            self.schedule(
                self.now + range[0].max(1),
                Occurrence::ConnectionsReset { to, node: id },
            );
        }
    }

    /// Whether traffic can go from `a` to `b` now.
    pub(super) fn reachable(&self, a: usize, b: usize) -> bool {
        let (x, y) = (self.nodes[a].id, self.nodes[b].id);
        !self.net.blocked.contains(&(x, y)) && !self.net.muted.contains(&x)
    }

    /// Cuts a node off from every other.
    pub(super) fn isolate(&mut self, id: NodeId) {
        for other in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            if other != id {
                self.net.blocked.insert((id, other));
                self.net.blocked.insert((other, id));
            }
        }
    }

    pub(super) fn unblock(&mut self, node: usize) {
        let id = self.nodes[node].id;
        self.net.blocked.retain(|(a, b)| *a != id && *b != id);
        self.net.muted.remove(&id);
        self.note(format!("{} reconnected", self.nodes[node].name));
    }

    /// A node fetches a blob: from the first of `holders` that is up, has it,
    /// and can talk to it both ways, at the scenario's bandwidth. With none, the
    /// fetch fails after one round trip when every holder is down (connections
    /// refused), or after the request timeout when one is up but cut off.
    pub(super) fn fetch(&mut self, node: usize, digest: String, holders: Vec<NodeId>) {
        let epoch = self.nodes[node].epoch;
        if self.nodes[node].blobs.contains(&digest) {
            self.schedule(
                self.now,
                Occurrence::FetchDone {
                    to: node,
                    epoch,
                    digest,
                    ok: Ok(()),
                },
            );
            return;
        }
        let candidates: Vec<usize> = holders
            .iter()
            .filter_map(|h| self.index_of(*h))
            .filter(|h| *h != node && !self.nodes[*h].down && !self.nodes[*h].gone)
            .collect();
        let source = candidates.iter().copied().find(|h| {
            self.nodes[*h].blobs.contains(&digest)
                && self.reachable(*h, node)
                && self.reachable(node, *h)
        });
        let (after_ms, ok) = match source {
            Some(h) => {
                let mb = self.sc.trials.checkpoint_mb;
                self.net.bytes_moved += (mb * 1e6) as u64;
                let transfer = (mb / self.sc.network.bandwidth_mb_s * 1000.0) as u64;
                (transfer + 2 * self.latency_range(h, node)[1], Ok(()))
            }
            None if candidates.is_empty() => {
                let rtt = 2 * self.sc.network.cross_site_latency_ms[1];
                (rtt, Err("no holder is connected".to_string()))
            }
            None => (
                self.sc.network.request_timeout_ms,
                Err("no holder answered".to_string()),
            ),
        };
        self.schedule(
            self.now + after_ms.max(1),
            Occurrence::FetchDone {
                to: node,
                epoch,
                digest,
                ok,
            },
        );
    }

    /// A transfer ended: the blob is on the fetching node's disk.
    pub(super) fn fetch_done(
        &mut self,
        to: usize,
        epoch: u64,
        digest: String,
        ok: Result<(), String>,
    ) {
        if self.nodes[to].epoch != epoch || self.nodes[to].down {
            return;
        }
        if ok.is_ok() {
            self.nodes[to].blobs.insert(digest.clone());
        }
        self.step(to, Event::Fetched { digest, result: ok });
    }
}
