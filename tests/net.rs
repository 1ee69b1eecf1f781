//! Real swarms on real sockets (127.0.0.x): gossip, Raft messages, blob transfer
//! with a killed sender and a corrupted chunk, admission by key and membership,
//! and the message size limit.

use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use resolute_core::PeerMessage;
use resolute_net::{spawn, Announcement, NetConfig, NetError, NetEvent, NetHandle};
use resolute_storage::blob::{BlobStore, BLOB_CHUNK_BYTES};

struct Peer {
    handle: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    task: JoinHandle<()>,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

async fn peer_with(host: u8, tweak: impl FnOnce(&mut NetConfig)) -> Peer {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: Multiaddr = format!("/ip4/127.0.0.{host}/tcp/0").parse().expect("addr");
    let mut config = NetConfig::new(dir.path().to_path_buf(), listen);
    tweak(&mut config);
    let (handle, events, task) = spawn(config).await.expect("swarm");
    let info = handle.info().await.expect("info");
    Peer {
        handle,
        events,
        task,
        addr: info.listen[0].clone(),
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

async fn peer(host: u8) -> Peer {
    peer_with(host, |_| {}).await
}

/// Waits for an event that `want` accepts (other events are skipped).
async fn expect<T>(
    events: &mut mpsc::Receiver<NetEvent>,
    what: &str,
    mut want: impl FnMut(&NetEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(e)) => {
                if let Some(t) = want(&e) {
                    return t;
                }
            }
            _ => panic!("timed out waiting for {what}"),
        }
    }
}

fn announcement(node: u64, seq: u64) -> Announcement {
    Announcement {
        node,
        seq,
        ttl_ms: 10_000,
        addrs: Vec::new(),
        api: String::new(),
        slots_total: 8,
        slots_free: 3,
        gpus: Vec::new(),
        labels: [("site".to_string(), "a".to_string())].into(),
        blobs: Vec::new(),
        reachability: Default::default(),
    }
}

/// Pseudo-random bytes (blake3's output stream), written to a file.
fn random_file(path: &Path, bytes: u64, seed: u8) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut reader = blake3::Hasher::new().update(&[seed]).finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        reader.fill(&mut buf[..n]);
        out.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
}

