//! One cluster across three sites on this machine, built from Linux network
//! namespaces by the test itself (`resolute-netns`, torn down at its end): a
//! "cloud" namespace with a public address, and two "on-prem" sites, each
//! behind its own NAT (nftables masquerade, no inbound port forwarding),
//! joined by a router whose links add latency and loss where the kernel has
//! tc netem.
//!
//! The on-prem nodes dial the cloud node; AutoNAT tells each that other
//! sites cannot dial it, so it reserves a relayed address on the cloud node
//! (circuit relay v2), and the two on-prem nodes reach each other through
//! it or through a hole-punched connection (DCUtR). A job submitted on-prem
//! runs on every site, a checkpoint crosses the two NATs, and SIGKILL of an
//! on-prem node moves its trial to another site. The test needs root (it
//! runs as root in CI) and says why when it skips.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use resolute_tests::{
    cli, client_env, create, get, repo, start_at, this_node, trials, until, NodeProc, Place,
};

/// How long a trial waits for on-prem slots before it runs on the (paid)
/// cloud node, in the test's configs (300 s in the shipped ones).
const BURST_AFTER_S: u64 = 5;

/// A copy of a shipped config for `site`, as the topology's nodes run it.
fn config_for(dir: &Path, shipped: &str, site: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join(shipped)).expect("shipped config");
    let path = dir.join(format!("{site}.toml"));
    std::fs::write(
        &path,
        resolute_netns::node_config(&text, site, BURST_AFTER_S),
    )
    .expect("config");
    path
}

/// [`until`], and on timeout what `show` says (the trials, the fetches).
fn until_shown(what: &str, limit: Duration, show: impl Fn() -> String, f: impl FnMut() -> bool) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| until(what, limit, f)));
    if let Err(e) = r {
        eprintln!("sites: {what}: timed out; now:\n{}", show());
        std::panic::resume_unwind(e);
    }
}

