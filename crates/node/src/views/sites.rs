//! The network as an operator needs to see it across sites: how this node
//! reaches each peer (direct, hole-punched, relayed) and the round trip,
//! whether each node can be dialled from other sites, and what is wrong with
//! the layout (a site nobody can dial, voters on one or two sites, round
//! trips too long for the node's timing).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use resolute_core::node::LatencyClass;
use resolute_core::state::{ClusterState, NodeState};
use resolute_core::NodeId;
use resolute_net::{PeerLink, Reachability};

use crate::node_actor::Local;

/// How this node is connected to `node` (null: not connected, or itself).
pub fn connection(local: &Local, node: NodeId) -> Value {
    match local.links.iter().find(|l| l.node == node) {
        Some(PeerLink {
            kind,
            rtt_ms,
            connections,
            ..
        }) => json!({
            "kind": kind.as_str(),
            "rtt_ms": rtt_ms,
            "connections": connections,
        }),
        None => Value::Null,
    }
}

/// Whether other sites can dial `node`: this node's own answer (from its
/// swarm) or what `node` last gossiped.
pub fn reachability(local: &Local, node: NodeId) -> Reachability {
    if node == local.node {
        return local.reachability;
    }
    local
        .records
        .get(&node)
        .map(|r| r.reachability)
        .unwrap_or_default()
}

/// What an operator should know about the layout, in words: every site
/// whose live nodes all say they cannot be dialled (they are reached through
/// relays on other sites; with no reachable node anywhere, nodes behind
/// different NATs cannot reach each other at all), voters that sit on one
/// site of several or on only two (losing the wrong one loses the quorum),
/// and peers whose round trip is longer than this node's timing holds.
pub fn warnings(state: &ClusterState, local: &Local, voters: &[NodeId]) -> Vec<String> {
    let mut out = reachability_warnings(state, local);
    out.extend(voter_warnings(state, voters));
    out.extend(timing_warnings(state, local));
    out
}

fn reachability_warnings(state: &ClusterState, local: &Local) -> Vec<String> {
    let mut out = Vec::new();
    let mut sites: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for (id, n) in &state.nodes {
        if n.state != NodeState::Lost {
            sites.entry(n.info.site.as_str()).or_default().push(*id);
        }
    }
    let mut reachable_anywhere = false;
    let mut unreachable_sites = Vec::new();
    for (site, nodes) in &sites {
        let kinds: Vec<Reachability> = nodes.iter().map(|n| reachability(local, *n)).collect();
        reachable_anywhere |= kinds.contains(&Reachability::Public);
        if kinds.iter().all(|k| *k == Reachability::Private) {
            unreachable_sites.push(*site);
        }
    }
    for site in &unreachable_sites {
        if reachable_anywhere {
            out.push(format!(
                "site {site} has no node that other sites can dial: its nodes are reached \
                 through relays on other sites (or hole punching)"
            ));
        } else {
            out.push(format!(
                "site {site} has no node that other sites can dial, and no site has one: \
                 nodes behind different NATs cannot reach each other (give one node a \
                 public address and open its net.listen port)"
            ));
        }
    }
    out
}

/// Voters on one site of several, or on exactly two sites: a quorum needs
/// more than half the voters, so with two sites one of them holds the
/// majority and losing it stops the log (the other site's nodes fence
/// themselves after their lease and stop their trials) until it returns.
fn voter_warnings(state: &ClusterState, voters: &[NodeId]) -> Vec<String> {
    let live_sites: BTreeSet<&str> = state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Lost)
        .map(|n| n.info.site.as_str())
        .collect();
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for v in voters {
        if let Some(n) = state.nodes.get(v) {
            *per_site.entry(n.info.site.as_str()).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    if live_sites.len() > 1 && voters.len() > 1 && per_site.len() == 1 {
        let site = per_site.keys().next().copied().unwrap_or_default();
        out.push(format!(
            "all {} voters are on site {site}: losing that site loses the quorum (the \
             other sites have no voter-capable node up, or joined after the voters were \
             chosen)",
            voters.len()
        ));
    }
    if per_site.len() == 2 {
        let (site, n) = per_site
            .iter()
            .max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))
            .map(|(s, n)| (*s, *n))
            .unwrap_or_default();
        if 2 * n > voters.len() {
            out.push(format!(
                "the {} voters span only two sites: losing site {site} ({n} of them) loses \
                 the quorum and the other site stops its trials until it returns; a node \
                 on a third site (a small cloud VM will do) keeps a quorum through the loss \
                 of any one site",
                voters.len()
            ));
        }
    }
    out
}

