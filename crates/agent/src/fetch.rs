//! Which blobs this node fetches, from whom, and when it tries again:
//!
//! - a launch's inputs (the model directory and the checkpoint to resume from):
//!   nothing unverified reaches a trial, so a launch waits for its fetches;
//! - a second copy of a live trial's latest checkpoint when the state says this
//!   node is the one to keep it (`ClusterState::checkpoints_to_copy`);
//! - the model directories the state asks this node to keep (`models`).
//!
//! One fetch per blob at a time, whatever wants it. A failed fetch is tried
//! again after a pause that grows with each failure: a holder's address may not
//! have reached this node yet, or a holder may be restarting.

use std::collections::{BTreeMap, BTreeSet};

use resolute_core::command::{Command, TrialId};
use resolute_core::{Node, NodeId};

use crate::agent::{act, note, Agent, Outs};
use crate::io::Action;

/// Failed fetches of a launch's input before the launch gives up.
pub const FETCH_ATTEMPTS: u32 = 8;
/// Pause after the first failed fetch; each further failure adds as much.
pub const FETCH_RETRY_MS: u64 = 500;
/// Longest pause between two tries of a copy or a model directory.
pub const FETCH_RETRY_MAX_MS: u64 = 30_000;

/// One blob this node wants.
#[derive(Debug, Default)]
struct Fetch {
    /// Where it may come from.
    holders: Vec<NodeId>,
    /// Failed tries so far.
    failures: u32,
    /// Asked of the shell and not answered yet.
    in_flight: bool,
    /// When to try again after a failure.
    retry_at: Option<u64>,
    /// Incarnations waiting for it before they launch.
    launches: BTreeSet<(TrialId, u64)>,
    /// A checkpoint copy this node keeps (recorded once fetched).
    copy: bool,
    /// A model directory this node keeps.
    model: bool,
}

impl Fetch {
    fn wanted(&self) -> bool {
        !self.launches.is_empty() || self.copy || self.model
    }
}

/// The blobs being fetched.
#[derive(Debug, Default)]
pub(crate) struct Fetches {
    by_digest: BTreeMap<String, Fetch>,
    /// The state's models generation and whether the disk was low at the
    /// last look at model directories (`None`: look again at the next tick).
    pub(crate) models_seen_at: Option<(u64, bool)>,
    /// The state's replication generation at the last look at the copies.
    copies_seen_at: Option<u64>,
}

impl Fetches {
    /// Blobs wanted.
    pub(crate) fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether `digest` is wanted or being fetched.
    pub(crate) fn wants(&self, digest: &str) -> bool {
        self.by_digest.contains_key(digest)
    }
}

impl Agent {
    /// Who may have `digest`: a checkpoint's holders, else (a model directory)
    /// every other member, those that recorded a copy first.
    pub(crate) fn sources(&self, node: &Node, digest: &str) -> Vec<NodeId> {
        let me = self.cfg.node;
        let state = node.state();
        if let Some(c) = state.checkpoints.get(digest) {
            return c.holders.iter().copied().filter(|n| *n != me).collect();
        }
        let recorded = state.models.get(digest);
        let mut sources: Vec<NodeId> = recorded
            .into_iter()
            .flatten()
            .copied()
            .filter(|n| *n != me)
            .collect();
        sources.extend(
            self.other_members(node)
                .into_iter()
                .filter(|n| !recorded.is_some_and(|r| r.contains(n))),
        );
        sources
    }

    /// Asks the shell for the blob (once at a time).
    fn start_fetch(&mut self, digest: &str, out: &mut Outs) {
        let Some(f) = self.fetches.by_digest.get_mut(digest) else {
            return;
        };
        if f.in_flight {
            return;
        }
        f.in_flight = true;
        f.retry_at = None;
        act(
            out,
            Action::Fetch {
                digest: digest.to_string(),
                holders: f.holders.clone(),
            },
        );
    }

