//! The node daemon: `core::Node` driven by a tokio event loop ([`daemon`]) that
//! carries its outputs to the durable store, the libp2p swarm (`crates/net`) and
//! the trial service (`crates/trial`), with the REST API ([`api`]) on every node.

pub mod api;
pub mod config;
pub mod daemon;

use tokio::sync::mpsc;

pub use daemon::{Daemon, DaemonError, Options};

/// Starts a node and serves until `stop` resolves (then drains and leaves).
/// Prints one line `ready node=<id> api=<addr> listen=<multiaddr>` once it serves.
pub async fn serve(
    opts: Options,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(&opts.config.api.listen)
        .await
        .map_err(|e| DaemonError::Setup(format!("api.listen {}: {e}", opts.config.api.listen)))?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| DaemonError::Setup(e.to_string()))?
        .to_string();
    let (tx, rx) = mpsc::channel(1024);
    let daemon = Daemon::start(opts, rx, api_addr.clone()).await?;
    let app = api::router(tx, daemon.blobs());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    println!(
        "ready node={:016x} api={} listen={}",
        daemon.id(),
        api_addr,
        daemon
            .listen()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    daemon.run(stop).await;
    Ok(())
}
