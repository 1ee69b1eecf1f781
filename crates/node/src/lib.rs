//! The production shell: actix actors around the sans-IO node.
//!
//! - [`node_actor::NodeActor`] owns the `agent::Driver` (`core::Node` and the
//!   node agent) and the durable log store, and carries out the driver's
//!   actions;
//! - [`net_actor::NetActor`] bridges the libp2p swarm (`crates/net`);
//! - `resolute_trial::TrialSupervisor` runs one `TrialActor` per trial
//!   incarnation and serves the trials' report endpoint;
//! - [`gpu_monitor::GpuMonitor`] makes the blocking NVML calls on a thread of
//!   its own;
//! - [`api`] is the REST API (axum, on the same tokio runtime), which talks to
//!   the node actor in typed messages.
//!
//! [`serve`] must run inside an actix `System` whose tokio runtime is
//! multi-threaded (the CLI builds it so): the actors share the system's thread,
//! while the swarm, the HTTP servers and blocking file work run on the
//! runtime's workers.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod gpu_monitor;
pub mod net_actor;
pub mod node_actor;
mod setup;
pub mod tls;
mod views;

use actix::prelude::*;

use resolute_agent::{AgentConfig, Driver};
use resolute_storage::blob::BlobStore;
use resolute_storage::DurableStore;
use resolute_trial::{SupervisorConfig, TrialSupervisor};

use crate::node_actor::{Local, NodeActor, Parts, Peers};
pub use setup::{data_dir, Options};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Storage, network or trial setup failed.
    #[error("{0}")]
    Setup(String),
}

use setup::setup as fail;

/// The wall clock in milliseconds since the Unix epoch: what the leader stamps
/// entries with, and what token expiries are measured against.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `fut` in an actix system on a multi-threaded tokio runtime (what
/// [`serve`] needs). Building a runtime fails only when the OS refuses threads.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    let runner = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("the OS refused a tokio runtime: {e}"))
    });
    runner.block_on(fut)
}

/// Starts a node and serves until `stop` resolves (then drains and leaves).
/// Prints one line `ready node=<id> api=<addr> listen=<multiaddr>` once it serves.
pub async fn serve(
    opts: Options,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let api_cfg = &opts.config.api;
    bootstrap::check_api_listen(&api_cfg.listen, api_cfg.tls_cert.is_some()).map_err(fail)?;
    let tls = match (&api_cfg.tls_cert, &api_cfg.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key).map_err(fail)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&opts.config.api.listen)
        .await
        .map_err(|e| fail(format!("api.listen {}: {e}", opts.config.api.listen)))?;
    let api_socket = listener.local_addr().map_err(fail)?;
    let api_addr = api_socket.to_string();
    let node = start(&opts, api_socket).await?;
    let blobs = BlobStore::open(&opts.data_dir).map_err(fail)?;
    let gate = auth::Gate::new(node.addr.clone(), api_socket);
    let tracking = opts.data_dir.join(resolute_tracking::FILE_NAME);
    let app = api::router(node.addr.clone(), blobs, tracking, gate);
    let app = app.into_make_service_with_connect_info::<tls::ClientAddr>();
    match tls {
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config).map_err(fail)?;
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        None => {
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
    }
    if let Some(admin) = node.admin.clone() {
        // The cluster's first administrator, from `resolute cluster init`.
        tokio::spawn(bootstrap::propose_admin(node.addr.clone(), admin));
    }
    println!(
        "ready node={:016x} api={} listen={}",
        node.id,
        api_addr,
        node.listen
            .first()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    stop.await;
    let _ = node.addr.send(node_actor::Leave).await;
    Ok(())
}

/// A started node.
struct Started {
    addr: Addr<NodeActor>,
    id: u64,
    listen: Vec<libp2p::Multiaddr>,
    /// The administrator to propose, on a node that bootstraps a cluster.
    admin: Option<bootstrap::Admin>,
}

