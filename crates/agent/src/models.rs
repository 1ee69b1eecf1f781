//! Which model directories this node keeps.
//!
//! An unfinished experiment's model directory is on every node, so that its
//! trials start anywhere without a transfer and it outlives the node it was
//! submitted to. Once an experiment has ended, only [`MODEL_REPLICAS`] alive
//! nodes keep it: the state says which (`ClusterState::models_for`), each of
//! them records its copy in the log (`Command::ModelKept`), and only then do
//! the others delete theirs, so the last copy is never the one deleted. A
//! node the state asks to keep one it lacks fetches it, from the recorded
//! holders first.
//!
//! [`MODEL_REPLICAS`]: resolute_core::state::MODEL_REPLICAS

use resolute_core::command::Command;
use resolute_core::state::ModelRole;
use resolute_core::Node;

use crate::agent::{act, note, Agent, Outs};
use crate::io::Action;

impl Agent {
    /// Fetches, records and deletes model directories as the state asks
    /// (looked at again whenever the answer may have changed).
    pub(crate) fn keep_models(&mut self, node: &Node, out: &mut Outs) {
        // Looked at again when the state or the disk's standing changed.
        let seen = (node.state().models_generation(), self.disk_low().is_some());
        if self.fetches.models_seen_at == Some(seen) {
            return;
        }
        self.fetches.models_seen_at = Some(seen);
        let me = self.cfg.node;
        let mut wanted = Vec::new();
        for (digest, role) in node.state().models_for(me) {
            match role {
                ModelRole::Everywhere | ModelRole::Held => {
                    let sources = self.sources(node, &digest);
                    wanted.push((digest, sources));
                }
                ModelRole::Hold(_) if self.have.contains(&digest) => {
                    if !self.recording_model(&digest) {
                        self.propose_own(Command::ModelKept { digest, holder: me }, out);
                    }
                }
                ModelRole::Hold(_) => {
                    let sources = self.sources(node, &digest);
                    wanted.push((digest, sources));
                }
                ModelRole::Spare => {}
                ModelRole::KeptElsewhere => {
                    let busy = self.uses_input(&digest) || self.launch_wants(&digest);
                    if self.have.contains(&digest) && !busy {
                        self.have.remove(&digest);
                        note(
                            out,
                            format!("model directory {digest}: kept by other nodes, deleted here"),
                        );
                        act(out, Action::DeleteBlob { digest });
                    }
                }
            }
        }
        if self.disk_low().is_some() {
            // Fetched once the disk has recovered.
            wanted.clear();
        }
        self.want_models(wanted, out);
    }

    /// Whether a proposal recording this node's copy of `digest` is in flight.
    fn recording_model(&self, digest: &str) -> bool {
        self.proposals
            .any(|c| matches!(c, Command::ModelKept { digest: d, .. } if d == digest))
    }
}
