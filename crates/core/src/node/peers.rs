//! What peers send a node, and how its proposals travel: raft-rs messages
//! (checked by `guard` first), proposals forwarded to the leader (one hop, from
//! their origin only), joins (a join token, in a cluster with users) and
//! leaves (for oneself only).

use super::*;

impl Node {
    pub(super) fn announce(&mut self, out: &mut Vec<Output>) {
        if let Some(via) = self.join_via {
            if !self.is_member(self.cfg.id) {
                let msg = PeerMessage::Announce {
                    node: self.cfg.id,
                    info: self.cfg.info.clone(),
                    join_token: self.cfg.join_token.clone(),
                };
                out.push(Output::Send { to: via, msg });
            }
        }
    }

    pub(super) fn is_member(&self, node: NodeId) -> bool {
        let cs = self.raw.store().conf_state();
        cs.voters.contains(&node) || cs.learners.contains(&node)
    }

    pub(super) fn on_peer(&mut self, from: NodeId, msg: PeerMessage, out: &mut Vec<Output>) {
        match msg {
            PeerMessage::Raft(bytes) => {
                let Ok(m) = Message::parse_from_bytes(&bytes) else {
                    self.guard.count(guard::Dropped::Malformed);
                    return;
                };
                // Who may speak Raft at all is decided by admission at the
                // network layer (the allow-list from the membership): a member
                // this node does not know yet, e.g. a leader added while it was
                // down, must be heard. What it says must be something an honest
                // peer can say (`guard`): raft-rs panics on some forgeries.
                // Proposals travel as `Forward`, never as raft-rs messages.
                if let Err(why) = guard::check(&m, from, &self.raw.raft) {
                    self.guard.count(why);
                    return;
                }
                if m.from == self.raw.raft.leader_id && m.term == self.raw.raft.term {
                    self.last_quorum_ms = Some(self.now_ms);
                }
                // Stale terms and unknown peers are raft-rs's to ignore; its errors
                // here are never fatal.
                let _ = self.raw.step(m);
            }
            PeerMessage::Forward {
                id,
                origin,
                user,
                command,
            } => {
                if origin != from {
                    // Whoever forwards a proposal is its proposer: nobody
                    // speaks for another node.
                    self.guard.count(guard::Dropped::ForgedOrigin);
                } else if !self.state.nodes.contains_key(&origin) {
                    // Only members vouch for users and report for themselves.
                    self.guard.count(guard::Dropped::NotAllowed);
                } else if !self.is_leader() {
                    out.push(Output::Send {
                        to: origin,
                        msg: PeerMessage::Refused {
                            id,
                            reason: "not the leader".into(),
                            retry: true,
                        },
                    });
                } else {
                    self.propose(id, origin, user, command, out);
                }
            }
            PeerMessage::Refused { id, reason, retry } => {
                if self.pending.remove(&id).is_some() {
                    let err = if retry {
                        NodeError::NoLeader
                    } else {
                        NodeError::Refused(reason)
                    };
                    out.push(Output::Reply {
                        id,
                        result: Err(err),
                    });
                }
            }
            PeerMessage::Announce {
                node,
                info,
                join_token,
            } => self.on_announce(node, info, join_token, out),
            // A node leaves for itself only, and asks the leader directly.
            PeerMessage::Leave { node } if node == from && self.is_leader() => {
                self.on_leave(node, out)
            }
            PeerMessage::Leave { .. } => self.guard.count(guard::Dropped::NotAllowed),
            PeerMessage::Removed => {
                if from == self.raw.raft.leader_id || !self.is_member(self.cfg.id) {
                    self.left(out);
                }
            }
        }
    }

