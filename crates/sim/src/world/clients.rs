//! Simulated users: each submits its experiments to a random live node, and
//! retries with the same proposal id (so a submission applies at most once)
//! when the answer is an error or does not come.
//!
//! A simulated cluster has users, as a real one does: first an administrator
//! bootstraps it and creates every experiment owner with the `user` role in
//! the workspaces of their experiments, then the owners submit on their own
//! authority, so that every replica's role checks run under the faults too.

use std::collections::{BTreeMap, BTreeSet};

use resolute_agent::Event;
use resolute_core::command::{Command, NewToken, ProposalId, Reply, Role, UserCommand};
use resolute_core::NodeError;

use super::{Occurrence, World};

/// How long a client waits before retrying a submission, in ms.
const CLIENT_RETRY_MS: u64 = 2_000;
/// How long a client waits for any answer before retrying elsewhere, in ms.
const CLIENT_TIMEOUT_MS: u64 = 30_000;

/// The simulated cluster's administrator.
const ADMIN: &str = "sim-admin";
/// The join token's id and secret that every simulated node presents (made
/// by the administrator's set-up; a node that joins before it exists joins a
/// cluster without users, which needs none).
const JOIN_TOKEN_ID: &str = "51";
const JOIN_TOKEN_SECRET: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
/// Joins the simulator's token admits at most (restarts with a fresh disk
/// rejoin).
const JOIN_TOKEN_USES: u32 = 1_000_000;

/// The join token a simulated node presents.
pub(super) fn join_token() -> String {
    format!(
        "{}{JOIN_TOKEN_ID}_{JOIN_TOKEN_SECRET}",
        resolute_core::state::auth::JOIN_TOKEN_PREFIX
    )
}

/// The users' submissions in flight.
#[derive(Debug)]
pub(super) struct Clients {
    /// The administrator's set-up, in order (bootstrap, then the owners).
    setup: Vec<(Option<String>, Command)>,
    /// The set-up proposal waiting for its answer: its step and id.
    setup_waiting: Option<(usize, ProposalId)>,
    /// Set-up steps applied; submissions wait until all are.
    setup_done: usize,
    /// Submissions waiting for their answer: which arrival each is.
    submissions: BTreeMap<ProposalId, usize>,
    /// Tries per submission.
    attempts: BTreeMap<ProposalId, u64>,
    /// Experiments submitted (first tries).
    pub(super) submitted: u64,
    next_proposal: u128,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            setup: Vec::new(),
            setup_waiting: None,
            setup_done: 0,
            submissions: BTreeMap::new(),
            attempts: BTreeMap::new(),
            submitted: 0,
            next_proposal: 1,
        }
    }
}

impl Clients {
    /// Whether every submission has been answered.
    pub(super) fn all_answered(&self) -> bool {
        self.submissions.is_empty()
    }

    /// The administrator's set-up for owners and their workspaces.
    pub(super) fn plan_users(&mut self, owners: &[(String, String)]) {
        let mut roles: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (owner, workspace) in owners {
            roles.entry(owner).or_default().insert(workspace);
        }
        let token = NewToken {
            id: "sim".into(),
            hash: "not-a-real-hash".into(),
            expires_ms: None,
            label: "the simulator's administrator".into(),
        };
        let join = NewToken {
            id: JOIN_TOKEN_ID.into(),
            hash: blake3::hash(JOIN_TOKEN_SECRET.as_bytes())
                .to_hex()
                .to_string(),
            expires_ms: None,
            label: "the simulated nodes".into(),
        };
        self.setup = vec![
            (
                None,
                Command::User(UserCommand::Bootstrap {
                    admin: ADMIN.into(),
                    token,
                }),
            ),
            (
                Some(ADMIN.into()),
                Command::User(UserCommand::CreateJoinToken {
                    token: join,
                    uses: JOIN_TOKEN_USES,
                }),
            ),
        ];
        for (owner, workspaces) in roles {
            let command = Command::User(UserCommand::Create {
                name: owner.into(),
                cluster_admin: false,
                roles: workspaces
                    .iter()
                    .map(|w| (w.to_string(), Role::User))
                    .collect(),
            });
            self.setup.push((Some(ADMIN.into()), command));
        }
    }

    fn users_ready(&self) -> bool {
        self.setup_done >= self.setup.len()
    }
}

