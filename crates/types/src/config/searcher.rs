//! The `searcher` section: Determined's searchers and Resolute's extensions.

use serde::Serialize;

use super::diag::{suggest, Diag, Fields, Known};
use super::read;
use crate::yaml::{Node, NodeKind};

/// Most trials one experiment may request.
pub const TRIALS_MAX: u64 = 100_000;
/// Most rungs (and Hyperband brackets) a searcher may use.
pub const RUNGS_MAX: u64 = 32;
/// Largest `max_time` / `length_per_round`, in `time_metric` units.
pub const TIME_MAX: u64 = 1 << 53;
/// Largest `max_concurrent_trials`.
pub const CONCURRENCY_MAX: u64 = 100_000;
/// Default `max_concurrent_trials` (Determined's default).
pub const CONCURRENCY_DEFAULT: u32 = 16;
/// Default ASHA divisor (Determined's default).
pub const DIVISOR_DEFAULT: f64 = 4.0;
/// Default Hyperband divisor (the Hyperband paper's η).
pub const HYPERBAND_DIVISOR_DEFAULT: f64 = 3.0;
/// Default `max_rungs` of adaptive_asha and hyperband.
pub const MAX_RUNGS_DEFAULT: u32 = 5;

/// The whole `searcher` section, normalized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearcherConfig {
    /// Which searcher, and its own fields.
    #[serde(flatten)]
    pub method: SearchMethod,
    /// The validation metric the searcher optimizes.
    pub metric: String,
    /// Whether smaller values of `metric` are better (default true).
    pub smaller_is_better: bool,
    /// Start every trial from this trial's latest checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_trial_id: Option<u64>,
    /// Start every trial from this checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_checkpoint_uuid: Option<String>,
}

/// How long a trial may train, in units the training code reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// The name of the validation metric that counts training progress (e.g. `batches`).
    pub time_metric: String,
    /// The most `time_metric` units any trial trains.
    pub max_time: u64,
}

/// How adaptive_asha picks its brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaptiveMode {
    /// One bracket with the most rungs (most early stopping).
    Aggressive,
    /// The upper half of the bracket sizes.
    Standard,
    /// Every bracket size from 1 to the maximum.
    Conservative,
}

/// A searcher and its settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum SearchMethod {
    /// One trial with the given (or first-sampled) hyperparameters.
    Single {
        /// Optional training budget (Resolute extension for random/grid/single).
        #[serde(flatten)]
        budget: Option<Budget>,
    },
    /// `max_trials` random samples.
    Random {
        /// How many trials in all.
        max_trials: u32,
        /// How many may run at once (0: no limit).
        max_concurrent_trials: u32,
        /// Optional training budget.
        #[serde(flatten)]
        budget: Option<Budget>,
    },
    /// Every point of the grid.
    Grid {
        /// How many may run at once (0: no limit).
        max_concurrent_trials: u32,
        /// Optional training budget.
        #[serde(flatten)]
        budget: Option<Budget>,
    },
    /// Determined's ASHA: stopping-based asynchronous successive halving.
    AsyncHalving {
        /// Number of rungs.
        num_rungs: u32,
        /// How many trials in all.
        max_trials: u32,
        /// Keep the top `1/divisor` at each rung.
        divisor: f64,
        /// How many may run at once (0: enough to fill the top rung).
        max_concurrent_trials: u32,
        /// The training budget.
        #[serde(flatten)]
        budget: Budget,
    },
    /// Determined's adaptive ASHA: several async_halving brackets.
    AdaptiveAsha {
        /// How many trials in all.
        max_trials: u32,
        /// Bracket selection.
        mode: AdaptiveMode,
        /// Keep the top `1/divisor` at each rung.
        divisor: f64,
        /// Upper bound on rungs per bracket.
        max_rungs: u32,
        /// Explicit bracket sizes (overrides `mode`).
        bracket_rungs: Vec<u32>,
        /// How many may run at once, split across brackets.
        max_concurrent_trials: u32,
        /// The training budget.
        #[serde(flatten)]
        budget: Budget,
    },
    /// Resolute extension: promotion-based ASHA (trials pause at rungs and resume
    /// from their checkpoint when promoted).
    Asha {
        /// Number of rungs.
        num_rungs: u32,
        /// How many trials in all.
        max_trials: u32,
        /// Promote the top `1/divisor` of each rung.
        divisor: f64,
        /// How many may run at once.
        max_concurrent_trials: u32,
        /// The training budget.
        #[serde(flatten)]
        budget: Budget,
    },
    /// Resolute extension: synchronous Hyperband brackets.
    Hyperband {
        /// Upper bound on the number of brackets (and rungs of the largest bracket).
        max_rungs: u32,
        /// η: keep the top `1/divisor` of each rung.
        divisor: f64,
        /// How many may run at once.
        max_concurrent_trials: u32,
        /// The training budget.
        #[serde(flatten)]
        budget: Budget,
    },
    /// Resolute extension: Population Based Training (Determined ≤ 0.15 field names).
    Pbt {
        /// Trials alive at once.
        population_size: u32,
        /// Rounds of train / exploit / explore.
        num_rounds: u32,
        /// The ready interval, in `time_metric` units.
        length_per_round: u64,
        /// The metric that counts training progress.
        time_metric: String,
        /// Exploit: which fraction to replace.
        replace_function: ReplaceFunction,
        /// Explore: how to perturb.
        explore_function: ExploreFunction,
    },
}

