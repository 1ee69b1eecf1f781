//! What the REST API shows, built from the node's replicated state and what
//! only it knows. Pure functions: the node actor calls them to answer a query.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use resolute_agent::Agent;
use resolute_core::state::{ClusterState, TrialState};
use resolute_core::Node;

use crate::node_actor::Local;

mod sites;

/// Whether the experiment's searcher metric is better when smaller.
fn smaller_is_better(node: &Node, experiment: u64) -> bool {
    node.state()
        .experiments
        .get(&experiment)
        .and_then(|e| e.config())
        .is_none_or(|c| c.searcher.smaller_is_better)
}

/// The better of two values of a searcher metric.
fn better(a: f64, b: f64, smaller: bool) -> f64 {
    if smaller {
        a.min(b)
    } else {
        a.max(b)
    }
}

/// A trial's best validation value of its experiment's searcher metric.
fn best_validation(node: &Node, trial: u64) -> Option<f64> {
    node.state().trials.get(&trial)?.best_validation
}

/// The best validation of the searcher's metric among experiment `id`'s
/// trials (None before any).
pub fn experiment_best(node: &Node, id: u64) -> Option<f64> {
    let e = node.state().experiments.get(&id)?;
    let smaller = smaller_is_better(node, id);
    e.trials
        .values()
        .filter_map(|t| best_validation(node, *t))
        .reduce(|a, b| better(a, b, smaller))
}

/// One experiment.
pub fn experiment(node: &Node, id: u64) -> Option<Value> {
    let e = node.state().experiments.get(&id)?;
    let trials: Vec<u64> = e.trials.values().copied().collect();
    let name = e.config().and_then(|c| c.name.clone()).unwrap_or_default();
    let metric = e
        .config()
        .map(|c| c.searcher.metric.clone())
        .unwrap_or_default();
    let best = experiment_best(node, id);
    Some(json!({
        "id": id,
        "name": name,
        "state": format!("{:?}", e.state),
        "owner": e.owner,
        "progress": e.progress(),
        "trials": trials,
        "model_digest": e.model_digest,
        // The nodes that keep the model directory of an ended experiment (an
        // unfinished one's is on every node).
        "model_holders": node
            .state()
            .models
            .get(&e.model_digest)
            .into_iter()
            .flatten()
            .map(|n| format!("{n:016x}"))
            .collect::<Vec<_>>(),
        "archived": e.archived,
        "searcher_metric": metric,
        "best_metric": best,
        "last_error": e.last_error,
    }))
}

/// Users and tokens as `user` may see them: a cluster admin sees everyone's,
/// anyone else themself and their own tokens. Hashes are never shown.
pub fn users(state: &ClusterState, user: &str) -> Value {
    let admin = state.is_cluster_admin(Some(user));
    let users: Vec<Value> = state
        .users
        .iter()
        .filter(|(name, _)| admin || name.as_str() == user)
        .map(|(name, u)| {
            let roles: BTreeMap<&str, &str> = u
                .roles
                .iter()
                .map(|(w, r)| (w.as_str(), r.name()))
                .collect();
            json!({"name": name, "active": u.active, "cluster_admin": u.cluster_admin,
                "roles": roles})
        })
        .collect();
    let tokens: Vec<Value> = state
        .tokens
        .iter()
        .filter(|(_, t)| admin || t.user == user)
        .map(|(id, t)| {
            json!({"id": id, "user": t.user, "label": t.label, "revoked": t.revoked,
                "expires_ms": t.expires_ms})
        })
        .collect();
    json!({"me": user, "cluster_admin": admin, "users": users, "tokens": tokens})
}

