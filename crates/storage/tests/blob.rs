//! The blob store: digests over chunk-hash manifests, verified and resumable
//! downloads, and hostile names and bytes refused.

use resolute_storage::blob::{check_digest, BlobError, BlobStore, Manifest, BLOB_CHUNK_BYTES};

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("resolute-blob-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_download_resumes_from_verified_chunks_and_lands_only_when_whole() {
    let src = BlobStore::open(&dir("src")).expect("store");
    let data = bytes(2 * BLOB_CHUNK_BYTES as usize + 1000, 1);
    let m = src.put_bytes(&data).expect("put");
    assert_eq!(m.chunk_count(), 3);
    let digest = m.digest();
    let dst_dir = dir("dst");
    let dst = BlobStore::open(&dst_dir).expect("store");
    let mut d = dst.download(&m).expect("download");
    d.write_chunk(0, &src.read_chunk(&m, 0).expect("chunk"))
        .expect("chunk 0");
    // A wrong chunk is refused and not written.
    let wrong = src.read_chunk(&m, 2).expect("chunk");
    assert!(matches!(
        d.write_chunk(1, &wrong),
        Err(BlobError::BadChunk { index: 1, .. })
    ));
    drop(d);
    assert!(!dst.has(&digest), "nothing visible before it is whole");
    // A new download (after a crash, say) keeps chunk 0 and only needs 1 and 2.
    let mut d = dst.download(&m).expect("resume");
    assert_eq!(d.missing(), vec![1, 2]);
    for i in [1, 2] {
        d.write_chunk(i, &src.read_chunk(&m, i).expect("chunk"))
            .expect("write");
    }
    let path = d.finish().expect("finish");
    assert_eq!(std::fs::read(path).expect("read"), data);
    assert!(dst.has(&digest));
    assert_eq!(dst.list(), vec![digest]);
}

#[test]
fn manifests_that_do_not_hash_to_their_digest_are_refused() {
    let store = BlobStore::open(&dir("manifest")).expect("store");
    let m = store.put_bytes(&bytes(5000, 2)).expect("put");
    let mut encoded = m.encode();
    assert_eq!(Manifest::decode(&m.digest(), &encoded).expect("ok"), m);
    encoded[30] ^= 1;
    assert!(matches!(
        Manifest::decode(&m.digest(), &encoded),
        Err(BlobError::BadManifest { .. })
    ));
    assert!(Manifest::decode(&m.digest(), b"short").is_err());
}

#[test]
fn digests_that_are_not_hex_hashes_are_refused_before_touching_files() {
    for bad in [
        "",
        "../../etc/passwd",
        &"A".repeat(64),
        &"g".repeat(64),
        &"a".repeat(63),
    ] {
        assert!(check_digest(bad).is_err(), "{bad:?}");
    }
    let store = BlobStore::open(&dir("names")).expect("store");
    assert!(!store.has("../blobs"));
    assert!(matches!(
        store.manifest("../../x"),
        Err(BlobError::BadDigest(_))
    ));
    assert!(matches!(
        store.manifest(&"0".repeat(64)),
        Err(BlobError::NotFound(_))
    ));
}

#[test]
fn an_empty_blob_is_a_blob() {
    let store = BlobStore::open(&dir("empty")).expect("store");
    let m = store.put_bytes(&[]).expect("put");
    assert_eq!((m.size, m.chunk_count()), (0, 0));
    assert!(store.has(&m.digest()));
}

#[test]
fn chunks_written_from_several_threads_land_and_an_incomplete_download_cannot_finish() {
    let src = BlobStore::open(&dir("threads-src")).expect("store");
    let data = bytes(5 * BLOB_CHUNK_BYTES as usize + 77, 3);
    let m = src.put_bytes(&data).expect("put");
    let dst = BlobStore::open(&dir("threads-dst")).expect("store");
    // Missing one chunk: finish refuses and nothing becomes visible.
    let mut d = dst.download(&m).expect("download");
    for i in 0..m.chunk_count() - 1 {
        d.write_chunk(i, &src.read_chunk(&m, i).expect("chunk"))
            .expect("write");
    }
    assert!(matches!(
        d.finish(),
        Err(BlobError::Incomplete { index: 5, .. })
    ));
    assert!(!dst.has(&m.digest()));
    // Every chunk written by its own thread through a shared writer.
    let d = dst.download(&m).expect("resume");
    assert_eq!(d.missing(), vec![5], "the chunks already there were kept");
    let _ = std::fs::remove_file(
        dst.path(&m.digest())
            .parent()
            .and_then(|p| p.parent())
            .expect("store root")
            .join("partial")
            .join(m.digest()),
    );
    let mut d2 = dst.download(&m).expect("fresh");
    assert_eq!(d2.missing().len(), 6);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..m.chunk_count())
            .map(|i| {
                let (w, chunk) = (d2.writer(), src.read_chunk(&m, i).expect("chunk"));
                s.spawn(move || w.write(i, &chunk).map(|()| i))
            })
            .collect();
        for h in handles {
            let i = h.join().expect("thread").expect("write");
            d2.mark_done(i);
        }
    });
    // A wrong chunk through a writer is refused (the data repeats every 64 KiB,
    // so whole chunks are alike: flip a byte).
    let mut wrong = src.read_chunk(&m, 1).expect("chunk");
    wrong[100] ^= 1;
    assert!(matches!(
        d2.writer().write(1, &wrong),
        Err(BlobError::BadChunk { index: 1, .. })
    ));
    drop(d);
    let path = d2.finish().expect("finish");
    assert_eq!(std::fs::read(path).expect("read"), data);
}

#[test]
fn the_same_content_put_from_two_threads_at_once_lands_once() {
    // Two trials saving equal checkpoints used to race on one temporary
    // manifest name: one of them failed with "No such file or directory".
    let store = BlobStore::open(&dir("twice")).expect("store");
    let data = bytes(4096, 9);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, data) = (store.clone(), data.clone());
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| store.put_bytes(&data).map(|m| m.digest()))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    for t in threads {
        let digests = t.join().expect("thread").expect("every put lands");
        assert!(digests.iter().all(|d| store.has(d)));
    }
}