impl World<'_> {
    /// The administrator's next set-up step (again, with the same id, after
    /// a failure or no answer).
    pub(super) fn set_up_users(&mut self, retry: Option<ProposalId>) {
        let step = self.clients.setup_done;
        let Some((user, command)) = self.clients.setup.get(step).cloned() else {
            return;
        };
        let via = self
            .random_up_node(usize::MAX)
            .and_then(|id| self.index_of(id));
        let Some(via) = via else {
            self.schedule(self.now + CLIENT_RETRY_MS, Occurrence::SetUpUsers { retry });
            return;
        };
        let c = &mut self.clients;
        let id = retry.unwrap_or_else(|| {
            let id = ProposalId(c.next_proposal);
            c.next_proposal += 1;
            id
        });
        c.setup_waiting = Some((step, id));
        self.schedule(
            self.now + CLIENT_TIMEOUT_MS,
            Occurrence::SetUpTimeout { step, id },
        );
        self.step(via, Event::Propose { id, command, user });
    }

    /// No answer to a set-up step: ask again (the same id applies once).
    pub(super) fn set_up_timed_out(&mut self, step: usize, id: ProposalId) {
        if self.clients.setup_waiting == Some((step, id)) {
            self.clients.setup_waiting = None;
            self.set_up_users(Some(id));
        }
    }

    pub(super) fn submit(&mut self, arrival: usize, retry: Option<ProposalId>) {
        if !self.clients.users_ready() {
            // The owner does not exist yet: try when the administrator is done.
            self.schedule(
                self.now + CLIENT_RETRY_MS,
                Occurrence::Submit { arrival, retry },
            );
            return;
        }
        let Some(via) = self
            .random_up_node(usize::MAX)
            .and_then(|id| self.index_of(id))
        else {
            self.schedule(
                self.now + CLIENT_RETRY_MS,
                Occurrence::Submit { arrival, retry },
            );
            return;
        };
        let e = &self.sc.experiments[arrival];
        let command = Command::ExperimentCreated {
            config_yaml: self.sc.experiment_texts[arrival].clone(),
            overrides: Vec::new(),
            owner: e.owner.clone(),
            model_digest: String::new(),
            default_seed: (self.opts.seed as u32) ^ arrival as u32,
        };
        let c = &mut self.clients;
        let id = retry.unwrap_or_else(|| {
            let id = ProposalId(c.next_proposal);
            c.next_proposal += 1;
            c.submitted += 1;
            id
        });
        c.submissions.insert(id, arrival);
        let attempt = c.attempts.entry(id).or_default();
        *attempt += 1;
        let attempt = *attempt;
        self.schedule(
            self.now + CLIENT_TIMEOUT_MS,
            Occurrence::SubmitTimeout {
                arrival,
                id,
                attempt,
            },
        );
        let config = self.sc.experiments[arrival].config.clone();
        self.note(format!(
            "submit experiment {config} via {}",
            self.nodes[via].name
        ));
        // The owner submits on their own authority.
        let user = Some(self.sc.experiments[arrival].owner.clone());
        self.step(via, Event::Propose { id, command, user });
    }

    /// No answer (the node died with the request): retry elsewhere with the
    /// same id; if it was applied, the retry returns the first result.
    pub(super) fn submit_timed_out(&mut self, arrival: usize, id: ProposalId, attempt: u64) {
        let c = &self.clients;
        if c.submissions.get(&id) == Some(&arrival) && c.attempts.get(&id) == Some(&attempt) {
            self.clients.submissions.remove(&id);
            self.submit(arrival, Some(id));
        }
    }

    /// A node's answer to a client's proposal.
    pub(super) fn reply(&mut self, id: ProposalId, result: Result<Reply, NodeError>) {
        if let Some((step, waiting)) = self.clients.setup_waiting {
            if waiting == id {
                self.clients.setup_waiting = None;
                match result {
                    Ok(Reply::Ok) => {
                        self.clients.setup_done = step + 1;
                        self.set_up_users(None);
                    }
                    Ok(refused) => self.violation(format!(
                        "the administrator's set-up step {step} was refused: {refused:?}"
                    )),
                    Err(_) => self.schedule(
                        self.now + CLIENT_RETRY_MS,
                        Occurrence::SetUpUsers { retry: Some(id) },
                    ),
                }
                return;
            }
        }
        if let Some(arrival) = self.clients.submissions.remove(&id) {
            if let Ok(refused @ (Reply::Forbidden { .. } | Reply::Rejected { .. })) = &result {
                // A submission the cluster refuses is a bug of the scenario or
                // of the role checks: say so rather than lose the experiment.
                let refused = refused.clone();
                self.violation(format!("a submission was refused: {refused:?}"));
                return;
            }
            if result.is_err() {
                // Retry with the same proposal id: applied at most once.
                self.schedule(
                    self.now + CLIENT_RETRY_MS,
                    Occurrence::Submit {
                        arrival,
                        retry: Some(id),
                    },
                );
            }
        }
    }

    pub(super) fn expected_submissions(&self) -> u64 {
        self.sc.experiments.iter().map(|e| u64::from(e.count)).sum()
    }
}
