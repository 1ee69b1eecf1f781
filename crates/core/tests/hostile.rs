//! A member that lies: forged heartbeats, snapshots, leaves, reports and
//! forwards, and random and mutated wire frames. The target keeps running,
//! its state does not change, and the attempt is counted.

mod common;

use common::{three, Cluster};
use protobuf::Message as _;
use raft::eraftpb::{Entry, Message, MessageType, Snapshot};
use resolute_core::command::{
    Command, MetricKind, MetricRecord, NewToken, ProposalId, TrialOutcome, UserCommand,
};
use resolute_core::guard::Dropped;
use resolute_core::state::{ClusterState, TrialState};
use resolute_core::{Input, NodeConfig, NodeId, PeerMessage, Reply};
use resolute_types::codec;

fn create() -> Command {
    Command::ExperimentCreated {
        config_yaml: "hyperparameters: {lr: {type: double, minval: 0.001, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 2, max_length: {batches: 100}}
"
        .into(),
        overrides: Vec::new(),
        owner: "alice".into(),
        model_digest: String::new(),
        default_seed: 1,
    }
}

/// The leader and its two followers.
fn roles(c: &Cluster) -> (NodeId, NodeId, NodeId) {
    let leader = c.leader().expect("leader");
    let mut others = [1, 2, 3].into_iter().filter(|n| *n != leader);
    (leader, others.next().expect("f"), others.next().expect("x"))
}

fn raft(c: &Cluster, ty: MessageType, from: NodeId, to: NodeId) -> Message {
    let mut m = Message::default();
    m.set_msg_type(ty);
    m.from = from;
    m.to = to;
    m.term = c.members[&to].node.term();
    m
}

fn send_raft(c: &mut Cluster, from: NodeId, to: NodeId, m: &Message) {
    let bytes = m.write_to_bytes().expect("encode");
    c.input(
        to,
        Input::Peer {
            from,
            msg: PeerMessage::Raft(bytes),
        },
    );
}

fn dropped(c: &Cluster, node: NodeId, why: Dropped) -> u64 {
    c.members[&node]
        .node
        .dropped()
        .counts()
        .get(&why)
        .copied()
        .unwrap_or(0)
}

/// A trial placed on a node: its id, incarnation and node.
fn placed_trial(state: &ClusterState) -> (u64, u64, NodeId) {
    state
        .trials
        .iter()
        .find_map(|(id, t)| match t.state {
            TrialState::Assigned { node } | TrialState::Running { node } => {
                Some((*id, t.incarnation, node))
            }
            _ => None,
        })
        .expect("a placed trial")
}

