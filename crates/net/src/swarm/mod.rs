//! The swarm and its event loop: one task that owns the `Swarm`, takes commands
//! from the node, and turns swarm events into node events and replies.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::pnet::PreSharedKey;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{autonat, dcutr, gossipsub, identify, mdns, ping, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use resolute_core::{NodeId, PeerMessage};
use resolute_storage::blob::{BlobStore, Download, Manifest};

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::{NetConfig, CHANNEL_DEPTH};
use crate::gossip::Announcement;
use crate::identity::{self, node_id};
use crate::reach::{Links, Reachability};
use crate::wire::{Request, Response, PEER_BLOB_MAX_BYTES};
use crate::{NetError, NetEvent, NetHandle, NetInfo, SwarmCommand};

mod fetch;

use fetch::Fetch;

/// Manifests kept in memory for serving chunks.
const MANIFEST_CACHE_MAX: usize = 256;
/// A chunk that failed verification this often from every holder fails the fetch.
const CHUNK_ATTEMPTS_MAX: u32 = 8;
/// How long an idle connection stays open.
const IDLE_CONNECTION_TIMEOUT_S: u64 = 300;
/// Connections a blob fetch keeps to each holder: chunk requests go round-robin
/// over a peer's connections, so each connection's encryption runs on its own
/// task (one noise session tops out near one core).
const FETCH_CONNECTIONS_PER_HOLDER: u32 = 4;
/// How long a fetch leaves a holder alone after it answered "busy" (its queue of
/// chunk requests was full: `NetConfig::serve_queue`).
const BUSY_BACKOFF_MS: u64 = 200;
/// How often the loop looks at its relay reservations (made when AutoNAT
/// finds the node unreachable, again when a relay went away).
const RELAY_CHECK_INTERVAL_MS: u64 = 5_000;

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
        /// It came over a relayed connection.
        relayed: bool,
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
    let (relay_transport, relay_client) = relay::client::new(peer_id);
    let mut swarm = Swarm::new(
        crate::behaviour::transport(&key, psk, relay_transport)?,
        crate::behaviour::behaviour(&key, &config, relay_client)?,
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
    let config_reachability = config.reachability;
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
        links: Links::new(config_reachability),
        autonat_servers: BTreeSet::new(),
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
    /// Connection kinds and RTTs, reachability, relay reservations.
    links: Links,
    /// Peers of other sites that AutoNAT asks to dial this node back.
    autonat_servers: BTreeSet<PeerId>,
}

impl EventLoop {
    async fn run(&mut self) {
        // Wakes fetches whose every holder answered "busy" once their pause ends.
        let mut backoff = tokio::time::interval(Duration::from_millis(BUSY_BACKOFF_MS));
        backoff.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relays = tokio::time::interval(Duration::from_millis(RELAY_CHECK_INTERVAL_MS));
        relays.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = backoff.tick() => self.pump_waiting(),
                _ = relays.tick() => self.keep_reservations(),
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
                mut announcement,
                reply,
            } => {
                self.stamp(&mut announcement);
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
                    links: self.links.links(),
                    reachability: self.links.reachability(),
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
                endpoint,
                ..
            } => {
                self.links.opened(connection_id, peer_id, &endpoint);
                let node = node_id(&peer_id);
                self.peers.insert(node, peer_id);
                let count = self.connections.entry(peer_id).or_default();
                *count += 1;
                if *count == 1 {
                    let _ = self.events.try_send(NetEvent::Connected(node));
                }
                self.finish_dial(connection_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.links.closed(connection_id);
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
                let hop = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                self.links.relay_capable(peer_id, hop);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                connection,
                result: Ok(rtt),
                ..
            })) => self.links.rtt(connection, rtt),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(connection) => self.links.hole_punched(connection),
                Err(e) => tracing::debug!(peer = %remote_peer_id, "hole punching failed: {e}"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                self.links.set_autonat(match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                });
                tracing::info!(
                    "reachability: {} (AutoNAT)",
                    self.links.reachability().as_str()
                );
                self.keep_reservations();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => tracing::debug!(relay = %relay_peer_id, "relay reservation accepted"),
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.links.listener_closed(listener_id)
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

    /// What only the swarm knows goes into this node's record: whether it is
    /// reachable, and the relayed addresses it holds reservations for (after
    /// the node's direct ones: a gang's `MASTER_ADDR` takes the first).
    fn stamp(&self, a: &mut Announcement) {
        a.reachability = self.links.reachability();
        for addr in self.swarm.listeners() {
            if self.links.is_reservation(addr) {
                let s = addr.to_string();
                if !a.addrs.contains(&s) {
                    a.addrs.push(s);
                }
            }
        }
    }

    /// Reserves on relays while this node is unreachable (and gives the
    /// reservations up once it is not): the relays are reachable peers that
    /// serve the relay protocol and that this node dialled directly.
    fn keep_reservations(&mut self) {
        for listener in self.links.reservations_to_drop() {
            self.swarm.remove_listener(listener);
        }
        let public: BTreeSet<PeerId> = self
            .announcements
            .iter()
            .filter(|(_, (a, _))| a.reachability == Reachability::Public)
            .filter_map(|(n, _)| self.peers.get(n).copied())
            .collect();
        for (relay, addr) in self.links.reservations_to_make(&public) {
            match self.swarm.listen_on(addr.clone()) {
                Ok(listener) => {
                    tracing::info!(%addr, "reserving a relayed address");
                    self.links.listening(relay, listener);
                }
                Err(e) => {
                    tracing::warn!(%addr, "relay reservation: {e}");
                    self.links.reservation_failed(&relay);
                }
            }
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
        // AutoNAT asks only other sites' nodes to dial this node back.
        let other_site =
            self.config.site.is_none() || a.labels.get("site") != self.config.site.as_ref();
        if other_site && self.autonat_servers.insert(source) {
            self.swarm.behaviour_mut().autonat.add_server(source, None);
        }
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
                connection_id,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
            } => {
                let relayed = self.links.kind_of_connection(connection_id)
                    == Some(crate::reach::LinkKind::Relayed);
                self.on_response(peer, request_id, relayed, Ok(response))
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.on_response(peer, request_id, false, Err(error.to_string())),
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
                relayed,
                result,
            } => self.on_chunk_written(fetch, index, peer, relayed, result),
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
        relayed: bool,
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
            Pending::Chunk { fetch, index, .. } => {
                self.on_chunk(fetch, index, peer, relayed, result)
            }
        }
    }
}
