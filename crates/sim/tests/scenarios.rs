//! Every shipped scenario runs clean and replays exactly; every seed that ever
//! failed (simulations/regressions.txt) is replayed; and the checkers do catch a
//! violation.

use std::path::PathBuf;

use resolute_sim::{run, Options, Scenario};

fn dir() -> PathBuf {
    // At run time: a test binary reused from another checkout's build must not
    // look in that checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../simulations")
}

fn load(name: &str) -> Scenario {
    Scenario::load(&dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Seeds per scenario in this test (CI's script sweeps more in release mode).
const SEEDS: u64 = 2;

const SHIPPED: [&str; 12] = [
    "promotions.toml",
    "fairness.toml",
    "gpu-failures.toml",
    "steady.toml",
    "churn.toml",
    "partition.toml",
    "rolling-restart.toml",
    "spot-burst.toml",
    "disk-loss.toml",
    "site-outage.toml",
    "gangs-burst.toml",
    "hybrid-nat.toml",
];

/// One run of `sc` with `seed` and the default options.
fn run_seed(sc: &Scenario, seed: u64) -> resolute_sim::Report {
    run(
        sc,
        &Options {
            seed,
            ..Options::default()
        },
    )
    .0
}

fn run_twice(sc: &Scenario, seed: u64) {
    let opts = Options {
        seed,
        ..Options::default()
    };
    let (a, _) = run(sc, &opts);
    assert!(
        a.violations.is_empty(),
        "{} seed {seed}:\n{}",
        sc.name,
        a.violations.join("\n")
    );
    assert_eq!(
        a.experiments_completed, a.experiments_submitted,
        "{} seed {seed}: every experiment finished",
        sc.name
    );
    let (b, _) = run(sc, &opts);
    assert_eq!(
        a.digest, b.digest,
        "{} seed {seed} replays exactly",
        sc.name
    );
}

#[test]
fn shipped_scenarios_run_clean_and_replay_exactly() {
    for name in SHIPPED {
        let sc = load(name);
        for seed in 0..SEEDS {
            run_twice(&sc, seed);
        }
    }
}

#[test]
fn every_seed_that_ever_failed_passes() {
    let text = std::fs::read_to_string(dir().join("regressions.txt")).expect("regressions.txt");
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(seed)) = (parts.next(), parts.next()) else {
            panic!("bad line: {line}")
        };
        let seed: u64 = seed.parse().expect("seed");
        run_twice(&load(name), seed);
    }
}

#[test]
fn the_checkers_catch_a_cluster_that_cannot_finish() {
    // Two of three voters lose their disks at once: Raft cannot recover that, so
    // the liveness phase must fail, loudly and with the seed.
    let mut sc = load("steady.toml");
    sc.liveness_bound_s = 600;
    for node in ["gpu-1", "gpu-2"] {
        sc.faults.events.push(resolute_sim::scenario::FaultEvent {
            at_s: 120,
            kind: resolute_sim::scenario::FaultKind::DiskLoss,
            node: Some(node.to_string()),
            site: None,
            restart_after_s: Some(30),
        });
    }
    let (r, _) = run(
        &sc,
        &Options {
            seed: 3,
            ..Options::default()
        },
    );
    assert!(
        r.violations.iter().any(|v| v.contains("liveness")),
        "{:#?}",
        r.violations
    );
    assert_eq!(r.seed, 3);
}

#[test]
fn bad_scenarios_are_clear_errors() {
    let tmp =
        std::env::temp_dir().join(format!("resolute-bad-scenario-{}.toml", std::process::id()));
    std::fs::write(
        &tmp,
        "name = \"x\"\nduration_s = 10\nliveness_bound_s = 10\ndurashun = 3\n",
    )
    .expect("write");
    let err = Scenario::load(&tmp).expect_err("unknown key").to_string();
    assert!(err.contains("durashun") && err.contains("line 4"), "{err}");
    std::fs::write(&tmp, "name = \"x\"\nduration_s = 10\nliveness_bound_s = 10\n[[sites]]\nname = \"a\"\n[[pools]]\nname = \"p\"\nsite = \"b\"\nnodes = 1\ngpus = 1\n").expect("write");
    let err = Scenario::load(&tmp).expect_err("unknown site").to_string();
    assert!(err.contains("unknown site b"), "{err}");
    // A fault that names a node the scenario does not have (nodes count from 1).
    std::fs::write(&tmp, "name = \"x\"\nduration_s = 10\nliveness_bound_s = 10\n[[sites]]\nname = \"a\"\n[[pools]]\nname = \"p\"\nsite = \"a\"\nnodes = 2\ngpus = 1\n[[faults.events]]\nat_s = 5\nkind = \"crash\"\nnode = \"p-0\"\n").expect("write");
    let err = Scenario::load(&tmp).expect_err("unknown node").to_string();
    assert!(err.contains("no node \"p-0\""), "{err}");
    std::fs::remove_file(&tmp).ok();
}

#[test]
fn nated_sites_talk_through_a_relay_and_recover_across_sites() {
    let sc = load("hybrid-nat.toml");
    // Seeds 1 to 3 once waited out dc1's whole outage: its first two nodes
    // had taken two of the three votes, so the other sites lost the quorum
    // with it (`maintain_membership` now spreads the voters).
    for seed in 0..4 {
        let r = run_seed(&sc, seed);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!(r.experiments_completed, r.experiments_submitted);
        // dc1 and dc2 only reach each other through the cloud nodes, and
        // checkpoints cross with them.
        assert!(r.relayed_messages > 0 && r.relayed_bytes > 0, "{r:?}");
        // The outage of dc1 moved its trials to the other sites, well
        // before it ended (20 minutes).
        let moved = r
            .recovery_s_p50_by_sites
            .iter()
            .find(|(k, _)| k.starts_with("dc1->") && *k != "dc1->dc1");
        assert!(
            moved.is_some_and(|(_, s)| *s < 600.0),
            "seed {seed}: {:?}",
            r.recovery_s_p50_by_sites
        );
    }
}

#[test]
fn every_site_behind_nat_is_a_clear_error() {
    let tmp = std::env::temp_dir().join(format!("resolute-all-nat-{}.toml", std::process::id()));
    let text = std::fs::read_to_string(dir().join("hybrid-nat.toml"))
        .expect("scenario")
        .replacen("name = \"cloud\"\n", "name = \"cloud\"\nnat = true\n", 1);
    std::fs::write(&tmp, text).expect("write");
    let err = Scenario::load(&tmp).expect_err("all NATed").to_string();
    std::fs::remove_file(&tmp).ok();
    assert!(err.contains("every site is behind NAT"), "{err}");
}

#[test]
fn weighted_fair_share_gives_teams_their_weights() {
    let sc = load("fairness.toml");
    for seed in 0..2 {
        let r = run_seed(&sc, seed);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        let a = r.group_share.get("team-a").copied().unwrap_or(0.0);
        let b = r.group_share.get("team-b").copied().unwrap_or(0.0);
        assert!(
            (a - 0.25).abs() < 0.05 && (b - 0.75).abs() < 0.05,
            "seed {seed}: shares {:?}",
            r.group_share
        );
    }
}

#[test]
fn gangs_span_nodes_and_waiting_work_bursts_to_the_cheapest_cloud_pool() {
    let sc = load("gangs-burst.toml");
    for seed in 0..3 {
        let r = run_seed(&sc, seed);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!(r.experiments_completed, r.experiments_submitted);
        // Every 8-slot trial spans two 4-GPU nodes at least once.
        assert!(r.multi_node_trials >= 6, "seed {seed}: {r:?}");
        let used = |pool: &str| r.gpu_s_by_pool.get(pool).copied().unwrap_or(0.0);
        assert!(used("onprem") > used("spot") && used("spot") > 0.0, "{r:?}");
    }
}

#[test]
fn failed_gpus_requeue_their_trials_without_charging_restarts() {
    let sc = load("gpu-failures.toml");
    for seed in 0..3 {
        let r = run_seed(&sc, seed);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!(r.experiments_completed, r.experiments_submitted);
        // Every scheduled GPU failure hit a running node.
        assert_eq!(r.gpu_failures, 4, "seed {seed}: {r:?}");
        assert_eq!(r.restarts_charged, 0, "seed {seed}: {r:?}");
    }
}

#[test]
fn trials_promoted_at_their_target_train_on_without_a_relaunch() {
    // Promotion ASHA raises a trial's target when its validation at a rung
    // applies. Each node's agent tells a trial at its target whether to go on
    // only after that validation applied, so no process completes short of a
    // raised target and has to be relaunched (before the agent, every
    // promotion on arrival cost one: 6 to 10 per run of this scenario).
    let sc = load("promotions.toml");
    for seed in 0..3 {
        let r = run_seed(&sc, seed);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!(r.experiments_completed, 1, "seed {seed}");
        assert_eq!(r.unfinished_exits, 0, "seed {seed}: {r:?}");
    }
}
