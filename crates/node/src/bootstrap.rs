//! What a new cluster starts from, and what a node refuses to start without.
//!
//! `resolute cluster init --data-dir D` ([`init`]) writes, in `D` (mode 0700):
//! - `cluster.key` (0600): the pre-shared key of the libp2p private network,
//!   used when the config names none; every other node needs the same key;
//! - `admin.json` (0600): the first administrator's name and the argon2 hash
//!   of their first token (the token itself is handed to the operator once).
//!
//! A node that bootstraps a cluster (a fresh data dir, nothing to join)
//! refuses to start without `admin.json`, and proposes the administrator as
//! the cluster's first user-scoped entry ([`propose_admin`]). A node refuses a
//! non-loopback API (tokens in clear text) and a non-loopback libp2p listen
//! without a cluster key.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::Addr;
use serde::{Deserialize, Serialize};

use resolute_core::command::{Command, NewToken, Reply, UserCommand};

use crate::auth::tokens;
use crate::node_actor::{self, NodeActor};

/// The cluster key's file in the data dir.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// The first administrator's file in the data dir.
pub const ADMIN_FILE: &str = "admin.json";
/// Pause between attempts to propose the administrator, in milliseconds.
const ADMIN_RETRY_MS: u64 = 200;

/// The cluster's first administrator, as `cluster init` left them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admin {
    /// Their user name.
    pub name: String,
    /// Their first token (hash only).
    pub token: NewToken,
}

/// Creates `dir` (and its parents) readable by its owner only.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    set_mode(dir, 0o700)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> Result<(), String> {
    Ok(())
}

/// Writes a file only its owner can read (created with that mode, so that it
/// is never readable by others, not even for a moment).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    set_mode(path, 0o600)
}

/// What `cluster init` made.
#[derive(Debug)]
pub struct Initialized {
    /// The administrator's token (shown once; only its hash is kept).
    pub token: String,
    /// The cluster key's file.
    pub key_path: PathBuf,
    /// Whether the key was made now (false: an existing one was kept).
    pub new_key: bool,
}

/// `resolute cluster init`: the cluster key (unless there is one) and the first
/// administrator, in `data_dir`. Refuses a data dir that already holds a log.
pub fn init(data_dir: &Path, admin: &str) -> Result<Initialized, String> {
    if !resolute_core::state::auth::valid_user_name(admin) {
        return Err(format!(
            "--admin {admin:?}: a user name is 1 to 64 of a-z, 0-9, _ . - (starting with a letter or digit)"
        ));
    }
    if data_dir.join("log").exists() {
        return Err(format!(
            "{}: this node already belongs to a cluster (it has a log)",
            data_dir.display()
        ));
    }
    private_dir(data_dir)?;
    let key_path = data_dir.join(CLUSTER_KEY_FILE);
    let new_key = !key_path.exists();
    if new_key {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| format!("no randomness from the OS: {e}"))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&key_path, format!("{hex}\n").as_bytes())?;
    }
    let (text, token) =
        tokens::mint("cluster init", None).map_err(|e| format!("the admin token: {e}"))?;
    let record = Admin {
        name: admin.to_string(),
        token,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    write_private(&data_dir.join(ADMIN_FILE), &json)?;
    Ok(Initialized {
        token: text,
        key_path,
        new_key,
    })
}

/// The administrator a bootstrapping node proposes.
pub fn read_admin(data_dir: &Path) -> Result<Admin, String> {
    let path = data_dir.join(ADMIN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        format!(
            "{}: a new cluster needs its first administrator; run `resolute cluster init --data-dir {}` \
             first (or join an existing cluster with --join)",
            path.display(),
            data_dir.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The cluster key: the config's, else the data dir's `cluster.key`.
pub fn cluster_key(configured: Option<&str>, data_dir: &Path) -> Result<Option<String>, String> {
    if let Some(k) = configured {
        return Ok(Some(k.to_string()));
    }
    let path = data_dir.join(CLUSTER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(k) => Ok(Some(k.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Without TLS the API listens on loopback only: its bearer tokens would cross
/// the network in clear text otherwise. (Authentication is always on.)
pub fn check_api_listen(listen: &str, tls: bool) -> Result<(), String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("api.listen {listen:?}: not an IP address and port ({e})"))?;
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    Err(format!(
        "api.listen {listen}: without TLS the REST API listens on loopback only (tokens would \
         cross the network in clear text). Set api.tls_cert and api.tls_key (PEM files) to serve \
         HTTPS on it, or set api.listen = \"127.0.0.1:8080\" and reach it through an SSH tunnel"
    ))
}

/// A libp2p listen address that others can reach needs a cluster key.
pub fn check_net_listen(listen: &[libp2p::Multiaddr], key: Option<&str>) -> Result<(), String> {
    use libp2p::multiaddr::Protocol;
    let open = listen.iter().find(|a| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => !ip.is_loopback(),
            Protocol::Ip6(ip) => !ip.is_loopback(),
            Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => true,
            _ => false,
        })
    });
    match (open, key) {
        (Some(a), None) => Err(format!(
            "net.listen {a}: a node reachable from other hosts needs a cluster key (net.cluster_key, \
             or `{CLUSTER_KEY_FILE}` in the data dir from `resolute cluster init`): without one any \
             host could connect"
        )),
        _ => Ok(()),
    }
}

/// Proposes the first administrator until the cluster has users (this
/// node's proposal applied, or someone's earlier one did).
pub async fn propose_admin(node: Addr<NodeActor>, admin: Admin) {
    loop {
        let command = Command::User(UserCommand::Bootstrap {
            admin: admin.name.clone(),
            token: admin.token.clone(),
        });
        match node.send(node_actor::Propose(command, None)).await {
            Ok(Ok(Reply::Ok)) => {
                eprintln!("the cluster's administrator is {}", admin.name);
                return;
            }
            Ok(Ok(Reply::Forbidden { .. })) => return,
            Ok(Ok(other)) => {
                eprintln!("the administrator was refused: {other:?}");
                return;
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(ADMIN_RETRY_MS)).await,
            Err(_) => return,
        }
    }
}
