//! One cluster across three sites on this machine, built from Linux network
//! namespaces by the test itself (and torn down at its end): a "cloud"
//! namespace with a public address, and two "on-prem" sites, each behind
//! its own NAT (nftables masquerade, no inbound port forwarding), all
//! joined by a "wan" router whose links add latency and loss (tc netem,
//! 20 ms each way and 0.5% loss per hop, so 40 ms and about 1% between two
//! sites) where the kernel has netem.
//!
//! ```text
//!            wan (router)   198.18.0.1 | 198.18.1.1 | 198.18.2.1
//!        /                   |                       \
//!   cloud 198.18.0.2     nat-a 198.18.1.2        nat-b 198.18.2.2
//!   (public: dialled       |  masquerade, drops     |
//!    by everyone)          |  what it did not open  |
//!                       site-a 10.10.1.2         site-b 10.10.2.2
//! ```
//!
//! The on-prem nodes dial the cloud node; AutoNAT tells each that other
//! sites cannot dial it, so it reserves a relayed address on the cloud node
//! (circuit relay v2), and the two on-prem nodes reach each other through
//! it or through a hole-punched connection (DCUtR). The test needs root (it
//! runs as root in CI) and says why when it skips.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use resolute_tests::{
    cli, client_env, create, get, repo, start_at, this_node, trials, until, NodeProc, Place,
};

/// One site's namespaces and addresses, and the whole topology's teardown.
struct Topology {
    /// Every namespace made (deleted on drop).
    namespaces: Vec<String>,
    /// Whether the links have added latency and loss.
    netem: bool,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `ip ARGS`, `ip netns exec NS CMD...` and friends, failing the test
/// with what the command said.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why this machine cannot run the test (None: it can).
fn cannot_run() -> Option<String> {
    for tool in ["ip", "nft", "tc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    let probe = format!("rs-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .ok()?;
    if !made.status.success() {
        return Some(format!(
            "network namespaces are not allowed here (`ip netns add`: {})",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

/// A veth pair between two namespaces, each end with its address, up.
fn link(a: (&str, &str, &str), b: (&str, &str, &str)) {
    let (ns_a, if_a, ip_a) = a;
    let (ns_b, if_b, ip_b) = b;
    sh(&[
        "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns",
        ns_b,
    ]);
    for (ns, ifname, ip) in [(ns_a, if_a, ip_a), (ns_b, if_b, ip_b)] {
        sh(&["ip", "-n", ns, "addr", "add", ip, "dev", ifname]);
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }
}

/// The NAT of an on-prem site: forwards what its LAN opens, masquerades it,
/// and drops every connection the WAN tries to open.
const NAT_RULES: &str = "
table ip nat {
  chain nat_out { type nat hook postrouting priority 100; oifname \"wan\" masquerade; }
}
table ip filter {
  chain pass {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname \"lan\" accept
  }
}
";

fn build() -> Topology {
    let tag = std::process::id() % 100_000;
    let name = |n: &str| format!("rs{tag}-{n}");
    let [wan, cloud, nat_a, site_a, nat_b, site_b] =
        ["wan", "cloud", "nata", "sitea", "natb", "siteb"].map(name);
    let mut topo = Topology {
        namespaces: Vec::new(),
        netem: false,
    };
    for ns in [&wan, &cloud, &nat_a, &site_a, &nat_b, &site_b] {
        sh(&["ip", "netns", "add", ns]);
        topo.namespaces.push(ns.clone());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    link(
        (&wan, "w0", "198.18.0.1/24"),
        (&cloud, "eth0", "198.18.0.2/24"),
    );
    link(
        (&wan, "w1", "198.18.1.1/24"),
        (&nat_a, "wan", "198.18.1.2/24"),
    );
    link(
        (&wan, "w2", "198.18.2.1/24"),
        (&nat_b, "wan", "198.18.2.2/24"),
    );
    link(
        (&nat_a, "lan", "10.10.1.1/24"),
        (&site_a, "eth0", "10.10.1.2/24"),
    );
    link(
        (&nat_b, "lan", "10.10.2.1/24"),
        (&site_b, "eth0", "10.10.2.2/24"),
    );
    for ns in [&wan, &nat_a, &nat_b] {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }
    sh(&[
        "ip",
        "-n",
        &cloud,
        "route",
        "add",
        "default",
        "via",
        "198.18.0.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &nat_a,
        "route",
        "add",
        "default",
        "via",
        "198.18.1.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &nat_b,
        "route",
        "add",
        "default",
        "via",
        "198.18.2.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &site_a,
        "route",
        "add",
        "default",
        "via",
        "10.10.1.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &site_b,
        "route",
        "add",
        "default",
        "via",
        "10.10.2.1",
    ]);
    for ns in [&nat_a, &nat_b] {
        let mut nft = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(NAT_RULES.as_bytes())
            .expect("nft rules");
        assert!(nft.wait().expect("nft").success(), "nft rules in {ns}");
    }
    // The router's three links: 20 ms and 0.5% loss on each way out.
    topo.netem = ["w0", "w1", "w2"].iter().all(|dev| {
        Command::new("tc")
            .args(["-n", &wan, "qdisc", "add", "dev", dev, "root", "netem"])
            .args(["delay", "20ms", "loss", "0.5%"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !topo.netem {
        eprintln!(
            "sites: tc netem is not available in this kernel (CONFIG_NET_SCH_NETEM): \
             the links run without added latency or loss"
        );
    }
    topo
}

/// How long a trial waits for on-prem slots before it runs on the (paid)
/// cloud node, in the test's configs (300 s in the shipped ones).
const BURST_AFTER_S: u64 = 5;

/// A copy of a shipped config for `site`.
fn config_for(dir: &Path, shipped: &str, site: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join(shipped)).expect("shipped config");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("site = ") {
            out.push_str(&format!("site = \"{site}\"\n"));
        } else if line.starts_with("burst_after_s = ") {
            // The cloud node costs something: it is burst capacity, used
            // once a trial has waited this long for on-prem slots.
            out.push_str(&format!("burst_after_s = {BURST_AFTER_S}\n"));
        } else if line.starts_with("uid_range = ") {
            // Trials run as the node's user here: this machine's python3 may
            // live under a home directory other uids cannot read.
            out.push_str("# uid_range: as the node's user in this test\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join(format!("{site}.toml"));
    std::fs::write(&path, out).expect("config");
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
    if let Some(why) = cannot_run() {
        eprintln!("sites: skipped: {why}");
        return;
    }
    let topo = build();
    let ns = |k: usize| Some(topo.namespaces[k].clone());
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
        &at(ns(1), 2, "198.18.0.2"),
        None,
        &cloud_config,
    );
    let a = start_at(
        &dir.path().join("a"),
        &at(ns(3), 3, "10.10.1.2"),
        Some(&c.listen),
        &dc1,
    );
    let b = start_at(
        &dir.path().join("b"),
        &at(ns(5), 4, "10.10.2.2"),
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
    assert!(via == "relayed" || via == "hole_punched", "{crossing}");
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
