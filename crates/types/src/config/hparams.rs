//! The `hyperparameters` section: Determined's five types plus nested maps.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use super::diag::{join, Diag, Fields, Known};
use super::read;
use crate::value::Value;
use crate::yaml::{Node, NodeKind};

/// Largest magnitude of an `int` bound; keeps `maxval - minval + 1` and its float
/// conversions exact.
pub const INT_BOUND_ABS_MAX: i64 = 1 << 53;
/// Largest `count` of one hyperparameter axis.
pub const COUNT_MAX: u64 = 1_000_000;
/// Deepest nesting of hyperparameter maps.
pub const NESTING_MAX: usize = 16;

/// The hyperparameter space: names (sorted) to their definitions.
pub type Hyperparameters = BTreeMap<String, Hyperparameter>;

/// One hyperparameter, as in Determined's `hyperparameter-*.json` schemas.
#[derive(Debug, Clone, PartialEq)]
pub enum Hyperparameter {
    /// A fixed value (also written as a bare scalar or list).
    Const {
        /// The value.
        val: Value,
    },
    /// An integer, uniform over `minval..=maxval`.
    Int {
        /// Smallest value (inclusive).
        minval: i64,
        /// Largest value (inclusive).
        maxval: i64,
        /// Number of grid points (grid search only).
        count: Option<u64>,
    },
    /// A float, uniform over `[minval, maxval)`.
    Double {
        /// Lower bound.
        minval: f64,
        /// Upper bound.
        maxval: f64,
        /// Number of grid points (grid search only).
        count: Option<u64>,
    },
    /// `base ^ uniform(minval, maxval)`: minval and maxval are exponents.
    Log {
        /// Smallest exponent.
        minval: f64,
        /// Largest exponent.
        maxval: f64,
        /// The base (required, > 0).
        base: f64,
        /// Number of grid points (grid search only).
        count: Option<u64>,
    },
    /// One of `vals`, uniformly.
    Categorical {
        /// The choices (any values, at least one).
        vals: Vec<Value>,
    },
    /// A map of hyperparameters (a YAML map without `type`), to any depth.
    Nested(Hyperparameters),
}

