//! Three real `core::Node`s, each with a durable store (real fsync) and its own
//! libp2p swarm on 127.0.0.x: they form one Raft group through joins, a proposal
//! made on a follower is forwarded to the leader over the network, and all three
//! replicas end with the same state. The allow-list is fed from each node's Raft
//! membership, as the node daemon will do.

use std::collections::VecDeque;
use std::time::Duration;

use libp2p::Multiaddr;
use tokio::sync::{mpsc, oneshot};

use resolute_core::command::Command;
use resolute_core::{Input, Node, NodeConfig, NodeId, NodeInfo, Output, ProposalId, Reply};
use resolute_net::{spawn, NetConfig, NetEvent, NetHandle};
use resolute_storage::{DurableStore, LogStore};

const TICK_MS: u64 = 50;

/// What a test asks of a running node.
enum Ask {
    Input(Input),
    Digest(oneshot::Sender<(String, u64, Vec<NodeId>)>),
    Reply(ProposalId, oneshot::Sender<Option<Result<Reply, String>>>),
}

struct Running {
    id: NodeId,
    net: NetHandle,
    asks: mpsc::Sender<Ask>,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
}

/// The shell: ticks, network events and asks in; sends, writes and replies out.
async fn drive(
    mut node: Node,
    first: Vec<Output>,
    mut store: DurableStore,
    net: NetHandle,
    mut events: mpsc::Receiver<NetEvent>,
    mut asks: mpsc::Receiver<Ask>,
) {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    let mut replies = std::collections::BTreeMap::new();
    let mut members: Vec<NodeId> = Vec::new();
    let mut initial = Some(first);
    loop {
        let mut work: VecDeque<Output> = VecDeque::new();
        if let Some(first) = initial.take() {
            work.extend(first);
        }
        let input = tokio::select! {
            _ = tick.tick() => Input::Tick,
            e = events.recv() => match e {
                Some(NetEvent::Message { from, msg }) => Input::Peer { from, msg },
                Some(NetEvent::Connected(n)) => Input::Heartbeat { node: n },
                Some(_) => continue,
                None => return,
            },
            a = asks.recv() => match a {
                Some(Ask::Input(i)) => i,
                Some(Ask::Digest(reply)) => {
                    let (v, l) = node.membership();
                    let mut all = [v, l].concat();
                    all.sort();
                    let _ = reply.send((node.state().digest(), node.applied(), all));
                    continue;
                }
                Some(Ask::Reply(id, reply)) => {
                    let _ = reply.send(replies.get(&id).cloned());
                    continue;
                }
                None => return,
            },
        };
        let now = start.elapsed().as_millis() as u64;
        // Everyone connected counts as alive (the daemon uses gossip for this).
        if matches!(input, Input::Tick) {
            if let Ok(info) = net.info().await {
                for n in info.connected {
                    node.step(now, Input::Heartbeat { node: n });
                }
            }
        }
        work.extend(node.step(now, input));
        while let Some(out) = work.pop_front() {
            match out {
                Output::Send { to, msg } => {
                    net.send_nowait(to, msg);
                }
                Output::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } => {
                    if let Some(s) = &snapshot {
                        store
                            .install_snapshot(s, &hard_state.unwrap_or_default())
                            .expect("snapshot");
                    }
                    store.append(&entries, hard_state.as_ref()).expect("append");
                    store.sync().expect("fsync");
                    if seq > 0 {
                        work.extend(node.step(now, Input::Persisted { seq }));
                    }
                }
                Output::Reply { id, result } => {
                    replies.insert(id, result.map_err(|e| e.to_string()));
                }
                Output::Effect(_) | Output::Track(_) => {}
            }
        }
        // The allow-list follows the Raft membership.
        let (v, l) = node.membership();
        let mut now_members = [v, l].concat();
        now_members.sort();
        if now_members != members && !now_members.is_empty() {
            members = now_members.clone();
            let _ = net.set_members(now_members).await;
        }
    }
}

async fn start(host: u8, bootstrap: bool) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen: Multiaddr = format!("/ip4/127.0.0.{host}/tcp/0").parse().expect("addr");
    let (net, events, _task) = spawn(NetConfig::new(dir.path().to_path_buf(), listen))
        .await
        .expect("swarm");
    let id = net.node_id;
    let addr = net.info().await.expect("info").listen[0].clone();
    let info = NodeInfo {
        site: format!("site-{host}"),
        slots: 2,
        ..Default::default()
    };
    let mut cfg = NodeConfig::new(id, info);
    cfg.tick_ms = TICK_MS;
    let (store, recovered) = DurableStore::open(&dir.path().join("log")).expect("store");
    let (node, first) = Node::new(cfg, &recovered, bootstrap).expect("node");
    let (ask_tx, ask_rx) = mpsc::channel(64);
    tokio::spawn(drive(node, first, store, net.clone(), events, ask_rx));
    Running {
        id,
        net,
        asks: ask_tx,
        addr,
        _dir: dir,
    }
}

async fn digest(n: &Running) -> (String, u64, Vec<NodeId>) {
    let (tx, rx) = oneshot::channel();
    n.asks.send(Ask::Digest(tx)).await.expect("ask");
    rx.await.expect("digest")
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_raft_group_over_libp2p_and_agree() {
    let a = start(40, true).await;
    let b = start(41, false).await;
    let c = start(42, false).await;
    let mut want = vec![a.id, b.id, c.id];
    want.sort();
    for n in [&b, &c] {
        n.net.dial(a.addr.clone()).await.expect("dial a");
        n.asks
            .send(Ask::Input(Input::Join { via: a.id }))
            .await
            .expect("join");
    }
    c.net.dial(b.addr.clone()).await.expect("dial b");
    wait_for("all three are members everywhere", async || {
        let mut ok = true;
        for n in [&a, &b, &c] {
            ok &= digest(n).await.2 == want;
        }
        ok
    })
    .await;
    // A proposal on c (not the leader at first) goes through the leader.
    let id = ProposalId(42);
    let command = Command::ExperimentCreated {
        config_yaml: "hyperparameters: {lr: {type: double, minval: 0.01, maxval: 0.1}}\nsearcher: {name: random, metric: loss, max_trials: 2, max_time: 10, time_metric: batches}\n".into(),
        overrides: vec![],
        owner: "test".into(),
        model_digest: "m".into(),
        default_seed: 1,
    };
    let mut reply = None;
    wait_for("the proposal is applied", async || {
        if reply.is_none() {
            let _ = c
                .asks
                .send(Ask::Input(Input::Propose {
                    id,
                    command: command.clone(),
                    user: None,
                }))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (tx, rx) = oneshot::channel();
        c.asks.send(Ask::Reply(id, tx)).await.expect("ask");
        reply = rx.await.expect("reply");
        matches!(reply, Some(Ok(Reply::ExperimentCreated { .. })))
    })
    .await;
    // Every replica applies the same log to the same state.
    wait_for("the same state everywhere", async || {
        let (da, ia, _) = digest(&a).await;
        let (db, ib, _) = digest(&b).await;
        let (dc, ic, _) = digest(&c).await;
        da == db && db == dc && ia == ib && ib == ic
    })
    .await;
}