/// PBT exploit settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplaceFunction {
    /// The bottom fraction is replaced by copies of the top fraction (0 to 0.5).
    pub truncate_fraction: f64,
}

/// PBT explore settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExploreFunction {
    /// Probability of resampling a hyperparameter instead of perturbing it.
    pub resample_probability: f64,
    /// A perturbed value is multiplied by `1 ± perturb_factor`.
    pub perturb_factor: f64,
}

impl SearchMethod {
    /// The searcher's name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            SearchMethod::Single { .. } => "single",
            SearchMethod::Random { .. } => "random",
            SearchMethod::Grid { .. } => "grid",
            SearchMethod::AsyncHalving { .. } => "async_halving",
            SearchMethod::AdaptiveAsha { .. } => "adaptive_asha",
            SearchMethod::Asha { .. } => "asha",
            SearchMethod::Hyperband { .. } => "hyperband",
            SearchMethod::Pbt { .. } => "pbt",
        }
    }

    /// The unit and the longest any trial trains, when the searcher knows it.
    pub fn budget(&self) -> Option<Budget> {
        match self {
            SearchMethod::Single { budget }
            | SearchMethod::Random { budget, .. }
            | SearchMethod::Grid { budget, .. } => budget.clone(),
            SearchMethod::AsyncHalving { budget, .. }
            | SearchMethod::AdaptiveAsha { budget, .. }
            | SearchMethod::Asha { budget, .. }
            | SearchMethod::Hyperband { budget, .. } => Some(budget.clone()),
            SearchMethod::Pbt {
                num_rounds,
                length_per_round,
                time_metric,
                ..
            } => Some(Budget {
                time_metric: time_metric.clone(),
                max_time: length_per_round.saturating_mul(u64::from(*num_rounds)),
            }),
        }
    }
}

/// Largest `k` with `base^k <= x`, exact for integer bases (no `ln(x)/ln(base)`
/// rounding at exact powers such as 1000 = 10^3). `base` must be > 1.
pub fn floor_log(x: u64, base: f64) -> u32 {
    assert!(base > 1.0, "floor_log needs base > 1");
    let x = x as f64;
    let mut power = 1.0f64;
    let mut k = 0u32;
    // Base > 1 and rungs are capped at RUNGS_MAX, so 64 steps are plenty.
    while k < 64 && power * base <= x * (1.0 + 1e-12) {
        power *= base;
        k += 1;
    }
    k
}

/// Trials a Hyperband search creates: bracket `s` of `s_max` starts
/// `ceil((s_max + 1) / (s + 1) * divisor^s)` trials.
pub fn hyperband_bracket_trials(max_time: u64, divisor: f64, max_rungs: u32) -> Vec<f64> {
    let s_max = (max_rungs.max(1) - 1).min(floor_log(max_time, divisor));
    (0..=s_max)
        .rev()
        .map(|s| (f64::from(s_max + 1) / f64::from(s + 1) * divisor.powi(s as i32)).ceil())
        .collect()
}

/// Searcher names this parser accepts.
pub const NAMES: [&str; 8] = [
    "single",
    "random",
    "grid",
    "async_halving",
    "adaptive_asha",
    "asha",
    "hyperband",
    "pbt",
];
/// Names Determined accepted once and removed in 0.38.
const EOL_NAMES: [&str; 4] = ["adaptive", "adaptive_simple", "sync_halving", "custom"];

