//! How this node reaches its peers and whether they can reach it: the
//! bookkeeping behind NAT traversal and the operator's view of it.
//!
//! A node on a cloud VM can be dialled; an on-prem server behind a NAT can
//! only dial out. libp2p's own protocols connect the two kinds: AutoNAT tells
//! a node which kind it is (peers on *other sites* try to dial it back: two
//! servers on one LAN reach each other whatever the NAT does), a node that is
//! not reachable keeps a circuit relay v2 reservation on up to
//! [`RELAY_RESERVATIONS_MAX`] reachable peers and advertises the relayed
//! address, and DCUtR upgrades a relayed connection to a direct one by hole
//! punching when both NATs allow it. [`Links`] records which kind each
//! connection is and its ping RTT; the swarm asks it which relays to reserve
//! on. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use resolute_core::NodeId;

use crate::identity::node_id;

/// Relays a node behind NAT keeps a reservation on (two: losing one relay
/// leaves it reachable while it reserves on another).
pub const RELAY_RESERVATIONS_MAX: usize = 2;

/// How a connection to a peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LinkKind {
    /// Dialled straight to the peer's address (or accepted from it).
    Direct,
    /// Made direct by DCUtR hole punching through both NATs.
    HolePunched,
    /// Carried by a third node's circuit relay (slower, and capped in bytes
    /// and time per circuit by the relay).
    Relayed,
}

impl LinkKind {
    /// The name the operator reads (`cluster status`, fetch reports).
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Direct => "direct",
            LinkKind::HolePunched => "hole-punched",
            LinkKind::Relayed => "relayed",
        }
    }
}

/// Whether a node can be dialled by the other sites' nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reachability {
    /// Not known yet (AutoNAT has not had an answer from another site).
    #[default]
    Unknown,
    /// Peers dialled it back: it can serve as a relay.
    Public,
    /// Dial-backs failed: it is behind a NAT or firewall and is reached
    /// through relays (or hole punching).
    Private,
}

impl Reachability {
    /// The name the operator reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        }
    }
}

/// The operator's `net.reachability`: let AutoNAT decide, or say it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReachabilityMode {
    /// AutoNAT decides.
    #[default]
    Auto,
    /// The node is reachable (a cloud VM with a public address).
    Public,
    /// The node is not (behind a NAT that AutoNAT would misjudge).
    Private,
}

impl std::str::FromStr for ReachabilityMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ReachabilityMode::Auto),
            "public" => Ok(ReachabilityMode::Public),
            "private" => Ok(ReachabilityMode::Private),
            other => Err(format!(
                "{other:?} is not a reachability (expected \"auto\", \"public\" or \"private\")"
            )),
        }
    }
}

/// One peer as this node is connected to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    /// The peer.
    pub node: NodeId,
    /// Its best connection: direct or hole-punched before relayed.
    pub kind: LinkKind,
    /// The last ping round trip on that connection, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Open connections to it (a blob fetch opens several).
    pub connections: u32,
}

/// Whether an address goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// One open connection.
#[derive(Debug, Clone)]
struct Conn {
    peer: PeerId,
    kind: LinkKind,
    rtt: Option<Duration>,
    /// The address this node dialled, when it dialled the peer directly (a
    /// relay is reserved on at this address).
    dialled: Option<Multiaddr>,
}

/// Connections, their kinds and RTTs, relay-capable peers, and reservations.
#[derive(Debug, Default)]
pub(crate) struct Links {
    conns: BTreeMap<ConnectionId, Conn>,
    /// Peers whose identify lists the relay hop protocol.
    relays: BTreeSet<PeerId>,
    /// Relays this node holds (or is asking for) a reservation on, and the
    /// circuit address it listens on through each.
    reserved: BTreeMap<PeerId, (Multiaddr, Option<ListenerId>)>,
    /// AutoNAT's latest answer.
    autonat: Reachability,
    mode: ReachabilityMode,
}

impl Links {
    pub(crate) fn new(mode: ReachabilityMode) -> Self {
        Links {
            mode,
            ..Links::default()
        }
    }

    /// A connection opened.
    pub(crate) fn opened(&mut self, id: ConnectionId, peer: PeerId, endpoint: &ConnectedPoint) {
        let (kind, dialled) = match endpoint {
            ConnectedPoint::Dialer { address, .. } if is_relayed(address) => {
                (LinkKind::Relayed, None)
            }
            ConnectedPoint::Dialer { address, .. } => (LinkKind::Direct, Some(address.clone())),
            ConnectedPoint::Listener { local_addr, .. } if is_relayed(local_addr) => {
                (LinkKind::Relayed, None)
            }
            ConnectedPoint::Listener { .. } => (LinkKind::Direct, None),
        };
        self.conns.insert(
            id,
            Conn {
                peer,
                kind,
                rtt: None,
                dialled,
            },
        );
    }

    /// A connection closed.
    pub(crate) fn closed(&mut self, id: ConnectionId) {
        self.conns.remove(&id);
    }