fn store_blob(p: &Peer, bytes: u64, seed: u8) -> String {
    let src = p.dir.join("source.bin");
    random_file(&src, bytes, seed);
    let m = BlobStore::open(&p.dir)
        .expect("store")
        .put_file(&src)
        .expect("put");
    std::fs::remove_file(&src).ok();
    m.digest()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_swarms_exchange_gossip_and_raft_messages() {
    let mut a = peer(2).await;
    let mut b = peer(3).await;
    let mut c = peer(4).await;
    b.handle.dial(a.addr.clone()).await.expect("b dials a");
    c.handle.dial(a.addr.clone()).await.expect("c dials a");
    c.handle.dial(b.addr.clone()).await.expect("c dials b");
    // Gossip: a's record reaches b and c (retried until the mesh has formed).
    let node_a = a.handle.node_id;
    let mut seq = 0;
    let mut got_b = false;
    let mut got_c = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(got_b && got_c) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gossip never arrived"
        );
        seq += 1;
        let _ = a.handle.publish(announcement(node_a, seq)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(e) = b.events.try_recv() {
            got_b |= matches!(e, NetEvent::Announcement(ref x) if x.node == node_a);
        }
        while let Ok(e) = c.events.try_recv() {
            got_c |= matches!(e, NetEvent::Announcement(ref x) if x.node == node_a);
        }
    }
    let known = b.handle.announcements().await.expect("records");
    assert!(known.iter().any(|x| x.node == node_a && x.slots_free == 3));
    // A record that claims another node's id is ignored.
    a.handle
        .publish(announcement(c.handle.node_id, 1_000))
        .await
        .ok();
    // Raft messages in every direction, with acknowledgements.
    let msg = PeerMessage::Raft(vec![7; 300]);
    b.handle
        .send(c.handle.node_id, msg.clone())
        .await
        .expect("b -> c");
    c.handle.send(node_a, msg.clone()).await.expect("c -> a");
    a.handle
        .send(b.handle.node_id, PeerMessage::Removed)
        .await
        .expect("a -> b");
    let from_b = b.handle.node_id;
    expect(&mut c.events, "b's message at c", |e| match e {
        NetEvent::Message { from, msg: m } if *from == from_b && *m == msg => Some(()),
        _ => None,
    })
    .await;
    let from_c = c.handle.node_id;
    expect(&mut a.events, "c's message at a", |e| match e {
        NetEvent::Message { from, .. } if *from == from_c => Some(()),
        _ => None,
    })
    .await;
    expect(&mut b.events, "a's message at b", |e| match e {
        NetEvent::Message { msg, .. } if *msg == PeerMessage::Removed => Some(()),
        _ => None,
    })
    .await;
    let records = c.handle.announcements().await.expect("records");
    assert!(
        !records.iter().any(|x| x.node == c.handle.node_id),
        "a forged record was believed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_blob_moves_between_two_peers_and_is_verified() {
    let a = peer(5).await;
    let b = peer(6).await;
    b.handle.dial(a.addr.clone()).await.expect("dial");
    let digest = store_blob(&a, 1 << 30, 1);
    let start = std::time::Instant::now();
    let report = b
        .handle
        .fetch(&digest, vec![a.handle.node_id])
        .await
        .expect("fetch");
    eprintln!("1 GiB in {:.2} s", start.elapsed().as_secs_f64());
    assert_eq!(report.bad_chunks, 0);
    assert_eq!(
        report.chunks_by_holder.get(&a.handle.node_id).copied(),
        Some((1u32 << 30) / BLOB_CHUNK_BYTES)
    );
    let store = BlobStore::open(&b.dir).expect("store");
    assert!(store.has(&digest));
    assert_eq!(
        std::fs::metadata(&report.path).expect("blob").len(),
        1 << 30
    );
    // The copy is byte-identical: re-storing it gives the same digest.
    let again = BlobStore::open(&b.dir.join("check"))
        .expect("store")
        .put_file(&report.path)
        .expect("put");
    assert_eq!(again.digest(), digest);
}

/// Bytes of chunk `index` as the receiver has them in its partial file.
fn chunk_on_disk(dir: &Path, digest: &str, index: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dir.join("partial").join(digest)).ok()?;
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, index * u64::from(BLOB_CHUNK_BYTES))
        .ok()?;
    Some(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sender_is_replaced_by_a_second_holder_and_progress_is_kept() {
    let a = peer(7).await;
    let c = peer(8).await;
    let b = peer_with(9, |cfg| cfg.fetch_parallel_chunks = 1).await;
    const SIZE: u64 = 512 << 20;
    let digest = store_blob(&a, SIZE, 2);
    assert_eq!(store_blob(&c, SIZE, 2), digest, "the same bytes");
    b.handle.dial(a.addr.clone()).await.expect("dial a");
    b.handle.dial(c.addr.clone()).await.expect("dial c");
    // Fetch from a alone, one chunk at a time; kill a once chunk 8 is on disk.
    let fetch = {
        let h = b.handle.clone();
        let d = digest.clone();
        let node_a = a.handle.node_id;
        tokio::spawn(async move { h.fetch(&d, vec![node_a]).await })
    };
    let zero = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while chunk_on_disk(&b.dir, &digest, 8).is_none_or(|c| c == zero) {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a.task.abort();
    let first = fetch.await.expect("join");
    assert!(
        matches!(first, Err(NetError::Fetch { .. })),
        "the only holder died midway: {first:?}"
    );
    assert!(!BlobStore::open(&b.dir).expect("store").has(&digest));
    // The second holder finishes it: only the missing chunks move.
    let report = b
        .handle
        .fetch(&digest, vec![c.handle.node_id])
        .await
        .expect("resumed fetch");
    let total = (SIZE / u64::from(BLOB_CHUNK_BYTES)) as u32;
    let from_c = report.chunks_by_holder[&c.handle.node_id];
    assert!(report.chunks_resumed >= 9, "{report:?}");
    assert_eq!(report.chunks_resumed + from_c, total);
    assert!(BlobStore::open(&b.dir).expect("store").has(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_dying_mid_fetch_is_replaced_within_the_same_fetch() {
    let a = peer(10).await;
    let c = peer(11).await;
    let b = peer_with(12, |cfg| cfg.fetch_parallel_chunks = 2).await;
    const SIZE: u64 = 256 << 20;
    let digest = store_blob(&a, SIZE, 3);
    store_blob(&c, SIZE, 3);
    b.handle.dial(a.addr.clone()).await.expect("dial a");
    b.handle.dial(c.addr.clone()).await.expect("dial c");
    let fetch = {
        let h = b.handle.clone();
        let d = digest.clone();
        let holders = vec![a.handle.node_id, c.handle.node_id];
        tokio::spawn(async move { h.fetch(&d, holders).await })
    };
    let zero = vec![0u8; 4096];
    while chunk_on_disk(&b.dir, &digest, 4).is_none_or(|c| c == zero) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a.task.abort();
    let report = fetch.await.expect("join").expect("completed from c");
    assert!(report.chunks_by_holder[&c.handle.node_id] > 0);
    assert!(BlobStore::open(&b.dir).expect("store").has(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_detected_and_fetched_again_elsewhere() {
    let a = peer(13).await;
    let c = peer(14).await;
    let b = peer(15).await;
    const SIZE: u64 = 40 << 20;
    let digest = store_blob(&a, SIZE, 4);
    store_blob(&c, SIZE, 4);
    // Damage a's copy on disk inside chunk 2 (a serves it with a valid crc32c:
    // only the manifest's hash can tell).
    {
        use std::os::unix::fs::FileExt;
        let path = BlobStore::open(&a.dir).expect("store").path(&digest);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        f.write_all_at(b"garbage", 2 * u64::from(BLOB_CHUNK_BYTES) + 100)
            .expect("damage");
    }
    b.handle.dial(a.addr.clone()).await.expect("dial a");
    b.handle.dial(c.addr.clone()).await.expect("dial c");
    // With a as the only holder the blob is never handed over.
    let only_a = b.handle.fetch(&digest, vec![a.handle.node_id]).await;
    match only_a {
        Err(NetError::Fetch { reason, .. }) => {
            assert!(reason.contains("chunk 2"), "{reason}")
        }
        other => panic!("a damaged blob was accepted: {other:?}"),
    }
    assert!(!BlobStore::open(&b.dir).expect("store").has(&digest));
    // With both, chunk 2 comes from c.
    let report = b
        .handle
        .fetch(&digest, vec![a.handle.node_id, c.handle.node_id])
        .await
        .expect("fetch");
    assert!(BlobStore::open(&b.dir).expect("store").has(&digest));
    assert!(
        report
            .chunks_by_holder
            .get(&c.handle.node_id)
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_cluster_key_cannot_connect() {
    let key = [7u8; 32];
    let a = peer_with(16, |c| c.cluster_key = Some(key)).await;
    let friend = peer_with(17, |c| c.cluster_key = Some(key)).await;
    let stranger = peer_with(18, |c| c.cluster_key = Some([8u8; 32])).await;
    let keyless = peer(19).await;
    friend.handle.dial(a.addr.clone()).await.expect("same key");
    assert!(stranger.handle.dial(a.addr.clone()).await.is_err());
    assert!(keyless.handle.dial(a.addr.clone()).await.is_err());
    // The dialer learns of the connection first; the listener a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = a.handle.info().await.expect("info");
        if !info.connected.is_empty() || std::time::Instant::now() > deadline {
            assert_eq!(info.connected, vec![friend.handle.node_id]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_the_membership_cannot_send_raft_or_read_blobs() {
    let mut a = peer(20).await;
    let member = peer(21).await;
    let outsider = peer(22).await;
    member.handle.dial(a.addr.clone()).await.expect("dial");
    outsider.handle.dial(a.addr.clone()).await.expect("dial");
    a.handle
        .set_members(vec![a.handle.node_id, member.handle.node_id])
        .await
        .expect("members");
    let raft = PeerMessage::Raft(vec![1, 2, 3]);
    member
        .handle
        .send(a.handle.node_id, raft.clone())
        .await
        .expect("a member may");
    let refused = outsider.handle.send(a.handle.node_id, raft.clone()).await;
    assert!(
        matches!(refused, Err(NetError::Denied { ref reason, .. }) if reason.contains("not a member")),
        "{refused:?}"
    );
    let digest = store_blob(&a, 1 << 20, 5);
    let blob = outsider.handle.fetch(&digest, vec![a.handle.node_id]).await;
    assert!(matches!(blob, Err(NetError::Fetch { .. })), "{blob:?}");
    // Only the member's message reached the node.
    let from_member = member.handle.node_id;
    let from = expect(&mut a.events, "the member's message", |e| match e {
        NetEvent::Message { from, .. } => Some(*from),
        _ => None,
    })
    .await;
    assert_eq!(from, from_member);
    // Admitted as a joiner, the outsider may (admission is a command to the
    // swarm, taken in turn with the network's requests: the first send may
    // still beat it).
    a.handle
        .admit(outsider.handle.node_id)
        .await
        .expect("admit");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match outsider.handle.send(a.handle.node_id, raft.clone()).await {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(matches!(e, NetError::Denied { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("still refused after the admission: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_rejected_with_a_clear_error() {
    let a = peer_with(23, |c| c.max_message_bytes = 1 << 20).await;
    let b = peer_with(24, |c| c.max_message_bytes = 1 << 20).await;
    b.handle.dial(a.addr.clone()).await.expect("dial");
    let big = PeerMessage::Raft(vec![0; 2 << 20]);
    let err = b
        .handle
        .send(a.handle.node_id, big)
        .await
        .expect_err("too large");
    let text = err.to_string();
    assert!(
        text.contains("exceeds the limit of 1048576 bytes (net.max_message_bytes)"),
        "{text}"
    );
    // A receiver with a smaller limit than its sender refuses too, and says why
    // on its side; the sender gets an error, not a hang.
    let small = peer_with(25, |c| c.max_message_bytes = 64 << 10).await;
    b.handle.dial(small.addr.clone()).await.expect("dial");
    let err = b
        .handle
        .send(small.handle.node_id, PeerMessage::Raft(vec![0; 512 << 10]))
        .await;
    assert!(err.is_err(), "{err:?}");
    // Normal traffic still flows.
    b.handle
        .send(a.handle.node_id, PeerMessage::Raft(vec![0; 1000]))
        .await
        .expect("small message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_survives_a_restart_and_bootstrap_peers_are_dialed() {
    let a = peer(26).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: Multiaddr = "/ip4/127.0.0.27/tcp/0".parse().expect("addr");
    let mut config = NetConfig::new(dir.path().to_path_buf(), listen);
    config.bootstrap = vec![a.addr.clone()];
    let (first, mut events, task) = spawn(config.clone()).await.expect("swarm");
    let node_a = a.handle.node_id;
    expect(&mut events, "the bootstrap connection", |e| match e {
        NetEvent::Connected(n) if *n == node_a => Some(()),
        _ => None,
    })
    .await;
    let id = first.node_id;
    first.shutdown().await;
    let _ = task.await;
    let (second, _events, _task) = spawn(config).await.expect("restarted swarm");
    assert_eq!(second.node_id, id, "the same key, the same node id");
    assert_eq!(second.peer_id, first.peer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_holder_pushes_back_and_the_fetch_still_completes() {
    // A holder that reads one chunk at a time and lets one more wait: a fetch
    // with 8 chunk requests in flight gets "busy" for the rest, pauses, asks
    // again, and neither drops the holder nor fails.
    let a = peer_with(27, |cfg| {
        cfg.serve_reads = 1;
        cfg.serve_queue = 1;
    })
    .await;
    let b = peer_with(28, |cfg| cfg.fetch_parallel_chunks = 8).await;
    const SIZE: u64 = 64 << 20;
    let digest = store_blob(&a, SIZE, 5);
    b.handle.dial(a.addr.clone()).await.expect("dial");
    let report = b
        .handle
        .fetch(&digest, vec![a.handle.node_id])
        .await
        .expect("fetch from a busy holder");
    assert!(report.busy_answers > 0, "{report:?}");
    let total = (SIZE / u64::from(BLOB_CHUNK_BYTES)) as u32;
    assert_eq!(report.chunks_by_holder[&a.handle.node_id], total);
    assert_eq!(
        std::fs::read(&report.path).expect("fetched"),
        std::fs::read(BlobStore::open(&a.dir).expect("store").path(&digest)).expect("source")
    );
}
