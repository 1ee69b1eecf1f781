//! In-process clusters of 1, 3 and 5 nodes agreeing through Raft.

mod common;

use common::{three, Cluster};
use resolute_core::command::{Command, MetricKind, MetricRecord, TrialOutcome};
use resolute_core::node::Effect;
use resolute_core::state::{ExperimentState, TrialState};
use resolute_core::{Input, NodeConfig, NodeError, NodeId, Reply};

const EXPERIMENT: &str = "name: t
hyperparameters:
  lr: {type: double, minval: 0.001, maxval: 0.1}
searcher: {name: random, metric: loss, max_trials: 3, max_concurrent_trials: 3, time_metric: batches, max_time: 100}
reproducibility: {experiment_seed: 5}
";

fn create() -> Command {
    Command::ExperimentCreated {
        config_yaml: EXPERIMENT.to_string(),
        overrides: Vec::new(),
        owner: "alice".into(),
        model_digest: "d".into(),
        default_seed: 1,
    }
}

#[test]
fn a_single_node_bootstraps_and_runs_an_experiment() {
    let mut c = Cluster::new(1);
    c.bootstrap(1, "a");
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    let pid = c.propose_on(1, create());
    c.until(2_000, "reply", |c| c.replies.contains_key(&pid));
    assert_eq!(
        c.replies[&pid],
        Ok(Reply::ExperimentCreated { experiment: 1 })
    );
    let state = c.members[&1].node.state();
    assert_eq!(
        state.trials.len(),
        3,
        "the searcher's trials were created on apply"
    );
    // Node 1 has 2 slots: two trials start here, the third waits.
    let started = c
        .effects
        .iter()
        .filter(|(n, e)| *n == 1 && matches!(e, Effect::StartTrial(_)))
        .count();
    assert_eq!(started, 2);
}

#[test]
fn three_nodes_form_a_cluster_and_agree() {
    let mut c = three(2);
    let pid = c.propose_on(3, create());
    c.until(5_000, "reply on the follower", |c| {
        c.replies.contains_key(&pid)
    });
    assert_eq!(
        c.replies[&pid],
        Ok(Reply::ExperimentCreated { experiment: 1 })
    );
    c.until(5_000, "converged", |c| c.converged());
    for m in c.members.values() {
        assert_eq!(m.node.state().experiments.len(), 1);
    }
}

#[test]
fn five_nodes_keep_three_voters_and_learners_forward() {
    let mut c = three(3);
    c.join(4, "a", 2);
    c.join(5, "b", 3);
    c.until(20_000, "learners", |c| {
        c.members[&1].node.membership().1.len() == 2 && c.converged()
    });
    assert_eq!(c.voters(1).len(), 3, "voters stay at the configured 3");
    let pid = c.propose_on(5, create());
    c.until(5_000, "learner's proposal answered", |c| {
        c.replies.contains_key(&pid)
    });
    assert!(matches!(
        c.replies[&pid],
        Ok(Reply::ExperimentCreated { .. })
    ));
    c.until(5_000, "converged", |c| c.converged());
}

#[test]
fn voters_spread_to_a_site_that_joins_later() {
    // The first nodes to join become the voters: two of site a, one of b.
    let mut c = Cluster::new(11);
    c.bootstrap(1, "a");
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    c.join(2, "a", 1);
    c.until(20_000, "two voters", |c| c.voters(1).len() == 2);
    c.join(3, "b", 1);
    c.until(20_000, "three voters", |c| {
        c.voters(1).len() == 3 && c.converged()
    });
    // A node of site c joins: one of a's voters (not the leader) hands it
    // its vote, so losing any one site keeps a quorum.
    c.join(4, "c", 1);
    c.until(20_000, "a voter on each site", |c| {
        let mut v = c.voters(1);
        v.sort();
        v == vec![1, 3, 4] && c.converged()
    });
    assert_eq!(c.members[&1].node.membership().1, vec![2], "2 is a learner");
    // And it stays so.
    c.run(10_000);
    let mut v = c.voters(1);
    v.sort();
    assert_eq!(v, vec![1, 3, 4]);
}

