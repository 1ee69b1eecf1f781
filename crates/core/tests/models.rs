//! Which nodes keep a model directory: every node while its experiment runs,
//! `MODEL_REPLICAS` alive nodes (on distinct sites where there are) once it
//! has ended, the others only after those have recorded their copies.

mod common;

use resolute_core::command::{Command, Control};
use resolute_core::state::{Change, ClusterState, ModelRole, MODEL_REPLICAS};
use resolute_core::{NodeId, NodeInfo, Reply};

const MODEL: &str = "model-digest";

struct Sm {
    state: ClusterState,
    index: u64,
}

impl Sm {
    /// Four nodes, two on each site, no slots (trials stay queued, so an
    /// experiment ends the moment it is canceled).
    fn new() -> Self {
        let mut state = ClusterState::default();
        let mut changes = Vec::new();
        for (node, site) in [(1, "a"), (2, "a"), (3, "b"), (4, "b")] {
            let info = NodeInfo {
                site: site.into(),
                slots: 0,
                ..Default::default()
            };
            state.add_node(node, info, &mut changes);
        }
        Sm { state, index: 0 }
    }

    fn apply(&mut self, command: Command) -> Reply {
        self.apply_with_changes(command).0
    }

    /// The reply and the changes the entry made.
    fn apply_with_changes(&mut self, command: Command) -> (Reply, Vec<Change>) {
        self.index += 1;
        let env = common::honest_envelope(&self.state, self.index, self.index * 1000, command);
        self.state.apply(self.index, env)
    }

    fn create(&mut self) -> u64 {
        let reply = self.apply(Command::ExperimentCreated {
            config_yaml: "hyperparameters: {lr: {type: double, minval: 0.01, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 1, max_length: {batches: 1}}
"
            .into(),
            overrides: vec![],
            owner: "o".into(),
            model_digest: MODEL.into(),
            default_seed: 3,
        });
        match reply {
            Reply::ExperimentCreated { experiment, .. } => experiment,
            other => panic!("{other:?}"),
        }
    }

    fn control(&mut self, experiment: u64, action: Control) -> Reply {
        self.apply(Command::ExperimentControl { experiment, action })
    }

    fn kept(&mut self, holder: NodeId) -> Reply {
        self.apply(Command::ModelKept {
            digest: MODEL.into(),
            holder,
        })
    }

    fn role(&self, me: NodeId) -> ModelRole {
        self.state.models_for(me)[MODEL].clone()
    }

    fn with_role(&self, wanted: fn(&ModelRole) -> bool) -> Vec<NodeId> {
        (1..=4).filter(|n| wanted(&self.role(*n))).collect()
    }
}

fn site(sm: &Sm, node: NodeId) -> String {
    sm.state.nodes[&node].info.site.clone()
}

#[test]
fn an_ended_experiments_model_directory_is_kept_by_a_few_nodes_and_deleted_by_the_rest_only_then() {
    let mut sm = Sm::new();
    let id = sm.create();
    assert_eq!(
        sm.with_role(|r| *r == ModelRole::Everywhere),
        vec![1, 2, 3, 4],
        "an unfinished experiment's model directory is on every node"
    );
    let generation = sm.state.models_generation();
    assert_eq!(sm.control(id, Control::Cancel), Reply::Ok);
    assert_ne!(
        sm.state.models_generation(),
        generation,
        "agents look again"
    );

    // Ended: MODEL_REPLICAS nodes, one per site, keep it; nobody deletes yet.
    let chosen = sm.with_role(|r| matches!(r, ModelRole::Hold(_)));
    assert_eq!(chosen.len(), MODEL_REPLICAS, "{:?}", sm.state.models_for(1));
    assert_ne!(site(&sm, chosen[0]), site(&sm, chosen[1]), "one per site");
    assert_eq!(
        sm.with_role(|r| *r == ModelRole::Spare).len(),
        4 - MODEL_REPLICAS
    );

    // The first keeper records its copy: the other stays chosen, on the other site.
    assert_eq!(sm.kept(chosen[0]), Reply::Ok);
    assert_eq!(sm.role(chosen[0]), ModelRole::Held);
    assert_eq!(sm.role(chosen[1]), ModelRole::Hold(vec![chosen[0]]));
    assert!(sm.with_role(|r| *r == ModelRole::KeptElsewhere).is_empty());

    // Both recorded: the others delete theirs; a late third copy is refused.
    assert_eq!(sm.kept(chosen[1]), Reply::Ok);
    let rest: Vec<NodeId> = (1..=4).filter(|n| !chosen.contains(n)).collect();
    assert_eq!(sm.with_role(|r| *r == ModelRole::KeptElsewhere), rest);
    assert!(matches!(sm.kept(rest[0]), Reply::Rejected { .. }));
    assert_eq!(sm.with_role(|r| *r == ModelRole::KeptElsewhere), rest);

    // A snapshot gives a restarted replica the same answers.
    let restored = ClusterState::decode(&sm.state.encode()).expect("decode");
    for n in 1..=4 {
        assert_eq!(restored.models_for(n), sm.state.models_for(n));
    }

    // A keeper is lost: a node on its site takes over; until it has recorded
    // its copy nobody deletes one.
    assert_eq!(sm.apply(Command::NodeLost { node: chosen[0] }), Reply::Ok);
    let lost_site = site(&sm, chosen[0]);
    let successor = sm.with_role(|r| matches!(r, ModelRole::Hold(_)));
    assert_eq!(successor.len(), 1);
    assert_eq!(site(&sm, successor[0]), lost_site);
    assert!(sm.with_role(|r| *r == ModelRole::KeptElsewhere).is_empty());
    assert_eq!(sm.kept(successor[0]), Reply::Ok);
    assert_eq!(sm.with_role(|r| *r == ModelRole::KeptElsewhere).len(), 1);
}

#[test]
fn a_model_directory_is_released_on_its_keepers_when_no_experiment_has_it_any_more() {
    let mut sm = Sm::new();
    let first = sm.create();
    sm.control(first, Control::Cancel);
    let chosen = sm.with_role(|r| matches!(r, ModelRole::Hold(_)));
    for n in &chosen {
        assert_eq!(sm.kept(*n), Reply::Ok);
    }
    // A second experiment of the same directory: every node keeps it again.
    let second = sm.create();
    assert_eq!(sm.with_role(|r| *r == ModelRole::Everywhere).len(), 4);
    // Deleting the first keeps it (the second has it).
    let (reply, changes) = sm.apply_with_changes(Command::ExperimentControl {
        experiment: first,
        action: Control::Delete,
    });
    assert_eq!(reply, Reply::Ok);
    assert!(!format!("{changes:?}").contains("Released"), "{changes:?}");
    assert!(sm.state.models.contains_key(MODEL));
    // Deleting the second too releases it on the recorded keepers.
    sm.control(second, Control::Cancel);
    let (reply, changes) = sm.apply_with_changes(Command::ExperimentControl {
        experiment: second,
        action: Control::Delete,
    });
    assert_eq!(reply, Reply::Ok);
    let released = format!("{changes:?}");
    assert!(
        released.contains(&format!(
            "Released {{ digest: \"{MODEL}\", holders: {chosen:?} }}"
        )),
        "{released}"
    );
    assert!(sm.state.models.is_empty());
    assert!(sm.state.models_for(1).is_empty());
    // A copy of a directory no experiment has is refused.
    assert!(matches!(sm.kept(1), Reply::Rejected { .. }));
}
