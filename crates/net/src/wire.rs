//! The request-response protocol `/resolute/rpc/1`: Raft and forwarding messages
//! between nodes, and blob manifests and chunks.
//!
//! A frame is a `u32` big-endian length, a kind byte and a body. Kind 0 bodies are
//! bincode (the project's one codec); kind 1 is a blob chunk sent raw (index, crc32c,
//! bytes), so 4 MiB of checkpoint is not serialized a byte at a time. Both sides
//! check the length against the configured limit before reading or writing, and
//! say so in plain words: libp2p's stock codecs fail with a bare EOF instead.

use std::io;

use async_trait::async_trait;
use futures::prelude::*;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use resolute_core::PeerMessage;
use resolute_storage::blob::BLOB_CHUNK_BYTES;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/resolute/rpc/1");
/// Default limit on a request or a non-chunk response, in bytes.
pub const MESSAGE_DEFAULT_MAX_BYTES: usize = 16 << 20;
/// Room for a chunk response's header beyond the chunk itself.
const CHUNK_FRAME_OVERHEAD_BYTES: usize = 64;

const KIND_BINCODE: u8 = 0;
const KIND_CHUNK: u8 = 1;

/// What one node asks another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// A message for the receiver's `core::Node` (Raft, forwarded proposals, joins).
    Peer(PeerMessage),
    /// The manifest of a blob.
    Manifest {
        /// The blob's digest.
        digest: String,
    },
    /// One chunk of a blob.
    Chunk {
        /// The blob's digest.
        digest: String,
        /// The chunk.
        index: u32,
    },
    /// A trial's log lines on the receiver, for `user` (whom the asking member
    /// authenticated; the receiver checks the user's rights itself).
    Logs {
        /// The trial.
        trial: u64,
        /// Lines read at or after this time (ms since the epoch).
        since_ms: u64,
        /// The user who asks.
        user: String,
    },
    /// A consistent copy of the receiver's tracking store at or past
    /// `min_index` (a node that caught up from a snapshot wants the history
    /// the snapshot did not carry). The receiver answers with the copy's blob,
    /// or none while it prepares one (ask again).
    TrackingCopy {
        /// The snapshot index the asker caught up to.
        min_index: u64,
    },
    /// A peer message too large to travel inline (a Raft snapshot of a large
    /// state): the sender keeps its bytes as a blob, and the receiver fetches
    /// them over the verified, chunked transfer and then takes them as the
    /// `Request::Peer(PeerMessage::Raft)` they stand for.
    PeerBlob {
        /// The blob holding the message's bytes (on the sender).
        digest: String,
        /// Their length (checked against `PEER_BLOB_MAX_BYTES` before fetching).
        size: u64,
    },
}

/// Largest peer message that travels as a blob, in bytes: the largest state the
/// codec decodes, and room for the Raft message around it.
pub const PEER_BLOB_MAX_BYTES: u64 = resolute_types::codec::DECODE_LIMIT_BYTES as u64 + (1 << 20);

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Delivered.
    Ack,
    /// Refused by admission (the sender is not a member, or not admitted).
    Denied(String),
    /// The receiver does not have the blob.
    NotFound(String),
    /// The receiver has the blob but too many chunk requests are waiting: ask
    /// again a little later (back-pressure; the holder is still good).
    Busy,
    /// A blob's manifest bytes (the receiver checks them against the digest).
    Manifest(Vec<u8>),
    /// A chunk and the crc32c of its bytes (catches damage in transit cheaply;
    /// the manifest's hash catches everything else).
    Chunk {
        /// Which chunk.
        index: u32,
        /// Its bytes.
        data: Vec<u8>,
        /// crc32c of `data`.
        crc32c: u32,
    },
    /// The node's answer to a request it serves itself (log lines, a
    /// tracking copy), encoded by the node: opaque to the network layer.
    Answer(Vec<u8>),
}

/// The small responses, as bincode.
#[derive(Serialize, Deserialize)]
enum Small {
    Ack,
    Denied(String),
    NotFound(String),
    Manifest(Vec<u8>),
    Busy,
    Answer(Vec<u8>),
}

