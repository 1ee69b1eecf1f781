//! Bad configs get exact messages that name the file, line, column and key path.

use resolute_types::config::{parse_bytes, parse_str};

const BASE: &str = "name: t
hyperparameters:
  lr: {type: double, minval: 0.1, maxval: 1.0}
searcher:
  name: random
  metric: loss
  max_trials: 4
";

fn errors(yaml: &str) -> Vec<String> {
    match parse_str("exp.yaml", yaml, &[]) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_base_config_is_valid() {
    let loaded = parse_str("exp.yaml", BASE, &[]).expect("valid");
    assert!(loaded.warnings.is_empty());
    assert_eq!(loaded.config.resources.priority, 42);
    assert_eq!(loaded.config.max_restarts, 5);
}

#[test]
fn exact_messages() {
    let cases: &[(&str, &str)] = &[
        (
            "hyperparameters: {}\nsearcher:\n  name: random\n  metric: loss\n  max_trails: 3\n",
            "exp.yaml:5:3: searcher.max_trails: unknown field (did you mean max_trials?)",
        ),
        (
            "searcher: {name: random, metric: loss, max_trials: 4}\nhyperparamters: {}\n",
            "exp.yaml:2:1: hyperparamters: unknown field (did you mean hyperparameters?)",
        ),
        (
            "searcher: {name: random, metric: loss, max_trials: four}\n",
            "exp.yaml:1:52: searcher.max_trials: expected an integer, found a string",
        ),
        (
            "hyperparameters:\n  lr: {type: double, minval: 1, maxval: 0.5}\nsearcher: {name: single, metric: l}\n",
            "exp.yaml:2:7: hyperparameters.lr: minval (1) must be less than maxval (0.5)",
        ),
        (
            "hyperparameters:\n  lr: {type: log, minval: -4, maxval: -1}\nsearcher: {name: single, metric: l}\n",
            "exp.yaml:2:7: hyperparameters.lr.base: missing required field (log hyperparameters need a base: minval and maxval are exponents)",
        ),
        (
            "hyperparameters:\n  act: {type: categorical, vals: []}\nsearcher: {name: single, metric: l}\n",
            "exp.yaml:2:34: hyperparameters.act.vals: must list at least one value",
        ),
        (
            "searcher: {name: randon, metric: loss}\n",
            "exp.yaml:1:18: searcher.name: unknown searcher `randon` (did you mean random?)",
        ),
        (
            "searcher: {name: async_halving, metric: l, num_rungs: 2, max_trials: 3, divisor: 1, time_metric: b, max_time: 9}\n",
            "exp.yaml:1:82: searcher.divisor: must be greater than 1 (and at most 1000), found 1",
        ),
        (
            "searcher: {name: single, metric: l}\nresources: {priority: 120}\n",
            "exp.yaml:2:23: resources.priority: must be between 1 and 99, found 120",
        ),
        (
            "searcher: {name: single}\n",
            "exp.yaml:1:11: searcher.metric: missing required field (the name of the validation metric to optimize)",
        ),
        (
            "searcher: {name: adaptive_asha, metric: l, max_trials: 4}\n",
            "exp.yaml:1:11: searcher.time_metric: missing required field (this searcher needs both time_metric and max_time)",
        ),
        (
            "searcher: {name: single, metric: l\n",
            "exp.yaml:2:1: YAML syntax error: while parsing a flow mapping, did not find expected ',' or '}'",
        ),
        (
            "hyperparameters:\n  x: {type: integer, minval: 1, maxval: 2}\nsearcher: {name: single, metric: l}\n",
            "exp.yaml:2:13: hyperparameters.x.type: unknown hyperparameter type `integer` (expected one of: const, int, double, log, categorical)",
        ),
        (
            "hyperparameters:\n  x: {type: int, minval: 1, maxval: 9}\nsearcher: {name: grid, metric: l}\n",
            "exp.yaml:2:6: hyperparameters.x.count: missing required field (the grid searcher needs a count for int, double and log hyperparameters)",
        ),
        (
            "searcher: {name: adaptive, metric: l}\n",
            "exp.yaml:1:18: searcher.name: searcher `adaptive` was removed in Determined 0.38 and is not supported; use adaptive_asha",
        ),
        (
            "searcher: {name: single, metric: l}\nenvironment: {environment_variables: [FOO]}\n",
            "exp.yaml:2:39: environment.environment_variables[0]: expected KEY=VALUE, found `FOO`",
        ),
        ("[1, 2]\n", "exp.yaml:1:1: expected a map, found a list"),
    ];
    for (yaml, want) in cases {
        let got = errors(yaml);
        assert_eq!(
            got.first().map(String::as_str),
            Some(*want),
            "for:\n{yaml}\nall errors: {got:#?}"
        );
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let got =
        errors("searcher: {name: random, metric: 3, max_trials: 0}\nresources: {weight: -1}\n");
    assert_eq!(got.len(), 3, "{got:#?}");
}

#[test]
fn overrides_apply_and_are_named_in_errors() {
    let loaded = parse_str(
        "exp.yaml",
        BASE,
        &[
            "searcher.max_trials=20".to_string(),
            "resources.slots_per_trial=2".to_string(),
        ],
    )
    .expect("valid");
    assert!(matches!(
        loaded.config.searcher.method,
        resolute_types::config::SearchMethod::Random { max_trials: 20, .. }
    ));
    assert_eq!(loaded.config.resources.slots_per_trial, 2);
    let err = parse_str("exp.yaml", BASE, &["searcher.max_trials=lots".to_string()])
        .expect_err("invalid");
    assert_eq!(err.errors[0].to_string(), "--config searcher.max_trials=lots: searcher.max_trials: expected an integer, found a string");
    let err = parse_str("exp.yaml", BASE, &["name.inner=3".to_string()]).expect_err("invalid");
    assert!(err.to_string().contains("not a map"), "{err}");
}

#[test]
fn binary_garbage_is_an_error() {
    let err = parse_bytes("exp.yaml", b"name: x\n\xff\xfe\x00garbage", &[]).expect_err("not utf-8");
    assert_eq!(
        err.errors[0].to_string(),
        "exp.yaml:2:1: not UTF-8 text: a config must be a YAML file"
    );
}

#[test]
fn determined_fields_without_effect_warn() {
    let yaml = format!("{BASE}bind_mounts: [{{host_path: /tmp, container_path: /x}}]\nenvironment: {{image: foo}}\nsearcher_extra: 1\n");
    let got = errors(&yaml);
    assert_eq!(
        got,
        vec!["exp.yaml:10:1: searcher_extra: unknown field (did you mean searcher?)".to_string()]
    );
    let yaml = format!("{BASE}bind_mounts: [{{host_path: /tmp, container_path: /x}}]\ncheckpoint_storage: {{type: s3, bucket: b}}\n");
    let loaded = parse_str("exp.yaml", &yaml, &[]).expect("valid");
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("exp.yaml:8:1: bind_mounts: accepted, has no effect here")),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("checkpoint_storage.bucket")),
        "{warnings:#?}"
    );
}

