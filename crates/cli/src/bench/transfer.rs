//! `resolute bench transfer`: one blob between two local peers over the real
//! protocol (TCP + noise + yamux, chunk requests, every chunk verified, the whole
//! blob verified and made durable), and the same bytes over a plain tokio
//! `TcpStream` in the same run, as interleaved pairs; the median of the pairs'
//! ratios is reported. The reference moves memory to memory (the receiver drops
//! the bytes), so the ratio also charges the protocol for the receiver's disk
//! writes and verification; a second reference that writes and syncs the bytes
//! on the receiver is reported beside it.
//!
//! Both peers run in this process, so the process's CPU time during a transfer
//! is what the transfer cost on this machine: reported per GiB for both paths, it
//! shows how far a machine's cores bound the ratio (noise encrypts and decrypts
//! every byte, and each chunk is hashed and written, on top of the kernel's own
//! copies that raw TCP pays too).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use resolute_net::{spawn, NetConfig};
use resolute_storage::blob::BlobStore;

/// Interleaved rounds (each: one libp2p transfer, one raw TCP transfer).
pub const ROUNDS: usize = 3;
/// Bytes per write on the raw TCP reference.
const RAW_WRITE_BYTES: usize = 4 << 20;

/// The figures (JSON keys are an interface).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Blob size.
    pub size_mb: u64,
    /// Median throughput of the libp2p transfers, MB/s (10^6 bytes).
    pub libp2p_mb_s: f64,
    /// Median throughput of the raw TCP transfers (receiver drops the bytes), MB/s.
    pub raw_tcp_mb_s: f64,
    /// Median throughput of raw TCP when the receiver writes and syncs a file.
    pub raw_tcp_to_disk_mb_s: f64,
    /// Median over rounds of libp2p / raw.
    pub ratio: f64,
    /// Every round's (libp2p, raw, raw to disk) MB/s.
    pub rounds: Vec<(f64, f64, f64)>,
    /// Median CPU seconds (user + system, both peers) per GiB moved by libp2p.
    pub libp2p_cpu_s_per_gib: f64,
    /// Median CPU seconds per GiB moved by raw TCP (memory to memory).
    pub raw_tcp_cpu_s_per_gib: f64,
    /// CPU cores this process may use.
    pub cores: usize,
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_s() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

fn random_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut reader = blake3::Hasher::new().update(b"bench").finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        reader.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Sends the file over one TCP connection on loopback; the receiver drops the
/// bytes, or writes them to `dst` and syncs it. Returns seconds.
async fn raw_tcp(src: &Path, dst: Option<&Path>) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let dst = dst.map(Path::to_path_buf);
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut out = match &dst {
            Some(d) => Some(tokio::fs::File::create(d).await?),
            None => None,
        };
        let mut buf = vec![0u8; RAW_WRITE_BYTES];
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if let Some(out) = out.as_mut() {
                out.write_all(&buf[..n]).await?;
            }
        }
        if let Some(out) = out.as_mut() {
            out.sync_data().await?;
        }
        anyhow::Ok(())
    });
    let start = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let mut input = tokio::fs::File::open(src).await?;
    let mut buf = vec![0u8; RAW_WRITE_BYTES];
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        socket.write_all(&buf[..n]).await?;
    }
    socket.shutdown().await?;
    receiver.await??;
    Ok(start.elapsed().as_secs_f64())
}

fn remove_blob(dir: &Path, digest: &str) {
    let _ = std::fs::remove_file(dir.join("blobs").join(digest));
    let _ = std::fs::remove_file(dir.join("blobs").join(format!("{digest}.manifest")));
    let _ = std::fs::remove_file(dir.join("partial").join(digest));
}

/// Runs the benchmark with a blob of `size_mb` MiB under `dir`.
pub fn run(size_mb: u64, dir: &Path) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(run_async(size_mb, dir))
}

async fn run_async(size_mb: u64, dir: &Path) -> anyhow::Result<Report> {
    let bytes = size_mb << 20;
    let (a_dir, b_dir): (PathBuf, PathBuf) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a_dir)?;
    std::fs::create_dir_all(&b_dir)?;
    let src = dir.join("source.bin");
    random_file(&src, bytes)?;
    let digest = BlobStore::open(&a_dir)?.put_file(&src)?.digest();
    let listen = |h: u8| format!("/ip4/127.0.0.{h}/tcp/0").parse();
    let (a, _a_events, _a_task) = spawn(NetConfig::new(a_dir.clone(), listen(1)?)).await?;
    let (b, _b_events, _b_task) = spawn(NetConfig::new(b_dir.clone(), listen(1)?)).await?;
    let a_addr = a.info().await?.listen[0].clone();
    b.dial(a_addr).await?;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let mut rounds = Vec::new();
    let mut p2p_cpu = Vec::new();
    let mut raw_cpu = Vec::new();
    for _ in 0..ROUNDS {
        remove_blob(&b_dir, &digest);
        let (start, cpu) = (Instant::now(), cpu_s());
        b.fetch(&digest, vec![a.node_id]).await?;
        let p2p = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
        p2p_cpu.push((cpu_s() - cpu) / gib);
        let blob = BlobStore::open(&a_dir)?.path(&digest);
        let cpu = cpu_s();
        let raw = bytes as f64 / 1e6 / raw_tcp(&blob, None).await?;
        raw_cpu.push((cpu_s() - cpu) / gib);
        let copy = dir.join("raw.bin");
        let to_disk = bytes as f64 / 1e6 / raw_tcp(&blob, Some(&copy)).await?;
        let _ = std::fs::remove_file(&copy);
        rounds.push((p2p, raw, to_disk));
    }
    a.shutdown().await;
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
    let mut p2p: Vec<f64> = rounds.iter().map(|r| r.0).collect();
    let mut raw: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    let mut to_disk: Vec<f64> = rounds.iter().map(|r| r.2).collect();
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.0 / r.1).collect();
    Ok(Report {
        size_mb,
        libp2p_mb_s: super::quantile(&mut p2p, 0.5),
        raw_tcp_mb_s: super::quantile(&mut raw, 0.5),
        raw_tcp_to_disk_mb_s: super::quantile(&mut to_disk, 0.5),
        ratio: super::quantile(&mut ratios, 0.5),
        rounds,
        libp2p_cpu_s_per_gib: super::quantile(&mut p2p_cpu, 0.5),
        raw_tcp_cpu_s_per_gib: super::quantile(&mut raw_cpu, 0.5),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}