const COMMON: [&str; 5] = [
    "name",
    "metric",
    "smaller_is_better",
    "source_trial_id",
    "source_checkpoint_uuid",
];

/// Reads the `searcher` section.
pub fn parse(diag: &mut Diag, node: &Node, path: &str) -> Option<SearcherConfig> {
    let NodeKind::Map(_) = &node.kind else {
        diag.error(
            node.pos,
            path,
            format!("expected a map, found {}", node.type_name()),
        );
        return None;
    };
    let Some(name_node) = node.get("name").filter(|n| n.kind != NodeKind::Null) else {
        diag.error(
            node.pos,
            &format!("{path}.name"),
            format!("missing required field (one of: {})", NAMES.join(", ")),
        );
        return None;
    };
    let name = read::string(diag, name_node, &format!("{path}.name"))?;
    let own: &[&str] = match name.as_str() {
        "single" => &["max_length", "time_metric", "max_time"],
        "random" => &[
            "max_trials",
            "max_concurrent_trials",
            "max_length",
            "time_metric",
            "max_time",
        ],
        "grid" => &[
            "max_concurrent_trials",
            "max_length",
            "time_metric",
            "max_time",
        ],
        "async_halving" => &[
            "num_rungs",
            "max_trials",
            "divisor",
            "max_concurrent_trials",
            "max_length",
            "time_metric",
            "max_time",
        ],
        "adaptive_asha" => &[
            "max_trials",
            "mode",
            "divisor",
            "max_rungs",
            "bracket_rungs",
            "max_concurrent_trials",
            "max_length",
            "time_metric",
            "max_time",
        ],
        "asha" => &[
            "num_rungs",
            "max_trials",
            "divisor",
            "max_concurrent_trials",
            "time_metric",
            "max_time",
        ],
        "hyperband" => &[
            "max_rungs",
            "divisor",
            "max_concurrent_trials",
            "time_metric",
            "max_time",
        ],
        "pbt" => &[
            "population_size",
            "num_rounds",
            "length_per_round",
            "time_metric",
            "replace_function",
            "explore_function",
        ],
        other => {
            let message = if EOL_NAMES.contains(&other) {
                format!("searcher `{other}` was removed in Determined 0.38 and is not supported; use adaptive_asha")
            } else {
                match suggest(other, &NAMES) {
                    Some(s) => format!("unknown searcher `{other}` (did you mean {s}?)"),
                    None => format!(
                        "unknown searcher `{other}` (expected one of: {})",
                        NAMES.join(", ")
                    ),
                }
            };
            diag.error(name_node.pos, &format!("{path}.name"), message);
            return None;
        }
    };
    let mut known: Vec<Known<'_>> = COMMON.iter().chain(own).map(|k| Known::Used(k)).collect();
    if matches!(name.as_str(), "async_halving" | "adaptive_asha") {
        known.push(Known::Ignored(
            "stop_once",
            "Resolute's async_halving and adaptive_asha always stop trials early (Determined 0.38 semantics)",
        ));
    }
    let f = Fields::read(diag, node, path, &known)?;
    let metric = match f.get("metric") {
        Some(n) => read::string(diag, n, &f.path_of("metric")),
        None => {
            f.missing(
                diag,
                "metric",
                " (the name of the validation metric to optimize)",
            );
            None
        }
    };
    let smaller_is_better = opt(diag, &f, "smaller_is_better", read::boolean).unwrap_or(Some(true));
    let source_trial_id = opt(diag, &f, "source_trial_id", |d, n, p| {
        read::uint(d, n, p, 0, u64::MAX)
    });
    let source_checkpoint_uuid = opt(diag, &f, "source_checkpoint_uuid", read::string);
    let method = parse_method(diag, &f, &name);
    Some(SearcherConfig {
        method: method?,
        metric: metric?,
        smaller_is_better: smaller_is_better?,
        source_trial_id: source_trial_id.flatten(),
        source_checkpoint_uuid: source_checkpoint_uuid.flatten(),
    })
}

