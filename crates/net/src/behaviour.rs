//! What the swarm is made of: the transport (TCP, or a circuit through a
//! relay, each inside the cluster key's private network, then noise and
//! yamux) and the protocols a node speaks (identify, ping, gossipsub, the
//! request-response wire, mDNS, AutoNAT, circuit relay v2 as server and
//! client, DCUtR), with their limits.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{autonat, dcutr, gossipsub, identify, mdns, noise, ping, relay, tcp, yamux, PeerId};

use crate::config::NetConfig;
use crate::wire::{WireCodec, PROTOCOL};
use crate::NetError;

/// Largest gossip message, in bytes.
pub(crate) const GOSSIP_MESSAGE_MAX_BYTES: usize = 256 * 1024;
/// How long a connection may take to set up (pnet, noise, yamux).
const UPGRADE_TIMEOUT_S: u64 = 20;
/// How long after start AutoNAT first asks a peer to dial back (identify
/// must have told it the node's observed address first).
const AUTONAT_BOOT_DELAY_MS: u64 = 3_000;
/// How soon AutoNAT asks again while it has no answer.
const AUTONAT_RETRY_INTERVAL_MS: u64 = 10_000;
/// How often AutoNAT checks an answer it has (a NAT's mapping can change).
const AUTONAT_REFRESH_INTERVAL_MS: u64 = 120_000;
/// How long AutoNAT leaves one server alone after asking it.
const AUTONAT_SERVER_THROTTLE_MS: u64 = 5_000;
/// How long a dial-back may take.
const AUTONAT_TIMEOUT_MS: u64 = 15_000;
/// Same answers in a row before AutoNAT is sure (and a different answer
/// flips the status only once its confidence is spent).
const AUTONAT_CONFIDENCE_MAX: usize = 2;
/// Circuits a relay carries at once, in all and per peer (every pair of
/// NATed nodes that talk needs one until hole punching replaces it).
const RELAY_CIRCUITS_MAX: usize = 512;
const RELAY_CIRCUITS_PER_PEER_MAX: usize = 64;
/// Reservations a relay holds, in all and per peer.
const RELAY_RESERVATIONS_MAX: usize = 256;
const RELAY_RESERVATIONS_PER_PEER_MAX: usize = 4;
/// How long a reservation lasts before the client renews it.
const RELAY_RESERVATION_DURATION_S: u64 = 3_600;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub rpc: request_response::Behaviour<WireCodec>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub autonat: autonat::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
}

/// TCP and relayed circuits, optionally inside the pre-shared-key private
/// network (a circuit too: the relay is a member, but the two ends check
/// each other's key themselves), then noise and yamux.
pub(crate) fn transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
    relay: relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let noise = noise::Config::new(key).map_err(|e| NetError::Transport(e.to_string()))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let timeout = Duration::from_secs(UPGRADE_TIMEOUT_S);
    let base = relay.or_transport(tcp);
    Ok(match psk {
        Some(psk) => base
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .boxed(),
        None => base
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .boxed(),
    })
}

pub(crate) fn behaviour(
    key: &Keypair,
    config: &NetConfig,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, NetError> {
    let err = |e: String| NetError::Transport(e);
    let peer_id = key.public().to_peer_id();
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
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|e| err(e.to_string()))?,
        )
    } else {
        None
    };
    let relay = config.relay_server.then(|| {
        relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: RELAY_RESERVATIONS_MAX,
                max_reservations_per_peer: RELAY_RESERVATIONS_PER_PEER_MAX,
                reservation_duration: Duration::from_secs(RELAY_RESERVATION_DURATION_S),
                max_circuits: RELAY_CIRCUITS_MAX,
                max_circuits_per_peer: RELAY_CIRCUITS_PER_PEER_MAX,
                max_circuit_duration: Duration::from_secs(config.relay_circuit_max_duration_s),
                max_circuit_bytes: config.relay_circuit_max_bytes,
                ..relay::Config::default()
            },
        )
    });
    Ok(Behaviour {
        identify: identify::Behaviour::new(identify::Config::new(
            format!("/resolute/{}/1", config.cluster),
            key.public(),
        )),
        ping: ping::Behaviour::default(),
        gossipsub,
        rpc,
        mdns: mdns.into(),
        autonat: autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                timeout: Duration::from_millis(AUTONAT_TIMEOUT_MS),
                boot_delay: Duration::from_millis(AUTONAT_BOOT_DELAY_MS),
                retry_interval: Duration::from_millis(AUTONAT_RETRY_INTERVAL_MS),
                refresh_interval: Duration::from_millis(AUTONAT_REFRESH_INTERVAL_MS),
                throttle_server_period: Duration::from_millis(AUTONAT_SERVER_THROTTLE_MS),
                // Only peers of other sites are asked (the swarm adds them as
                // servers from their gossip records): a LAN neighbour reaches
                // this node whatever its NAT does.
                use_connected: false,
                confidence_max: AUTONAT_CONFIDENCE_MAX,
                // On-prem sites and cloud VPCs use private addresses.
                only_global_ips: false,
                ..autonat::Config::default()
            },
        ),
        relay: relay.into(),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
    })
}
