//! Resource pool settings: how a pool shares its slots, when waiting work may
//! burst onto preemptible or paid nodes, how long a started trial is protected.
//! Plain data carried by commands (`Command::SetPool`, a joining node's
//! `NodeInfo`) and read by the scheduling pass (`state::scheduling`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds a queued trial waits for owned capacity before burst nodes are offered.
pub const BURST_AFTER_DEFAULT_S: u64 = 300;
/// Seconds after its start during which a trial is not preempted (anti-thrash).
pub const MIN_RUNTIME_DEFAULT_S: u64 = 60;

/// How a pool shares its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Max-min fair share weighted by `resources.weight`, capped by `max_slots`.
    #[default]
    FairShare,
    /// Lower `resources.priority` first; optionally preempting lower priorities.
    Priority {
        /// Preempt lower-priority trials (checkpoint and stop).
        preemption: bool,
    },
}

/// A resource pool's settings (from the node config, or `Command::SetPool`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSettings {
    /// How the pool shares its slots.
    pub policy: Policy,
    /// Seconds a queued trial waits for owned capacity before it may use burst
    /// (preemptible or paid) nodes.
    pub burst_after_s: u64,
    /// Seconds after its start during which a trial is not preempted.
    pub min_runtime_s: u64,
    /// Fair-share weight per team (workspace); a team not listed weighs the sum
    /// of its experiments' weights.
    pub team_weights: BTreeMap<String, f64>,
}

/// The settings of a pool that has none of its own.
pub static POOL_SETTINGS_DEFAULT: PoolSettings = PoolSettings {
    policy: Policy::FairShare,
    burst_after_s: BURST_AFTER_DEFAULT_S,
    min_runtime_s: MIN_RUNTIME_DEFAULT_S,
    team_weights: BTreeMap::new(),
};

impl Default for PoolSettings {
    fn default() -> Self {
        POOL_SETTINGS_DEFAULT.clone()
    }
}
