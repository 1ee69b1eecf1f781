//! What a peer's message must pass before it reaches raft-rs, and the count of
//! what was dropped.
//!
//! raft-rs trusts its peers: some malformed or forged messages make it panic
//! (`fatal!`: a heartbeat whose commit index is past the log's end, an append
//! whose entries conflict with committed ones, an append acknowledgement past
//! the leader's log), and a snapshot from anyone who claims a term replaces the
//! state. Resolute's peers are authenticated members, but a member may be
//! compromised or buggy, and no message may crash a node or rewrite it. So
//! every raft-rs message is checked here against what an honest peer can send,
//! given this node's log; what fails is dropped and counted by reason.
//!
//! The checks are conservative: each holds for every message the raft-rs
//! protocol sends (the comments say why), so an honest cluster never loses one.

use std::collections::BTreeMap;

use raft::eraftpb::{Message, MessageType};
use raft::Raft;

use crate::command::NodeId;
use crate::log_cache::LogCache;

/// Why a peer's message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dropped {
    /// Its bytes are not a raft-rs message.
    Malformed,
    /// It claims another sender than the authenticated peer, or another
    /// receiver than this node.
    ForgedSender,
    /// A forwarded proposal claims another origin than its sender.
    ForgedOrigin,
    /// A type raft-rs only makes locally (propose, hup, beat, read index...).
    LocalOnly,
    /// A heartbeat or append whose commit index is past this node's log.
    CommitPastLog,
    /// An append whose entries are not consecutive after its index, or whose
    /// terms run backwards or past the message's term.
    BadEntries,
    /// An append that would rewrite committed entries.
    RewritesCommitted,
    /// An acknowledgement of entries this leader does not have.
    AckPastLog,
    /// A snapshot (or leadership hand-over) not from the current leader.
    NotFromLeader,
    /// A peer asked to remove another node, or a non-member asked anything
    /// only members may.
    NotAllowed,
    /// A term or index too large to be honest (`MESSAGE_NUMBER_MAX`,
    /// `TERM_JUMP_MAX`).
    OutOfRange,
}

/// Largest term or index a message may carry: raft-rs adds to them
/// unchecked, so a forged `u64::MAX` would overflow. Honest values are many
/// orders of magnitude below.
pub const MESSAGE_NUMBER_MAX: u64 = 1 << 48;
/// How far past this node's term a message's term may be: each election adds
/// one, and pre-vote keeps a partitioned node from running its term up.
pub const TERM_JUMP_MAX: u64 = 1 << 20;

/// Counts of dropped messages, by reason.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    counts: BTreeMap<Dropped, u64>,
}

impl Guard {
    /// Counts one dropped message.
    pub fn count(&mut self, why: Dropped) {
        *self.counts.entry(why).or_default() += 1;
    }

    /// Dropped messages by reason.
    pub fn counts(&self) -> &BTreeMap<Dropped, u64> {
        &self.counts
    }

    /// Dropped messages in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// Whether raft-rs may step `m`, received from the authenticated peer `from`.
pub fn check(m: &Message, from: NodeId, raft: &Raft<LogCache>) -> Result<(), Dropped> {
    if m.from != from || from == 0 || m.to != raft.id {
        return Err(Dropped::ForgedSender);
    }
    let log = &raft.raft_log;
    let snapshot = m.get_snapshot().get_metadata();
    let numbers = [
        m.term,
        m.log_term,
        m.index,
        m.commit,
        m.commit_term,
        m.reject_hint,
        m.request_snapshot,
        snapshot.index,
        snapshot.term,
    ];
    let entries = m.entries.iter().flat_map(|e| [e.index, e.term]);
    // Term 0 marks raft-rs's local messages (it skips its term checks for
    // them); every message it sends to a peer carries a term.
    if numbers
        .into_iter()
        .chain(entries)
        .any(|n| n > MESSAGE_NUMBER_MAX)
        || m.term == 0
        || m.term > raft.term.saturating_add(TERM_JUMP_MAX)
    {
        return Err(Dropped::OutOfRange);
    }
    let from_leader = matches!(
        m.get_msg_type(),
        MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
    );
    // One term has one leader: another member claiming to lead the term this
    // node already follows someone in is lying. (A member that claims a
    // higher term can still start an election: Raft tolerates crashes, not
    // lies, and admission is what keeps liars out.)
    if from_leader && m.term == raft.term && raft.leader_id != 0 && raft.leader_id != m.from {
        return Err(Dropped::NotFromLeader);
    }
    match m.get_msg_type() {
        MessageType::MsgHup
        | MessageType::MsgBeat
        | MessageType::MsgPropose
        | MessageType::MsgUnreachable
        | MessageType::MsgSnapStatus
        | MessageType::MsgCheckQuorum
        | MessageType::MsgTransferLeader
        | MessageType::MsgReadIndex
        | MessageType::MsgReadIndexResp => Err(Dropped::LocalOnly),
        // A leader's heartbeat carries min(the follower's match, commit),
        // which the follower has.
        MessageType::MsgHeartbeat if m.commit > log.last_index() => Err(Dropped::CommitPastLog),
        MessageType::MsgAppend => check_append(m, raft),
        // A follower acknowledges only entries the leader sent it.
        MessageType::MsgAppendResponse if !m.reject && m.index > log.last_index() => {
            Err(Dropped::AckPastLog)
        }
        // Only the current leader installs state or hands leadership over.
        MessageType::MsgSnapshot | MessageType::MsgTimeoutNow
            if m.from != raft.leader_id || m.term != raft.term =>
        {
            Err(Dropped::NotFromLeader)
        }
        MessageType::MsgSnapshot if !m.has_snapshot() => Err(Dropped::BadEntries),
        _ => Ok(()),
    }
}

/// An append's entries follow its index one by one, their terms never fall and
/// lie between the previous entry's term and the message's; and an honest
/// leader never contradicts what is committed here.
fn check_append(m: &Message, raft: &Raft<LogCache>) -> Result<(), Dropped> {
    let log = &raft.raft_log;
    let mut term = m.log_term;
    for (i, e) in m.entries.iter().enumerate() {
        let expected = m
            .index
            .checked_add(1 + i as u64)
            .ok_or(Dropped::BadEntries)?;
        if e.index != expected || e.term < term || e.term > m.term {
            return Err(Dropped::BadEntries);
        }
        term = e.term;
    }
    if m.log_term > m.term {
        return Err(Dropped::BadEntries);
    }
    if m.index < log.committed {
        // raft-rs answers with its commit index and appends nothing.
        return Ok(());
    }
    // The leader's log holds every committed entry with its term (Leader
    // Completeness), and terms never fall along a log: so its term at any index
    // from our commit on is at least our term at the commit.
    let committed_term = log.term(log.committed).unwrap_or(0);
    if m.log_term < committed_term {
        return Err(Dropped::RewritesCommitted);
    }
    Ok(())
}
