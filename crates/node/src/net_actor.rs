//! [`NetActor`]: the node's bridge to its libp2p swarm (which runs as its own
//! task in `crates/net`), for everything but the hot path: gossip, dials, the
//! membership the swarm admits, blob fetches (which take long: they are served
//! as futures, never holding the node up), and shutting the swarm down. The
//! hot path goes without a mailbox hop, because every hop costs latency on the
//! commit path: peer messages leave through its [`Outbox`] (straight into the
//! swarm's bounded channel), and the swarm's events are a stream the node
//! actor reads itself (taking the next one only when it is done with the last,
//! so a flood of peer messages slows the swarm's reader instead of growing a
//! queue).

use actix::prelude::*;
use libp2p::Multiaddr;

use resolute_core::{NodeId, PeerMessage};
use resolute_net::{Announcement, FetchReport, NetHandle};

/// Mailbox of the net actor: messages to send (a full one drops them; Raft and
/// the proposers retransmit).
pub const NET_MAILBOX: usize = 4096;

/// The bridge's fast lane for peer messages: the node hands each Raft or
/// forwarding message straight to the swarm's bounded command channel, not
/// through a mailbox (every hop on the commit path costs latency); a full
/// channel drops the message (Raft and the proposers retransmit).
#[derive(Clone)]
pub struct Outbox(NetHandle);

impl Outbox {
    /// Sends `msg` to `to`, best effort; false when it was dropped.
    pub fn send(&self, to: NodeId, msg: PeerMessage) -> bool {
        self.0.send_nowait(to, msg)
    }

    /// The swarm's handle, for requests that wait for their answer.
    pub fn handle(&self) -> NetHandle {
        self.0.clone()
    }
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
    type Result = Result<FetchReport, String>;
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
}

impl NetActor {
    /// Starts the bridge; returns its address and its fast lane for peer
    /// messages.
    pub fn start(net: NetHandle) -> (Addr<NetActor>, Outbox) {
        let outbox = Outbox(net.clone());
        (NetActor { net }.start(), outbox)
    }
}

impl Actor for NetActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(NET_MAILBOX);
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
    type Result = ResponseFuture<Result<FetchReport, String>>;

    fn handle(&mut self, f: Fetch, _ctx: &mut Context<Self>) -> Self::Result {
        let net = self.net.clone();
        Box::pin(async move {
            net.fetch(&f.digest, f.holders)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Handler<Shutdown> for NetActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        let net = self.net.clone();
        Box::pin(async move { net.shutdown().await })
    }
}