    /// An incarnation needs `digest` before it launches.
    pub(crate) fn fetch_for_launch(
        &mut self,
        node: &Node,
        digest: &str,
        key: (TrialId, u64),
        out: &mut Outs,
    ) {
        let holders = self.sources(node, digest);
        let f = self
            .fetches
            .by_digest
            .entry(digest.to_string())
            .or_default();
        f.launches.insert(key);
        f.holders = holders;
        if f.retry_at.is_none() {
            self.start_fetch(digest, out);
        }
    }

    /// An incarnation no longer waits for its inputs (it was stopped).
    pub(crate) fn forget_launch(&mut self, key: (TrialId, u64)) {
        for f in self.fetches.by_digest.values_mut() {
            f.launches.remove(&key);
        }
        self.fetches
            .by_digest
            .retain(|_, f| f.wanted() || f.in_flight);
    }

    /// Keeps the copies the state asks of this node: fetches them, and records
    /// a copy this node already has (a restart may have lost that record).
    pub(crate) fn copy_checkpoints(&mut self, node: &Node, out: &mut Outs) {
        if self.disk_low().is_some() {
            return; // Looked at again once the disk has recovered.
        }
        let me = self.cfg.node;
        // Only when something changed (failed fetches are tried again by
        // `retry_fetches` meanwhile).
        let generation = node.state().replication_generation();
        if self.fetches.copies_seen_at == Some(generation) {
            return;
        }
        self.fetches.copies_seen_at = Some(generation);
        let wanted = node.state().checkpoints_to_copy(me);
        let wanted_set: BTreeSet<&String> = wanted.iter().map(|(u, _)| u).collect();
        for f in self
            .fetches
            .by_digest
            .iter_mut()
            .filter(|(d, _)| !wanted_set.contains(d))
        {
            f.1.copy = false;
        }
        for (uuid, holders) in &wanted {
            if self.have.contains(uuid) {
                if !self.recording_copy(uuid) {
                    self.propose_own(
                        Command::CheckpointReplicated {
                            uuid: uuid.clone(),
                            holder: me,
                        },
                        out,
                    );
                }
                continue;
            }
            let f = self.fetches.by_digest.entry(uuid.clone()).or_default();
            f.copy = true;
            f.holders = holders.clone();
            if f.retry_at.is_none_or(|t| t <= self.now_ms) {
                self.start_fetch(uuid, out);
            }
        }
        self.fetches
            .by_digest
            .retain(|_, f| f.wanted() || f.in_flight);
    }

    /// Whether a proposal recording this node's copy of `uuid` is in flight.
    fn recording_copy(&self, uuid: &str) -> bool {
        self.proposals
            .any(|c| matches!(c, Command::CheckpointReplicated { uuid: u, .. } if u == uuid))
    }

    /// Wants the model directories in `wanted` (digest and sources) and no
    /// others: a fetch for one this node lacks starts unless it waits out a
    /// pause after a failure.
    pub(crate) fn want_models(&mut self, wanted: Vec<(String, Vec<NodeId>)>, out: &mut Outs) {
        let digests: BTreeSet<&String> = wanted.iter().map(|(d, _)| d).collect();
        for (digest, f) in self.fetches.by_digest.iter_mut() {
            f.model = digests.contains(digest);
        }
        for (digest, holders) in wanted {
            if self.have.contains(&digest) || holders.is_empty() {
                continue;
            }
            let f = self.fetches.by_digest.entry(digest.clone()).or_default();
            f.model = true;
            f.holders = holders;
            if f.retry_at.is_none() {
                self.start_fetch(&digest, out);
            }
        }
        self.fetches
            .by_digest
            .retain(|_, f| f.wanted() || f.in_flight);
    }

    /// Whether a launch here waits for `digest`.
    pub(crate) fn launch_wants(&self, digest: &str) -> bool {
        self.fetches
            .by_digest
            .get(digest)
            .is_some_and(|f| !f.launches.is_empty())
    }