    /// DCUtR made this connection by hole punching.
    pub(crate) fn hole_punched(&mut self, id: ConnectionId) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.kind = LinkKind::HolePunched;
        }
    }

    /// A ping answered on a connection.
    pub(crate) fn rtt(&mut self, id: ConnectionId, rtt: Duration) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.rtt = Some(rtt);
        }
    }

    /// The kind of one connection (None: not open).
    pub(crate) fn kind_of_connection(&self, id: ConnectionId) -> Option<LinkKind> {
        self.conns.get(&id).map(|c| c.kind)
    }

    /// The best kind of connection to a peer (None: not connected).
    pub(crate) fn kind_of(&self, peer: &PeerId) -> Option<LinkKind> {
        self.conns
            .values()
            .filter(|c| c.peer == *peer)
            .map(|c| c.kind)
            .min()
    }

    /// Whether a peer has a connection that is not relayed.
    pub(crate) fn is_direct(&self, peer: &PeerId) -> bool {
        self.kind_of(peer).is_some_and(|k| k != LinkKind::Relayed)
    }

    /// Every connected peer, by node id.
    pub(crate) fn links(&self) -> Vec<PeerLink> {
        let mut by_peer: BTreeMap<NodeId, PeerLink> = BTreeMap::new();
        for c in self.conns.values() {
            let rtt_ms = c
                .rtt
                .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
            let link = by_peer.entry(node_id(&c.peer)).or_insert(PeerLink {
                node: node_id(&c.peer),
                kind: c.kind,
                rtt_ms,
                connections: 0,
            });
            link.connections += 1;
            // The best connection's kind and RTT speak for the peer.
            if c.kind < link.kind || (c.kind == link.kind && link.rtt_ms.is_none()) {
                link.kind = c.kind;
                link.rtt_ms = rtt_ms.or(link.rtt_ms);
            }
        }
        by_peer.into_values().collect()
    }

    /// Identify said whether `peer` serves as a relay.
    pub(crate) fn relay_capable(&mut self, peer: PeerId, capable: bool) {
        if capable {
            self.relays.insert(peer);
        } else {
            self.relays.remove(&peer);
        }
    }

    /// AutoNAT's new answer.
    pub(crate) fn set_autonat(&mut self, r: Reachability) {
        self.autonat = r;
    }

    /// This node's reachability: the operator's word, else AutoNAT's.
    pub(crate) fn reachability(&self) -> Reachability {
        match self.mode {
            ReachabilityMode::Auto => self.autonat,
            ReachabilityMode::Public => Reachability::Public,
            ReachabilityMode::Private => Reachability::Private,
        }
    }

    /// The circuit addresses to listen on now: none while this node is
    /// reachable or not known to be unreachable; otherwise one per relay up
    /// to [`RELAY_RESERVATIONS_MAX`], on relay-capable peers that this node
    /// dialled directly and that say they are public (`public`, from their
    /// gossip records). Marks them reserved: the caller listens on each.
    pub(crate) fn reservations_to_make(
        &mut self,
        public: &BTreeSet<PeerId>,
    ) -> Vec<(PeerId, Multiaddr)> {
        if self.reachability() != Reachability::Private {
            return Vec::new();
        }
        let mut out = Vec::new();
        for c in self.conns.values() {
            if self.reserved.len() + out.len() >= RELAY_RESERVATIONS_MAX {
                break;
            }
            let Some(addr) = &c.dialled else { continue };
            let wanted = self.relays.contains(&c.peer)
                && public.contains(&c.peer)
                && !self.reserved.contains_key(&c.peer)
                && !out.iter().any(|(p, _)| *p == c.peer);
            if wanted {
                let circuit = strip_peer(addr)
                    .with(Protocol::P2p(c.peer))
                    .with(Protocol::P2pCircuit);
                out.push((c.peer, circuit));
            }
        }
        for (peer, addr) in &out {
            self.reserved.insert(*peer, (addr.clone(), None));
        }
        out
    }

    /// The swarm listens on the circuit through `relay` as `listener`.
    pub(crate) fn listening(&mut self, relay: PeerId, listener: ListenerId) {
        if let Some(r) = self.reserved.get_mut(&relay) {
            r.1 = Some(listener);
        }
    }

    /// A listener ended (for a relay reservation: the relay went away or
    /// refused; the next round may reserve elsewhere). Also for a listen that
    /// never started (`None` with its relay).
    pub(crate) fn listener_closed(&mut self, listener: ListenerId) {
        self.reserved.retain(|_, (_, l)| *l != Some(listener));
    }

    /// A reservation that could not even be asked for.
    pub(crate) fn reservation_failed(&mut self, relay: &PeerId) {
        self.reserved.remove(relay);
    }

    /// The reservations to give up: all of them once this node is no longer
    /// known to be unreachable (AutoNAT found it public).
    pub(crate) fn reservations_to_drop(&mut self) -> Vec<ListenerId> {
        if self.reachability() == Reachability::Private {
            return Vec::new();
        }
        let out = self.reserved.values().filter_map(|(_, l)| *l).collect();
        self.reserved.clear();
        out
    }

    /// Whether a listen address is one of this node's relay reservations.
    pub(crate) fn is_reservation(&self, addr: &Multiaddr) -> bool {
        self.reserved.values().any(|(a, _)| starts_with(addr, a))
    }
}

