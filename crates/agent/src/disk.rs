//! Disk as a bounded resource. Every `DISK_CHECK_MS` the shell measures the
//! free space of the data dir's file system (`Action::CheckDisk`, answered by
//! `Event::DiskSpace`). Below the node's low-water mark the node takes no new
//! work: it proposes `Command::NodeDisk` for itself (so the scheduler places
//! nothing new there and replication picks other nodes), refuses launches that
//! arrive meanwhile (back to the queue, no restart charged), starts no
//! checkpoint copies or model fetches, and its shell refuses uploads. What runs
//! there goes on, and the log has its own reserve (`storage::DurableStore`),
//! so a full disk does not stop the node. It takes work again once free space
//! is `DISK_RECOVERY_PERCENT` above the mark, so a disk at the mark does not
//! flap.

use resolute_core::command::{Command, DiskLow, TrialId, TrialOutcome};
use resolute_core::Node;

use crate::agent::{act, note, Agent, Outs};
use crate::io::Action;

/// How often the shell measures the data dir's free space.
pub const DISK_CHECK_MS: u64 = 5_000;
/// How far above the low-water mark (percent of it) free space must be before a
/// node low on disk takes work again.
pub const DISK_RECOVERY_PERCENT: u64 = 10;

/// The disk checks of one node.
#[derive(Debug)]
pub(crate) struct DiskWatch {
    /// The low-water mark in bytes (0: not watched).
    low_water_bytes: u64,
    check_at: u64,
    in_flight: bool,
    /// The latest measurement.
    free_bytes: Option<u64>,
    /// Below the mark (and not yet recovered).
    low: Option<DiskLow>,
}

impl DiskWatch {
    pub(crate) fn new(low_water_bytes: u64, now_ms: u64) -> DiskWatch {
        DiskWatch {
            low_water_bytes,
            // The first check at the first tick: a node that starts on a full
            // disk says so before it takes work.
            check_at: now_ms,
            in_flight: false,
            free_bytes: None,
            low: None,
        }
    }

    /// Free bytes a node low on disk needs before it takes work again.
    fn recovery_bytes(&self) -> u64 {
        let mark = self.low_water_bytes;
        mark.saturating_add(mark / 100 * DISK_RECOVERY_PERCENT)
    }

    /// Whether free space `free` leaves the node low, given whether it is now.
    fn is_low(&self, free: u64, low_now: bool) -> bool {
        if low_now {
            free < self.recovery_bytes()
        } else {
            free < self.low_water_bytes
        }
    }
}

impl Agent {
    /// Below the low-water mark: what it measured (for messages and refusals).
    pub fn disk_low(&self) -> Option<DiskLow> {
        self.disk.low
    }

    /// The low-water mark, in bytes (0: the disk is not watched).
    pub fn disk_low_water_bytes(&self) -> u64 {
        self.disk.low_water_bytes
    }

    /// The latest measurement of free bytes, if any.
    pub fn disk_free_bytes(&self) -> Option<u64> {
        self.disk.free_bytes
    }

    /// Asks the shell to measure when a check is due.
    pub(crate) fn check_disk_when_due(&mut self, out: &mut Outs) {
        let d = &mut self.disk;
        if d.low_water_bytes > 0 && !d.in_flight && self.now_ms >= d.check_at {
            d.in_flight = true;
            act(out, Action::CheckDisk);
        }
    }

    /// The shell's measurement (`None`: it could not measure; nothing is
    /// concluded from that).
    pub(crate) fn on_disk_space(
        &mut self,
        now_ms: u64,
        node: &Node,
        free_bytes: Option<u64>,
        out: &mut Outs,
    ) {
        self.now_ms = now_ms;
        let d = &mut self.disk;
        d.in_flight = false;
        d.check_at = now_ms + DISK_CHECK_MS;
        let Some(free) = free_bytes else {
            return;
        };
        if d.low_water_bytes == 0 {
            return;
        }
        d.free_bytes = Some(free);
        let was = d.low;
        let low = d.is_low(free, was.is_some()).then_some(DiskLow {
            free_bytes: free,
            low_water_bytes: d.low_water_bytes,
        });
        d.low = low;
        match (was, low) {
            (None, Some(l)) => note(
                out,
                format!(
                    "disk low: {l}; this node takes no new trials, checkpoint copies or uploads \
                     until it has {} MiB free",
                    d.recovery_bytes() >> 20
                ),
            ),
            (Some(_), None) => note(
                out,
                format!("disk recovered: {} MiB free; taking work again", free >> 20),
            ),
            _ => {}
        }
        self.record_disk(node, out);
    }

    /// Proposes this node's disk standing when the state records another one
    /// (and no such proposal is in flight).
    fn record_disk(&mut self, node: &Node, out: &mut Outs) {
        let me = self.cfg.node;
        let Some(recorded) = node.state().nodes.get(&me).map(|n| n.disk_low.is_some()) else {
            return; // Not a member yet: it proposes once it is.
        };
        if recorded == self.disk.low.is_some()
            || self
                .proposals
                .any(|c| matches!(c, Command::NodeDisk { .. }))
        {
            return;
        }
        self.propose_own(
            Command::NodeDisk {
                node: me,
                low: self.disk.low,
            },
            out,
        );
    }

    /// A launch that arrives while the disk is low goes back to the queue
    /// without a restart charged (the node's standing is proposed first, so
    /// the scheduler does not place it here again). Returns whether it was
    /// refused.
    pub(crate) fn refuse_launch_for_disk(
        &mut self,
        node: &Node,
        key: (TrialId, u64),
        out: &mut Outs,
    ) -> bool {
        let Some(low) = self.disk.low else {
            return false;
        };
        note(
            out,
            format!(
                "trial {} incarnation {}: not launched here: {low}; back to the queue",
                key.0, key.1
            ),
        );
        self.record_disk(node, out);
        self.report_exit(key, TrialOutcome::Preempted, out);
        true
    }
}