    /// Tries again the fetches whose pause is over (with fresh sources).
    pub(crate) fn retry_fetches(&mut self, node: &Node, out: &mut Outs) {
        let now = self.now_ms;
        let due: Vec<String> = self
            .fetches
            .by_digest
            .iter()
            .filter(|(_, f)| !f.in_flight && f.retry_at.is_some_and(|t| t <= now))
            .map(|(d, _)| d.clone())
            .collect();
        for digest in due {
            let holders = self.sources(node, &digest);
            if let Some(f) = self.fetches.by_digest.get_mut(&digest) {
                if !f.copy {
                    f.holders = holders;
                }
            }
            self.start_fetch(&digest, out);
        }
    }

    /// Whether a blob is still wanted here: a checkpoint the state records, a
    /// model directory of an experiment it has, or an input of a local
    /// incarnation or fetch.
    pub(crate) fn blob_in_use(&self, node: &Node, digest: &str) -> bool {
        let state = node.state();
        state.checkpoints.contains_key(digest)
            || state.experiments.values().any(|e| e.model_digest == digest)
            || self.launch_wants(digest)
            || self.uses_input(digest)
    }

    /// A blob that arrived when nothing here asked for it any more: kept if
    /// the state says this node holds it (or it is an experiment's model
    /// directory, or a local incarnation's input), else deleted. A release
    /// goes only to a checkpoint's recorded holders, so a copy nobody recorded
    /// would otherwise stay on this disk for ever.
    fn keep_or_delete(&mut self, node: &Node, digest: String, out: &mut Outs) {
        if self.recorded_here(node, &digest) || self.uses_input(&digest) {
            self.have.insert(digest);
        } else {
            self.have.remove(&digest);
            act(out, Action::DeleteBlob { digest });
        }
    }

    /// A fetch ended.
    pub(crate) fn on_fetched(
        &mut self,
        now_ms: u64,
        node: &Node,
        digest: String,
        result: Result<(), String>,
        out: &mut Outs,
    ) {
        self.now_ms = now_ms;
        let Some(mut f) = self.fetches.by_digest.remove(&digest) else {
            if result.is_ok() {
                self.keep_or_delete(node, digest, out);
            }
            return;
        };
        f.in_flight = false;
        match result {
            Ok(()) => {
                let recorded = node.state().checkpoints.contains_key(&digest);
                if f.launches.is_empty() && !(f.copy && recorded) && !f.model {
                    // Nothing here wants it any more: the copy was given to
                    // another node, or its checkpoint was deleted (its
                    // experiment's policy, or the experiment), while it
                    // travelled; a release went to the holders it had then.
                    self.keep_or_delete(node, digest, out);
                    return;
                }
                self.have.insert(digest.clone());
                if f.model {
                    // A copy to record, perhaps (`models`).
                    self.fetches.models_seen_at = None;
                }
                if f.copy {
                    let holder = self.cfg.node;
                    self.propose_own(
                        Command::CheckpointReplicated {
                            uuid: digest.clone(),
                            holder,
                        },
                        out,
                    );
                }
                for key in f.launches {
                    self.input_ready(node, key, &digest, out);
                }
            }
            Err(why) => {
                f.failures += 1;
                if !f.launches.is_empty() && f.failures >= FETCH_ATTEMPTS {
                    for key in std::mem::take(&mut f.launches) {
                        self.input_unavailable(node, key, &digest, &why, out);
                    }
                } else if !f.launches.is_empty() {
                    note(
                        out,
                        format!("{digest} not fetched yet (try {}): {why}", f.failures),
                    );
                }
                if f.wanted() {
                    let pause = (FETCH_RETRY_MS * u64::from(f.failures)).min(FETCH_RETRY_MAX_MS);
                    f.retry_at = Some(now_ms + pause);
                    self.fetches.by_digest.insert(digest, f);
                }
            }
        }
    }
}