/// `addr` without a trailing `/p2p/<id>`.
fn strip_peer(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// Whether `addr` begins with every protocol of `prefix`.
fn starts_with(addr: &Multiaddr, prefix: &Multiaddr) -> bool {
    let a: Vec<_> = addr.iter().collect();
    let p: Vec<_> = prefix.iter().collect();
    a.len() >= p.len() && a[..p.len()] == p[..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::PortUse;
    use libp2p::core::Endpoint;

    fn dialer(addr: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: addr.parse().expect("multiaddr"),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    fn listener(local: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: local.parse().expect("multiaddr"),
            send_back_addr: "/ip4/10.0.0.9/tcp/1".parse().expect("multiaddr"),
        }
    }

    #[test]
    fn a_connection_is_direct_relayed_or_hole_punched() {
        let mut links = Links::new(ReachabilityMode::Auto);
        let relay = PeerId::random();
        let peer = PeerId::random();
        let relayed = format!("/ip4/198.51.100.1/tcp/7000/p2p/{relay}/p2p-circuit/p2p/{peer}");
        links.opened(ConnectionId::new_unchecked(1), peer, &dialer(&relayed));
        assert_eq!(links.kind_of(&peer), Some(LinkKind::Relayed));
        assert!(!links.is_direct(&peer));
        links.opened(
            ConnectionId::new_unchecked(2),
            peer,
            &dialer("/ip4/203.0.113.4/tcp/9"),
        );
        links.hole_punched(ConnectionId::new_unchecked(2));
        links.rtt(ConnectionId::new_unchecked(2), Duration::from_millis(41));
        assert_eq!(links.kind_of(&peer), Some(LinkKind::HolePunched));
        let all = links.links();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].kind, LinkKind::HolePunched);
        assert_eq!(all[0].rtt_ms, Some(41));
        assert_eq!(all[0].connections, 2);
        links.closed(ConnectionId::new_unchecked(2));
        assert_eq!(links.kind_of(&peer), Some(LinkKind::Relayed));
        let inbound = PeerId::random();
        let circuit = format!("/ip4/198.51.100.1/tcp/7000/p2p/{relay}/p2p-circuit");
        links.opened(ConnectionId::new_unchecked(3), inbound, &listener(&circuit));
        assert_eq!(links.kind_of(&inbound), Some(LinkKind::Relayed));
    }

    #[test]
    fn only_a_private_node_reserves_and_only_on_public_relays_it_dialled() {
        let relay = PeerId::random();
        let lan_peer = PeerId::random();
        let inbound = PeerId::random();
        let mut links = Links::new(ReachabilityMode::Auto);
        links.opened(
            ConnectionId::new_unchecked(1),
            relay,
            &dialer("/ip4/198.51.100.1/tcp/7000"),
        );
        links.opened(
            ConnectionId::new_unchecked(2),
            lan_peer,
            &dialer("/ip4/10.1.0.3/tcp/7000"),
        );
        links.opened(
            ConnectionId::new_unchecked(3),
            inbound,
            &listener("/ip4/10.1.0.2/tcp/7000"),
        );
        for p in [relay, lan_peer, inbound] {
            links.relay_capable(p, true);
        }
        let public: BTreeSet<PeerId> = [relay, inbound].into();
        // Unknown: no reservation yet.
        assert!(links.reservations_to_make(&public).is_empty());
        links.set_autonat(Reachability::Public);
        assert!(links.reservations_to_make(&public).is_empty());
        links.set_autonat(Reachability::Private);
        let made = links.reservations_to_make(&public);
        let want: Multiaddr = format!("/ip4/198.51.100.1/tcp/7000/p2p/{relay}/p2p-circuit")
            .parse()
            .expect("multiaddr");
        assert_eq!(made, vec![(relay, want.clone())]);
        // Held: not asked again; gone: asked again.
        assert!(links.reservations_to_make(&public).is_empty());
        let listened = want.clone().with(Protocol::P2p(PeerId::random()));
        assert!(links.is_reservation(&listened));
        let id = ListenerId::next();
        links.listening(relay, id);
        links.listener_closed(id);
        assert!(!links.is_reservation(&listened));
        assert_eq!(links.reservations_to_make(&public).len(), 1);
        // Public after all: every reservation is given up.
        links.listening(relay, id);
        links.set_autonat(Reachability::Public);
        assert_eq!(links.reservations_to_drop(), vec![id]);
        assert!(!links.is_reservation(&listened));
    }

    #[test]
    fn the_operator_overrides_autonat() {
        let mut links = Links::new(ReachabilityMode::Public);
        links.set_autonat(Reachability::Private);
        assert_eq!(links.reachability(), Reachability::Public);
        let links = Links::new(ReachabilityMode::Private);
        assert_eq!(links.reachability(), Reachability::Private);
        assert!("sometimes".parse::<ReachabilityMode>().is_err());
        assert_eq!(
            "private".parse::<ReachabilityMode>(),
            Ok(ReachabilityMode::Private)
        );
    }
}
