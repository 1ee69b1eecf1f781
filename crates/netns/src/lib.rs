//! Three sites on one machine, built from Linux network namespaces: a
//! "cloud" namespace with a public address, and two "on-prem" sites, each
//! behind its own NAT (nftables masquerade, no inbound port forwarding),
//! all joined by a "wan" router whose links add latency and loss (tc netem,
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
//! The addresses are from 198.18.0.0/15 (set aside for benchmarks) and
//! 10.10.0.0/16, inside namespaces that only this process's children use;
//! [`Topology`] deletes every namespace it made when dropped. Building one
//! needs root, `ip`, `nft` and `tc`; [`cannot_run`] says why not.

use std::io::Write;
use std::process::{Command, Stdio};

/// The cloud node's address (public: every site dials it).
pub const CLOUD_IP: &str = "198.18.0.2";
/// Site a's node address (behind nat-a).
pub const SITE_A_IP: &str = "10.10.1.2";
/// Site b's node address (behind nat-b).
pub const SITE_B_IP: &str = "10.10.2.2";
/// One-way delay netem adds on each router link, in milliseconds.
pub const LINK_DELAY_MS: u32 = 20;
/// Loss netem adds on each router link, in percent.
pub const LINK_LOSS_PERCENT: f64 = 0.5;

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

/// The namespaces made, and whether the links have added latency and loss.
#[derive(Debug)]
pub struct Topology {
    /// wan, cloud, nat-a, site-a, nat-b, site-b (deleted on drop).
    namespaces: Vec<String>,
    /// Whether netem adds latency and loss on the router's links.
    pub netem: bool,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Why this machine cannot build the topology (None: it can).
pub fn cannot_run() -> Option<String> {
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
    let made = match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(m) => m,
        Err(e) => return Some(format!("`ip netns add`: {e}")),
    };
    if !made.status.success() {
        return Some(format!(
            "network namespaces are not allowed here (`ip netns add`: {})",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

/// Runs a command, with what it said on failure.
fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A veth pair between two namespaces, each end with its address, up.
fn link(a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<(), String> {
    let (ns_a, if_a, ip_a) = a;
    let (ns_b, if_b, ip_b) = b;
    sh(&[
        "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns",
        ns_b,
    ])?;
    for (ns, ifname, ip) in [(ns_a, if_a, ip_a), (ns_b, if_b, ip_b)] {
        sh(&["ip", "-n", ns, "addr", "add", ip, "dev", ifname])?;
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
    }
    Ok(())
}

impl Topology {
    /// Builds the six namespaces, their links, routes and NAT rules, and
    /// netem on the router's links where the kernel has it.
    pub fn build() -> Result<Topology, String> {
        let tag = std::process::id() % 100_000;
        let name = |n: &str| format!("rs{tag}-{n}");
        let names = ["wan", "cloud", "nata", "sitea", "natb", "siteb"].map(name);
        let mut topo = Topology {
            namespaces: Vec::new(),
            netem: false,
        };
        for ns in &names {
            sh(&["ip", "netns", "add", ns])?;
            topo.namespaces.push(ns.clone());
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let [wan, cloud, nat_a, site_a, nat_b, site_b] = names.each_ref().map(String::as_str);
        link(
            (wan, "w0", "198.18.0.1/24"),
            (cloud, "eth0", "198.18.0.2/24"),
        )?;
        link(
            (wan, "w1", "198.18.1.1/24"),
            (nat_a, "wan", "198.18.1.2/24"),
        )?;
        link(
            (wan, "w2", "198.18.2.1/24"),
            (nat_b, "wan", "198.18.2.2/24"),
        )?;
        link(
            (nat_a, "lan", "10.10.1.1/24"),
            (site_a, "eth0", "10.10.1.2/24"),
        )?;
        link(
            (nat_b, "lan", "10.10.2.1/24"),
            (site_b, "eth0", "10.10.2.2/24"),
        )?;
        for ns in [wan, nat_a, nat_b] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
        }
        for (ns, via) in [
            (cloud, "198.18.0.1"),
            (nat_a, "198.18.1.1"),
            (nat_b, "198.18.2.1"),
            (site_a, "10.10.1.1"),
            (site_b, "10.10.2.1"),
        ] {
            sh(&["ip", "-n", ns, "route", "add", "default", "via", via])?;
        }
        for ns in [nat_a, nat_b] {
            let mut nft = Command::new("ip")
                .args(["netns", "exec", ns, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("nft in {ns}: {e}"))?;
            if let Some(mut stdin) = nft.stdin.take() {
                stdin
                    .write_all(NAT_RULES.as_bytes())
                    .map_err(|e| format!("nft rules in {ns}: {e}"))?;
            }
            let ok = nft.wait().map_err(|e| format!("nft in {ns}: {e}"))?;
            if !ok.success() {
                return Err(format!("nft rules in {ns} were refused"));
            }
        }
        let delay = format!("{LINK_DELAY_MS}ms");
        let loss = format!("{LINK_LOSS_PERCENT}%");
        topo.netem = ["w0", "w1", "w2"].iter().all(|dev| {
            Command::new("tc")
                .args(["-n", wan, "qdisc", "add", "dev", dev, "root", "netem"])
                .args(["delay", &delay, "loss", &loss])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        Ok(topo)
    }

    /// The cloud namespace (public address [`CLOUD_IP`]).
    pub fn cloud(&self) -> &str {
        &self.namespaces[1]
    }

    /// On-prem site a's namespace (behind its NAT, [`SITE_A_IP`]).
    pub fn site_a(&self) -> &str {
        &self.namespaces[3]
    }

    /// On-prem site b's namespace (behind its NAT, [`SITE_B_IP`]).
    pub fn site_b(&self) -> &str {
        &self.namespaces[5]
    }

    /// Why the links run without netem, in words (None when they have it).
    pub fn netem_missing(&self) -> Option<&'static str> {
        (!self.netem).then_some(
            "tc netem is not available in this kernel (CONFIG_NET_SCH_NETEM): \
             the links run without added latency or loss",
        )
    }
}

/// A shipped node config (`config/cloud.toml`, `config/onprem.toml`) for a
/// node of this topology on `site`: its trials run as the node's user (the
/// machine's python3 and binaries may sit under a home directory other uids
/// cannot read), and a trial waits `burst_after_s` for on-prem slots before
/// it may run on the cloud node, which costs something.
pub fn node_config(shipped: &str, site: &str, burst_after_s: u64) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        if line.starts_with("site = ") {
            out.push_str(&format!("site = \"{site}\""));
        } else if line.starts_with("burst_after_s = ") {
            out.push_str(&format!("burst_after_s = {burst_after_s}"));
        } else if line.starts_with("uid_range = ") {
            out.push_str("# uid_range: trials run as the node's user");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// `program` run inside network namespace `ns` (`ip netns exec`).
pub fn command_in(ns: &str, program: &std::path::Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}