/// A node's row in `cluster status` as `from` sees it.
fn row(from: &NodeProc, id: &str) -> Value {
    get(&from.api, &["cluster", "status"])["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn one_cluster_across_a_cloud_and_two_nated_sites() {
    if let Some(why) = resolute_netns::cannot_run() {
        eprintln!("sites: skipped: {why}");
        return;
    }
    let topo = resolute_netns::Topology::build().expect("the topology");
    if let Some(why) = topo.netem_missing() {
        eprintln!("sites: {why}");
    }
    let ns = |n: &str| Some(n.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud_config = config_for(dir.path(), "config/cloud.toml", "cloud");
    let dc1 = config_for(dir.path(), "config/onprem.toml", "dc1");
    let dc2 = config_for(dir.path(), "config/onprem.toml", "dc2");
    let at = |ns: Option<String>, api_host: u8, ip: &str| Place {
        ns,
        api_host,
        listen_ip: ip.to_string(),
    };
    let c = start_at(
        &dir.path().join("cloud"),
        &at(ns(topo.cloud()), 2, resolute_netns::CLOUD_IP),
        None,
        &cloud_config,
    );
    let a = start_at(
        &dir.path().join("a"),
        &at(ns(topo.site_a()), 3, resolute_netns::SITE_A_IP),
        Some(&c.listen),
        &dc1,
    );
    let b = start_at(
        &dir.path().join("b"),
        &at(ns(topo.site_b()), 4, resolute_netns::SITE_B_IP),
        Some(&c.listen),
        &dc2,
    );
    let (id_c, id_a, id_b) = (this_node(&c), this_node(&a), this_node(&b));
    until(
        "three voters, one per site",
        Duration::from_secs(90),
        || {
            let v = get(&c.api, &["cluster", "status"]);
            v["voters"].as_array().is_some_and(|x| x.len() == 3)
        },
    );
    // AutoNAT: the cloud node is dialled back by the on-prem ones; theirs fail.
    until(
        "the cloud node public, the on-prem nodes private",
        Duration::from_secs(120),
        || {
            row(&c, &id_c)["reachability"] == "public"
                && row(&c, &id_a)["reachability"] == "private"
                && row(&c, &id_b)["reachability"] == "private"
        },
    );
    // The two NATed sites reach each other through the cloud node's relay,
    // or directly once DCUtR punched a hole.
    let mut kind = String::new();
    until(
        "site a connected to site b",
        Duration::from_secs(90),
        || {
            kind = row(&a, &id_b)["connection"]["kind"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            !kind.is_empty()
        },
    );
    eprintln!("sites: a reaches b {kind} (netem: {})", topo.netem);
    assert_ne!(
        kind, "direct",
        "two NATs apart, a plain direct dial cannot work"
    );
    assert_eq!(row(&a, &id_c)["connection"]["kind"], "direct");
    let status = get(&a.api, &["cluster", "status"]);
    let warnings = status["warnings"].to_string();
    assert!(
        warnings.contains("site dc1 has no node that other sites can dial"),
        "{status}"
    );

    // The log reaches every site: b applies what a has applied.
    let applied = get(&a.api, &["cluster", "status"])["applied"]
        .as_u64()
        .unwrap_or(0);
    until("b caught up with a", Duration::from_secs(60), || {
        get(&b.api, &["cluster", "status"])["applied"]
            .as_u64()
            .is_some_and(|x| x >= applied)
    });

    // A job submitted on-prem runs on every site, the cloud node included,
    // and its results come back to the site it was submitted on.
    let model = repo().join("examples/core-api");
    let length = 300;
    let overrides = [
        client_env(),
        format!("searcher.max_length.batches={length}"),
        "data.pause_s=0.1".to_string(),
    ];
    let id = create(&a.api, &model.join("experiment.yaml"), &model, &overrides);
    let on = |t: &Value, node: &str| {
        t["layout"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["node"].as_str() == Some(node))
    };
    until_shown(
        "a trial on the cloud node reports to site a",
        Duration::from_secs(120),
        || format!("{:#?}", trials(&c.api, id)),
        || {
            trials(&a.api, id).iter().any(|t| {
                on(t, &id_c)
                    && get(&a.api, &["trial", "metrics", &t["id"].to_string()])
                        .as_array()
                        .is_some_and(|m| !m.is_empty())
            })
        },
    );

    // A checkpoint moves between the two NATed sites: each new checkpoint of
    // a trial on one of them is copied by a node on a site without a copy,
    // the other on-prem node for about half of them, and that fetch can only
    // go through the relay (or a punched hole). Its report says which.
    let mut crossing = Value::Null;
    until_shown(
        "a checkpoint fetched across the two NATs",
        Duration::from_secs(120),
        || {
            let f = |n: &NodeProc| get(&n.api, &["cluster", "status"])["fetches"].to_string();
            format!("a's fetches {}\nb's fetches {}", f(&a), f(&b))
        },
        || {
            for (me, other) in [(&a, &id_b), (&b, &id_a)] {
                let status = get(&me.api, &["cluster", "status"]);
                let fetches = status["fetches"].as_array().cloned().unwrap_or_default();
                if let Some(f) = fetches
                    .iter()
                    .find(|f| f["from"].get(other.as_str()).is_some())
                {
                    crossing = f.clone();
                    return true;
                }
            }
            false
        },
    );
    let via = crossing["from"]
        .as_object()
        .and_then(|m| m.values().next())
        .map(|h| h["via"].clone())
        .unwrap_or_default();
    eprintln!("sites: a checkpoint crossed the NATs via {via}: {crossing}");
    assert!(via == "relayed" || via == "hole-punched", "{crossing}");
    if via == "relayed" {
        assert!(
            crossing["relayed_chunks"].as_u64().unwrap_or(0) >= 1,
            "{crossing}"
        );
    }

    // SIGKILL of an on-prem node with a trial whose checkpoint has a copy
    // elsewhere: the trial moves to another site and resumes from it.
    let mut victim: Option<(u64, String)> = None;
    let copied = |trial: u64| {
        let runs = get(&c.api, &["trial", "runs", &trial.to_string()]);
        runs["checkpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|k| k["holders"].as_array().is_some_and(|h| h.len() >= 2))
    };
    until_shown(
        "an on-prem trial with a copied checkpoint",
        Duration::from_secs(120),
        || format!("{:#?}", trials(&c.api, id)),
        || {
            for t in trials(&c.api, id) {
                let tid = t["id"].as_u64().unwrap_or(0);
                for node in [&id_b, &id_a] {
                    if t["state"] == "Running" && on(&t, node) && copied(tid) {
                        victim = Some((tid, node.clone()));
                        return true;
                    }
                }
            }
            false
        },
    );
    let (trial, gone) = victim.expect("victim");
    let (a, b) = if gone == id_b {
        drop(b);
        (Some(a), None)
    } else {
        drop(a);
        (None, Some(b))
    };
    eprintln!("sites: SIGKILLed {gone} under trial {trial}");
    until_shown(
        "the trial runs again on another site",
        Duration::from_secs(120),
        || get(&c.api, &["trial", "describe", &trial.to_string()]).to_string(),
        || {
            let d = get(&c.api, &["trial", "describe", &trial.to_string()]);
            d["incarnation"].as_u64().unwrap_or(0) >= 2 && d["state"] == "Running" && !on(&d, &gone)
        },
    );
    until("the experiment completes", Duration::from_secs(300), || {
        get(&c.api, &["experiment", "describe", &id.to_string()])["state"] == "Completed"
    });
    for t in trials(&c.api, id) {
        assert_eq!(t["state"], "Done(Completed)", "{t}");
        assert_eq!(t["steps_completed"], length, "{t}");
    }
    // It resumed from its replicated checkpoint (the script logs where), and
    // the lost node was not the trial's fault.
    let described = get(&c.api, &["trial", "describe", &trial.to_string()]);
    assert_eq!(described["restarts"], 0, "{described}");
    let (_, logs) = cli(&c.api, &["trial", "logs", &trial.to_string()]);
    assert!(logs.contains("resumed at batch"), "{logs}");
    drop((a, b, c));
}