/// Peers whose measured round trip is longer than the latency class this
/// node's timers were chosen for: elections and leases would then fire on
/// a slow link that is still up.
fn timing_warnings(state: &ClusterState, local: &Local) -> Vec<String> {
    let budget = local.latency.rtt_budget_ms();
    local
        .links
        .iter()
        .filter_map(|l| Some((l, u64::from(l.rtt_ms?))))
        .filter(|(_, rtt)| *rtt > budget)
        .map(|(l, rtt)| {
            let site = state
                .nodes
                .get(&l.node)
                .map(|n| n.info.site.as_str())
                .unwrap_or("?");
            let fix = match local.latency {
                LatencyClass::Lan => "set node.latency = \"wan\" on every node",
                LatencyClass::Wan => "raise node.election_ms and node.lease_timeout_ms",
            };
            format!(
                "the round trip to node {:016x} (site {site}) is {rtt} ms, longer than \
                 node.latency = \"{}\" holds ({budget} ms): {fix}",
                l.node,
                local.latency.name()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use resolute_core::state::NodeRecord;
    use resolute_net::LinkKind;

    fn local(links: Vec<PeerLink>, latency: LatencyClass) -> Local {
        Local {
            node: 1,
            api: String::new(),
            listen: Vec::new(),
            connected: Default::default(),
            links,
            reachability: Reachability::Public,
            records: Default::default(),
            ignored_records: 0,
            denied_requests: 0,
            work_root: std::path::PathBuf::new(),
            fetches: Default::default(),
            latency,
        }
    }

    fn state(sites: &[(NodeId, &str)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, site) in sites {
            let mut record = NodeRecord {
                info: Default::default(),
                state: NodeState::Alive,
                disk_low: None,
            };
            record.info.site = site.to_string();
            s.nodes.insert(*id, record);
        }
        s
    }

    #[test]
    fn voters_on_two_sites_are_named_and_on_three_are_not() {
        let s = state(&[(1, "dc1"), (2, "dc1"), (3, "cloud"), (4, "dc2")]);
        let l = local(Vec::new(), LatencyClass::Wan);
        let w = warnings(&s, &l, &[1, 2, 3]);
        assert!(
            w.iter()
                .any(|x| x.contains("span only two sites: losing site dc1 (2 of them)")),
            "{w:?}"
        );
        assert!(warnings(&s, &l, &[1, 3, 4]).is_empty());
        let w = warnings(&s, &l, &[1, 2]);
        assert!(
            w.iter().any(|x| x.contains("all 2 voters are on site dc1")),
            "{w:?}"
        );
    }

    #[test]
    fn a_round_trip_longer_than_the_timing_holds_is_named() {
        let s = state(&[(1, "dc1"), (2, "cloud"), (3, "dc2")]);
        let link = |node, rtt_ms| PeerLink {
            node,
            kind: LinkKind::Direct,
            rtt_ms: Some(rtt_ms),
            connections: 1,
        };
        let lan = local(vec![link(2, 80), link(3, 5)], LatencyClass::Lan);
        let w = warnings(&s, &lan, &[1, 2, 3]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("(site cloud) is 80 ms") && w[0].contains("node.latency = \"wan\""));
        let wan = local(vec![link(2, 80), link(3, 5)], LatencyClass::Wan);
        assert!(warnings(&s, &wan, &[1, 2, 3]).is_empty());
    }
}
