//! This node's slots: which incarnation holds which slot (and so which GPU),
//! and which slots are out of service because their GPU failed.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::TrialId;

/// The slot table of one node.
#[derive(Debug, Clone)]
pub struct Slots {
    /// GPU uuid of each slot (empty: the node offers CPU slots).
    gpus: Vec<String>,
    /// Slots the node has (GPUs, or CPU slots).
    count: u32,
    /// Slots held by running incarnations.
    held: BTreeMap<(TrialId, u64), Vec<usize>>,
    /// Slots whose GPU failed its last health check.
    failed: BTreeSet<usize>,
}

impl Slots {
    /// `cpu_slots` CPU slots when `gpus` is empty, else one slot per GPU.
    pub fn new(gpus: Vec<String>, cpu_slots: u32) -> Slots {
        let count = if gpus.is_empty() {
            cpu_slots
        } else {
            gpus.len() as u32
        };
        Slots {
            gpus,
            count,
            held: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Whether the slots are GPUs.
    pub fn are_gpus(&self) -> bool {
        !self.gpus.is_empty()
    }

    /// The GPU uuid of each slot.
    pub fn gpu_uuids(&self) -> &[String] {
        &self.gpus
    }

    /// Slots the node has, failed ones included.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Slots the node offers now: all but the failed ones.
    pub fn offered(&self) -> u32 {
        self.count.saturating_sub(self.failed.len() as u32)
    }

    /// Slots held by incarnations.
    pub fn used(&self) -> u32 {
        self.held.values().map(|s| s.len() as u32).sum()
    }

    /// Takes `n` free, healthy slots for an incarnation (lowest first), with
    /// their GPU uuids; None when fewer are free (an older incarnation may still
    /// be on its way out).
    pub fn take(&mut self, key: (TrialId, u64), n: u32) -> Option<(Vec<usize>, Vec<String>)> {
        let used: BTreeSet<usize> = self.held.values().flatten().copied().collect();
        let free: Vec<usize> = (0..self.count as usize)
            .filter(|s| !used.contains(s) && !self.failed.contains(s))
            .take(n as usize)
            .collect();
        if free.len() < n as usize {
            return None;
        }
        let gpus = free
            .iter()
            .filter_map(|s| self.gpus.get(*s).cloned())
            .collect();
        self.held.insert(key, free.clone());
        Some((free, gpus))
    }

    /// Frees an incarnation's slots; returns them.
    pub fn release(&mut self, key: (TrialId, u64)) -> Vec<usize> {
        self.held.remove(&key).unwrap_or_default()
    }

    /// The slots an incarnation holds.
    pub fn held_by(&self, key: (TrialId, u64)) -> &[usize] {
        self.held.get(&key).map_or(&[], Vec::as_slice)
    }

    /// The incarnations holding any of `slots`.
    pub fn holders_of(&self, slots: &BTreeSet<usize>) -> Vec<(TrialId, u64)> {
        self.held
            .iter()
            .filter(|(_, s)| s.iter().any(|i| slots.contains(i)))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The failed slots.
    pub fn failed(&self) -> &BTreeSet<usize> {
        &self.failed
    }

    /// Replaces the failed set.
    pub fn set_failed(&mut self, failed: BTreeSet<usize>) {
        self.failed = failed;
    }
}
