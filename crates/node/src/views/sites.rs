//! The network as an operator needs to see it across sites: how this node
//! reaches each peer (direct, hole-punched, relayed) and the round trip,
//! whether each node can be dialled from other sites, and what is wrong with
//! the layout (a site nobody can dial, all voters on one site).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

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
/// different NATs cannot reach each other at all), and voters that sit on
/// one site of several (losing it loses the quorum).
pub fn warnings(state: &ClusterState, local: &Local, voters: &[NodeId]) -> Vec<String> {
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
    let voter_sites: BTreeSet<&str> = voters
        .iter()
        .filter_map(|v| state.nodes.get(v))
        .map(|n| n.info.site.as_str())
        .collect();
    if sites.len() > 1 && voters.len() > 1 && voter_sites.len() == 1 {
        let site = voter_sites.first().copied().unwrap_or_default();
        out.push(format!(
            "all {} voters are on site {site}: losing that site loses the quorum (the \
             other sites have no voter-capable node up, or joined after the voters were \
             chosen)",
            voters.len()
        ));
    }
    out
}
