//! TLS for the REST API (rustls with its `ring` provider, the one libp2p
//! already builds): a certificate chain and a key from PEM files in the
//! config (`api.tls_cert`, `api.tls_key`), and a listener that axum serves
//! like a TCP one.
//!
//! Handshakes run on tasks of their own, at most `TLS_HANDSHAKES_MAX` at once
//! and each for at most `TLS_HANDSHAKE_TIMEOUT_MS`: a client that opens a
//! connection and says nothing holds up no one else.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Handshakes in progress at once, at most (more connections wait in the
/// kernel's accept queue).
pub const TLS_HANDSHAKES_MAX: usize = 256;
/// Finished handshakes waiting for the server to take them.
const READY_CONNECTIONS_MAX: usize = 64;

/// Reads the certificate chain and key (PEM); errors name the file and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("api.tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("api.tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "api.tls_cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("api.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map(Arc::new)
        .map_err(|e| format!("api.tls_cert and api.tls_key do not go together: {e}"))
}

/// A TCP listener whose connections arrive already through their handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` and shakes hands with `config` (on the current runtime).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_CONNECTIONS_MAX);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(TLS_HANDSHAKES_MAX));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(_) => {
                        // Out of file descriptors, say: breathe, then go on.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let wait = Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS);
                    let shaken = tokio::time::timeout(wait, acceptor.accept(stream)).await;
                    drop(slot);
                    if let Ok(Ok(tls)) = shaken {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept task ended (the runtime is stopping): nothing comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client's address, for the gate's throttle, from a plain or a TLS
/// listener (axum knows only its own listeners' addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}