/// A cluster running one experiment, every node with the same state.
fn busy(seed: u64) -> Cluster {
    let mut c = three(seed);
    let pid = c.propose_on(1, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    c.until(5_000, "placed", |c| {
        c.members[&1]
            .node
            .state()
            .trials
            .values()
            .any(|t| matches!(t.state, TrialState::Assigned { .. }))
    });
    c.until(5_000, "converged", |c| c.converged());
    c
}

#[test]
fn a_forged_heartbeat_past_the_log_is_dropped_and_counted() {
    let mut c = busy(21);
    let (_, f, x) = roles(&c);
    let before = c.digests();
    let committed = c.members[&f].node.committed();
    for term_bump in [0, 1] {
        let mut m = raft(&c, MessageType::MsgHeartbeat, x, f);
        m.term += term_bump;
        m.commit = 1_000_000_000;
        send_raft(&mut c, x, f, &m);
    }
    // Both are refused: the same term has a leader already, and the commit
    // index is past the log (raft-rs would panic on it).
    assert_eq!(
        dropped(&c, f, Dropped::NotFromLeader) + dropped(&c, f, Dropped::CommitPastLog),
        2
    );
    assert_eq!(c.members[&f].node.committed(), committed);
    assert_eq!(c.digests(), before, "nothing changed");
    c.run(2_000);
    assert!(c.converged());
}

#[test]
fn a_forged_snapshot_does_not_replace_the_state() {
    let mut c = busy(22);
    let (_, f, x) = roles(&c);
    let experiments = c.members[&f].node.state().experiments.len();
    assert_eq!(experiments, 1);
    let term = c.members[&f].node.term();
    for term_bump in [0, 5] {
        let mut m = raft(&c, MessageType::MsgSnapshot, x, f);
        m.term += term_bump;
        let mut snap = Snapshot {
            data: ClusterState::default().encode().into(),
            ..Default::default()
        };
        snap.mut_metadata().index = 1_000_000;
        snap.mut_metadata().term = m.term;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        m.set_snapshot(snap);
        send_raft(&mut c, x, f, &m);
    }
    assert_eq!(dropped(&c, f, Dropped::NotFromLeader), 2);
    assert_eq!(c.members[&f].node.term(), term);
    c.run(2_000);
    assert_eq!(c.members[&f].node.state().experiments.len(), experiments);
    assert!(c.converged());
}

#[test]
fn a_member_cannot_remove_another() {
    let mut c = busy(23);
    let (leader, f, x) = roles(&c);
    for to in [leader, f] {
        c.input(
            to,
            Input::Peer {
                from: x,
                msg: PeerMessage::Leave { node: f },
            },
        );
    }
    c.run(3_000);
    assert_eq!(
        dropped(&c, leader, Dropped::NotAllowed) + dropped(&c, f, Dropped::NotAllowed),
        2
    );
    let mut voters = c.voters(leader);
    voters.sort();
    assert_eq!(voters, vec![1, 2, 3], "nobody was removed");
}

#[test]
fn a_member_cannot_report_for_trials_or_nodes_it_is_not() {
    let mut c = busy(24);
    let leader = c.leader().expect("leader");
    let state = c.members[&leader].node.state();
    let (trial, incarnation, runs_on) = placed_trial(state);
    let liar = [1, 2, 3].into_iter().find(|n| *n != runs_on).expect("liar");
    let forbidden_before = state.forbidden;
    let forward = |id: u128, origin: NodeId, command: Command| PeerMessage::Forward {
        id: ProposalId(id),
        origin,
        user: None,
        command,
    };
    let lies = [
        Command::TrialExited {
            trial,
            incarnation,
            outcome: TrialOutcome::Errored {
                message: "forged".into(),
                exit_code: Some(1),
            },
        },
        Command::NodeLost { node: runs_on },
        Command::NodeCapacity {
            node: runs_on,
            slots: 0,
            stop_first: Vec::new(),
        },
        Command::NodeDisk {
            node: runs_on,
            low: Some(resolute_core::command::DiskLow {
                free_bytes: 0,
                low_water_bytes: 1,
            }),
        },
        Command::Metrics {
            records: vec![MetricRecord {
                trial,
                incarnation,
                kind: MetricKind::Validation,
                steps_completed: 100,
                metrics: [("loss".to_string(), resolute_types::Value::Float(-1e9))].into(),
            }],
        },
    ];
    for (i, lie) in lies.iter().enumerate() {
        let msg = forward(900 + i as u128, liar, lie.clone());
        c.input(leader, Input::Peer { from: liar, msg });
    }
    // And one that claims to come from the node the trial runs on.
    let msg = forward(999, runs_on, lies[0].clone());
    c.input(leader, Input::Peer { from: liar, msg });
    c.run(3_000);
    let state = c.members[&leader].node.state();
    let t = &state.trials[&trial];
    assert_eq!(t.incarnation, incarnation);
    assert!(
        matches!(
            t.state,
            TrialState::Assigned { .. } | TrialState::Running { .. }
        ),
        "{:?}",
        t.state
    );
    assert!(state.nodes[&runs_on].info.slots > 0, "capacity unchanged");
    assert!(state.nodes[&runs_on].disk_low.is_none(), "disk unchanged");
    assert_eq!(
        state.forbidden - forbidden_before,
        5,
        "four entries refused and one metric record dropped"
    );
    assert_eq!(dropped(&c, leader, Dropped::ForgedOrigin), 1);
    assert!(c.converged());
}

/// xorshift64: deterministic, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A value a forger would try: the edges and what is near the target's own.
fn edgy(r: &mut Rng, near: u64) -> u64 {
    match r.below(6) {
        0 => 0,
        1 => u64::MAX,
        2 => near.saturating_add(r.below(3)),
        3 => near.saturating_sub(r.below(3)),
        4 => r.next(),
        _ => near.wrapping_add(r.below(1000)),
    }
}

fn mutate_raft(r: &mut Rng, bytes: &[u8], c: &Cluster, to: NodeId) -> Vec<u8> {
    let Ok(mut m) = Message::parse_from_bytes(bytes) else {
        return bytes.to_vec();
    };
    let node = &c.members[&to].node;
    let (term, commit) = (node.term(), node.committed());
    for _ in 0..1 + r.below(3) {
        match r.below(10) {
            0 => m.term = edgy(r, term),
            1 => m.index = edgy(r, commit),
            2 => m.log_term = edgy(r, term),
            3 => m.commit = edgy(r, commit),
            4 => m.reject = !m.reject,
            5 => m.reject_hint = edgy(r, commit),
            6 => {
                let types = [
                    MessageType::MsgAppend,
                    MessageType::MsgAppendResponse,
                    MessageType::MsgHeartbeat,
                    MessageType::MsgHeartbeatResponse,
                    MessageType::MsgRequestVote,
                    MessageType::MsgRequestVoteResponse,
                    MessageType::MsgRequestPreVote,
                    MessageType::MsgRequestPreVoteResponse,
                    MessageType::MsgSnapshot,
                    MessageType::MsgTimeoutNow,
                    MessageType::MsgTransferLeader,
                    MessageType::MsgReadIndex,
                ];
                m.set_msg_type(types[r.below(types.len() as u64) as usize]);
            }
            7 => {
                let (index, term) = (edgy(r, commit), edgy(r, term));
                let data: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
                m.mut_entries().push(Entry {
                    index,
                    term,
                    data: data.into(),
                    ..Default::default()
                });
            }
            8 => {
                for e in m.mut_entries().iter_mut() {
                    if r.below(2) == 0 {
                        e.index = edgy(r, e.index);
                    } else {
                        e.term = edgy(r, e.term);
                    }
                }
            }
            _ => {
                let mut s = Snapshot::default();
                s.mut_metadata().index = edgy(r, commit);
                s.mut_metadata().term = edgy(r, term);
                s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
                s.data = (0..r.below(64))
                    .map(|_| r.next() as u8)
                    .collect::<Vec<u8>>()
                    .into();
                m.set_snapshot(s);
            }
        }
    }
    m.write_to_bytes().unwrap_or_default()
}

/// At least 100,000 frames per round, from the cluster's own traffic: raft-rs messages
/// with forged fields, bit-flipped encodings of every peer message, and
/// random bytes, each sent by a member to a member.
#[test]
fn random_and_mutated_wire_frames_never_panic_a_node() {
    // `RESOLUTE_FUZZ_ROUNDS` runs more rounds (other seeds) than CI's four.
    let rounds: u64 = std::env::var("RESOLUTE_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        storm(
            31 + round,
            0x5eed_1234_abcd_ef01 ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
    }
}

fn storm(cluster_seed: u64, rng_seed: u64) {
    const CASES: u64 = 100_000;
    let mut c = three(cluster_seed);
    c.tap = Some(Vec::new());
    let pid = c.propose_on(2, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    c.run(10_000);
    let traffic = c.tap.take().expect("tap");
    assert!(
        traffic.len() > 50,
        "some traffic to mutate: {}",
        traffic.len()
    );
    let mut r = Rng(rng_seed | 1);
    let mut decoded = 0u64;
    for case in 0..CASES {
        let (from, to, msg) = &traffic[r.below(traffic.len() as u64) as usize];
        let (from, to) = if r.below(4) == 0 {
            (1 + r.below(3), 1 + r.below(3))
        } else {
            (*from, *to)
        };
        let msg = match r.below(3) {
            0 => match msg {
                PeerMessage::Raft(bytes) => PeerMessage::Raft(mutate_raft(&mut r, bytes, &c, to)),
                other => other.clone(),
            },
            1 => {
                // Bit flips in the encoded frame; what still decodes is sent.
                let mut bytes = codec::encode(msg).expect("encode");
                for _ in 0..1 + r.below(4) {
                    let i = r.below(bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << r.below(8);
                }
                match codec::decode::<PeerMessage>(&bytes) {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            }
            _ => {
                let len = r.below(200) as usize;
                let bytes: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
                match codec::decode::<PeerMessage>(&bytes) {
                    Ok(m) => m,
                    Err(_) => PeerMessage::Raft(bytes),
                }
            }
        };
        decoded += 1;
        c.input(to, Input::Peer { from, msg });
        if case % 2_000 == 0 {
            c.run(200);
        }
    }
    assert!(decoded > CASES / 2, "most cases reached a node: {decoded}");
    assert!(c.members.values().all(|m| m.up), "every node still runs");
    let dropped: u64 = c.members.values().map(|m| m.node.dropped().total()).sum();
    assert!(dropped > 0, "forgeries were counted");
    // An honest proposal still works afterwards.
    c.run(5_000);
    let pid = c.propose_on(1, Command::Noop);
    c.until(20_000, "a proposal after the storm", |c| {
        matches!(c.replies.get(&pid), Some(Ok(Reply::Ok)))
    });
}

fn is_member(c: &Cluster, node: NodeId) -> bool {
    let (v, l) = c.members[&1].node.membership();
    v.contains(&node) || l.contains(&node)
}

fn token(id: &str, hash: String) -> NewToken {
    NewToken {
        id: id.into(),
        hash,
        expires_ms: None,
        label: String::new(),
    }
}

/// One node, leader of a cluster with one user, `admin`.
fn secured(seed: u64) -> Cluster {
    let mut c = Cluster::new(seed);
    c.bootstrap(1, "a");
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    let admin = Command::User(UserCommand::Bootstrap {
        admin: "admin".into(),
        token: token("a1", "argon2-hash".into()),
    });
    let pid = c.propose_on(1, admin);
    c.until(5_000, "users", |c| {
        c.replies.get(&pid) == Some(&Ok(Reply::Ok))
    });
    c
}

/// Proposes on node 1 as `user` and waits for the reply.
fn as_user(c: &mut Cluster, user: &str, command: Command) -> Reply {
    let pid = c.propose_as(1, user, command);
    c.until(10_000, "a reply", |c| c.replies.contains_key(&pid));
    c.replies[&pid].clone().expect("applied")
}

#[test]
fn an_approved_node_joins_and_a_removed_one_is_refused_everywhere() {
    let mut c = secured(43);
    // Nobody but a cluster admin approves.
    let r = as_user(&mut c, "nobody", Command::NodeApproved { node: 2 });
    assert!(matches!(r, Reply::Forbidden { .. }), "{r:?}");
    for node in [2, 3] {
        assert_eq!(
            as_user(&mut c, "admin", Command::NodeApproved { node }),
            Reply::Ok
        );
        c.join_cfg(NodeConfig::new(node, common::info("b", 1)), 1);
    }
    c.until(20_000, "approved nodes joined", |c| {
        is_member(c, 2) && is_member(c, 3) && c.converged()
    });
    assert!(
        c.members[&1].node.state().approved_nodes.is_empty(),
        "approvals are used up"
    );
    c.until(20_000, "three voters", |c| c.voters(1).len() == 3);
    // Nobody but a cluster admin removes.
    let r = as_user(&mut c, "nobody", Command::NodeRemoved { node: 3 });
    assert!(matches!(r, Reply::Forbidden { .. }), "{r:?}");
    assert_eq!(
        as_user(&mut c, "admin", Command::NodeRemoved { node: 3 }),
        Reply::Ok
    );
    c.until(20_000, "removed from the membership", |c| {
        [1, 2].iter().all(|n| {
            let (v, l) = c.members[n].node.membership();
            !v.contains(&3) && !l.contains(&3) && !c.members[n].node.state().nodes.contains_key(&3)
        })
    });
    // What it sends now is refused and counted: a forward, an announcement
    // (sent by hand: the node itself is stopped, so that it says nothing else).
    c.crash(3);
    let before = dropped(&c, 1, Dropped::NotAllowed);
    c.input(
        1,
        Input::Peer {
            from: 3,
            msg: PeerMessage::Forward {
                id: ProposalId(77),
                origin: 3,
                user: Some("admin".into()),
                command: Command::NodeRemoved { node: 2 },
            },
        },
    );
    c.input(
        1,
        Input::Peer {
            from: 3,
            msg: PeerMessage::Announce {
                node: 3,
                info: common::info("b", 1),
                join_token: None,
            },
        },
    );
    c.run(3_000);
    assert_eq!(dropped(&c, 1, Dropped::NotAllowed), before + 2);
    assert!(is_member(&c, 2) && !is_member(&c, 3));
    // Even a fresh join token does not bring a removed node back; an approval does.
    let secret = "ef".repeat(32);
    let hash = blake3::hash(secret.as_bytes()).to_hex().to_string();
    let join = Command::User(UserCommand::CreateJoinToken {
        token: token("2f", hash),
        uses: 1,
    });
    assert_eq!(as_user(&mut c, "admin", join), Reply::Ok);
    let mut back = NodeConfig::new(3, common::info("b", 1));
    back.join_token = Some(format!("rsj_2f_{secret}"));
    c.input(
        1,
        Input::Peer {
            from: 3,
            msg: PeerMessage::Announce {
                node: 3,
                info: back.info.clone(),
                join_token: back.join_token.clone(),
            },
        },
    );
    c.run(3_000);
    assert!(!is_member(&c, 3), "a removed node needs an approval");
    assert_eq!(
        as_user(&mut c, "admin", Command::NodeApproved { node: 3 }),
        Reply::Ok
    );
    c.input(
        1,
        Input::Peer {
            from: 3,
            msg: PeerMessage::Announce {
                node: 3,
                info: back.info,
                join_token: None,
            },
        },
    );
    c.until(10_000, "approved again", |c| is_member(c, 3));
}

#[test]
fn in_a_cluster_with_users_only_a_join_token_admits_a_node() {
    let mut c = secured(41);
    let secret = "ab".repeat(32);
    let hash = blake3::hash(secret.as_bytes()).to_hex().to_string();
    let join = Command::User(UserCommand::CreateJoinToken {
        token: token("1f", hash),
        uses: 1,
    });
    // Only a cluster admin makes one.
    let pid = c.propose_as(1, "nobody", join.clone());
    c.until(5_000, "refused", |c| c.replies.contains_key(&pid));
    assert!(matches!(c.replies[&pid], Ok(Reply::Forbidden { .. })));
    let pid = c.propose_as(1, "admin", join);
    c.until(5_000, "join token", |c| {
        c.replies.get(&pid) == Some(&Ok(Reply::Ok))
    });
    // Without a token, and with a wrong one: not admitted.
    c.join_cfg(NodeConfig::new(2, common::info("b", 1)), 1);
    let mut wrong = NodeConfig::new(3, common::info("c", 1));
    wrong.join_token = Some(format!("rsj_1f_{}", "cd".repeat(32)));
    c.join_cfg(wrong, 1);
    c.run(3_000);
    assert!(!is_member(&c, 2) && !is_member(&c, 3));
    assert!(dropped(&c, 1, Dropped::NotAllowed) >= 2);
    // With it: admitted, and the token is used up.
    let mut right = NodeConfig::new(4, common::info("d", 1));
    right.join_token = Some(format!("rsj_1f_{secret}"));
    c.join_cfg(right.clone(), 1);
    c.until(10_000, "admitted", |c| is_member(c, 4));
    c.run(1_000);
    assert_eq!(c.members[&1].node.state().join_tokens["1f"].uses_left, 0);
    right.id = 5;
    c.join_cfg(right, 1);
    c.run(3_000);
    assert!(!is_member(&c, 5), "a used-up token admits nobody");
}

#[test]
fn metric_records_past_the_limits_are_dropped_on_apply() {
    let mut c = busy(25);
    let leader = c.leader().expect("leader");
    let state = c.members[&leader].node.state();
    let (trial, incarnation, runs_on) = placed_trial(state);
    let record =
        |metrics: std::collections::BTreeMap<String, resolute_types::Value>| Command::Metrics {
            records: vec![MetricRecord {
                trial,
                incarnation,
                kind: MetricKind::Training,
                steps_completed: 1,
                metrics,
            }],
        };
    let many = (0..=resolute_core::command::METRIC_NAMES_PER_RECORD_MAX)
        .map(|i| (format!("m{i}"), resolute_types::Value::Int(1)))
        .collect();
    let long = [(
        "x".repeat(resolute_core::command::METRIC_NAME_BYTES_MAX + 1),
        resolute_types::Value::Int(1),
    )]
    .into();
    // What the leader's tracking store would have been given for the trial.
    let reports = |c: &Cluster| {
        c.tracks
            .iter()
            .filter(|(n, _)| *n == leader)
            .flat_map(|(_, b)| &b.reports)
            .filter(|r| r.record.trial == trial)
            .count()
    };
    let big = [(
        "notes".to_string(),
        resolute_types::Value::String("x".repeat(resolute_core::command::METRIC_RECORD_BYTES_MAX)),
    )]
    .into();
    let points_before = reports(&c);
    for oversized in [many, long, big] {
        // From the node the trial runs on, as its own report would come.
        let pid = c.propose_on(runs_on, record(oversized));
        c.until(10_000, "applied", |c| c.replies.contains_key(&pid));
        assert!(
            matches!(&c.replies[&pid], Ok(Reply::Rejected { reason }) if reason.contains("limits")),
            "{:?}",
            c.replies[&pid]
        );
    }
    assert_eq!(reports(&c), points_before);
}
