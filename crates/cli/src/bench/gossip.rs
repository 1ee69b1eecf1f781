//! `resolute bench gossip`: how long a node record takes to reach every other
//! node, across 10 local peers (each dialed to two others, so most records take
//! more than one hop), over the real gossipsub.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;

use resolute_net::{spawn, Announcement, NetConfig, NetEvent};

/// Peers in the benchmark.
pub const PEERS: usize = 10;
/// Records published (each from the next peer in turn).
pub const RECORDS: u64 = 100;
/// Pause between records.
const RECORD_EVERY_MS: u64 = 50;
/// How long to wait for the mesh to form before measuring.
const WARMUP_S: u64 = 20;

/// The figures (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Peers.
    pub peers: usize,
    /// Median time from publish to arrival at a peer, ms.
    pub gossip_ms_p50: f64,
    /// 99th percentile of the same.
    pub gossip_ms_p99: f64,
    /// Fraction of (record, peer) arrivals that happened.
    pub delivered: f64,
}

fn record(node: u64, seq: u64) -> Announcement {
    Announcement {
        node,
        seq,
        ttl_ms: 60_000,
        addrs: Vec::new(),
        api: String::new(),
        slots_total: 8,
        slots_free: 8,
        gpus: Vec::new(),
        labels: Default::default(),
        blobs: Vec::new(),
        reachability: Default::default(),
    }
}

/// Runs the benchmark (peers keep their identities under `dir`).
pub fn run(dir: &std::path::Path) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let r = runtime.block_on(run_async(dir));
    let _ = std::fs::remove_dir_all(dir);
    r
}

async fn run_async(dir: &std::path::Path) -> anyhow::Result<Report> {
    let (arrivals_tx, mut arrivals) = mpsc::channel::<(usize, u64, u64, Instant)>(4096);
    let mut handles = Vec::new();
    for i in 0..PEERS {
        let listen = format!("/ip4/127.0.0.{}/tcp/0", 30 + i).parse()?;
        let (h, mut events, _task) =
            spawn(NetConfig::new(dir.join(format!("p{i}")), listen)).await?;
        let tx = arrivals_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let NetEvent::Announcement(a) = e {
                    let _ = tx.send((i, a.node, a.seq, Instant::now())).await;
                }
            }
        });
        handles.push(h);
    }
    // A ring with one chord: every peer dials the next two.
    let mut addrs = Vec::new();
    for h in &handles {
        addrs.push(h.info().await?.listen[0].clone());
    }
    for i in 0..PEERS {
        for k in [1, 2] {
            handles[i].dial(addrs[(i + k) % PEERS].clone()).await?;
        }
    }
    // Warm up until a record from peer 0 reaches everyone.
    let deadline = Instant::now() + Duration::from_secs(WARMUP_S);
    let mut seq = 0;
    'warm: loop {
        anyhow::ensure!(Instant::now() < deadline, "gossip mesh did not form");
        seq += 1;
        let _ = handles[0].publish(record(handles[0].node_id, seq)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut seen = std::collections::BTreeSet::new();
        while let Ok((peer, node, _, _)) = arrivals.try_recv() {
            if node == handles[0].node_id {
                seen.insert(peer);
            }
        }
        if seen.len() == PEERS - 1 {
            break 'warm;
        }
    }
    let base = 1_000_000;
    let mut sent: Vec<(u64, u64, Instant)> = Vec::new();
    for r in 0..RECORDS {
        let from = (r as usize) % PEERS;
        let seq = base + r;
        sent.push((handles[from].node_id, seq, Instant::now()));
        handles[from]
            .publish(record(handles[from].node_id, seq))
            .await?;
        tokio::time::sleep(Duration::from_millis(RECORD_EVERY_MS)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::new();
    while let Ok((_, node, seq, at)) = arrivals.try_recv() {
        if let Some((_, _, t0)) = sent.iter().find(|(n, s, _)| *n == node && *s == seq) {
            latencies.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
        }
    }
    let expected = RECORDS as f64 * (PEERS - 1) as f64;
    let delivered = latencies.len() as f64 / expected;
    for h in &handles {
        h.shutdown().await;
    }
    Ok(Report {
        peers: PEERS,
        gossip_ms_p50: super::quantile(&mut latencies, 0.5),
        gossip_ms_p99: super::quantile(&mut latencies, 0.99),
        delivered,
    })
}