/// One trial; with where it launched on this node and how long that took.
pub fn trial(node: &Node, agent: &Agent, id: u64) -> Option<Value> {
    let t = node.state().trials.get(&id)?;
    let (state, node_id) = match &t.state {
        TrialState::Queued => ("Queued".to_string(), None),
        TrialState::Assigned { node } => ("Assigned".to_string(), Some(*node)),
        TrialState::Running { node } => ("Running".to_string(), Some(*node)),
        TrialState::Paused => ("Paused".to_string(), None),
        TrialState::Done(o) => (format!("Done({o:?})"), None),
    };
    let mut v = json!({
        "id": id,
        "experiment": t.experiment,
        "state": state,
        "node": node_id.map(|n| format!("{n:016x}")),
        // Where its slots are while it is placed: node and slots, rank 0's first.
        "layout": t.layout.iter().map(|(n, s)| json!({"node": format!("{n:016x}"), "slots": s}))
            .collect::<Vec<_>>(),
        "hparams": t.hparams,
        "seed": t.seed,
        "incarnation": t.incarnation,
        "restarts": t.restarts,
        "steps_completed": t.steps_completed,
        "target": t.target,
        "latest_checkpoint": t.latest_checkpoint,
        "best_metric": best_validation(node, id),
    });
    // Only the node that started it knows how long the start took.
    if let Some((incarnation, prepare_ms)) = agent.launched(id) {
        v["launched_here"] = json!({"incarnation": incarnation, "fetch_ms": prepare_ms});
    }
    Some(v)
}

/// An experiment's trials.
pub fn experiment_trials(node: &Node, agent: &Agent, id: u64) -> Option<Value> {
    let e = node.state().experiments.get(&id)?;
    Some(Value::Array(
        e.trials
            .values()
            .filter_map(|t| trial(node, agent, *t))
            .collect(),
    ))
}

/// The cluster as this node sees it.
pub fn cluster(node: &Node, local: &Local, this_disk: Value) -> Value {
    let state = node.state();
    let (voters, learners) = node.membership();
    let mut used: BTreeMap<u64, u32> = BTreeMap::new();
    for t in state.trials.values().filter(|t| t.is_placed()) {
        for (n, s) in &t.layout {
            *used.entry(*n).or_default() += s;
        }
    }
    let nodes: Vec<Value> = state
        .nodes
        .iter()
        .map(|(id, n)| {
            // GPUs and labels as the node last gossiped them (soft state).
            let record = local.records.get(id);
            json!({
                "id": format!("{id:016x}"),
                "site": n.info.site,
                "pool": n.info.pool,
                "state": format!("{:?}", n.state),
                "slots": n.info.slots,
                "slots_used": used.get(id).copied().unwrap_or(0),
                "voter": voters.contains(id),
                // How this node reaches it, and whether other sites can.
                "connection": sites::connection(local, *id),
                "reachability": sites::reachability(local, *id).as_str(),
                // Below its low-water mark: it takes no new work.
                "disk_low": n.disk_low.map(|d| json!({
                    "free_mib": d.free_bytes >> 20,
                    "low_water_mib": d.low_water_bytes >> 20,
                    "message": d.to_string(),
                })),
                "gpus": record.map(|r| r.gpus.iter().map(|g| json!({
                    "uuid": g.uuid,
                    "model": g.model,
                    "memory_mib": g.memory_mib,
                    "disabled": g.disabled,
                })).collect::<Vec<_>>()).unwrap_or_default(),
                "labels": record.map(|r| r.labels.clone()).unwrap_or_default(),
            })
        })
        .collect();
    let queue = state
        .trials
        .values()
        .filter(|t| t.state == TrialState::Queued)
        .count();
    json!({
        "this_node": format!("{:016x}", local.node),
        "this_disk": this_disk,
        "api": local.api,
        "listen": local.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "connected": local.connected.iter().map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
        "warnings": sites::warnings(state, local, &voters),
        "reachability": local.reachability.as_str(),
        // Its latest blob fetches: from whom, and whether a relay carried them.
        "fetches": local.fetches,
        "leader": format!("{:016x}", node.leader_id()),
        "voters": voters.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
        "learners": learners.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
        "nodes": nodes,
        // Admitted by an admin without a join token, not joined yet; and
        // removed for good (`resolute node approve|remove`).
        "approved": state.approved_nodes.iter().map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
        "removed": state.removed_nodes.iter().map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
        "queue": queue,
        "applied": node.applied(),
        "digest": state.digest(),
        "unfinished_exits": state.unfinished_exits,
        // What hostile or broken peers tried: peer messages dropped before
        // raft-rs (by reason), entries refused on apply, gossip ignored.
        "security": {
            "dropped_peer_messages": node
                .dropped()
                .counts()
                .iter()
                .map(|(why, n)| (format!("{why:?}"), *n))
                .collect::<BTreeMap<String, u64>>(),
            "forbidden": state.forbidden,
            "ignored_records": local.ignored_records,
            "denied_requests": local.denied_requests,
        },
    })
}
