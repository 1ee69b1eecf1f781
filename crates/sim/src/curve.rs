//! Simulated training: learning curves with a known optimum.
//!
//! Each experiment gets a seeded optimum point in its (normalized) search space.
//! A trial's final loss is `0.05 + mean squared distance` of its hyperparameters
//! from that point, and its loss after `u` units is the final loss plus
//! `exp(-u / tau)`: better hyperparameters are better at every length, so the
//! searchers' choices matter and their result can be scored against 0.05.

use std::collections::BTreeMap;

use resolute_types::config::{Hyperparameter, Hyperparameters};
use resolute_types::Value;

/// The loss floor every experiment can reach at its optimum.
pub const OPTIMUM_LOSS: f64 = 0.05;

/// The learning-curve family of one experiment.
#[derive(Debug, Clone)]
pub struct Curve {
    optimum: BTreeMap<String, f64>,
    tau: f64,
}

impl Curve {
    /// A curve family for `space`, seeded, with time constant `tau` units.
    pub fn new(space: &Hyperparameters, seed: u64, tau: f64) -> Self {
        let mut optimum = BTreeMap::new();
        let mut x = seed | 1;
        collect(space, "", &mut |path, _| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            optimum.insert(path.to_string(), (x >> 11) as f64 / (1u64 << 53) as f64);
        });
        Curve {
            optimum,
            tau: tau.max(1.0),
        }
    }

    /// The final loss of a trial with `hparams`.
    pub fn final_loss(&self, space: &Hyperparameters, hparams: &Value) -> f64 {
        let mut sum = 0.0;
        let mut n = 0;
        collect(space, "", &mut |path, hp| {
            if let (Some(u), Some(target)) = (
                normalized(hp, lookup(hparams, path)),
                self.optimum.get(path),
            ) {
                sum += (u - target) * (u - target);
                n += 1;
            }
        });
        OPTIMUM_LOSS + if n == 0 { 0.0 } else { sum / f64::from(n) }
    }

    /// The loss after `units` of training.
    pub fn loss(&self, final_loss: f64, units: u64) -> f64 {
        final_loss + (-(units as f64) / self.tau).exp()
    }
}

fn collect(space: &Hyperparameters, prefix: &str, f: &mut dyn FnMut(&str, &Hyperparameter)) {
    for (name, hp) in space {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match hp {
            Hyperparameter::Nested(inner) => collect(inner, &path, f),
            Hyperparameter::Int { .. }
            | Hyperparameter::Double { .. }
            | Hyperparameter::Log { .. }
            | Hyperparameter::Categorical { .. } => f(&path, hp),
            Hyperparameter::Const { .. } => {}
        }
    }
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        cur = cur.as_map()?.get(part)?;
    }
    Some(cur)
}

/// The value's position in its range, 0 to 1.
fn normalized(hp: &Hyperparameter, v: Option<&Value>) -> Option<f64> {
    let v = v?;
    match hp {
        Hyperparameter::Int { minval, maxval, .. } => {
            Some((v.as_f64()? - *minval as f64) / (*maxval - *minval) as f64)
        }
        Hyperparameter::Double { minval, maxval, .. } => {
            Some((v.as_f64()? - minval) / (maxval - minval))
        }
        Hyperparameter::Log {
            minval,
            maxval,
            base,
            ..
        } => {
            let x = v.as_f64()?;
            (x > 0.0).then(|| (x.ln() / base.ln() - minval) / (maxval - minval))
        }
        Hyperparameter::Categorical { vals } => {
            let i = vals.iter().position(|c| c == v)?;
            Some(if vals.len() > 1 {
                i as f64 / (vals.len() - 1) as f64
            } else {
                0.0
            })
        }
        _ => None,
    }
}