/// A tiny deterministic generator (xorshift) so the property test needs no crate.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_bytes_and_random_yaml_never_panic() {
    let mut g = Gen(0x5eed_1234_abcd_ef01);
    for _ in 0..3000 {
        let len = (g.next() % 200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
        let _ = parse_bytes("fuzz.yaml", &bytes, &[]);
    }
    // Structured noise: real keys and values in random shapes, plus mutations of the
    // valid examples.
    let tokens = [
        "searcher",
        "name",
        "metric",
        "hyperparameters",
        "type",
        "int",
        "log",
        "double",
        "categorical",
        "const",
        "minval",
        "maxval",
        "base",
        "count",
        "vals",
        "max_trials",
        "max_time",
        "time_metric",
        "num_rungs",
        "divisor",
        "asha",
        "adaptive_asha",
        "async_halving",
        "grid",
        "random",
        "pbt",
        "hyperband",
        "single",
        "resources",
        "priority",
        "checkpoint_storage",
        "environment",
        "environment_variables",
        "bracket_rungs",
        "mode",
        "population_size",
        "replace_function",
        "explore_function",
        "length_per_round",
        "max_length",
        "batches",
        ":",
        " ",
        "\n",
        "  ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "&a",
        "*a",
        "!!str",
        "'",
        "\"",
        "#",
        "0",
        "-1",
        "1e308",
        ".nan",
        "null",
        "true",
        "99999999999999999999",
        "1.5",
        "~",
        "|",
        ">",
        "---",
        "?",
    ];
    for _ in 0..20_000 {
        let n = (g.next() % 40) as usize;
        let text: String = (0..n).map(|_| g.pick(&tokens)).collect();
        let _ = parse_str("fuzz.yaml", &text, &[]);
    }
    // Read at run time: a test binary reused from a build in another checkout
    // must not look in that checkout.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let examples: Vec<String> = std::fs::read_dir(dir.join("../../examples/searchers"))
        .expect("examples")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    for text in &examples {
        for _ in 0..500 {
            let mut bytes = text.clone().into_bytes();
            for _ in 0..(1 + g.next() % 4) {
                let i = (g.next() % bytes.len() as u64) as usize;
                match g.next() % 3 {
                    0 => bytes[i] = g.next() as u8,
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, b" :-[{\n0"[(g.next() % 7) as usize]),
                }
            }
            let _ = parse_bytes("fuzz.yaml", &bytes, &[]);
        }
    }
}

