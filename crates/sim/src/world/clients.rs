//! Simulated users: each submits its experiments to a random live node, and
//! retries with the same proposal id (so a submission applies at most once)
//! when the answer is an error or does not come.

use std::collections::BTreeMap;

use resolute_agent::Event;
use resolute_core::command::{Command, ProposalId, Reply};
use resolute_core::NodeError;

use super::{Occurrence, World};

/// How long a client waits before retrying a submission, in ms.
const CLIENT_RETRY_MS: u64 = 2_000;
/// How long a client waits for any answer before retrying elsewhere, in ms.
const CLIENT_TIMEOUT_MS: u64 = 30_000;

/// The users' submissions in flight.
#[derive(Debug)]
pub(super) struct Clients {
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
}

impl World<'_> {
    pub(super) fn submit(&mut self, arrival: usize, retry: Option<ProposalId>) {
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
        // A simulated cluster has no users: the owner is who the client says.
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
        if let Some(arrival) = self.clients.submissions.remove(&id) {
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
