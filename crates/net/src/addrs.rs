//! Which of a node's addresses its peers are told (in its gossip record,
//! and so in every gang's `MASTER_ADDR` and every log fetch): an operator's
//! explicit `advertise` list when there is one; otherwise what the swarm
//! listens on, without unspecified addresses (0.0.0.0, ::), and without
//! loopback ones when it has others (a peer on another machine that dials
//! 127.0.0.1 reaches itself). A node that listens on loopback only (a
//! laptop cluster, the tests) keeps its loopback addresses.

use std::net::{IpAddr, SocketAddr};

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// The IP of a multiaddr (None for DNS names and the like).
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The addresses a node advertises, from what it listens on and the
/// operator's explicit list (which wins whole when given).
pub fn advertised(listening: &[Multiaddr], explicit: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    let source = if explicit.is_empty() {
        listening
    } else {
        explicit
    };
    for a in source {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    if !explicit.is_empty() {
        return out;
    }
    out.retain(|a| !ip_of(a).is_some_and(|ip| ip.is_unspecified()));
    let reachable = |a: &Multiaddr| !ip_of(a).is_some_and(|ip| ip.is_loopback());
    if out.iter().any(reachable) {
        out.retain(reachable);
    }
    out
}

/// The REST API address a node advertises (`host:port`): the operator's
/// `explicit` one; else the bound socket, an unspecified IP (the API listens
/// on every interface) replaced by the first IP it advertises.
pub fn advertised_api(
    bound: SocketAddr,
    explicit: Option<&str>,
    advertised: &[Multiaddr],
) -> String {
    if let Some(e) = explicit {
        return e.to_string();
    }
    if bound.ip().is_unspecified() {
        if let Some(ip) = advertised.iter().find_map(ip_of) {
            return SocketAddr::new(ip, bound.port()).to_string();
        }
    }
    bound.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn peers_are_told_only_addresses_they_can_use() {
        let lo = "/ip4/127.0.0.1/tcp/7000";
        let lan = "/ip4/192.0.2.2/tcp/7000";
        let any = "/ip4/0.0.0.0/tcp/7000";
        let public = "/ip4/203.0.113.9/tcp/7000";
        let dns = "/dns4/gpu-7.lab/tcp/7000";
        // (listening, the operator's list, advertised)
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            // Listening on every interface: the loopback one is dropped.
            (&[lo, lan], &[], &[lan]),
            // Loopback only (a laptop cluster): kept.
            (&[lo], &[], &[lo]),
            // Never the unspecified address itself.
            (&[any, lan], &[], &[lan]),
            (&[any], &[], &[]),
            // The operator's list wins whole (a NAT's public address, a name).
            (&[lo, lan], &[public, dns], &[public, dns]),
            // Duplicates once.
            (&[lan, lan], &[], &[lan]),
        ];
        let all = |xs: &[&str]| xs.iter().map(|x| m(x)).collect::<Vec<_>>();
        for (listening, explicit, want) in cases {
            assert_eq!(
                advertised(&all(listening), &all(explicit)),
                all(want),
                "{listening:?} {explicit:?}"
            );
        }
    }

    #[test]
    fn the_api_address_names_a_reachable_host() {
        let lan = [m("/ip4/192.0.2.2/tcp/7000")];
        let bound: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(advertised_api(bound, None, &lan), "192.0.2.2:8080");
        assert_eq!(
            advertised_api(bound, Some("10.0.0.5:443"), &lan),
            "10.0.0.5:443"
        );
        let lo: SocketAddr = "127.0.0.2:9000".parse().expect("addr");
        assert_eq!(advertised_api(lo, None, &lan), "127.0.0.2:9000");
        assert_eq!(advertised_api(bound, None, &[]), "0.0.0.0:8080");
    }
}
