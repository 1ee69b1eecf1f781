//! Sampling, grids and PBT's explore step over a hyperparameter space.
//!
//! Keys are visited in sorted order at every depth (Determined visits nested maps in
//! Go's random map order; sorting makes the draws reproducible).

use std::collections::BTreeMap;

use resolute_types::config::{Hyperparameter, Hyperparameters};
use resolute_types::Value;

use crate::rng::ExperimentRng;

/// Draws one value for every hyperparameter.
pub fn sample_all(space: &Hyperparameters, rng: &mut ExperimentRng) -> Value {
    Value::Map(
        space
            .iter()
            .map(|(k, hp)| (k.clone(), sample_one(hp, rng)))
            .collect(),
    )
}

fn sample_one(hp: &Hyperparameter, rng: &mut ExperimentRng) -> Value {
    match hp {
        Hyperparameter::Const { val } => val.clone(),
        Hyperparameter::Int { minval, maxval, .. } => {
            // The config parser bounds |minval|, |maxval| by 2^53, so this cannot overflow.
            let span = (maxval - minval + 1) as u64;
            Value::Int(minval + rng.below(span) as i64)
        }
        Hyperparameter::Double { minval, maxval, .. } => {
            Value::Float(rng.uniform(*minval, *maxval))
        }
        Hyperparameter::Log {
            minval,
            maxval,
            base,
            ..
        } => Value::Float(base.powf(rng.uniform(*minval, *maxval))),
        Hyperparameter::Categorical { vals } => vals[rng.below(vals.len() as u64) as usize].clone(),
        Hyperparameter::Nested(inner) => sample_all(inner, rng),
    }
}

/// One axis of the grid: a path of keys and the values at that path.
struct Axis {
    route: Vec<String>,
    values: Vec<Value>,
}

/// Every point of the grid, first sorted key outermost.
pub fn grid(space: &Hyperparameters) -> Vec<Value> {
    let mut axes = Vec::new();
    for (name, hp) in space {
        grid_axes(vec![name.clone()], hp, &mut axes);
    }
    if axes.is_empty() {
        return Vec::new();
    }
    let total: usize = axes.iter().map(|a| a.values.len()).product();
    let mut points = Vec::with_capacity(total);
    let mut index = vec![0usize; axes.len()];
    for _ in 0..total {
        let mut point = Value::Map(BTreeMap::new());
        for (axis, &i) in axes.iter().zip(&index) {
            insert_at(&mut point, &axis.route, axis.values[i].clone());
        }
        points.push(point);
        // Odometer increment: the last axis turns fastest.
        for pos in (0..axes.len()).rev() {
            index[pos] += 1;
            if index[pos] < axes[pos].values.len() {
                break;
            }
            index[pos] = 0;
        }
    }
    points
}

fn grid_axes(route: Vec<String>, hp: &Hyperparameter, axes: &mut Vec<Axis>) {
    let values = match hp {
        Hyperparameter::Const { val } => vec![val.clone()],
        Hyperparameter::Int {
            minval,
            maxval,
            count,
        } => {
            let span = (maxval - minval + 1) as u64;
            let count = count.unwrap_or(1).min(span);
            if count == 1 {
                vec![Value::Int((((minval + maxval) as f64) / 2.0).round() as i64)]
            } else {
                (0..count)
                    .map(|i| {
                        let step =
                            (i as i128 * (maxval - minval) as i128) as f64 / (count - 1) as f64;
                        Value::Int((*minval as f64 + step).round() as i64)
                    })
                    .collect()
            }
        }
        Hyperparameter::Double {
            minval,
            maxval,
            count,
        } => linspace(*minval, *maxval, count.unwrap_or(1))
            .into_iter()
            .map(Value::Float)
            .collect(),
        Hyperparameter::Log {
            minval,
            maxval,
            base,
            count,
        } => linspace(*minval, *maxval, count.unwrap_or(1))
            .into_iter()
            .map(|e| Value::Float(base.powf(e)))
            .collect(),
        Hyperparameter::Categorical { vals } => vals.clone(),
        Hyperparameter::Nested(inner) => {
            if inner.is_empty() {
                // Keep empty maps in the samples, as Determined does.
                vec![Value::Map(BTreeMap::new())]
            } else {
                for (name, sub) in inner {
                    let mut sub_route = route.clone();
                    sub_route.push(name.clone());
                    grid_axes(sub_route, sub, axes);
                }
                return;
            }
        }
    };
    axes.push(Axis { route, values });
}

fn linspace(lo: f64, hi: f64, count: u64) -> Vec<f64> {
    if count <= 1 {
        return vec![(lo + hi) / 2.0];
    }
    (0..count)
        .map(|i| lo + i as f64 * (hi - lo) / (count - 1) as f64)
        .collect()
}

fn insert_at(point: &mut Value, route: &[String], value: Value) {
    let Value::Map(map) = point else { return };
    match route {
        [] => {}
        [last] => {
            map.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let child = map
                .entry(first.clone())
                .or_insert_with(|| Value::Map(BTreeMap::new()));
            insert_at(child, rest, value);
        }
    }
}

/// PBT's explore: each hyperparameter is resampled with `resample_probability`,
/// otherwise multiplied by `1 - perturb_factor` or `1 + perturb_factor` (even odds)
/// and clamped to its range. Constants and categoricals are kept unless resampled.
pub fn explore(
    space: &Hyperparameters,
    old: &Value,
    resample_probability: f64,
    perturb_factor: f64,
    rng: &mut ExperimentRng,
) -> Value {
    let empty = BTreeMap::new();
    let old_map = old.as_map().unwrap_or(&empty);
    let mut out = BTreeMap::new();
    for (name, hp) in space {
        let prev = old_map.get(name).cloned().unwrap_or(Value::Null);
        let value = if let Hyperparameter::Nested(inner) = hp {
            explore(inner, &prev, resample_probability, perturb_factor, rng)
        } else if rng.unit() < resample_probability {
            sample_one(hp, rng)
        } else {
            let decrease = rng.unit() < 0.5;
            let factor = if decrease {
                1.0 - perturb_factor
            } else {
                1.0 + perturb_factor
            };
            perturb(hp, prev, factor, decrease)
        };
        out.insert(name.clone(), value);
    }
    Value::Map(out)
}

fn perturb(hp: &Hyperparameter, prev: Value, factor: f64, decrease: bool) -> Value {
    match (hp, &prev) {
        (Hyperparameter::Int { minval, maxval, .. }, Value::Int(v)) => {
            let scaled = *v as f64 * factor;
            let rounded = if decrease {
                scaled.floor()
            } else {
                scaled.ceil()
            };
            Value::Int((rounded as i64).clamp(*minval, *maxval))
        }
        (Hyperparameter::Double { minval, maxval, .. }, v) => match v.as_f64() {
            Some(x) => Value::Float((x * factor).clamp(*minval, *maxval)),
            None => prev,
        },
        (
            Hyperparameter::Log {
                minval,
                maxval,
                base,
                ..
            },
            v,
        ) => match v.as_f64() {
            Some(x) => Value::Float((x * factor).clamp(base.powf(*minval), base.powf(*maxval))),
            None => prev,
        },
        _ => prev,
    }
}
