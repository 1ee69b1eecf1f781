//! A node's libp2p identity: an ed25519 key kept in its data dir, so a restarted
//! node keeps its peer id (and with it its node id).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::PeerId;

use crate::NetError;

/// The key file's name in the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the node's key, or creates one (readable by its owner only).
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, NetError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |e: std::io::Error| NetError::Io(format!("{}: {e}", path.display()));
    if path.exists() {
        let bytes = fs::read(&path).map_err(io)?;
        return Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| NetError::Io(format!("{}: not an identity key: {e}", path.display())));
    }
    fs::create_dir_all(data_dir).map_err(io)?;
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| NetError::Io(e.to_string()))?;
    let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)?;
    Ok(key)
}

/// The node id a peer id stands for: the first 8 bytes of its blake3 hash (never
/// 0, which raft-rs reserves). Every node computes the same id for a peer, so no
/// mapping has to be agreed on.
pub fn node_id(peer: &PeerId) -> u64 {
    let h = blake3::hash(&peer.to_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b).max(1)
}