#[test]
fn leader_failover_and_exactly_once_submission() {
    let mut c = three(4);
    let old = c.leader().expect("leader");
    let follower = if old == 1 { 2 } else { 1 };
    // The proposal reaches the leader, which crashes before anyone answers.
    let pid = c.propose_on(follower, create());
    c.run(30);
    c.crash(old);
    c.until(20_000, "new leader", |c| {
        c.leader().is_some_and(|l| l != old)
    });
    // The client retries with the same id through another node.
    let other = [1, 2, 3]
        .into_iter()
        .find(|n| *n != old && *n != follower)
        .expect("third node");
    c.repropose(other, pid, create());
    c.until(10_000, "retry answered", |c| {
        c.replies.get(&pid).is_some_and(|r| r.is_ok())
    });
    c.restart(old);
    c.until(20_000, "all converge", |c| c.converged());
    for m in c.members.values() {
        assert_eq!(
            m.node.state().experiments.len(),
            1,
            "applied exactly once on node {}",
            m.node.id()
        );
    }
}

#[test]
fn proposals_without_a_leader_fail_fast() {
    let mut c = three(5);
    // Isolate node 3 completely; it loses its leader.
    for n in [1, 2] {
        c.blocked.insert((3, n));
        c.blocked.insert((n, 3));
    }
    c.run(5_000);
    let pid = c.propose_on(3, create());
    c.run(6_000);
    let r = c.replies.get(&pid).cloned();
    assert!(
        matches!(r, Some(Err(NodeError::NoLeader | NodeError::Timeout))),
        "{r:?}"
    );
}

#[test]
fn a_lagging_learner_catches_up_by_snapshot() {
    let mut c = common::Cluster::new(6);
    let mut cfg = NodeConfig::new(1, common::info("a", 2));
    cfg.snapshot_entries = 20;
    c.add(cfg, true);
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    for _ in 0..100 {
        c.propose_on(1, Command::Noop);
        c.run(10);
    }
    c.until(5_000, "applied", |c| c.members[&1].node.applied() >= 100);
    assert!(c.members[&1].node.snapshot_index() >= 80);
    let mut cfg = NodeConfig::new(2, common::info("b", 2));
    cfg.snapshot_entries = 20;
    c.join_cfg(cfg, 1);
    c.until(20_000, "learner caught up", |c| c.converged());
    assert!(
        c.members[&2].node.snapshot_index() > 0,
        "caught up from a snapshot"
    );
}

#[test]
fn a_voter_whose_lease_expires_is_replaced() {
    let mut c = three(7);
    c.join(4, "d", 1);
    c.until(20_000, "learner", |c| {
        c.members[&1].node.membership().1 == vec![4]
    });
    let leader = c.leader().expect("leader");
    let victim = [1, 2, 3]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    c.crash(victim);
    c.until(30_000, "replaced", |c| {
        let mut v = c.voters(leader);
        v.sort();
        !v.contains(&victim) && v.contains(&4) && v.len() == 3
    });
    c.until(10_000, "lost", |c| {
        c.members[&leader]
            .node
            .state()
            .nodes
            .get(&victim)
            .is_some_and(|n| n.state == resolute_core::state::NodeState::Lost)
    });
}

