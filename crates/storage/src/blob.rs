//! Content-addressed blobs (checkpoints, model directories) on a node's disk.
//!
//! A blob is cut into fixed-size chunks; its [`Manifest`] lists every chunk's
//! blake3 hash, and the blob's digest is the blake3 hash of the manifest. So a
//! receiver that fetched the manifest from anyone can check it against the digest
//! it was given, and then check every chunk on its own, from whichever holder sent
//! it: a corrupted or forged chunk is caught (and fetched again) before it is
//! written, and nothing unverified ever reaches `blobs/`.
//!
//! Layout under the store's directory:
//! - `blobs/<digest>` and `blobs/<digest>.manifest`: complete, verified blobs;
//! - `partial/<digest>`: a download in progress. Resuming one re-hashes the chunks
//!   already there, so no separate progress file can disagree with the data after
//!   a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of a chunk, the unit of transfer and verification.
pub const BLOB_CHUNK_BYTES: u32 = 4 << 20;
/// Largest blob the store accepts.
pub const BLOB_SIZE_MAX_BYTES: u64 = 1 << 40;
/// Domain separation for the manifest hash.
const MANIFEST_MAGIC: &[u8; 16] = b"resolute-blob-v1";

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The store has no such blob.
    #[error("no blob {0}")]
    NotFound(String),
    /// A manifest's bytes are malformed or do not hash to the expected digest.
    #[error("manifest of {digest}: {reason}")]
    BadManifest {
        /// The digest it was fetched for.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk's bytes do not hash to the manifest's entry.
    #[error("chunk {index} of {digest} does not match its hash")]
    BadChunk {
        /// The blob.
        digest: String,
        /// The chunk.
        index: u32,
    },
    /// A chunk index outside the blob.
    #[error("chunk {index} of {digest} is out of range ({chunks} chunks)")]
    OutOfRange {
        /// The blob.
        digest: String,
        /// The index asked for.
        index: u32,
        /// How many there are.
        chunks: u32,
    },
    /// The blob is larger than [`BLOB_SIZE_MAX_BYTES`].
    #[error("blob of {0} bytes is larger than the limit of {BLOB_SIZE_MAX_BYTES} bytes")]
    TooLarge(u64),
    /// A download finished before every chunk was written.
    #[error("download of {digest} is missing chunk {index}")]
    Incomplete {
        /// The blob.
        digest: String,
        /// The first chunk missing.
        index: u32,
    },
    /// A digest that is not 64 lowercase hex characters (it names files).
    #[error("{0:?} is not a blob digest")]
    BadDigest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a blob is made of: its size, chunk size and every chunk's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Bytes in the blob.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_bytes: u32,
    /// blake3 of each chunk.
    pub chunks: Vec<[u8; 32]>,
}

impl Manifest {
    /// The blob's digest: blake3 of the encoded manifest, in hex.
    pub fn digest(&self) -> String {
        blake3::hash(&self.encode()).to_hex().to_string()
    }

    /// `magic, size (u64 LE), chunk_bytes (u32 LE), hashes`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + 32 * self.chunks.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        for h in &self.chunks {
            out.extend_from_slice(h);
        }
        out
    }

    /// Decodes a manifest and checks that it hashes to `digest` and is consistent.
    pub fn decode(digest: &str, bytes: &[u8]) -> Result<Manifest, BlobError> {
        let bad = |reason: &str| BlobError::BadManifest {
            digest: digest.to_string(),
            reason: reason.to_string(),
        };
        if blake3::hash(bytes).to_hex().as_str() != digest {
            return Err(bad("does not hash to the digest"));
        }
        if bytes.len() < 28 || &bytes[..16] != MANIFEST_MAGIC || (bytes.len() - 28) % 32 != 0 {
            return Err(bad("malformed"));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&bytes[16..24]);
        let mut chunk = [0u8; 4];
        chunk.copy_from_slice(&bytes[24..28]);
        let m = Manifest {
            size: u64::from_le_bytes(size),
            chunk_bytes: u32::from_le_bytes(chunk),
            chunks: bytes[28..]
                .chunks_exact(32)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect(),
        };
        if m.chunk_bytes == 0 || m.size > BLOB_SIZE_MAX_BYTES {
            return Err(bad("chunk size or blob size out of range"));
        }
        if m.chunks.len() as u64 != m.size.div_ceil(u64::from(m.chunk_bytes)) {
            return Err(bad("chunk count does not match the size"));
        }
        Ok(m)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Byte range of chunk `index`.
    pub fn range(&self, index: u32) -> (u64, usize) {
        let start = u64::from(index) * u64::from(self.chunk_bytes);
        let len = (self.size - start).min(u64::from(self.chunk_bytes)) as usize;
        (start, len)
    }

    /// Whether `data` is chunk `index`.
    pub fn verify(&self, index: u32, data: &[u8]) -> bool {
        self.chunks.get(index as usize).is_some_and(|h| {
            data.len() == self.range(index).1 && blake3::hash(data).as_bytes() == h
        })
    }
}