/// Opens the data dir, starts the swarm, the trials, the NVML thread and the
/// node actor.
async fn start(opts: &Options, api_socket: std::net::SocketAddr) -> Result<Started, DaemonError> {
    let c = &opts.config;
    let (advertise, api_advertise) = setup::advertise(opts)?;
    bootstrap::private_dir(&opts.data_dir).map_err(fail)?;
    let (mut store, recovered) = DurableStore::open(&opts.data_dir.join("log")).map_err(fail)?;
    let log_reserve_bytes = c.disk.log_reserve_mib << 20;
    if let Err(e) = store.set_reserve(log_reserve_bytes) {
        // A disk too full for the reserve still runs the node (it takes no
        // new work); the reserve is made once space is back.
        eprintln!(
            "warning: the log's reserve of {} MiB: {e}",
            c.disk.log_reserve_mib
        );
    }
    let mut net_config = setup::net_config(opts)?;
    net_config.advertise = advertise.clone();
    let cluster_key = net_config.cluster_key;
    let (join, _) = setup::join_addresses(opts)?;
    let (net, net_events, _task) = resolute_net::spawn(net_config).await.map_err(fail)?;
    let id = net.node_id;
    let gpu_records = setup::gpus(c);
    // The slots: the GPUs that passed their probe, in NVML order.
    let gpu_uuids: Vec<String> = gpu_records
        .iter()
        .filter(|g| g.disabled.is_none())
        .map(|g| g.uuid.clone())
        .collect();
    let slots = if gpu_uuids.is_empty() {
        c.cpu_slots
    } else {
        gpu_uuids.len() as u32
    };
    let (info, labels) = setup::node_info(c, slots);
    let node_cfg = setup::node_config(opts, id, info);
    let fresh = recovered.snapshot.is_none() && recovered.entries.is_empty();
    let bootstrap = fresh && join.is_empty();
    // A new cluster starts with its administrator, or not at all: a cluster
    // without users would have nobody who may use it.
    // (A node that restarts before its proposal applied proposes it again;
    // once the cluster has users, it is refused.)
    let admin = if bootstrap {
        Some(bootstrap::read_admin(&opts.data_dir).map_err(fail)?)
    } else {
        bootstrap::read_admin(&opts.data_dir).ok()
    };
    let blobs = BlobStore::open(&opts.data_dir).map_err(fail)?;
    let mut agent_cfg =
        AgentConfig::new(id, gpu_uuids.clone(), c.cpu_slots, setup::proposal_base());
    agent_cfg.disk_low_water_bytes = c.disk.low_water_mib << 20;
    let now = wall_ms();
    let (driver, first) = Driver::new(
        node_cfg,
        agent_cfg,
        &recovered,
        bootstrap,
        blobs.list(),
        now,
    )
    .map_err(fail)?;
    let admin = admin.filter(|_| !driver.node().state().secured());
    let tracking_file = opts.data_dir.join(resolute_tracking::FILE_NAME);
    let mut tracker = resolute_tracking::Tracker::open(&tracking_file).map_err(fail)?;
    // A store behind the snapshot this node restarts from (deleted, or from
    // another schema version) is rebuilt from the state at once.
    tracker.catch_up(driver.node().state()).map_err(fail)?;
    // Peers this node knew before a restart, and the ones it joins through.
    let known = setup::known_peers(&opts.data_dir);
    for addr in join.iter().cloned().chain(
        known
            .values()
            .flatten()
            .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok()),
    ) {
        let _ = net.dial(addr).await;
    }
    let info = net.info().await.map_err(fail)?;
    // What peers are told: never 0.0.0.0, loopback only on a loopback node,
    // or the operator's own list.
    let listen = resolute_net::addrs::advertised(&info.listen, &advertise);
    let api_addr =
        resolute_net::addrs::advertised_api(api_socket, api_advertise.as_deref(), &listen);
    // The node's address exists before it runs, so that the actors it talks
    // to can be given it.
    let ctx: Context<NodeActor> = Context::new();
    let addr = ctx.address();
    // Absolute: trials run elsewhere (their working copies) and are told
    // paths under it (checkpoint staging, restored checkpoints).
    let work_root = std::path::absolute(opts.data_dir.join("trials")).map_err(fail)?;
    resolute_trial::tidy_models(&work_root, &blobs);
    let (trials, _endpoint) = TrialSupervisor::start(
        SupervisorConfig {
            work_root: work_root.clone(),
            data_dir: opts.data_dir.clone(),
            run_as: c.trial.run_as().map_err(fail)?,
            cluster_key,
            best_validation: Some(addr.clone().recipient()),
        },
        addr.clone().recipient(),
    )
    .await
    .map_err(fail)?;
    let (net_actor, outbox) = net_actor::NetActor::start(net);
    let parts = Parts {
        driver,
        first,
        store,
        blobs,
        peers: Peers {
            net: net_actor,
            outbox,
            trials,
            gpus: gpu_monitor::start(),
        },
        local: Local {
            node: id,
            api: api_addr,
            listen: listen.clone(),
            connected: Default::default(),
            links: Vec::new(),
            reachability: Default::default(),
            records: Default::default(),
            ignored_records: 0,
            denied_requests: 0,
            work_root,
            fetches: Default::default(),
            latency: c.node.class().map_err(fail)?,
        },
        gpu_uuids,
        gpu_records,
        labels,
        tick_ms: c.node.tick_ms,
        joining: fresh && !bootstrap,
        addrs: known,
        join,
        data_dir: opts.data_dir.clone(),
        log_reserve_bytes,
        peer_inline_max_bytes: node_actor::PEER_INLINE_MAX_BYTES.min(c.net.max_message_bytes / 2),
        events: net_events,
        tracker: (
            resolute_tracking::background::Background::spawn(tracker).map_err(fail)?,
            tracking_file,
        ),
    };
    ctx.run(NodeActor::new(parts));
    Ok(Started {
        addr,
        id,
        listen,
        admin,
    })
}
