//! What a trial incarnation is started with: its command, environment, slots,
//! GPUs, target, checkpoint, and its place in a gang (the torchrun contract).
//! Derived from the replicated state and the start effect, so that every shell
//! starts the same trial the same way.

use std::collections::BTreeMap;

use resolute_core::command::{ExperimentId, TrialId};
use resolute_core::state::ClusterState;
use resolute_core::{NodeId, StartTrial};
use resolute_types::config::{Entrypoint, ExperimentConfig};
use resolute_types::Value;

/// torchrun rendezvous ports: `MASTER_PORT_BASE` plus a value derived from the
/// trial and incarnation (every node of a gang computes the same one; two gangs
/// whose rank 0 shares a node rarely collide, and a new incarnation moves on).
pub const MASTER_PORT_BASE: u16 = 29_500;
/// How many ports the rendezvous ports spread over.
pub const MASTER_PORT_SPAN: u64 = 2_000;
/// The ports of the Core API's collectives (`allgather`, `broadcast`, ...) on
/// rank 0's node sit this far above the rendezvous ports: torchrun's store
/// and the collectives' listener never take the same port.
pub const COLLECTIVES_PORT_OFFSET: u16 = 2_000;
const _: () = assert!(
    MASTER_PORT_BASE as u64 + MASTER_PORT_SPAN + (COLLECTIVES_PORT_OFFSET as u64) < u16::MAX as u64
);
/// The unit of a trial's target when its searcher names none.
pub const TIME_METRIC_DEFAULT: &str = "batches";

/// Where one node's processes sit in a multi-node gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gang {
    /// Global rank of this node's first process.
    pub rank: u32,
    /// Slots in the whole gang.
    pub world_size: u32,
    /// Slots on this node.
    pub local_world_size: u32,
    /// This node's rank in the gang (0 runs the chief).
    pub group_rank: u32,
    /// The node that runs rank 0 (the shell turns it into `MASTER_ADDR`).
    pub rank0: NodeId,
    /// The gang's nodes in rank order (rank 0's first).
    pub nodes: Vec<NodeId>,
    /// The rendezvous port on rank 0's node.
    pub master_port: u16,
}

/// Everything needed to start one incarnation of a trial on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    /// The trial.
    pub trial: TrialId,
    /// Its incarnation (every report must carry it).
    pub incarnation: u64,
    /// Its experiment.
    pub experiment: ExperimentId,
    /// The shell command to run (the config's `entrypoint`).
    pub entrypoint: String,
    /// The config's `environment_variables` for this node's kind of slot.
    pub env: BTreeMap<String, String>,
    /// Hyperparameters.
    pub hparams: Value,
    /// The trial seed.
    pub seed: u32,
    /// The model directory's blob digest, if the experiment has one.
    pub model_digest: Option<String>,
    /// The checkpoint to resume from (a blob digest), if any.
    pub latest_checkpoint: Option<String>,
    /// Train until this many `time_metric` units.
    pub target: Option<u64>,
    /// The unit of `target` (batches, epochs, ...).
    pub time_metric: String,
    /// This node's slot indices for the incarnation (filled in when it launches).
    pub slots: Vec<usize>,
    /// The GPU uuids of those slots (empty: CPU slots).
    pub gpus: Vec<String>,
    /// Slots it takes on this node.
    pub slots_here: u32,
    /// Its place in a multi-node gang (None: all its slots are here).
    pub gang: Option<Gang>,
    /// The experiment's config as parsed (the trial sees it as
    /// `ClusterInfo.trial.config`, and its `data` as `user_data`).
    pub config: Box<ExperimentConfig>,
}

/// The rendezvous port of one incarnation of a trial.
pub fn master_port(trial: TrialId, incarnation: u64) -> u16 {
    // splitmix64's finalizer: consecutive trials land far apart.
    let mut z = trial ^ incarnation.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let spread = (z ^ (z >> 31)) % MASTER_PORT_SPAN;
    MASTER_PORT_BASE + spread as u16
}

/// The port the chief of one incarnation of a trial listens on for the
/// Core API's collectives (every node of a gang computes the same one).
pub fn collectives_port(trial: TrialId, incarnation: u64) -> u16 {
    master_port(trial, incarnation) + COLLECTIVES_PORT_OFFSET
}

/// The command that runs a Trial class (`entrypoint: model_def:MyTrial`):
/// the Python harness, under the torch launcher (one process per slot) when
/// the trial has several slots, as Determined wraps its legacy entrypoints.
/// `class` is `module:Class` of Python identifiers (the config parser
/// accepts nothing else as a Trial class), so it is safe in a shell line.
pub fn trial_class_command(class: &str, slots_per_trial: u32) -> String {
    if slots_per_trial > 1 {
        format!("python3 -m determined.launch.torch_distributed --trial {class}")
    } else {
        format!("python3 -m determined.exec.harness {class}")
    }
}

/// The launch of `start` on a node with GPU slots (`gpus`) or CPU slots; None
/// when its experiment is unknown here (it cannot be started).
pub fn spec(state: &ClusterState, start: StartTrial, gpus: bool) -> Option<LaunchSpec> {
    let exp = state.experiments.get(&start.experiment)?;
    let config = exp.config()?;
    let entrypoint = match &config.entrypoint {
        Some(Entrypoint::Command(c)) => c.clone(),
        Some(Entrypoint::Args(a)) => a.join(" "),
        Some(Entrypoint::TrialClass(class)) => {
            trial_class_command(class, config.resources.slots_per_trial)
        }
        None => String::new(),
    };
    let vars = if gpus {
        &config.environment.environment_variables.cuda
    } else {
        &config.environment.environment_variables.cpu
    };
    let env = vars
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let time_metric = config
        .searcher
        .method
        .budget()
        .map_or(TIME_METRIC_DEFAULT.to_string(), |b| b.time_metric);
    let layout = &start.layout;
    let gang = (layout.len() > 1).then(|| Gang {
        rank: layout[..start.node_rank.min(layout.len())]
            .iter()
            .map(|(_, s)| *s)
            .sum(),
        world_size: layout.iter().map(|(_, s)| *s).sum(),
        local_world_size: start.slots,
        group_rank: start.node_rank as u32,
        rank0: layout[0].0,
        nodes: layout.iter().map(|(n, _)| *n).collect(),
        master_port: master_port(start.trial, start.incarnation),
    });
    Some(LaunchSpec {
        trial: start.trial,
        incarnation: start.incarnation,
        experiment: start.experiment,
        entrypoint,
        env,
        hparams: start.hparams,
        seed: start.seed,
        model_digest: (!exp.model_digest.is_empty()).then(|| exp.model_digest.clone()),
        latest_checkpoint: start.latest_checkpoint,
        target: start.target,
        time_metric,
        slots: Vec::new(),
        gpus: Vec::new(),
        slots_here: start.slots,
        gang,
        config: Box::new(config.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_of_a_gang_agrees_on_its_port_and_a_new_incarnation_moves_on() {
        let p = master_port(42, 1);
        assert!((MASTER_PORT_BASE..MASTER_PORT_BASE + MASTER_PORT_SPAN as u16).contains(&p));
        assert_eq!(p, master_port(42, 1), "every node of the gang agrees");
        assert_ne!(p, master_port(42, 2), "a new incarnation moves on");
        let ports: std::collections::BTreeSet<u16> = (0..100).map(|t| master_port(t, 1)).collect();
        assert!(
            ports.len() > 95,
            "trials spread over the range: {}",
            ports.len()
        );
    }
}