    pub(super) fn on_announce(
        &mut self,
        node: NodeId,
        info: NodeInfo,
        join_token: Option<String>,
        out: &mut Vec<Output>,
    ) {
        if node == 0 || self.is_member(node) {
            return;
        }
        if self.state.is_removed(node) {
            // Removed by an admin: only an approval lets it back.
            self.guard.count(guard::Dropped::NotAllowed);
            return;
        }
        if self.is_leader() {
            // A cluster with users admits only nodes an admin let in: with a
            // join token, or approved by id.
            let token = join_token
                .as_deref()
                .and_then(|t| self.state.live_join_token(t, self.now_ms));
            let approved = self.state.approved_nodes.contains(&node);
            if self.state.secured() && token.is_none() && !approved {
                self.guard.count(guard::Dropped::NotAllowed);
                return;
            }
            if self.raw.raft.has_pending_conf() {
                return; // The joiner repeats its announcement.
            }
            let request = JoinRequest {
                info,
                join_token: token,
            };
            let context = codec::encode(&request).unwrap_or_default();
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![single(node, ConfChangeType::AddLearnerNode)].into());
            cc.context = context.into();
            self.last_seen.insert(node, self.now_ms);
            let _ = self.raw.propose_conf_change(Vec::new(), cc);
        } else if self.raw.raft.leader_id != 0 {
            out.push(Output::Send {
                to: self.raw.raft.leader_id,
                msg: PeerMessage::Announce {
                    node,
                    info,
                    join_token,
                },
            });
        }
    }

    /// This node is out of the membership: answer its leave request.
    pub(super) fn left(&mut self, out: &mut Vec<Output>) {
        if let Some(id) = self.leaving.take() {
            if self.pending.remove(&id).is_some() {
                out.push(Output::Reply {
                    id,
                    result: Ok(Reply::Ok),
                });
            }
        }
    }

    /// Removes `node` from the membership (on the leader; forwarded otherwise).
    pub(super) fn on_leave(&mut self, node: NodeId, out: &mut Vec<Output>) {
        if !self.is_member(node) {
            return;
        }
        if self.is_leader() {
            // The leaving node asks again on its next tick if this fails.
            self.remove_member(node);
        } else if self.raw.raft.leader_id != 0 {
            out.push(Output::Send {
                to: self.raw.raft.leader_id,
                msg: PeerMessage::Leave { node },
            });
        }
    }

    /// On the leader: proposes taking `node` out of the Raft membership (one
    /// change at a time). A leader does not remove itself: it hands leadership
    /// to another voter, which removes it on its own next tick.
    pub(super) fn remove_member(&mut self, node: NodeId) {
        if self.raw.raft.has_pending_conf() {
            return;
        }
        if node == self.cfg.id {
            let cs = self.raw.store().conf_state().clone();
            if let Some(next) = cs.voters.iter().copied().filter(|v| *v != node).min() {
                self.raw.transfer_leader(next);
            }
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single(node, ConfChangeType::RemoveNode)].into());
        let _ = self.raw.propose_conf_change(Vec::new(), cc);
    }

    /// Proposes on the leader, forwards elsewhere, answers when neither works.
    pub(super) fn propose(
        &mut self,
        id: ProposalId,
        origin: NodeId,
        user: Option<String>,
        command: Command,
        out: &mut Vec<Output>,
    ) {
        let fail =
            |out: &mut Vec<Output>, pending: &mut BTreeMap<ProposalId, u64>, err: NodeError| {
                if origin == self.cfg.id {
                    if pending.remove(&id).is_some() {
                        out.push(Output::Reply {
                            id,
                            result: Err(err),
                        });
                    }
                } else {
                    out.push(Output::Send {
                        to: origin,
                        msg: PeerMessage::Refused {
                            id,
                            reason: err.to_string(),
                            retry: err == NodeError::NoLeader,
                        },
                    });
                }
            };
        if self.is_leader() {
            let envelope = Envelope {
                version: COMMAND_VERSION,
                id,
                time_ms: self.now_ms,
                proposer: origin,
                leader: self.cfg.id,
                user,
                command,
            };
            let data = match codec::encode(&envelope) {
                Ok(d) => d,
                Err(e) => return fail(out, &mut self.pending, NodeError::Refused(e.to_string())),
            };
            if let Err(e) = self.raw.propose(Vec::new(), data) {
                fail(out, &mut self.pending, NodeError::Refused(e.to_string()));
            }
        } else if self.raw.raft.leader_id != 0 {
            let leader = self.raw.raft.leader_id;
            out.push(Output::Send {
                to: leader,
                msg: PeerMessage::Forward {
                    id,
                    origin,
                    user,
                    command,
                },
            });
        } else {
            fail(out, &mut self.pending, NodeError::NoLeader);
        }
    }

    pub(super) fn internal_id(&mut self) -> ProposalId {
        self.internal_seq += 1;
        ProposalId(
            (1u128 << 127)
                | (u128::from(self.cfg.id) << 64)
                | u128::from(self.internal_seq)
                | (u128::from(self.raw.raft.term) << 32),
        )
    }
}
