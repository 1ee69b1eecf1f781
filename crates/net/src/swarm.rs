//! The swarm and its event loop: one task that owns the `Swarm`, takes commands
//! from the node, and turns swarm events into node events and replies.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use resolute_core::{NodeId, PeerMessage};
use resolute_storage::blob::{check_digest, BlobStore, Download, Manifest};

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{NetConfig, CHANNEL_DEPTH};
use crate::gossip::Announcement;
use crate::identity::{self, node_id};
use crate::wire::{Request, Response, WireCodec, PEER_BLOB_MAX_BYTES, PROTOCOL};
use crate::{FetchReport, NetError, NetEvent, NetHandle, NetInfo, SwarmCommand};

/// Manifests kept in memory for serving chunks.
const MANIFEST_CACHE_MAX: usize = 256;
/// Largest gossip message, in bytes.
const GOSSIP_MESSAGE_MAX_BYTES: usize = 256 * 1024;
/// A chunk that failed verification this often from every holder fails the fetch.
const CHUNK_ATTEMPTS_MAX: u32 = 8;
/// How long an idle connection stays open.
const IDLE_CONNECTION_TIMEOUT_S: u64 = 300;
/// How long a connection may take to set up (pnet, noise, yamux).
const UPGRADE_TIMEOUT_S: u64 = 20;
/// Connections a blob fetch keeps to each holder: chunk requests go round-robin
/// over a peer's connections, so each connection's encryption runs on its own
/// task (one noise session tops out near one core).
const FETCH_CONNECTIONS_PER_HOLDER: u32 = 4;
/// How long a fetch leaves a holder alone after it answered "busy" (its queue of
/// chunk requests was full: `NetConfig::serve_queue`).
const BUSY_BACKOFF_MS: u64 = 200;

/// Disk and hashing work done on blocking threads, so that the event loop (Raft
/// messages, heartbeats, gossip) never waits for a 4 MiB read, a chunk hash or an
/// fsync. Each finished job comes back to the loop as one of these.
enum IoDone {
    /// A chunk read for a peer's request.
    ChunkRead {
        channel: ResponseChannel<Response>,
        index: u32,
        result: Result<(Vec<u8>, u32), String>,
    },
    /// A partial download opened (chunks already on disk re-hashed).
    Opened {
        fetch: u64,
        result: Result<Download, String>,
    },
    /// A received chunk checked and written (`Err((bad, why))`: `bad` when the
    /// holder sent wrong bytes rather than failed to answer).
    ChunkWritten {
        fetch: u64,
        index: u32,
        peer: PeerId,
        result: Result<(), (bool, String)>,
    },
    /// A complete download made durable and moved into the store.
    Finished {
        fetch: u64,
        result: Result<PathBuf, String>,
    },
    /// The node's answer to a peer's request (log lines).
    Answer {
        channel: ResponseChannel<Response>,
        response: Response,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::Behaviour<WireCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// TCP, optionally inside the pre-shared-key private network, then noise and yamux.
fn transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let noise = noise::Config::new(key).map_err(|e| NetError::Transport(e.to_string()))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let timeout = Duration::from_secs(UPGRADE_TIMEOUT_S);
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .boxed(),
        None => tcp
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .boxed(),
    })
}

fn behaviour(key: &Keypair, config: &NetConfig) -> Result<Behaviour, NetError> {
    let err = |e: String| NetError::Transport(e);
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(GOSSIP_MESSAGE_MAX_BYTES)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )
    .map_err(|e| err(e.to_string()))?;
    let rpc = request_response::Behaviour::with_codec(
        WireCodec {
            max_message_bytes: config.max_message_bytes,
        },
        [(PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_millis(config.request_timeout_ms))
            .with_max_concurrent_streams(256),
    );
    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())
                .map_err(|e| err(e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Behaviour {
        identify: identify::Behaviour::new(identify::Config::new(
            format!("/resolute/{}/1", config.cluster),
            key.public(),
        )),
        ping: ping::Behaviour::default(),
        gossipsub,
        rpc,
        mdns: mdns.into(),
    })
}