impl Hyperparameter {
    /// The Determined form of the definition, as a value (`{type: int, minval: ...}`).
    pub fn to_value(&self) -> Value {
        fn map(entries: Vec<(&str, Value)>) -> Value {
            Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            )
        }
        fn count(entries: &mut Vec<(&str, Value)>, count: Option<u64>) {
            if let Some(c) = count {
                entries.push(("count", Value::Int(c as i64)));
            }
        }
        match self {
            Hyperparameter::Const { val } => {
                map(vec![("type", "const".into()), ("val", val.clone())])
            }
            Hyperparameter::Int {
                minval,
                maxval,
                count: c,
            } => {
                let mut e = vec![
                    ("type", "int".into()),
                    ("minval", (*minval).into()),
                    ("maxval", (*maxval).into()),
                ];
                count(&mut e, *c);
                map(e)
            }
            Hyperparameter::Double {
                minval,
                maxval,
                count: c,
            } => {
                let mut e = vec![
                    ("type", "double".into()),
                    ("minval", (*minval).into()),
                    ("maxval", (*maxval).into()),
                ];
                count(&mut e, *c);
                map(e)
            }
            Hyperparameter::Log {
                minval,
                maxval,
                base,
                count: c,
            } => {
                let mut e = vec![
                    ("type", "log".into()),
                    ("minval", (*minval).into()),
                    ("maxval", (*maxval).into()),
                    ("base", (*base).into()),
                ];
                count(&mut e, *c);
                map(e)
            }
            Hyperparameter::Categorical { vals } => map(vec![
                ("type", "categorical".into()),
                ("vals", Value::List(vals.clone())),
            ]),
            Hyperparameter::Nested(inner) => Value::Map(
                inner
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

impl Serialize for Hyperparameter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

const TYPES: [&str; 5] = ["const", "int", "double", "log", "categorical"];

/// Reads the `hyperparameters` map.
pub fn parse(diag: &mut Diag, node: &Node, path: &str) -> Hyperparameters {
    parse_map(diag, node, path, 0)
}

fn parse_map(diag: &mut Diag, node: &Node, path: &str, depth: usize) -> Hyperparameters {
    let mut out = Hyperparameters::new();
    match &node.kind {
        NodeKind::Null => {}
        NodeKind::Map(entries) => {
            for (key, value) in entries {
                let key_path = join(path, &key.name);
                if let Some(hp) = parse_one(diag, value, &key_path, depth) {
                    out.insert(key.name.clone(), hp);
                }
            }
        }
        _ => diag.error(
            node.pos,
            path,
            format!("expected a map, found {}", node.type_name()),
        ),
    }
    out
}

fn parse_one(diag: &mut Diag, node: &Node, path: &str, depth: usize) -> Option<Hyperparameter> {
    let NodeKind::Map(_) = &node.kind else {
        return Some(Hyperparameter::Const {
            val: node.to_value(),
        });
    };
    let Some(type_node) = node.get("type") else {
        if depth + 1 >= NESTING_MAX {
            diag.error(
                node.pos,
                path,
                format!("hyperparameters nested deeper than {NESTING_MAX} levels"),
            );
            return None;
        }
        return Some(Hyperparameter::Nested(parse_map(
            diag,
            node,
            path,
            depth + 1,
        )));
    };
    let type_path = join(path, "type");
    let kind = read::string(diag, type_node, &type_path)?;
    match kind.as_str() {
        "const" => parse_const(diag, node, path),
        "int" => parse_int(diag, node, path),
        "double" => parse_double(diag, node, path),
        "log" => parse_log(diag, node, path),
        "categorical" => parse_categorical(diag, node, path),
        other => {
            let hint = match super::diag::suggest(other, &TYPES) {
                Some(s) => format!(" (did you mean {s}?)"),
                None => format!(" (expected one of: {})", TYPES.join(", ")),
            };
            diag.error(
                type_node.pos,
                &type_path,
                format!("unknown hyperparameter type `{other}`{hint}"),
            );
            None
        }
    }
}

fn parse_const(diag: &mut Diag, node: &Node, path: &str) -> Option<Hyperparameter> {
    let f = Fields::read(diag, node, path, &[Known::Used("type"), Known::Used("val")])?;
    // `val: null` is a legitimate constant, so look at the raw entry.
    match node.get("val") {
        Some(v) => Some(Hyperparameter::Const { val: v.to_value() }),
        None => {
            f.missing(diag, "val", "");
            None
        }
    }
}

const RANGE_KEYS: [Known<'static>; 4] = [
    Known::Used("type"),
    Known::Used("minval"),
    Known::Used("maxval"),
    Known::Used("count"),
];

fn count(diag: &mut Diag, f: &Fields<'_>) -> Option<Option<u64>> {
    match f.get("count") {
        None => Some(None),
        Some(n) => read::uint(diag, n, &f.path_of("count"), 1, COUNT_MAX).map(Some),
    }
}

fn required<'a>(diag: &mut Diag, f: &Fields<'a>, key: &str) -> Option<&'a Node> {
    let node = f.get(key);
    if node.is_none() {
        f.missing(diag, key, "");
    }
    node
}

fn parse_int(diag: &mut Diag, node: &Node, path: &str) -> Option<Hyperparameter> {
    let f = Fields::read(diag, node, path, &RANGE_KEYS)?;
    let (lo, hi) = (required(diag, &f, "minval"), required(diag, &f, "maxval"));
    let bound = INT_BOUND_ABS_MAX;
    let minval = lo.and_then(|n| read::int(diag, n, &f.path_of("minval"), -bound, bound));
    let maxval = hi.and_then(|n| read::int(diag, n, &f.path_of("maxval"), -bound, bound));
    let count = count(diag, &f);
    let (minval, maxval, count) = (minval?, maxval?, count?);
    if minval >= maxval {
        diag.error(
            node.pos,
            path,
            format!("minval ({minval}) must be less than maxval ({maxval})"),
        );
        return None;
    }
    Some(Hyperparameter::Int {
        minval,
        maxval,
        count,
    })
}

fn parse_double(diag: &mut Diag, node: &Node, path: &str) -> Option<Hyperparameter> {
    let f = Fields::read(diag, node, path, &RANGE_KEYS)?;
    let (lo, hi) = (required(diag, &f, "minval"), required(diag, &f, "maxval"));
    let minval = lo.and_then(|n| read::number(diag, n, &f.path_of("minval")));
    let maxval = hi.and_then(|n| read::number(diag, n, &f.path_of("maxval")));
    let count = count(diag, &f);
    let (minval, maxval, count) = (minval?, maxval?, count?);
    if minval >= maxval {
        diag.error(
            node.pos,
            path,
            format!("minval ({minval}) must be less than maxval ({maxval})"),
        );
        return None;
    }
    Some(Hyperparameter::Double {
        minval,
        maxval,
        count,
    })
}

fn parse_log(diag: &mut Diag, node: &Node, path: &str) -> Option<Hyperparameter> {
    let keys = [
        Known::Used("type"),
        Known::Used("minval"),
        Known::Used("maxval"),
        Known::Used("base"),
        Known::Used("count"),
    ];
    let f = Fields::read(diag, node, path, &keys)?;
    let (lo, hi) = (required(diag, &f, "minval"), required(diag, &f, "maxval"));
    let base = f.get("base");
    if base.is_none() {
        f.missing(
            diag,
            "base",
            " (log hyperparameters need a base: minval and maxval are exponents)",
        );
    }
    let minval = lo.and_then(|n| read::number(diag, n, &f.path_of("minval")));
    let maxval = hi.and_then(|n| read::number(diag, n, &f.path_of("maxval")));
    let base = base.and_then(|n| {
        read::number_where(diag, n, &f.path_of("base"), |b| {
            (b <= 0.0).then_some("greater than 0")
        })
    });
    let count = count(diag, &f);
    let (minval, maxval, base, count) = (minval?, maxval?, base?, count?);
    if minval >= maxval {
        diag.error(
            node.pos,
            path,
            format!("minval ({minval}) must be less than maxval ({maxval})"),
        );
        return None;
    }
    if !base.powf(minval).is_finite() || !base.powf(maxval).is_finite() {
        diag.error(
            node.pos,
            path,
            format!("base^minval or base^maxval is not a finite number (base {base})"),
        );
        return None;
    }
    Some(Hyperparameter::Log {
        minval,
        maxval,
        base,
        count,
    })
}

fn parse_categorical(diag: &mut Diag, node: &Node, path: &str) -> Option<Hyperparameter> {
    let f = Fields::read(
        diag,
        node,
        path,
        &[Known::Used("type"), Known::Used("vals")],
    )?;
    let vals_node = required(diag, &f, "vals")?;
    let NodeKind::Seq(items) = &vals_node.kind else {
        diag.error(
            vals_node.pos,
            &f.path_of("vals"),
            format!("expected a list, found {}", vals_node.type_name()),
        );
        return None;
    };
    if items.is_empty() {
        diag.error(
            vals_node.pos,
            &f.path_of("vals"),
            "must list at least one value",
        );
        return None;
    }
    Some(Hyperparameter::Categorical {
        vals: items.iter().map(Node::to_value).collect(),
    })
}

/// Checks that every int/double/log leaf has a `count`, as grid search requires, and
/// returns the number of grid points (saturating).
pub fn check_grid(diag: &mut Diag, hps: &Hyperparameters, node: Option<&Node>, path: &str) -> u64 {
    let mut points: u64 = 1;
    for (name, hp) in hps {
        let hp_path = join(path, name);
        let hp_node = node.and_then(|n| n.get(name));
        let pos = hp_node.or(node).map(|n| n.pos).unwrap_or_default();
        let axis = match hp {
            Hyperparameter::Const { .. } => 1,
            Hyperparameter::Categorical { vals } => vals.len() as u64,
            Hyperparameter::Int {
                minval,
                maxval,
                count,
            } => match count {
                Some(c) => (*c).min((maxval - minval + 1) as u64),
                None => {
                    diag.error(pos, &join(&hp_path, "count"), "missing required field (the grid searcher needs a count for int, double and log hyperparameters)");
                    1
                }
            },
            Hyperparameter::Double { count, .. } | Hyperparameter::Log { count, .. } => match count
            {
                Some(c) => *c,
                None => {
                    diag.error(pos, &join(&hp_path, "count"), "missing required field (the grid searcher needs a count for int, double and log hyperparameters)");
                    1
                }
            },
            Hyperparameter::Nested(inner) => check_grid(diag, inner, hp_node, &hp_path),
        };
        points = points.saturating_mul(axis);
    }
    points
}
