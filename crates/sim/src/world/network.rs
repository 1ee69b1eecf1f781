//! The simulated network: per-link latency (within a site, across sites), loss,
//! duplication, partitions (both ways, or a node's outgoing traffic muted),
//! NATs and relays, connection resets when a process dies, and blob transfers
//! at the scenario's bandwidth.
//!
//! A site with `nat = true` is dialled by nobody outside it; its nodes dial
//! out. A node outside any NAT talks directly with everyone; two nodes on
//! different NATed sites talk through a relay: a node outside any NAT that is
//! up and reachable from both (production's circuit relay v2 on a public
//! node). A relayed message takes both legs' latency plus the relay's; a
//! relayed blob moves at the relay's bandwidth, and not at all when it is
//! larger than a circuit may carry. With no relay left, the two cannot talk.

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
    /// Messages that went through a relay.
    pub(super) relayed_messages: u64,
    /// Bytes of blobs that went through a relay.
    pub(super) relayed_bytes: u64,
}

/// How traffic goes from one node to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// A connection one of them could dial (same site, or one outside a NAT).
    Direct,
    /// Both behind NATs on different sites: through this relay node.
    Relayed(usize),
    /// No path: cut off, or both behind NATs with no relay.
    None,
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

    fn behind_nat(&self, n: usize) -> bool {
        self.sc.sites[self.nodes[n].site].nat
    }

    /// Whether nothing blocks traffic on the direct link from `a` to `b`.
    fn open(&self, a: usize, b: usize) -> bool {
        let (x, y) = (self.nodes[a].id, self.nodes[b].id);
        !self.net.blocked.contains(&(x, y)) && !self.net.muted.contains(&x)
    }

    /// How traffic goes from `a` to `b` now (the relay, where one is needed,
    /// is the first node outside any NAT that is up and open both ways with
    /// both).
    pub(super) fn route(&self, a: usize, b: usize) -> Route {
        let direct =
            self.nodes[a].site == self.nodes[b].site || !self.behind_nat(a) || !self.behind_nat(b);
        if direct {
            return if self.open(a, b) {
                Route::Direct
            } else {
                Route::None
            };
        }
        let relays = |r: &usize| {
            let n = &self.nodes[*r];
            !self.behind_nat(*r)
                && !n.down
                && !n.gone
                && [(a, *r), (*r, a), (*r, b), (b, *r)]
                    .iter()
                    .all(|(x, y)| self.open(*x, *y))
        };
        (0..self.nodes.len())
            .find(relays)
            .map_or(Route::None, Route::Relayed)
    }

    /// One message's latency over `route` (sampled).
    fn sample_latency(&mut self, a: usize, b: usize, route: Route) -> u64 {
        let leg = |w: &mut Self, x: usize, y: usize| {
            let range = w.latency_range(x, y);
            range[0] + w.rng.net.next_u64() % (range[1].saturating_sub(range[0]) + 1)
        };
        match route {
            Route::Relayed(r) => {
                let [lo, hi] = self.sc.network.relay_latency_ms;
                let extra = lo + self.rng.net.next_u64() % (hi - lo + 1);
                leg(self, a, r) + leg(self, r, b) + extra
            }
            _ => leg(self, a, b),
        }
    }

    fn lost(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.net.next_u64() % 1_000_000) as f64 / 1_000_000.0 < p
    }

    pub(super) fn send(&mut self, from_idx: usize, to: NodeId, msg: PeerMessage) {
        let from = self.nodes[from_idx].id;
        let Some(to_idx) = self.index_of(to) else {
            return;
        };
        let route = self.route(from_idx, to_idx);
        if route == Route::None || self.lost(self.sc.network.loss) {
            return;
        }
        if matches!(route, Route::Relayed(_)) {
            self.net.relayed_messages += 1;
        }
        let latency = self.sample_latency(from_idx, to_idx, route);
        if self.lost(self.sc.network.duplicate) {
            let spread = self.latency_range(from_idx, to_idx)[1].max(latency);
            let extra = latency + 1 + self.rng.net.next_u64() % (spread + 1);
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
            // Over a relay, the relay sees the reset and closes the circuit.
            let after = match self.route(node, to) {
                Route::None => continue,
                Route::Direct => self.latency_range(node, to)[0],
                Route::Relayed(r) => self.latency_range(node, r)[0] + self.latency_range(r, to)[0],
            };
            self.schedule(
                self.now + after.max(1),
                Occurrence::ConnectionsReset { to, node: id },
            );
        }
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
    /// and can talk to it both ways, preferring a direct link (as the swarm's
    /// fetch does) and taking a relayed one only if the blob fits a circuit.
    /// With none, the fetch fails after one round trip when every holder is
    /// down (connections refused), or after the request timeout when one is up
    /// but cut off.
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
        let mb = self.sc.trials.checkpoint_mb;
        let fits_circuit = mb <= self.sc.network.relay_circuit_max_mb;
        let routes: Vec<(usize, Route, Route)> = candidates
            .iter()
            .filter(|h| self.nodes[**h].blobs.contains(&digest))
            .map(|h| (*h, self.route(*h, node), self.route(node, *h)))
            .filter(|(_, there, back)| *there != Route::None && *back != Route::None)
            .collect();
        let source = routes
            .iter()
            .find(|(_, there, _)| *there == Route::Direct)
            .or_else(|| routes.iter().find(|_| fits_circuit))
            .copied();
        let (after_ms, ok) = match source {
            Some((h, route, _)) => {
                self.net.bytes_moved += (mb * 1e6) as u64;
                let (bandwidth, rtt) = match route {
                    Route::Relayed(r) => {
                        self.net.relayed_bytes += (mb * 1e6) as u64;
                        let legs = self.latency_range(h, r)[1] + self.latency_range(r, node)[1];
                        let relay = self.sc.network.relay_latency_ms[1];
                        (self.sc.network.relay_bandwidth_mb_s, 2 * (legs + relay))
                    }
                    _ => (
                        self.sc.network.bandwidth_mb_s,
                        2 * self.latency_range(h, node)[1],
                    ),
                };
                let transfer = (mb / bandwidth * 1000.0) as u64;
                (transfer + rtt, Ok(()))
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