/// Reads an optional field: `None` when absent, `Some(None)` when present but invalid.
fn opt<T>(
    diag: &mut Diag,
    f: &Fields<'_>,
    key: &str,
    reader: impl Fn(&mut Diag, &Node, &str) -> Option<T>,
) -> Option<Option<T>> {
    f.get(key).map(|n| reader(diag, n, &f.path_of(key)))
}

fn count_field(
    diag: &mut Diag,
    f: &Fields<'_>,
    key: &str,
    min: u64,
    max: u64,
    default: Option<u32>,
) -> Option<u32> {
    match f.get(key) {
        Some(n) => {
            read::uint(diag, n, &f.path_of(key), min, max).and_then(|v| u32::try_from(v).ok())
        }
        None => {
            if default.is_none() {
                f.missing(diag, key, "");
            }
            default
        }
    }
}

fn divisor(diag: &mut Diag, f: &Fields<'_>, default: f64) -> Option<f64> {
    match f.get("divisor") {
        Some(n) => read::number_where(diag, n, &f.path_of("divisor"), |d| {
            (d <= 1.0 || d > 1000.0).then_some("greater than 1 (and at most 1000)")
        }),
        None => Some(default),
    }
}

fn parse_method(diag: &mut Diag, f: &Fields<'_>, name: &str) -> Option<SearchMethod> {
    let mct = |diag: &mut Diag| {
        count_field(
            diag,
            f,
            "max_concurrent_trials",
            0,
            CONCURRENCY_MAX,
            Some(CONCURRENCY_DEFAULT),
        )
    };
    match name {
        "single" => Some(SearchMethod::Single {
            budget: budget(diag, f, false)?,
        }),
        "random" => {
            let max_trials = count_field(diag, f, "max_trials", 1, TRIALS_MAX, None);
            let mct = mct(diag);
            let budget = budget(diag, f, false);
            Some(SearchMethod::Random {
                max_trials: max_trials?,
                max_concurrent_trials: mct?,
                budget: budget?,
            })
        }
        "grid" => {
            let mct = mct(diag);
            let budget = budget(diag, f, false);
            Some(SearchMethod::Grid {
                max_concurrent_trials: mct?,
                budget: budget?,
            })
        }
        "async_halving" | "asha" => {
            let num_rungs = count_field(diag, f, "num_rungs", 1, RUNGS_MAX, None);
            let max_trials = count_field(diag, f, "max_trials", 1, TRIALS_MAX, None);
            let divisor = divisor(diag, f, DIVISOR_DEFAULT);
            let mct = mct(diag);
            let budget = budget(diag, f, true);
            let (num_rungs, max_trials, divisor, max_concurrent_trials) =
                (num_rungs?, max_trials?, divisor?, mct?);
            let budget = budget??;
            Some(if name == "asha" {
                SearchMethod::Asha {
                    num_rungs,
                    max_trials,
                    divisor,
                    max_concurrent_trials,
                    budget,
                }
            } else {
                SearchMethod::AsyncHalving {
                    num_rungs,
                    max_trials,
                    divisor,
                    max_concurrent_trials,
                    budget,
                }
            })
        }
        "adaptive_asha" => {
            let max_trials = count_field(diag, f, "max_trials", 1, TRIALS_MAX, None);
            let mode = match f.get("mode") {
                None => Some(AdaptiveMode::Standard),
                Some(n) => mode(diag, n, &f.path_of("mode")),
            };
            let divisor = divisor(diag, f, DIVISOR_DEFAULT);
            let max_rungs =
                count_field(diag, f, "max_rungs", 1, RUNGS_MAX, Some(MAX_RUNGS_DEFAULT));
            let bracket_rungs = match f.get("bracket_rungs") {
                None => Some(Vec::new()),
                Some(n) => bracket_rungs(diag, n, &f.path_of("bracket_rungs")),
            };
            let mct = mct(diag);
            let budget = budget(diag, f, true);
            Some(SearchMethod::AdaptiveAsha {
                max_trials: max_trials?,
                mode: mode?,
                divisor: divisor?,
                max_rungs: max_rungs?,
                bracket_rungs: bracket_rungs?,
                max_concurrent_trials: mct?,
                budget: budget??,
            })
        }
        "hyperband" => {
            let max_rungs =
                count_field(diag, f, "max_rungs", 1, RUNGS_MAX, Some(MAX_RUNGS_DEFAULT));
            let divisor = divisor(diag, f, HYPERBAND_DIVISOR_DEFAULT);
            let mct = mct(diag);
            let budget = budget(diag, f, true);
            let (max_rungs, divisor, budget) = (max_rungs?, divisor?, budget??);
            let trials: f64 = hyperband_bracket_trials(budget.max_time, divisor, max_rungs)
                .iter()
                .sum();
            if trials > TRIALS_MAX as f64 {
                let pos = f.get("max_rungs").map_or(f.pos, |n| n.pos);
                diag.error(
                    pos,
                    &f.path_of("max_rungs"),
                    format!("these brackets would create {trials:.0} trials; at most {TRIALS_MAX} are allowed (lower max_rungs or raise divisor)"),
                );
                return None;
            }
            Some(SearchMethod::Hyperband {
                max_rungs,
                divisor,
                max_concurrent_trials: mct?,
                budget,
            })
        }
        "pbt" => parse_pbt(diag, f),
        _ => None,
    }
}

