//! [`NetActor`]: the bridge between the node and its libp2p swarm (which runs as
//! its own task in `crates/net`). Swarm events go to the node one at a time,
//! waiting while the node's mailbox is full (so a flood of peer messages slows
//! the swarm's reader instead of growing a queue); the node's sends, gossip,
//! dials, membership and blob fetches go to the swarm.
//!
//! Failure: when the swarm's event stream ends (its task stopped), the node can
//! no longer keep its promises: the process stops with exit code 3, and its
//! supervisor (systemd, the quick start) starts it again from its data dir.

use actix::prelude::*;
use libp2p::Multiaddr;

use resolute_core::{NodeId, PeerMessage};
use resolute_net::{Announcement, NetEvent, NetHandle};

/// Mailbox of the net actor: messages to send (a full one drops them; Raft and
/// the proposers retransmit).
pub const NET_MAILBOX: usize = 4096;

/// A swarm event, for the node.
#[derive(Debug)]
pub struct FromNet(pub NetEvent);

impl Message for FromNet {
    type Result = ();
}

/// Send a message to a peer (best effort).
#[derive(Debug)]
pub struct SendPeer {
    /// The peer.
    pub to: NodeId,
    /// The message.
    pub msg: PeerMessage,
}

impl Message for SendPeer {
    type Result = ();
}

/// Gossip this node's record.
#[derive(Debug)]
pub struct Publish(pub Announcement);

impl Message for Publish {
    type Result = ();
}

/// Dial an address.
#[derive(Debug)]
pub struct Dial(pub Multiaddr);

impl Message for Dial {
    type Result = ();
}

/// The cluster's members (who may speak Raft and fetch blobs).
#[derive(Debug)]
pub struct SetMembers(pub Vec<NodeId>);

impl Message for SetMembers {
    type Result = ();
}

/// Fetch a blob from any of `holders` into the local store (verified).
#[derive(Debug)]
pub struct Fetch {
    /// The blob's digest.
    pub digest: String,
    /// Who has it.
    pub holders: Vec<NodeId>,
}

impl Message for Fetch {
    type Result = Result<(), String>;
}

/// Stop the swarm.
#[derive(Debug)]
pub struct Shutdown;

impl Message for Shutdown {
    type Result = ();
}

/// The bridge.
pub struct NetActor {
    net: NetHandle,
    node: Recipient<FromNet>,
    /// The node asked the swarm to stop (its event stream ends as it should).
    stopping: bool,
}

impl NetActor {
    /// Starts the bridge: `events` (the swarm's) go to `node`.
    pub fn start(
        net: NetHandle,
        events: tokio::sync::mpsc::Receiver<NetEvent>,
        node: Recipient<FromNet>,
    ) -> Addr<NetActor> {
        NetActor::create(|ctx| {
            let stream = futures::stream::unfold(events, |mut rx| async move {
                rx.recv().await.map(|e| (e, rx))
            });
            ctx.add_stream(stream);
            NetActor {
                net,
                node,
                stopping: false,
            }
        })
    }
}

impl Actor for NetActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(NET_MAILBOX);
    }
}

impl StreamHandler<NetEvent> for NetActor {
    fn handle(&mut self, event: NetEvent, ctx: &mut Context<Self>) {
        // Nothing else is taken from the swarm until the node has this one.
        let node = self.node.clone();
        ctx.wait(
            async move {
                let _ = node.send(FromNet(event)).await;
            }
            .into_actor(self),
        );
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            ctx.stop();
            return;
        }
        eprintln!("fatal: the network task stopped");
        std::process::exit(3);
    }
}

impl Handler<SendPeer> for NetActor {
    type Result = ();

    fn handle(&mut self, m: SendPeer, _ctx: &mut Context<Self>) {
        self.net.send_nowait(m.to, m.msg);
    }
}

impl Handler<Publish> for NetActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, Publish(a): Publish, _ctx: &mut Context<Self>) -> Self::Result {
        let net = self.net.clone();
        Box::pin(async move {
            let _ = net.publish(a).await;
        })
    }
}

impl Handler<Dial> for NetActor {
    type Result = ();

    fn handle(&mut self, Dial(addr): Dial, _ctx: &mut Context<Self>) {
        let net = self.net.clone();
        // A peer that is not up yet costs only this dial.
        tokio::spawn(async move {
            let _ = net.dial(addr).await;
        });
    }
}

impl Handler<SetMembers> for NetActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, SetMembers(m): SetMembers, _ctx: &mut Context<Self>) -> Self::Result {
        let net = self.net.clone();
        Box::pin(async move {
            let _ = net.set_members(m).await;
        })
    }
}

impl Handler<Fetch> for NetActor {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, f: Fetch, _ctx: &mut Context<Self>) -> Self::Result {
        let net = self.net.clone();
        Box::pin(async move {
            net.fetch(&f.digest, f.holders)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

impl Handler<Shutdown> for NetActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        let net = self.net.clone();
        Box::pin(async move { net.shutdown().await })
    }
}