#[test]
fn a_stale_incarnation_cannot_report() {
    let mut c = three(8);
    let pid = c.propose_on(1, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    c.until(5_000, "converged", |c| c.converged());
    let leader = c.leader().expect("leader");
    let (trial, t) = {
        let s = c.members[&leader].node.state();
        let (id, t) = s
            .trials
            .iter()
            .find(|(_, t)| matches!(t.state, TrialState::Assigned { .. }))
            .expect("assigned");
        (*id, t.clone())
    };
    let TrialState::Assigned { node } = t.state else {
        unreachable!()
    };
    let old = t.incarnation;
    // The node running it is lost: the trial is requeued and placed again.
    let lost = c.propose_on(leader, Command::NodeLost { node });
    c.until(5_000, "lost", |c| c.replies.contains_key(&lost));
    c.until(5_000, "reassigned", |c| {
        c.members[&leader].node.state().trials[&trial].incarnation > old
    });
    let stale = c.propose_on(
        leader,
        Command::Metrics {
            records: vec![MetricRecord {
                trial,
                incarnation: old,
                kind: MetricKind::Validation,
                steps_completed: 100,
                metrics: Default::default(),
            }],
        },
    );
    c.until(5_000, "answer", |c| c.replies.contains_key(&stale));
    assert!(
        matches!(&c.replies[&stale], Ok(Reply::Rejected { reason }) if reason.contains("stale")),
        "{:?}",
        c.replies[&stale]
    );
    let exit = c.propose_on(
        leader,
        Command::TrialExited {
            trial,
            incarnation: old,
            outcome: TrialOutcome::Completed,
        },
    );
    c.until(5_000, "answer", |c| c.replies.contains_key(&exit));
    assert!(matches!(&c.replies[&exit], Ok(Reply::Rejected { .. })));
    assert_eq!(c.members[&leader].node.state().stale_reports, 2);
}

#[test]
fn trials_run_to_completion_and_the_experiment_ends() {
    let mut c = three(9);
    let pid = c.propose_on(2, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    c.until(5_000, "converged", |c| c.converged());
    // Play the trial runners: every started trial reports a validation and completes.
    for _ in 0..20 {
        let starts: Vec<(u64, u64, u64)> = c
            .effects
            .drain(..)
            .filter_map(|(n, e)| match e {
                Effect::StartTrial(s) => Some((n, s.trial, s.incarnation)),
                _ => None,
            })
            .collect();
        for (node, trial, incarnation) in starts {
            let mut metrics = std::collections::BTreeMap::new();
            metrics.insert("loss".to_string(), resolute_types::Value::Float(0.5));
            metrics.insert("batches".to_string(), resolute_types::Value::Int(100));
            c.propose_on(
                node,
                Command::Metrics {
                    records: vec![MetricRecord {
                        trial,
                        incarnation,
                        kind: MetricKind::Validation,
                        steps_completed: 100,
                        metrics,
                    }],
                },
            );
            c.run(50);
            c.propose_on(
                node,
                Command::TrialExited {
                    trial,
                    incarnation,
                    outcome: TrialOutcome::Completed,
                },
            );
            c.run(50);
        }
        c.run(200);
    }
    c.until(10_000, "converged", |c| c.converged());
    let s = c.members[&1].node.state();
    assert_eq!(
        s.experiments[&1].state,
        ExperimentState::Completed,
        "{:?}",
        s.trials
    );
    assert!(s
        .trials
        .values()
        .all(|t| matches!(t.state, TrialState::Done(TrialOutcome::Completed))));
}

#[test]
fn a_full_restart_from_disk_keeps_every_state() {
    let mut c = Cluster::new(10).durable("restart");
    c.bootstrap(1, "a");
    c.until(5_000, "leader", |c| c.leader() == Some(1));
    c.join(2, "b", 1);
    c.join(3, "c", 1);
    c.until(20_000, "three voters", |c| {
        c.voters(1).len() == 3 && c.converged()
    });
    let pid = c.propose_on(2, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    for _ in 0..30 {
        c.propose_on(3, Command::Noop);
    }
    c.until(10_000, "converged", |c| c.converged());
    let before = c.digests();
    for id in [1, 2, 3] {
        c.crash(id);
    }
    for id in [1, 2, 3] {
        c.restart(id);
    }
    c.until(30_000, "re-elected and replayed", |c| {
        c.leader().is_some() && c.converged()
    });
    let after = c.digests();
    assert_eq!(before, after, "every state digest survives a full restart");
}

#[test]
fn lossy_links_still_converge() {
    let mut c = three(11);
    c.drop_per_mille = 100;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(c.propose_on(1 + i % 3, Command::Noop));
        c.run(50);
    }
    c.drop_per_mille = 0;
    c.until(20_000, "converged", |c| c.converged());
    // Every proposal was answered: applied, or failed so the client can retry.
    c.run(6_000);
    assert!(
        ids.iter().all(|id| c.replies.contains_key(id)),
        "never silence"
    );
}

#[test]
fn an_isolated_node_fences_itself() {
    let mut c = three(12);
    let pid = c.propose_on(1, create());
    c.until(5_000, "created", |c| c.replies.contains_key(&pid));
    c.until(5_000, "converged", |c| c.converged());
    let leader = c.leader().expect("leader");
    let with_trials = c.members[&leader]
        .node
        .state()
        .trials
        .values()
        .find_map(|t| match t.state {
            TrialState::Assigned { node } if node != leader => Some(node),
            _ => None,
        })
        .expect("a follower runs a trial");
    for n in [1, 2, 3] {
        if n != with_trials {
            c.blocked.insert((with_trials, n));
            c.blocked.insert((n, with_trials));
        }
    }
    c.effects.clear();
    c.run(6_000);
    assert!(
        c.effects
            .iter()
            .any(|(n, e)| *n == with_trials && *e == Effect::StopAllTrials),
        "the isolated node stopped its trials"
    );
    // Meanwhile the majority declared it lost and moved its trials.
    let s = c.members[&leader].node.state();
    assert!(s.trials.values().all(|t| !matches!(t.state, TrialState::Assigned { node } | TrialState::Running { node } if node == with_trials)));
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed: u64| {
        let mut c = three(seed);
        c.drop_per_mille = 50;
        for i in 0..10 {
            c.propose_on(1 + i % 3, create());
            c.run(100);
        }
        c.drop_per_mille = 0;
        c.run(5_000);
        (
            c.digests(),
            c.now_ms,
            c.members
                .values()
                .map(|m| (m.node.term(), m.node.applied()))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(run(21), run(21));
}

#[test]
fn many_seeds_of_crash_and_restart_converge() {
    for seed in 100..130 {
        let mut c = three(seed);
        c.drop_per_mille = 20;
        let mut pids = Vec::new();
        for i in 0..6u64 {
            pids.push(c.propose_on(1 + i % 3, create()));
            c.run(40);
            if i == 2 {
                let leader = c.leader().expect("leader");
                c.crash(leader);
                c.run(3_000);
                c.restart(leader);
            }
        }
        c.drop_per_mille = 0;
        c.until(30_000, "converged", |c| {
            c.leader().is_some() && c.converged()
        });
        c.run(6_000);
        assert!(
            pids.iter().all(|p| c.replies.contains_key(p)),
            "seed {seed}: every proposal answered"
        );
        let s = c.members[&1].node.state();
        let applied_ok = pids
            .iter()
            .filter(|p| matches!(c.replies[p], Ok(Reply::ExperimentCreated { .. })))
            .count();
        assert!(
            s.experiments.len() >= applied_ok,
            "seed {seed}: an acknowledged experiment was lost"
        );
    }
}

#[test]
fn garbage_and_strangers_on_the_wire_never_panic() {
    use resolute_core::{Input, PeerMessage};
    let mut c = three(13);
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..3000u64 {
        let len = (next() % 64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let from = if i % 2 == 0 { 99 } else { 1 + next() % 3 };
        let to = 1 + next() % 3;
        let msg = match i % 3 {
            0 => PeerMessage::Raft(bytes),
            1 => PeerMessage::Refused {
                id: resolute_core::ProposalId(u128::from(next())),
                reason: "x".into(),
                retry: false,
            },
            _ => PeerMessage::Announce {
                node: 0,
                info: common::info("z", 1),
                join_token: None,
            },
        };
        c.input(to, Input::Peer { from, msg });
    }
    // A message whose claimed sender differs from the transport's is dropped, and
    // a proposal smuggled in as a raft-rs message too.
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    m.from = 2;
    m.to = 1;
    m.term = 1000;
    let bytes = protobuf::Message::write_to_bytes(&m).expect("encode");
    let term = c.members[&1].node.term();
    c.input(
        1,
        Input::Peer {
            from: 99,
            msg: PeerMessage::Raft(bytes),
        },
    );
    let mut p = raft::eraftpb::Message::default();
    p.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
    p.from = 2;
    let bytes = protobuf::Message::write_to_bytes(&p).expect("encode");
    c.input(
        1,
        Input::Peer {
            from: 2,
            msg: PeerMessage::Raft(bytes),
        },
    );
    assert_eq!(
        c.members[&1].node.term(),
        term,
        "a spoofed sender cannot bump the term"
    );
    c.until(10_000, "still converges", |c| {
        c.leader().is_some() && c.converged()
    });
}

#[test]
fn a_node_leaves_gracefully_and_a_learner_takes_its_vote() {
    for leaving_leader in [false, true] {
        let mut c = three(14);
        c.join(4, "d", 1);
        c.until(20_000, "learner", |c| {
            c.members[&1].node.membership().1 == vec![4]
        });
        let leader = c.leader().expect("leader");
        let who = if leaving_leader {
            leader
        } else {
            [1, 2, 3]
                .into_iter()
                .find(|n| *n != leader)
                .expect("follower")
        };
        let pid = resolute_core::ProposalId(9_999);
        c.input(who, resolute_core::Input::Leave { id: pid });
        c.until(20_000, "left", |c| {
            c.replies.get(&pid) == Some(&Ok(Reply::Ok))
        });
        let now = c.leader().expect("a leader remains");
        c.until(20_000, "replaced", |c| {
            let mut v = c.voters(now);
            v.sort();
            !v.contains(&who) && v.contains(&4) && v.len() == 3
        });
        assert!(
            !c.members[&now].node.state().nodes.contains_key(&who),
            "the leaver is gone from the state"
        );
    }
}

/// The tick at which the leader's state marks `victim` lost, after `start`.
fn lost_after_ms(c: &mut Cluster, leader: NodeId, victim: NodeId) -> u64 {
    let start = c.now_ms;
    c.until(10_000, "lost", |c| {
        c.members[&leader]
            .node
            .state()
            .nodes
            .get(&victim)
            .is_some_and(|n| n.state == resolute_core::state::NodeState::Lost)
    });
    c.now_ms - start
}

#[test]
fn a_crashed_node_whose_connections_close_is_lost_before_its_lease_ends() {
    let mut c = three(11);
    let leader = c.leader().expect("leader");
    let victim = [1, 2, 3]
        .into_iter()
        .find(|n| *n != leader)
        .expect("follower");
    c.crash(victim);
    // Its kernel resets its connections: every peer hears of it at once.
    for n in [1, 2, 3].into_iter().filter(|n| *n != victim) {
        c.input(n, Input::Disconnected { node: victim });
    }
    let ms = lost_after_ms(&mut c, leader, victim);
    let grace = resolute_core::node::DISCONNECT_GRACE_DEFAULT_MS;
    let lease = resolute_core::node::LEASE_TIMEOUT_DEFAULT_MS;
    assert!(ms > grace / 2 && ms < lease - 500, "lost after {ms} ms");
}

#[test]
fn a_silent_node_is_lost_only_when_its_lease_ends() {
    let mut c = three(12);
    let leader = c.leader().expect("leader");
    let victim = [1, 2, 3]
        .into_iter()
        .find(|n| *n != leader)
        .expect("follower");
    c.crash(victim);
    let ms = lost_after_ms(&mut c, leader, victim);
    let lease = resolute_core::node::LEASE_TIMEOUT_DEFAULT_MS;
    assert!(ms >= lease - 200, "lost after {ms} ms");
}

#[test]
fn a_node_that_reconnects_within_the_grace_stays_alive() {
    let mut c = three(13);
    let leader = c.leader().expect("leader");
    let blip = [1, 2, 3]
        .into_iter()
        .find(|n| *n != leader)
        .expect("follower");
    // The connection drops and comes back: heartbeats go on (the harness keeps
    // gossiping between live nodes), so the disconnect is outweighed.
    c.input(leader, Input::Disconnected { node: blip });
    c.run(5_000);
    let state = c.members[&leader].node.state().nodes[&blip].state;
    assert_eq!(state, resolute_core::state::NodeState::Alive);
}

#[test]
fn a_crashed_leader_is_lost_soon_after_the_election_not_a_lease_later() {
    let mut c = three(14);
    let old = c.leader().expect("leader");
    c.crash(old);
    for n in [1, 2, 3].into_iter().filter(|n| *n != old) {
        c.input(n, Input::Disconnected { node: old });
    }
    let start = c.now_ms;
    c.until(10_000, "a new leader", |c| {
        c.leader().is_some_and(|l| l != old)
    });
    let elected_ms = c.now_ms - start;
    let leader = c.leader().expect("leader");
    let ms = elected_ms + lost_after_ms(&mut c, leader, old);
    let lease = resolute_core::node::LEASE_TIMEOUT_DEFAULT_MS;
    assert!(
        ms < elected_ms + lease / 2,
        "elected after {elected_ms} ms, lost after {ms} ms"
    );
}