fn mode(diag: &mut Diag, node: &Node, path: &str) -> Option<AdaptiveMode> {
    let text = read::string(diag, node, path)?;
    match text.as_str() {
        "aggressive" => Some(AdaptiveMode::Aggressive),
        "standard" => Some(AdaptiveMode::Standard),
        "conservative" => Some(AdaptiveMode::Conservative),
        other => {
            diag.error(
                node.pos,
                path,
                format!("unknown mode `{other}` (expected aggressive, standard or conservative)"),
            );
            None
        }
    }
}

fn bracket_rungs(diag: &mut Diag, node: &Node, path: &str) -> Option<Vec<u32>> {
    let NodeKind::Seq(items) = &node.kind else {
        diag.error(
            node.pos,
            path,
            format!("expected a list of integers, found {}", node.type_name()),
        );
        return None;
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        out.push(read::uint(diag, item, &format!("{path}[{i}]"), 1, RUNGS_MAX)? as u32);
    }
    Some(out)
}

/// Reads `time_metric` + `max_time`, or the deprecated `max_length`.
/// Returns `Some(None)` when no budget is given and none is required.
fn budget(diag: &mut Diag, f: &Fields<'_>, required: bool) -> Option<Option<Budget>> {
    let time_metric = opt(diag, f, "time_metric", read::string);
    let max_time = opt(diag, f, "max_time", |d, n, p| {
        read::uint(d, n, p, 1, TIME_MAX)
    });
    let legacy = match f.get("max_length") {
        None => None,
        Some(n) => Some(legacy_length(diag, n, &f.path_of("max_length"))?),
    };
    let (time_metric, max_time) = match (time_metric, max_time) {
        (Some(t), Some(m)) => (Some(t?), Some(m?)),
        (t, m) => (t.flatten(), m.flatten()),
    };
    match (legacy, time_metric, max_time) {
        (Some((unit, len)), t, m) => {
            let pos = f.get("max_length").map(|n| n.pos).unwrap_or(f.pos);
            if m.is_some() {
                diag.error(
                    pos,
                    &f.path_of("max_length"),
                    "give either max_time or the deprecated max_length, not both",
                );
                return None;
            }
            let time_metric = match (unit, t) {
                (Some(u), None) => u,
                (_, Some(t)) => t,
                (None, None) => {
                    diag.error(
                        pos,
                        &f.path_of("max_length"),
                        "a bare max_length needs time_metric to name its unit",
                    );
                    return None;
                }
            };
            diag.warn(
                pos,
                &f.path_of("max_length"),
                format!("deprecated since Determined 0.38: read as `time_metric: {time_metric}` and `max_time: {len}`; the training code must report `{time_metric}` in its validation metrics"),
            );
            Some(Some(Budget {
                time_metric,
                max_time: len,
            }))
        }
        (None, Some(time_metric), Some(max_time)) => Some(Some(Budget {
            time_metric,
            max_time,
        })),
        (None, None, None) if !required => Some(None),
        (None, t, m) => {
            let missing = if t.is_none() {
                "time_metric"
            } else {
                "max_time"
            };
            let _ = m;
            let why = if required {
                " (this searcher needs both time_metric and max_time)"
            } else {
                " (give both time_metric and max_time, or neither)"
            };
            f.missing(diag, missing, why);
            None
        }
    }
}