#[test]
fn searches_that_would_create_too_many_trials_are_rejected() {
    let got = errors("searcher: {name: hyperband, metric: l, max_rungs: 32, divisor: 2, time_metric: b, max_time: 9007199254740992}\n");
    assert!(
        got[0].contains("searcher.max_rungs: these brackets would create"),
        "{got:#?}"
    );
    let got = errors("searcher: {name: pbt, metric: l, population_size: 100000, num_rounds: 100, length_per_round: 10, time_metric: b, replace_function: {truncate_fraction: 0.5}, explore_function: {resample_probability: 0, perturb_factor: 0}}\n");
    assert!(got[0].contains("at most 100000"), "{got:#?}");
}

#[test]
fn a_command_with_a_colon_is_still_a_command() {
    for entrypoint in [
        "python3 train.py --arg a:b",
        "python3 -m determined.launch.torch_distributed -- python3 train.py",
        "\"sh -c 'echo a:b'\"",
    ] {
        let yaml = format!("searcher: {{name: single, metric: l}}\nentrypoint: {entrypoint}\n");
        assert!(parse_str("exp.yaml", &yaml, &[]).is_ok(), "{entrypoint}");
    }
}

#[test]
fn a_trial_class_entrypoint_runs_through_the_harness_and_says_so() {
    use resolute_types::config::Entrypoint;
    let yaml = "searcher: {name: single, metric: l, max_length: {batches: 10}}\nentrypoint: model_def:MyTrial\nscheduling_unit: 5\n";
    let loaded = parse_str("exp.yaml", yaml, &[]).expect("valid");
    assert_eq!(
        loaded.config.entrypoint,
        Some(Entrypoint::TrialClass("model_def:MyTrial".into()))
    );
    assert_eq!(loaded.config.scheduling_unit, Some(5));
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "exp.yaml:2:13: entrypoint: \"model_def:MyTrial\" is a Trial class (deprecated since Determined 0.38)"
        ) && w.contains("needs torch")),
        "{warnings:#?}"
    );
    // A command is not a Trial class, and scheduling_unit has no effect on it.
    let yaml =
        "searcher: {name: single, metric: l}\nentrypoint: python3 train.py\nscheduling_unit: 5\n";
    let loaded = parse_str("exp.yaml", yaml, &[]).expect("valid");
    assert!(matches!(
        loaded.config.entrypoint,
        Some(Entrypoint::Command(_))
    ));
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.iter().any(|w| w
            .starts_with("exp.yaml:3:18: scheduling_unit: read only by the Trial-class harness")),
        "{warnings:#?}"
    );
    assert_eq!(
        errors("searcher: {name: single, metric: l}\nscheduling_unit: 0\n"),
        vec![
            "exp.yaml:2:18: scheduling_unit: must be between 1 and 9007199254740992, found 0"
                .to_string()
        ]
    );
}
