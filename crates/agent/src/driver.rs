//! [`Driver`]: `core::Node` and the [`Agent`] as the one state machine a shell
//! steps. The node's effects go down to the agent, the agent's proposals go to
//! the node, replies go to whoever proposed; the shell sees only [`Event`]s in
//! and [`Action`]s out.
//!
//! Order matters for durability: a node's `Persist`s must reach the disk in the
//! order it emitted them. So the driver never steps the node while it is still
//! handing out the outputs of an earlier step: proposals the agent makes in
//! response wait in a queue until those outputs are all out.

use std::collections::VecDeque;

use resolute_core::log_store::Recovered;
use resolute_core::{Input, Node, NodeConfig, Output, ProposalId};

use crate::agent::{Agent, AgentConfig, Out, Outs};
use crate::io::{Action, Event};

/// A node and its agent.
pub struct Driver {
    node: Node,
    agent: Agent,
}

impl Driver {
    /// A node rebuilt from what its store `recovered` (see `core::Node::new`),
    /// with an agent whose store holds `blobs`. Returns the actions to carry out
    /// first (a bootstrap write).
    pub fn new(
        node_cfg: NodeConfig,
        agent_cfg: AgentConfig,
        recovered: &Recovered,
        bootstrap: bool,
        blobs: impl IntoIterator<Item = String>,
        now_ms: u64,
    ) -> Result<(Driver, Vec<Action>), raft::Error> {
        let (node, first) = Node::new(node_cfg, recovered, bootstrap)?;
        let agent = Agent::new(agent_cfg, blobs, now_ms);
        let mut driver = Driver { node, agent };
        let mut actions = Vec::new();
        let mut queue = VecDeque::new();
        driver.carry(now_ms, first, &mut queue, &mut actions);
        driver.run(now_ms, queue, &mut actions);
        Ok((driver, actions))
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// A fresh id for a client's proposal (`Event::Propose`).
    pub fn next_id(&mut self) -> ProposalId {
        self.agent.next_id()
    }

    /// Handles one event at `now_ms` (the shell's clock, only compared with
    /// itself) and returns what to do, in order.
    pub fn step(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut queue: VecDeque<Input> = VecDeque::new();
        let mut outs = Outs::new();
        match event {
            Event::Tick => {
                // The node ticks first; the agent's tick sees what it did.
                let outputs = self.node.step(now_ms, Input::Tick);
                self.carry(now_ms, outputs, &mut queue, &mut actions);
                self.agent.on_tick(now_ms, &self.node, &mut outs);
            }
            Event::Peer { from, msg } => queue.push_back(Input::Peer { from, msg }),
            Event::Persisted { seq } => queue.push_back(Input::Persisted { seq }),
            Event::Heartbeat { node } => queue.push_back(Input::Heartbeat { node }),
            Event::Disconnected { node } => queue.push_back(Input::Disconnected { node }),
            Event::Join { via } => queue.push_back(Input::Join { via }),
            Event::Propose { id, command, user } => {
                queue.push_back(Input::Propose { id, command, user })
            }
            Event::Trial(report) => self.agent.on_report(now_ms, &self.node, report, &mut outs),
            Event::Fetched { digest, result } => self
                .agent
                .on_fetched(now_ms, &self.node, digest, result, &mut outs),
            Event::GpuHealth(health) => self
                .agent
                .on_gpu_health(now_ms, &self.node, health, &mut outs),
            Event::DiskSpace { free_bytes } => self
                .agent
                .on_disk_space(now_ms, &self.node, free_bytes, &mut outs),
            Event::Drain => self.agent.drain(&mut outs),
            Event::Leave => self.agent.begin_leaving(now_ms, &mut outs),
        }
        self.hand_out(outs, &mut queue, &mut actions);
        self.run(now_ms, queue, &mut actions);
        actions
    }

    /// Steps the node with each queued input, in order, until none is left.
    fn run(&mut self, now_ms: u64, mut queue: VecDeque<Input>, actions: &mut Vec<Action>) {
        while let Some(input) = queue.pop_front() {
            let outputs = self.node.step(now_ms, input);
            self.carry(now_ms, outputs, &mut queue, actions);
        }
    }

    /// Hands out one node step's outputs: effects and the agent's own replies go
    /// to the agent (whose proposals join the queue), the rest to the shell.
    fn carry(
        &mut self,
        now_ms: u64,
        outputs: Vec<Output>,
        queue: &mut VecDeque<Input>,
        actions: &mut Vec<Action>,
    ) {
        for output in outputs {
            match output {
                Output::Send { to, msg } => actions.push(Action::Send { to, msg }),
                Output::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                } => actions.push(Action::Persist {
                    seq,
                    snapshot,
                    entries,
                    hard_state,
                }),
                Output::Track(batch) => actions.push(Action::Track(batch)),
                Output::Reply { id, result } if self.agent.owns(id) => {
                    let mut outs = Outs::new();
                    self.agent
                        .on_reply(now_ms, &self.node, id, result, &mut outs);
                    self.hand_out(outs, queue, actions);
                }
                Output::Reply { id, result } => actions.push(Action::Reply { id, result }),
                Output::Effect(effect) => {
                    let mut outs = Outs::new();
                    self.agent.on_effect(now_ms, &self.node, effect, &mut outs);
                    self.hand_out(outs, queue, actions);
                }
            }
        }
    }

    /// The agent's outputs: actions to the shell now, proposals to the queue.
    fn hand_out(&mut self, outs: Outs, queue: &mut VecDeque<Input>, actions: &mut Vec<Action>) {
        for out in outs {
            match out {
                Out::Propose { id, command } => queue.push_back(Input::Propose {
                    id,
                    command,
                    user: None,
                }),
                Out::Leave { id } => queue.push_back(Input::Leave { id }),
                Out::Act(action) => actions.push(action),
            }
        }
    }
}
