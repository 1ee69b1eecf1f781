//! How long a node waits before it suspects a peer, by how far apart the
//! cluster's nodes are (its latency class).
//!
//! Every timer here is a multiple of the round trip it must outlast. Raft's
//! election timeout must survive a few lost heartbeats; the lease (after
//! which a silent node is declared lost and its trials move) must survive a
//! few missed elections' worth of silence, or a lossy link starts a
//! node-lost storm; the disconnect grace must outlast a reconnect (over a
//! WAN a connection also closes when a NAT forgets it or a relay's circuit
//! ends, and the next dial takes a few round trips). The classes are named
//! defaults an operator picks per cluster (`[node] latency`); each value
//! can still be set on its own, and `cluster status` warns when a measured
//! round trip exceeds the class's budget.

use serde::{Deserialize, Serialize};

use super::{NodeConfig, DISCONNECT_GRACE_DEFAULT_MS, LEASE_TIMEOUT_DEFAULT_MS};

/// How far apart a cluster's nodes are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyClass {
    /// One machine room or one cloud zone: round trips of a few milliseconds.
    #[default]
    Lan,
    /// Sites and cloud regions over the internet: round trips up to 150 ms,
    /// some loss, NATs and relays.
    Wan,
}

/// A node's failure-detection timing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Raft's base election timeout (each node adds up to as much again).
    pub election_ms: u64,
    /// The leader's heartbeat period.
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is lost.
    pub lease_timeout_ms: u64,
    /// A node whose connections all closed is lost after this long unless it
    /// reconnects.
    pub disconnect_grace_ms: u64,
}

/// LAN: heartbeats every 300 ms, elections after 1-2 s, lease 3 s.
const LAN: Timing = Timing {
    election_ms: 1_000,
    heartbeat_ms: 300,
    lease_timeout_ms: LEASE_TIMEOUT_DEFAULT_MS,
    disconnect_grace_ms: DISCONNECT_GRACE_DEFAULT_MS,
};

/// WAN: a 150 ms round trip fits three times into a heartbeat period, six
/// heartbeats may be lost before an election (3-6 s), and a lease of 10 s
/// spans at least two elections. A crashed process is still noticed from its
/// reset connections, after a 5 s grace that lets a relayed or NATed
/// connection be dialled again.
const WAN: Timing = Timing {
    election_ms: 3_000,
    heartbeat_ms: 500,
    lease_timeout_ms: 10_000,
    disconnect_grace_ms: 5_000,
};

/// Round trips up to this are what the LAN timing was made for.
const LAN_RTT_BUDGET_MS: u64 = 20;
/// Round trips up to this are what the WAN timing was made for.
const WAN_RTT_BUDGET_MS: u64 = 300;

impl LatencyClass {
    /// Every class, for error messages.
    pub const ALL: [LatencyClass; 2] = [LatencyClass::Lan, LatencyClass::Wan];

    /// Its name in config files.
    pub fn name(self) -> &'static str {
        match self {
            LatencyClass::Lan => "lan",
            LatencyClass::Wan => "wan",
        }
    }

    /// The class named `name`.
    pub fn parse(name: &str) -> Option<LatencyClass> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Its default timing.
    pub fn timing(self) -> Timing {
        match self {
            LatencyClass::Lan => LAN,
            LatencyClass::Wan => WAN,
        }
    }

    /// The longest round trip its timing holds against.
    pub fn rtt_budget_ms(self) -> u64 {
        match self {
            LatencyClass::Lan => LAN_RTT_BUDGET_MS,
            LatencyClass::Wan => WAN_RTT_BUDGET_MS,
        }
    }
}

impl Timing {
    /// Why this timing cannot work at `tick_ms` per tick (None: it can).
    pub fn problem(&self, tick_ms: u64) -> Option<String> {
        if tick_ms == 0 {
            return Some("the tick must be positive".into());
        }
        if self.heartbeat_ms < tick_ms {
            return Some(format!(
                "the heartbeat must be at least one tick ({tick_ms} ms)"
            ));
        }
        if self.election_ms < 2 * self.heartbeat_ms {
            return Some("the election timeout must be at least two heartbeats".into());
        }
        if self.lease_timeout_ms < 5 * tick_ms || self.lease_timeout_ms < self.election_ms {
            return Some(
                "the lease must be at least 5 ticks and at least the election timeout".into(),
            );
        }
        None
    }
}

impl NodeConfig {
    /// Runs with `timing` (ticks rounded up).
    pub fn set_timing(&mut self, timing: Timing) {
        let tick = self.tick_ms.max(1);
        self.election_ticks = timing.election_ms.div_ceil(tick).max(2) as usize;
        self.heartbeat_ticks = timing.heartbeat_ms.div_ceil(tick).max(1) as usize;
        self.lease_timeout_ms = timing.lease_timeout_ms;
        self.disconnect_grace_ms = timing.disconnect_grace_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::NodeInfo;

    #[test]
    fn every_class_is_sound_at_the_default_tick() {
        for class in LatencyClass::ALL {
            let t = class.timing();
            assert_eq!(t.problem(100), None, "{class:?}");
            // A heartbeat period holds the class's longest round trip, and
            // an election several heartbeats.
            assert!(t.heartbeat_ms >= class.rtt_budget_ms(), "{class:?}");
            assert!(t.election_ms >= 3 * t.heartbeat_ms, "{class:?}");
            assert!(t.disconnect_grace_ms <= t.lease_timeout_ms, "{class:?}");
            assert_eq!(LatencyClass::parse(class.name()), Some(class));
        }
        assert_eq!(LatencyClass::parse("moon"), None);
    }

    #[test]
    fn the_lan_class_is_what_a_node_ran_with_before_classes() {
        let mut cfg = NodeConfig::new(1, NodeInfo::default());
        let before = (
            cfg.election_ticks,
            cfg.heartbeat_ticks,
            cfg.lease_timeout_ms,
        );
        cfg.set_timing(LatencyClass::Lan.timing());
        assert_eq!(
            before,
            (
                cfg.election_ticks,
                cfg.heartbeat_ticks,
                cfg.lease_timeout_ms
            )
        );
        assert_eq!(cfg.disconnect_grace_ms, DISCONNECT_GRACE_DEFAULT_MS);
    }

    #[test]
    fn wan_timing_in_ticks() {
        let mut cfg = NodeConfig::new(1, NodeInfo::default());
        cfg.tick_ms = 100;
        cfg.set_timing(LatencyClass::Wan.timing());
        assert_eq!((cfg.election_ticks, cfg.heartbeat_ticks), (30, 5));
        assert_eq!(
            (cfg.lease_timeout_ms, cfg.disconnect_grace_ms),
            (10_000, 5_000)
        );
    }

    #[test]
    fn unsound_timing_is_named() {
        let mut t = LatencyClass::Wan.timing();
        t.election_ms = 600;
        assert!(t.problem(100).expect("a problem").contains("election"));
        let mut t = LatencyClass::Lan.timing();
        t.lease_timeout_ms = 400;
        assert!(t.problem(100).expect("a problem").contains("lease"));
    }
}