/// Frames [`Request`]s and [`Response`]s with size limits.
#[derive(Debug, Clone)]
pub struct WireCodec {
    /// Largest request or non-chunk response, in bytes.
    pub max_message_bytes: usize,
}

impl WireCodec {
    fn response_limit(&self) -> usize {
        self.max_message_bytes
            .max(BLOB_CHUNK_BYTES as usize + CHUNK_FRAME_OVERHEAD_BYTES)
    }
}

fn too_large(what: &str, size: usize, limit: usize, kind: io::ErrorKind) -> io::Error {
    io::Error::new(
        kind,
        format!(
            "{what} of {size} bytes exceeds the limit of {limit} bytes (net.max_message_bytes)"
        ),
    )
}

/// Reads a frame's length and kind; returns the kind and the body's length.
async fn read_head<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<(u8, usize)> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty frame"));
    }
    if len > limit {
        return Err(too_large(
            "incoming message",
            len,
            limit,
            io::ErrorKind::InvalidData,
        ));
    }
    let mut kind = [0u8; 1];
    io.read_exact(&mut kind).await?;
    Ok((kind[0], len - 1))
}

async fn read_body<T: AsyncRead + Unpin + Send>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<(u8, Vec<u8>)> {
    let (kind, len) = read_head(io, limit).await?;
    Ok((kind, read_body(io, len).await?))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    kind: u8,
    parts: &[&[u8]],
    limit: usize,
) -> io::Result<()> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > limit {
        return Err(too_large(
            "message",
            len,
            limit,
            io::ErrorKind::InvalidInput,
        ));
    }
    let mut head = Vec::with_capacity(5);
    head.extend_from_slice(&(len as u32).to_be_bytes());
    head.push(kind);
    io.write_all(&head).await?;
    for p in parts {
        io.write_all(p).await?;
    }
    io.flush().await
}

fn bad_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    resolute_types::codec::encode(v).map_err(bad_data)
}

#[async_trait]
impl libp2p::request_response::Codec for WireCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let (kind, body) = read_frame(io, self.max_message_bytes).await?;
        if kind != KIND_BINCODE {
            return Err(bad_data(format!("unknown request kind {kind}")));
        }
        resolute_types::codec::decode(&body).map_err(bad_data)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let (kind, len) = read_head(io, self.response_limit()).await?;
        match kind {
            KIND_BINCODE => Ok(
                match resolute_types::codec::decode::<Small>(&read_body(io, len).await?)
                    .map_err(bad_data)?
                {
                    Small::Ack => Response::Ack,
                    Small::Denied(r) => Response::Denied(r),
                    Small::NotFound(r) => Response::NotFound(r),
                    Small::Manifest(m) => Response::Manifest(m),
                    Small::Busy => Response::Busy,
                    Small::Answer(a) => Response::Answer(a),
                },
            ),
            KIND_CHUNK if len >= 8 => {
                // The 8-byte head first, so the data lands in its own buffer
                // (no 4 MiB shift to drop a head from the front).
                let mut head = [0u8; 8];
                io.read_exact(&mut head).await?;
                let index = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let crc32c = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                let data = read_body(io, len - 8).await?;
                Ok(Response::Chunk {
                    index,
                    data,
                    crc32c,
                })
            }
            _ => Err(bad_data(format!("unknown response kind {kind}"))),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let body = encode(&req)?;
        write_frame(io, KIND_BINCODE, &[&body], self.max_message_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let limit = self.response_limit();
        let small = match res {
            Response::Chunk {
                index,
                data,
                crc32c,
            } => {
                let mut head = [0u8; 8];
                head[..4].copy_from_slice(&index.to_be_bytes());
                head[4..].copy_from_slice(&crc32c.to_be_bytes());
                return write_frame(io, KIND_CHUNK, &[&head, &data], limit).await;
            }
            Response::Ack => Small::Ack,
            Response::Denied(r) => Small::Denied(r),
            Response::NotFound(r) => Small::NotFound(r),
            Response::Manifest(m) => Small::Manifest(m),
            Response::Busy => Small::Busy,
            Response::Answer(a) => Small::Answer(a),
        };
        let body = encode(&small)?;
        write_frame(io, KIND_BINCODE, &[&body], limit).await
    }
}