/// Reads a legacy length: `{batches|records|epochs: N}` or a bare integer.
/// Returns the unit (if named) and the length.
fn legacy_length(diag: &mut Diag, node: &Node, path: &str) -> Option<(Option<String>, u64)> {
    match &node.kind {
        NodeKind::Map(entries) if entries.len() == 1 => {
            let (key, value) = &entries[0];
            if !matches!(key.name.as_str(), "batches" | "records" | "epochs") {
                diag.error(
                    key.pos,
                    &format!("{path}.{}", key.name),
                    "a length must be one of batches, records or epochs",
                );
                return None;
            }
            let len = read::uint(diag, value, &format!("{path}.{}", key.name), 1, TIME_MAX)?;
            Some((Some(key.name.clone()), len))
        }
        NodeKind::Int(_) => Some((None, read::uint(diag, node, path, 1, TIME_MAX)?)),
        _ => {
            diag.error(node.pos, path, "a length must be a map with one of batches, records or epochs, e.g. {batches: 1000}");
            None
        }
    }
}

fn parse_pbt(diag: &mut Diag, f: &Fields<'_>) -> Option<SearchMethod> {
    let population_size = count_field(diag, f, "population_size", 1, TRIALS_MAX, None);
    let num_rounds = count_field(diag, f, "num_rounds", 1, TRIALS_MAX, None);
    let time_metric = opt(diag, f, "time_metric", read::string);
    let length = match f.get("length_per_round") {
        Some(n) => legacy_length(diag, n, &f.path_of("length_per_round")),
        None => {
            f.missing(
                diag,
                "length_per_round",
                " (the ready interval, in time_metric units)",
            );
            None
        }
    };
    let replace = match f.get("replace_function") {
        Some(n) => {
            let path = f.path_of("replace_function");
            Fields::read(diag, n, &path, &[Known::Used("truncate_fraction")]).and_then(
                |rf| match rf.get("truncate_fraction") {
                    Some(v) => read::number_where(diag, v, &rf.path_of("truncate_fraction"), |x| {
                        (!(0.0..=0.5).contains(&x)).then_some("between 0 and 0.5")
                    })
                    .map(|truncate_fraction| ReplaceFunction { truncate_fraction }),
                    None => {
                        rf.missing(diag, "truncate_fraction", "");
                        None
                    }
                },
            )
        }
        None => {
            f.missing(diag, "replace_function", " (with truncate_fraction)");
            None
        }
    };
    let explore = match f.get("explore_function") {
        Some(n) => {
            let path = f.path_of("explore_function");
            let keys = [
                Known::Used("resample_probability"),
                Known::Used("perturb_factor"),
            ];
            Fields::read(diag, n, &path, &keys).and_then(|ef| {
                let unit = |diag: &mut Diag, key: &str| match ef.get(key) {
                    Some(v) => read::number_where(diag, v, &ef.path_of(key), |x| {
                        (!(0.0..=1.0).contains(&x)).then_some("between 0 and 1")
                    }),
                    None => {
                        ef.missing(diag, key, "");
                        None
                    }
                };
                let resample_probability = unit(diag, "resample_probability");
                let perturb_factor = unit(diag, "perturb_factor");
                Some(ExploreFunction {
                    resample_probability: resample_probability?,
                    perturb_factor: perturb_factor?,
                })
            })
        }
        None => {
            f.missing(
                diag,
                "explore_function",
                " (with resample_probability and perturb_factor)",
            );
            None
        }
    };
    let (unit, length_per_round) = length?;
    let time_metric = match (time_metric.flatten(), unit) {
        (Some(t), _) => t,
        (None, Some(u)) => u,
        (None, None) => {
            f.missing(
                diag,
                "time_metric",
                " (the metric that counts training progress)",
            );
            return None;
        }
    };
    let (population_size, num_rounds, replace_function) = (population_size?, num_rounds?, replace?);
    let copies = (replace_function.truncate_fraction * f64::from(population_size)) as u64;
    let trials = u64::from(population_size) + copies * u64::from(num_rounds - 1);
    if trials > TRIALS_MAX {
        diag.error(f.pos, &f.path_of("num_rounds"), format!("population_size, num_rounds and truncate_fraction would create {trials} trials; at most {TRIALS_MAX} are allowed"));
        return None;
    }
    Some(SearchMethod::Pbt {
        population_size,
        num_rounds,
        length_per_round,
        time_metric,
        replace_function,
        explore_function: explore?,
    })
}