/// A number for temporary file names, unique within the process.
fn next_temp() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Checks that `digest` is a well-formed digest (it becomes a file name).
pub fn check_digest(digest: &str) -> Result<(), BlobError> {
    let ok = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BlobError::BadDigest(digest.to_string()))
    }
}

/// A node's blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        for sub in ["blobs", "partial"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    /// Where a complete blob's bytes are.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(digest)
    }

    fn manifest_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{digest}.manifest"))
    }

    fn partial_path(&self, digest: &str) -> PathBuf {
        self.root.join("partial").join(digest)
    }

    /// Whether a complete blob is here.
    pub fn has(&self, digest: &str) -> bool {
        check_digest(digest).is_ok() && self.manifest_path(digest).exists()
    }

    /// The digests of every complete blob (sorted).
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.root.join("blobs"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".manifest").map(str::to_string))
            .collect();
        out.sort();
        out
    }

    /// Copies the file at `src` into the store; returns its manifest.
    pub fn put_file(&self, src: &Path) -> Result<Manifest, BlobError> {
        let mut input = File::open(src).map_err(io_err(src))?;
        self.put_reader(&mut input, src)
    }

    /// Stores what `input` yields until its end (a request body streamed
    /// from the network, a file); `src` names it in errors. At most
    /// `BLOB_SIZE_MAX_BYTES` are kept: past that it fails as too large.
    pub fn put_reader(&self, input: &mut dyn Read, src: &Path) -> Result<Manifest, BlobError> {
        let tmp =
            self.root
                .join("partial")
                .join(format!(".put-{}-{}", std::process::id(), next_temp()));
        let written = Self::write_temp(input, src, &tmp);
        let installed = written.and_then(|manifest| {
            self.install(&manifest, &tmp)?;
            Ok(manifest)
        });
        if installed.is_err() {
            // A broken stream or a full disk leaves no partial file behind.
            let _ = fs::remove_file(&tmp);
        }
        installed
    }

    /// Copies `input` into `tmp`, hashing its chunks; its manifest.
    fn write_temp(input: &mut dyn Read, src: &Path, tmp: &Path) -> Result<Manifest, BlobError> {
        let mut out = File::create(tmp).map_err(io_err(tmp))?;
        let mut size = 0u64;
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; BLOB_CHUNK_BYTES as usize];
        loop {
            let n = read_full(input, &mut buf).map_err(io_err(src))?;
            if n == 0 {
                break;
            }
            chunks.push(*blake3::hash(&buf[..n]).as_bytes());
            out.write_all(&buf[..n]).map_err(io_err(tmp))?;
            size += n as u64;
            if size > BLOB_SIZE_MAX_BYTES {
                return Err(BlobError::TooLarge(size));
            }
            if n < buf.len() {
                break;
            }
        }
        out.sync_data().map_err(io_err(tmp))?;
        Ok(Manifest {
            size,
            chunk_bytes: BLOB_CHUNK_BYTES,
            chunks,
        })
    }

    /// Stores `bytes` as a blob; returns its manifest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Manifest, BlobError> {
        let tmp = self.root.join("partial").join(format!(
            ".bytes-{}-{}",
            std::process::id(),
            next_temp()
        ));
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        let m = self.put_file(&tmp);
        let _ = fs::remove_file(&tmp);
        m
    }

    /// Moves a verified file into place: data, then manifest (its presence means
    /// "complete"), then the directory entry is made durable.
    fn install(&self, manifest: &Manifest, data: &Path) -> Result<(), BlobError> {
        let digest = manifest.digest();
        let dst = self.path(&digest);
        fs::rename(data, &dst).map_err(io_err(&dst))?;
        let mpath = self.manifest_path(&digest);
        // A name of its own: two puts of the same content may install at once
        // (two trials saving equal checkpoints); each renames its own file.
        let mtmp = self.partial_path(&format!(
            ".{digest}.manifest-{}-{}",
            std::process::id(),
            next_temp()
        ));
        let mut f = File::create(&mtmp).map_err(io_err(&mtmp))?;
        f.write_all(&manifest.encode()).map_err(io_err(&mtmp))?;
        f.sync_data().map_err(io_err(&mtmp))?;
        fs::rename(&mtmp, &mpath).map_err(io_err(&mpath))?;
        let dir = self.root.join("blobs");
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok(())
    }

    /// Removes a complete blob: its manifest first (it no longer counts as
    /// here), then its bytes. Removing one that is not here is not an error.
    pub fn remove(&self, digest: &str) -> Result<(), BlobError> {
        check_digest(digest)?;
        for path in [self.manifest_path(digest), self.path(digest)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(())
    }

    /// The manifest of a complete blob, checked against its digest.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, BlobError> {
        check_digest(digest)?;
        let path = self.manifest_path(digest);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound(digest.to_string()),
            _ => io_err(&path)(e),
        })?;
        Manifest::decode(digest, &bytes)
    }

    /// Reads chunk `index` of a complete blob (as stored: the reader verifies).
    pub fn read_chunk(&self, manifest: &Manifest, index: u32) -> Result<Vec<u8>, BlobError> {
        let digest = manifest.digest();
        if index >= manifest.chunk_count() {
            return Err(BlobError::OutOfRange {
                digest,
                index,
                chunks: manifest.chunk_count(),
            });
        }
        let path = self.path(&digest);
        let mut file = File::open(&path).map_err(io_err(&path))?;
        let (start, len) = manifest.range(index);
        // Read into spare capacity: no zeroing of a 4 MiB buffer per chunk served.
        file.seek(io::SeekFrom::Start(start))
            .map_err(io_err(&path))?;
        let mut buf = Vec::with_capacity(len);
        file.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(io_err(&path))?;
        if buf.len() != len {
            let short = io::Error::new(io::ErrorKind::UnexpectedEof, "blob file is short");
            return Err(io_err(&path)(short));
        }
        Ok(buf)
    }

    /// Starts or resumes a download of the blob `manifest` describes: the chunks
    /// already in its partial file that match their hashes count as done.
    pub fn download(&self, manifest: &Manifest) -> Result<Download, BlobError> {
        let digest = manifest.digest();
        let path = self.partial_path(&digest);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let have = file.metadata().map_err(io_err(&path))?.len();
        let mut done = vec![false; manifest.chunks.len()];
        let mut buf = vec![0u8; manifest.chunk_bytes as usize];
        for (i, d) in done.iter_mut().enumerate() {
            let (start, len) = manifest.range(i as u32);
            if start + len as u64 > have {
                break;
            }
            file.read_exact_at(&mut buf[..len], start)
                .map_err(io_err(&path))?;
            *d = manifest.verify(i as u32, &buf[..len]);
        }
        file.set_len(manifest.size).map_err(io_err(&path))?;
        Ok(Download {
            store: self.clone(),
            writer: ChunkWriter {
                inner: std::sync::Arc::new(WriterInner {
                    manifest: manifest.clone(),
                    digest,
                    file,
                    path,
                }),
            },
            done,
        })
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A download in progress: verified chunks are written at their offsets; nothing
/// is visible in `blobs/` until every chunk is there and the file is durable.
///
/// Chunks may be written from several threads at once through [`ChunkWriter`]s
/// (each verifies its chunk and writes it at its own offset); the download only
/// records which chunks are done, so that hashing and writing stay off the
/// caller's event loop.
#[derive(Debug)]
pub struct Download {
    store: BlobStore,
    writer: ChunkWriter,
    done: Vec<bool>,
}

/// Verifies chunks of one download and writes them in place; cheap to clone and
/// safe to use from several threads (positional writes never overlap).
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    inner: std::sync::Arc<WriterInner>,
}