pub(crate) async fn spawn(
    config: NetConfig,
) -> Result<
    (
        NetHandle,
        mpsc::Receiver<NetEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NetError,
> {
    let key = identity::load_or_create(&config.data_dir)?;
    let peer_id = key.public().to_peer_id();
    let store = BlobStore::open(&config.data_dir).map_err(|e| NetError::Io(e.to_string()))?;
    let psk = config.cluster_key.map(PreSharedKey::new);
    let mut swarm = Swarm::new(
        transport(&key, psk)?,
        behaviour(&key, &config)?,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(IDLE_CONNECTION_TIMEOUT_S)),
    );
    let topic = gossipsub::IdentTopic::new(format!("resolute/{}/nodes/v1", config.cluster));
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| NetError::Transport(e.to_string()))?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Transport(format!("listen on {addr}: {e}")))?;
    }
    // Wait until every listener has an address (port 0 gets a real one).
    let mut listening = 0;
    while listening < config.listen.len() {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { .. } => listening += 1,
            SwarmEvent::ListenerError { error, .. }
            | SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            } => return Err(NetError::Transport(error.to_string())),
            _ => {}
        }
    }
    // The operator's addresses go out in identify (a NAT's public address).
    for addr in &config.advertise {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        let _ = swarm.dial(addr.clone());
    }
    let (command_tx, command_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (event_tx, event_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (io_tx, io_rx) = mpsc::channel(CHANNEL_DEPTH);
    let mut event_loop = EventLoop {
        swarm,
        commands: command_rx,
        events: event_tx,
        topic,
        config,
        store,
        manifests: BTreeMap::new(),
        peers: BTreeMap::new(),
        connections: BTreeMap::new(),
        members: None,
        admitted: BTreeMap::new(),
        announcements: BTreeMap::new(),
        pending: BTreeMap::new(),
        fetches: BTreeMap::new(),
        next_fetch: 0,
        dials: Vec::new(),
        io_tx,
        io_rx,
        reads_in_flight: 0,
        read_queue: VecDeque::new(),
    };
    let task = tokio::spawn(async move { event_loop.run().await });
    let handle = NetHandle {
        commands: command_tx,
        peer_id,
        node_id: node_id(&peer_id),
    };
    Ok((handle, event_rx, task))
}

/// What an outbound request is for.
enum Pending {
    Send {
        node: NodeId,
        reply: Option<oneshot::Sender<Result<(), NetError>>>,
    },
    Manifest {
        fetch: u64,
    },
    Chunk {
        fetch: u64,
        index: u32,
    },
    Answer {
        node: NodeId,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
}

/// A blob fetch in progress.
struct Fetch {
    digest: String,
    /// Holders still worth asking.
    holders: Vec<PeerId>,
    /// Everyone waiting for this blob (a second fetch of the same digest joins
    /// the first instead of racing it for the same partial file).
    replies: Vec<oneshot::Sender<Result<FetchReport, NetError>>>,
    download: Option<Download>,
    /// Chunks not yet asked for (or to ask again).
    queue: VecDeque<u32>,
    in_flight: usize,
    /// Round-robin position over `holders`.
    turn: usize,
    /// Failed attempts per chunk, and the holders that sent it bad.
    attempts: BTreeMap<u32, (u32, BTreeSet<PeerId>)>,
    report: FetchReport,
    last_error: String,
    /// Every chunk is written; the file is being made durable.
    finishing: bool,
    /// Holders that answered "busy", left alone until then.
    busy_until: BTreeMap<PeerId, Instant>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<SwarmCommand>,
    events: mpsc::Sender<NetEvent>,
    topic: gossipsub::IdentTopic,
    config: NetConfig,
    store: BlobStore,
    /// Shared, not copied per request: a large blob's manifest is megabytes.
    manifests: BTreeMap<String, Arc<Manifest>>,
    peers: BTreeMap<NodeId, PeerId>,
    connections: BTreeMap<PeerId, u32>,
    /// The Raft membership (None: not known yet, everyone with the key is let in).
    members: Option<BTreeSet<NodeId>>,
    /// Joiners let in until a deadline.
    admitted: BTreeMap<NodeId, Instant>,
    announcements: BTreeMap<NodeId, (Announcement, Instant)>,
    pending: BTreeMap<OutboundRequestId, Pending>,
    fetches: BTreeMap<u64, Fetch>,
    next_fetch: u64,
    dials: Vec<(ConnectionId, oneshot::Sender<Result<(), NetError>>)>,
    /// Finished blocking jobs come back here (bounded: the jobs in flight are).
    io_tx: mpsc::Sender<IoDone>,
    io_rx: mpsc::Receiver<IoDone>,
    /// Chunk reads running for peers, and the requests waiting for one.
    reads_in_flight: usize,
    read_queue: VecDeque<(ResponseChannel<Response>, Arc<Manifest>, u32)>,
}

impl EventLoop {
    async fn run(&mut self) {
        // Wakes fetches whose every holder answered "busy" once their pause ends.
        let mut backoff = tokio::time::interval(Duration::from_millis(BUSY_BACKOFF_MS));
        backoff.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = backoff.tick() => self.pump_waiting(),
                command = self.commands.recv() => match command {
                    Some(SwarmCommand::Shutdown) | None => return,
                    Some(c) => self.on_command(c),
                },
                event = self.swarm.select_next_some() => self.on_swarm(event),
                Some(done) = self.io_rx.recv() => self.on_io(done),
            }
        }
    }

    fn on_command(&mut self, command: SwarmCommand) {
        match command {
            SwarmCommand::Send { to, request, reply } => self.send(to, request, reply),
            SwarmCommand::Publish {
                announcement,
                reply,
            } => {
                let result = resolute_types::codec::encode(&announcement)
                    .map_err(|e| NetError::Io(e.to_string()))
                    .and_then(|bytes| {
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(self.topic.clone(), bytes)
                            .map(|_| ())
                            .map_err(|e| NetError::Send {
                                node: 0,
                                reason: format!("gossip: {e}"),
                            })
                    });
                let _ = reply.send(result);
            }
            SwarmCommand::Fetch {
                digest,
                holders,
                reply,
            } => self.start_fetch(digest, holders, reply),
            SwarmCommand::Ask { to, request, reply } => {
                let Some(peer) = self.peers.get(&to).copied() else {
                    let _ = reply.send(Err(NetError::UnknownNode(to)));
                    return;
                };
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.pending.insert(id, Pending::Answer { node: to, reply });
            }
            SwarmCommand::SetMembers { members } => {
                self.members = Some(members.into_iter().collect());
            }
            SwarmCommand::Admit { node } => {
                let until = Instant::now() + Duration::from_millis(self.config.admission_window_ms);
                self.admitted.insert(node, until);
            }
            SwarmCommand::Dial { addr, reply } => {
                // A new local port, for the same reason as in `start_fetch`.
                let opts = DialOpts::unknown_peer_id()
                    .address(addr.clone())
                    .allocate_new_port()
                    .build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => self.dials.push((id, reply)),
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Transport(format!("dial {addr}: {e}"))));
                    }
                }
            }
            SwarmCommand::Info { reply } => {
                let peer_id = *self.swarm.local_peer_id();
                let _ = reply.send(NetInfo {
                    peer_id,
                    node_id: node_id(&peer_id),
                    listen: self.swarm.listeners().cloned().collect(),
                    connected: self.connections.keys().map(node_id).collect(),
                });
            }
            SwarmCommand::Announcements { reply } => {
                let now = Instant::now();
                self.announcements.retain(|_, (_, expires)| *expires > now);
                let _ = reply.send(
                    self.announcements
                        .values()
                        .map(|(a, _)| a.clone())
                        .collect(),
                );
            }
            SwarmCommand::Shutdown => {}
        }
    }

    fn send(
        &mut self,
        to: NodeId,
        request: Request,
        reply: Option<oneshot::Sender<Result<(), NetError>>>,
    ) {
        let Some(peer) = self.peers.get(&to).copied() else {
            if let Some(r) = reply {
                let _ = r.send(Err(NetError::UnknownNode(to)));
            }
            return;
        };
        let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
        self.pending.insert(id, Pending::Send { node: to, reply });
    }

    /// Whether `node` may send Raft traffic or read blobs.
    fn admitted(&mut self, node: NodeId) -> bool {
        let Some(members) = &self.members else {
            return true;
        };
        if members.contains(&node) {
            return true;
        }
        let now = Instant::now();
        self.admitted.retain(|_, until| *until > now);
        self.admitted.contains_key(&node)
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            } => {
                let node = node_id(&peer_id);
                self.peers.insert(node, peer_id);
                let count = self.connections.entry(peer_id).or_default();
                *count += 1;
                if *count == 1 {
                    let _ = self.events.try_send(NetEvent::Connected(node));
                }
                self.finish_dial(connection_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } => {
                if let Some(count) = self.connections.get_mut(&peer_id) {
                    *count -= 1;
                    if *count == 0 {
                        self.connections.remove(&peer_id);
                        let _ = self
                            .events
                            .try_send(NetEvent::Disconnected(node_id(&peer_id)));
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => self.finish_dial(connection_id, Err(NetError::Transport(error.to_string()))),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Only addresses another machine can use (a peer listening on
                // every interface also lists its loopback one).
                for addr in crate::addrs::advertised(&info.listen_addrs, &[]) {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.add_peer_address(peer, addr.clone());
                    let _ = self.swarm.dial(addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => self.on_gossip(message),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.on_rpc(event),
            _ => {}
        }
    }

    fn finish_dial(&mut self, id: ConnectionId, result: Result<(), NetError>) {
        if let Some(at) = self.dials.iter().position(|(c, _)| *c == id) {
            let (_, reply) = self.dials.swap_remove(at);
            let _ = reply.send(result);
        }
    }

    fn on_gossip(&mut self, message: gossipsub::Message) {
        let Some(source) = message.source else {
            return;
        };
        let Ok(a) = resolute_types::codec::decode::<Announcement>(&message.data) else {
            return;
        };
        // A node speaks only for itself: the record's node id must be the signer's.
        if a.node != node_id(&source) {
            return;
        }
        // An expired record does not hold a newer one back.
        let now = Instant::now();
        let newer = self
            .announcements
            .get(&a.node)
            .is_none_or(|(old, expires)| a.seq > old.seq || *expires <= now);
        if !newer {
            return;
        }
        self.peers.insert(a.node, source);
        for addr in a.addrs.iter().filter_map(|s| s.parse::<Multiaddr>().ok()) {
            self.swarm.add_peer_address(source, addr);
        }
        let ttl = a.ttl_ms.min(self.config.announcement_ttl_ms);
        let expires = Instant::now() + Duration::from_millis(ttl);
        self.announcements.insert(a.node, (a.clone(), expires));
        let _ = self.events.try_send(NetEvent::Announcement(a));
    }

    fn on_rpc(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_request(peer, request, channel),
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => self.on_response(peer, request_id, Ok(response)),
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.on_response(peer, request_id, Err(error.to_string())),
            _ => {}
        }
    }

    fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self
            .swarm
            .behaviour_mut()
            .rpc
            .send_response(channel, response);
    }

    fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        let node = node_id(&peer);
        self.peers.insert(node, peer);
        let allowed = match &request {
            // A join request is how a node asks to become a member: the cluster
            // key already let it connect, and the leader decides (a join token,
            // in a cluster with users). Nothing else of a stranger's gets
            // through until the membership says it is a member.
            Request::Peer(PeerMessage::Announce { node: claimed, .. }) if *claimed == node => true,
            _ => self.admitted(node),
        };
        if !allowed {
            let _ = self.events.try_send(NetEvent::Denied(node));
            let reason = format!("node {node:016x} is not a member of this cluster");
            return self.respond(channel, Response::Denied(reason));
        }
        let response = match request {
            Request::Peer(msg) => match self.events.try_send(NetEvent::Message { from: node, msg })
            {
                Ok(()) => Response::Ack,
                Err(_) => Response::Denied("receiver busy".to_string()),
            },
            Request::Manifest { digest } => match self.manifest(&digest) {
                Ok(m) => Response::Manifest(m.encode()),
                Err(e) => Response::NotFound(e.to_string()),
            },
            Request::Logs {
                trial,
                since_ms,
                user,
            } => {
                let (reply, answer) = oneshot::channel();
                let wanted = NetEvent::LogsWanted {
                    from: node,
                    trial,
                    since_ms,
                    user,
                    reply,
                };
                return self.ask_node(wanted, answer, channel);
            }
            Request::PeerBlob { digest, size } if size <= PEER_BLOB_MAX_BYTES => {
                let event = NetEvent::PeerBlob {
                    from: node,
                    digest,
                    size,
                };
                match self.events.try_send(event) {
                    Ok(()) => Response::Ack,
                    Err(_) => Response::Denied("receiver busy".to_string()),
                }
            }
            Request::PeerBlob { size, .. } => Response::Denied(format!(
                "a peer message of {size} bytes exceeds the limit of {PEER_BLOB_MAX_BYTES} bytes"
            )),
            Request::TrackingCopy { min_index } => {
                let (reply, answer) = oneshot::channel();
                let wanted = NetEvent::TrackingCopyWanted {
                    from: node,
                    min_index,
                    reply,
                };
                return self.ask_node(wanted, answer, channel);
            }
            Request::Chunk { digest, index } => match self.manifest(&digest) {
                Ok(m) if self.read_queue.len() < self.config.serve_queue => {
                    self.read_queue.push_back((channel, m, index));
                    return self.start_reads();
                }
                Ok(_) => Response::Busy,
                Err(e) => Response::NotFound(e),
            },
        };
        self.respond(channel, response);
    }

    /// Hands a member's request that the node answers itself (log lines, a
    /// tracking copy) to the node, and its answer back to the member (or
    /// "busy" when the node's queue is full, "no answer" when it does not
    /// answer in time).
    fn ask_node(
        &mut self,
        wanted: NetEvent,
        answer: oneshot::Receiver<Result<Vec<u8>, String>>,
        channel: ResponseChannel<Response>,
    ) {
        if self.events.try_send(wanted).is_err() {
            return self.respond(channel, Response::Busy);
        }
        let done = self.io_tx.clone();
        tokio::spawn(async move {
            let wait = Duration::from_millis(crate::LOGS_ANSWER_TIMEOUT_MS);
            let response = match tokio::time::timeout(wait, answer).await {
                Ok(Ok(Ok(bytes))) => Response::Answer(bytes),
                Ok(Ok(Err(reason))) => Response::Denied(reason),
                _ => Response::NotFound("the node did not answer".into()),
            };
            let _ = done.send(IoDone::Answer { channel, response }).await;
        });
    }

    /// Starts queued chunk reads up to `serve_reads` at once.
    fn start_reads(&mut self) {
        while self.reads_in_flight < self.config.serve_reads.max(1) {
            let Some((channel, manifest, index)) = self.read_queue.pop_front() else {
                return;
            };
            self.reads_in_flight += 1;
            let store = self.store.clone();
            let done = self.io_tx.clone();
            tokio::task::spawn_blocking(move || {
                let result = store
                    .read_chunk(&manifest, index)
                    .map(|data| {
                        let crc = crc32c::crc32c(&data);
                        (data, crc)
                    })
                    .map_err(|e| e.to_string());
                let _ = done.blocking_send(IoDone::ChunkRead {
                    channel,
                    index,
                    result,
                });
            });
        }
    }

    fn on_io(&mut self, done: IoDone) {
        match done {
            IoDone::ChunkRead {
                channel,
                index,
                result,
            } => {
                self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
                let response = match result {
                    Ok((data, crc32c)) => Response::Chunk {
                        index,
                        crc32c,
                        data,
                    },
                    Err(e) => Response::NotFound(e),
                };
                self.respond(channel, response);
                self.start_reads();
            }
            IoDone::Opened { fetch, result } => self.on_opened(fetch, result),
            IoDone::ChunkWritten {
                fetch,
                index,
                peer,
                result,
            } => self.on_chunk_written(fetch, index, peer, result),
            IoDone::Finished { fetch, result } => self.on_finished(fetch, result),
            IoDone::Answer { channel, response } => self.respond(channel, response),
        }
    }

    fn manifest(&mut self, digest: &str) -> Result<Arc<Manifest>, String> {
        if let Some(m) = self.manifests.get(digest) {
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(self.store.manifest(digest).map_err(|e| e.to_string())?);
        if self.manifests.len() >= MANIFEST_CACHE_MAX {
            self.manifests.pop_first();
        }
        self.manifests.insert(digest.to_string(), Arc::clone(&m));
        Ok(m)
    }

    fn on_response(
        &mut self,
        peer: PeerId,
        id: OutboundRequestId,
        result: Result<Response, String>,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match pending {
            Pending::Send { node, reply } => {
                let outcome = match result {
                    Ok(Response::Ack) => Ok(()),
                    Ok(Response::Denied(reason)) => Err(NetError::Denied { node, reason }),
                    Ok(other) => Err(NetError::Send {
                        node,
                        reason: format!("unexpected answer {other:?}"),
                    }),
                    Err(reason) => Err(NetError::Send { node, reason }),
                };
                if let Some(r) = reply {
                    let _ = r.send(outcome);
                }
            }
            Pending::Answer { node, reply } => {
                let outcome = match result {
                    Ok(Response::Answer(bytes)) => Ok(bytes),
                    Ok(Response::Denied(reason)) => Err(NetError::Denied { node, reason }),
                    Ok(other) => Err(NetError::Send {
                        node,
                        reason: format!("unexpected answer {other:?}"),
                    }),
                    Err(reason) => Err(NetError::Send { node, reason }),
                };
                let _ = reply.send(outcome);
            }
            Pending::Manifest { fetch, .. } => self.on_manifest(fetch, peer, result),
            Pending::Chunk { fetch, index, .. } => self.on_chunk(fetch, index, peer, result),
        }
    }

    // ----- blob fetches -------------------------------------------------------

    fn start_fetch(
        &mut self,
        digest: String,
        holders: Vec<NodeId>,
        reply: oneshot::Sender<Result<FetchReport, NetError>>,
    ) {
        if let Err(e) = check_digest(&digest) {
            let _ = reply.send(Err(NetError::Fetch {
                digest,
                reason: e.to_string(),
            }));
            return;
        }
        if self.store.has(&digest) {
            let _ = reply.send(Ok(FetchReport {
                path: self.store.path(&digest),
                chunks_resumed: 0,
                chunks_by_holder: BTreeMap::new(),
                bad_chunks: 0,
                busy_answers: 0,
            }));
            return;
        }
        let holders: Vec<PeerId> = holders
            .iter()
            .filter_map(|n| self.peers.get(n).copied())
            .collect();
        if let Some(f) = self.fetches.values_mut().find(|f| f.digest == digest) {
            f.replies.push(reply);
            for h in holders {
                if !f.holders.contains(&h) {
                    f.holders.push(h);
                }
            }
            return;
        }
        for peer in &holders {
            let have = self.connections.get(peer).copied().unwrap_or(0);
            for _ in have..FETCH_CONNECTIONS_PER_HOLDER {
                // A new local port: with port reuse, a second connection to the
                // same peer would have the same address 4-tuple and reset the first.
                let opts = DialOpts::peer_id(*peer)
                    .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                    .allocate_new_port()
                    .build();
                let _ = self.swarm.dial(opts);
            }
        }
        let id = self.next_fetch;
        self.next_fetch += 1;
        self.fetches.insert(
            id,
            Fetch {
                digest,
                holders,
                replies: vec![reply],
                download: None,
                queue: VecDeque::new(),
                in_flight: 0,
                turn: 0,
                attempts: BTreeMap::new(),
                report: FetchReport {
                    path: Default::default(),
                    chunks_resumed: 0,
                    chunks_by_holder: BTreeMap::new(),
                    bad_chunks: 0,
                    busy_answers: 0,
                },
                last_error: "no holder is connected".to_string(),
                finishing: false,
                busy_until: BTreeMap::new(),
            },
        );
        self.ask_manifest(id);
    }

    fn ask_manifest(&mut self, id: u64) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let Some(&peer) = f.holders.first() else {
            return self.fail_fetch(id);
        };
        let request = Request::Manifest {
            digest: f.digest.clone(),
        };
        let rid = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
        self.pending.insert(rid, Pending::Manifest { fetch: id });
    }

    fn on_manifest(&mut self, id: u64, peer: PeerId, result: Result<Response, String>) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let manifest = match result {
            Ok(Response::Manifest(bytes)) => {
                Manifest::decode(&f.digest, &bytes).map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e),
        };
        let manifest = match manifest {
            Ok(m) => m,
            Err(e) => {
                f.last_error = format!("manifest from {:016x}: {e}", node_id(&peer));
                f.holders.retain(|h| *h != peer);
                return self.ask_manifest(id);
            }
        };
        // Opening re-hashes what a broken fetch left on disk: off the loop.
        let store = self.store.clone();
        let done = self.io_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = store.download(&manifest).map_err(|e| e.to_string());
            let _ = done.blocking_send(IoDone::Opened { fetch: id, result });
        });
    }

    fn on_opened(&mut self, id: u64, result: Result<Download, String>) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        match result {
            Ok(d) => {
                f.queue = d.missing().into();
                f.report.chunks_resumed = d.manifest().chunk_count() - f.queue.len() as u32;
                f.download = Some(d);
                self.pump(id);
            }
            Err(e) => {
                f.last_error = e;
                f.holders.clear();
                self.fail_fetch(id);
            }
        }
    }

    /// Keeps up to `fetch_parallel_chunks` chunk requests in flight, spread over
    /// the holders in turn (a chunk that came back bad goes to another holder).
    fn pump(&mut self, id: u64) {
        let parallel = self.config.fetch_parallel_chunks.max(1);
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        if f.finishing {
            return;
        }
        if f.download.as_ref().is_some_and(Download::is_complete) {
            return self.complete_fetch(id);
        }
        if f.holders.is_empty() {
            if f.in_flight == 0 {
                self.fail_fetch(id);
            }
            return;
        }
        let now = Instant::now();
        f.busy_until.retain(|_, until| *until > now);
        let ready: Vec<PeerId> = f
            .holders
            .iter()
            .filter(|h| !f.busy_until.contains_key(*h))
            .copied()
            .collect();
        let mut requests = Vec::new();
        while f.in_flight < parallel && !ready.is_empty() {
            let Some(index) = f.queue.pop_front() else {
                break;
            };
            let bad = f
                .attempts
                .get(&index)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            let n = ready.len();
            let pick = (0..n)
                .map(|k| ready[(f.turn + k) % n])
                .find(|h| !bad.contains(h))
                .unwrap_or(ready[f.turn % n]);
            f.turn = (f.turn + 1) % n;
            f.in_flight += 1;
            requests.push((index, pick, f.digest.clone()));
        }
        for (index, peer, digest) in requests {
            let rid = self
                .swarm
                .behaviour_mut()
                .rpc
                .send_request(&peer, Request::Chunk { digest, index });
            self.pending
                .insert(rid, Pending::Chunk { fetch: id, index });
        }
    }

    fn on_chunk(&mut self, id: u64, index: u32, peer: PeerId, result: Result<Response, String>) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let failed = match result {
            Ok(Response::Chunk {
                index: got,
                data,
                crc32c: crc,
            }) if got == index => match f.download.as_ref().map(Download::writer) {
                Some(writer) => {
                    // Checked and written on a blocking thread; the chunk stays
                    // in flight (and in memory) until then, which bounds both.
                    let done = self.io_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = if crc32c::crc32c(&data) != crc {
                            Err((true, "chunk damaged in transit (crc32c)".to_string()))
                        } else {
                            writer
                                .write(index, &data)
                                .map_err(|e| (true, e.to_string()))
                        };
                        let _ = done.blocking_send(IoDone::ChunkWritten {
                            fetch: id,
                            index,
                            peer,
                            result,
                        });
                    });
                    return;
                }
                None => (false, "no download".to_string()),
            },
            Ok(Response::Busy) => {
                // Back-pressure, not a failure: the chunk waits, and this holder
                // is left alone for a moment (the others go on).
                f.in_flight = f.in_flight.saturating_sub(1);
                f.report.busy_answers += 1;
                f.busy_until.insert(
                    peer,
                    Instant::now() + Duration::from_millis(BUSY_BACKOFF_MS),
                );
                f.queue.push_front(index);
                return self.pump(id);
            }
            Ok(Response::NotFound(e)) | Ok(Response::Denied(e)) => {
                // This holder cannot serve the blob: stop asking it.
                f.holders.retain(|h| *h != peer);
                (false, e)
            }
            Ok(other) => (true, format!("unexpected answer {other:?}")),
            Err(e) => {
                // The connection broke or timed out: leave this holder; the chunk
                // goes to another one, and a later fetch resumes what is on disk.
                f.holders.retain(|h| *h != peer);
                (false, e)
            }
        };
        self.on_chunk_written(id, index, peer, Err(failed));
    }

    /// A chunk request ended: written, or failed (`bad`: the holder sent wrong
    /// bytes, so the chunk is asked of another holder first).
    fn on_chunk_written(
        &mut self,
        id: u64,
        index: u32,
        peer: PeerId,
        result: Result<(), (bool, String)>,
    ) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        f.in_flight = f.in_flight.saturating_sub(1);
        let holder = node_id(&peer);
        match result {
            Ok(()) => {
                if let Some(d) = f.download.as_mut() {
                    d.mark_done(index);
                }
                *f.report.chunks_by_holder.entry(holder).or_default() += 1;
            }
            Err((bad, e)) => {
                f.last_error = format!("chunk {index} from {holder:016x}: {e}");
                let entry = f.attempts.entry(index).or_default();
                entry.0 += 1;
                if bad {
                    f.report.bad_chunks += 1;
                    entry.1.insert(peer);
                }
                if entry.0 >= CHUNK_ATTEMPTS_MAX {
                    f.holders.clear();
                } else {
                    f.queue.push_front(index);
                }
            }
        }
        self.pump(id);
    }

    /// Pumps the fetches that have chunks waiting and nothing in flight (every
    /// holder answered "busy" a moment ago).
    fn pump_waiting(&mut self) {
        let waiting: Vec<u64> = self
            .fetches
            .iter()
            .filter(|(_, f)| !f.busy_until.is_empty() && f.in_flight == 0 && !f.queue.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.pump(id);
        }
    }

    /// Every chunk is written: the fsync and the move into the store run on a
    /// blocking thread (an fsync of a large blob takes seconds on a real disk).
    fn complete_fetch(&mut self, id: u64) {
        let Some(f) = self.fetches.get_mut(&id) else {
            return;
        };
        let Some(download) = f.download.take() else {
            return;
        };
        f.finishing = true;
        let done = self.io_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = download.finish().map_err(|e| e.to_string());
            let _ = done.blocking_send(IoDone::Finished { fetch: id, result });
        });
    }

    fn on_finished(&mut self, id: u64, result: Result<PathBuf, String>) {
        let Some(mut f) = self.fetches.remove(&id) else {
            return;
        };
        let result = match result {
            Ok(path) => {
                f.report.path = path;
                Ok(f.report.clone())
            }
            Err(reason) => Err(NetError::Fetch {
                digest: f.digest.clone(),
                reason,
            }),
        };
        for r in f.replies.drain(..) {
            let _ = r.send(result.clone());
        }
    }

    fn fail_fetch(&mut self, id: u64) {
        let Some(mut f) = self.fetches.remove(&id) else {
            return;
        };
        let err = NetError::Fetch {
            digest: f.digest.clone(),
            reason: format!("no holder left: {}", f.last_error),
        };
        for r in f.replies.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
    }
}
