//! Simulated disks: a node's writes complete after a sampled fsync time, all
//! that are queued by then in one group commit; a crash before that loses them
//! or tears the last (`nodes::lose_unsynced_writes`), and injected I/O errors
//! fail the fsync, which crashes the node as a failed fsync must.

use rand_core::RngCore;

use resolute_agent::{Action, Event};
use resolute_storage::LogStore;

use super::{mix, Occurrence, World};

impl World<'_> {
    /// Queues a write; the first one of a batch starts the fsync clock.
    pub(super) fn persist(&mut self, node: usize, write: Action) {
        let first = self.nodes[node].writes.is_empty();
        self.nodes[node].writes.push_back(write);
        if first {
            let at = self.now + self.fsync_time();
            let epoch = self.nodes[node].epoch;
            self.schedule(at, Occurrence::DiskDone { node, epoch });
        }
    }

    fn fsync_time(&mut self) -> u64 {
        let r = self.sc.node.fsync_ms;
        r[0] + self.rng.disk.next_u64() % (r[1] - r[0] + 1)
    }

    /// Completes every write queued so far with one fsync (group commit).
    pub(super) fn disk_done(&mut self, node: usize, epoch: u64) {
        if self.nodes[node].epoch != epoch || self.nodes[node].down {
            return;
        }
        let writes: Vec<Action> = self.nodes[node].writes.drain(..).collect();
        let fail = self.sc.faults.disk_error_rate > 0.0
            && (self.rng.disk.next_u64() % 1_000_000) as f64 / 1_000_000.0
                < self.sc.faults.disk_error_rate;
        let mut seqs = Vec::new();
        {
            let store = &mut self.nodes[node].store;
            for w in &writes {
                if let Action::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } = w
                {
                    let r = snapshot
                        .as_ref()
                        .map_or(Ok(()), |s| {
                            store.install_snapshot(s, &hard_state.unwrap_or_default())
                        })
                        .and_then(|()| store.append(entries, hard_state.as_ref()));
                    if r.is_err() {
                        break;
                    }
                    self.digest = mix(mix(self.digest, *seq), entries.len() as u64);
                    seqs.push(*seq);
                }
            }
            if fail {
                store.fail_next_sync();
            }
        }
        if self.nodes[node].store.sync().is_err() {
            // A failed fsync leaves the node's state unknown: it crashes.
            self.crash(node, "disk write failed", true);
            let delay = self.range(self.sc.faults.restart_after_s).max(1) * 1000;
            self.schedule(self.now + delay, Occurrence::Restart { node });
            return;
        }
        for seq in seqs.into_iter().filter(|s| *s > 0) {
            self.step(node, Event::Persisted { seq });
        }
    }
}