#[derive(Debug)]
struct WriterInner {
    manifest: Manifest,
    digest: String,
    file: File,
    path: PathBuf,
}

impl ChunkWriter {
    /// Writes chunk `index` if it matches its hash (a bad chunk writes nothing).
    pub fn write(&self, index: u32, data: &[u8]) -> Result<(), BlobError> {
        let w = &self.inner;
        if index >= w.manifest.chunk_count() {
            return Err(BlobError::OutOfRange {
                digest: w.digest.clone(),
                index,
                chunks: w.manifest.chunk_count(),
            });
        }
        if !w.manifest.verify(index, data) {
            return Err(BlobError::BadChunk {
                digest: w.digest.clone(),
                index,
            });
        }
        let (start, _) = w.manifest.range(index);
        w.file.write_all_at(data, start).map_err(io_err(&w.path))
    }
}

impl Download {
    /// The blob's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.writer.inner.manifest
    }

    /// Chunks still missing, in order.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.manifest().chunk_count())
            .filter(|i| !self.done[*i as usize])
            .collect()
    }

    /// A writer for this download's chunks (to verify and write them elsewhere).
    pub fn writer(&self) -> ChunkWriter {
        self.writer.clone()
    }

    /// Records that a [`ChunkWriter`] wrote chunk `index`.
    pub fn mark_done(&mut self, index: u32) {
        if let Some(d) = self.done.get_mut(index as usize) {
            *d = true;
        }
    }

    /// Writes chunk `index` if it matches its hash.
    pub fn write_chunk(&mut self, index: u32, data: &[u8]) -> Result<(), BlobError> {
        self.writer.write(index, data)?;
        self.mark_done(index);
        Ok(())
    }

    /// Whether every chunk is written.
    pub fn is_complete(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// Makes the file durable and moves it into `blobs/`. Returns its path.
    ///
    /// Every chunk was verified before it was written (or, when resumed, when it
    /// was read back from the partial file), so the file is not hashed again: a
    /// second pass would read the same page-cache pages that were just written.
    /// Readers of a stored blob verify chunks as they use them.
    pub fn finish(self) -> Result<PathBuf, BlobError> {
        if let Some(i) = self.done.iter().position(|d| !*d) {
            return Err(BlobError::Incomplete {
                digest: self.writer.inner.digest.clone(),
                index: i as u32,
            });
        }
        let w = &self.writer.inner;
        w.file.sync_data().map_err(io_err(&w.path))?;
        self.store.install(&w.manifest, &w.path)?;
        Ok(self.store.path(&w.digest))
    }
}
