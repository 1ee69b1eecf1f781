//! Every shipped scenario runs clean, twice per seed with equal digests.

use std::path::PathBuf;

use resolute_sim::{run, Options, Scenario};

fn load(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../simulations")
        .join(name);
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn steady_runs_clean_and_replays() {
    let sc = load("steady.toml");
    for seed in 0..2 {
        let opts = Options {
            seed,
            ..Options::default()
        };
        let (a, _) = run(&sc, &opts);
        assert!(a.violations.is_empty(), "seed {seed}: {:#?}", a.violations);
        assert_eq!(a.experiments_completed, 2, "{a:#?}");
        let (b, _) = run(&sc, &opts);
        assert_eq!(a.digest, b.digest, "seed {seed} replays exactly");
    }
}
