//! The built-in trainer: a small multi-layer perceptron on the red wine quality
//! dataset (1,599 wines, 11 measurements, quality 3-8; shipped inside the
//! `linfa-datasets` crate), so the platform is useful and testable with no Python.
//!
//! It regresses quality (standardized features, mean squared error) with AdamW,
//! optional dropout and weight decay. Everything random (initial weights, the
//! order of each epoch, dropout masks) comes from ChaCha8 streams derived from the
//! trial seed, and a checkpoint holds the weights, the optimizer's moments, the
//! step and the dropout stream's position: on CPU, a run killed and resumed from a
//! checkpoint reports bit-identical metrics to one that never stopped.

use std::path::Path;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Rows held out for validation: every fifth wine.
const VALIDATION_EVERY_NTH_ROW: usize = 5;
/// Largest network the trainer builds (hidden width x depth).
pub const HIDDEN_WIDTH_MAX: usize = 1024;
/// Deepest network the trainer builds.
pub const DEPTH_MAX: usize = 16;
/// Name of the checkpoint file inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "trainer-state.bin";

/// Hyperparameters (all optional in the trial's `hparams`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hparams {
    /// AdamW learning rate.
    pub lr: f64,
    /// Units per hidden layer.
    pub hidden: usize,
    /// Hidden layers.
    pub depth: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Dropout probability after each hidden layer.
    pub dropout: f64,
    /// Batches between validations (and checkpoints).
    pub validate_every: u64,
}

impl Default for Hparams {
    fn default() -> Self {
        Hparams {
            lr: 0.003,
            hidden: 32,
            depth: 2,
            batch_size: 32,
            weight_decay: 0.0,
            dropout: 0.0,
            validate_every: 100,
        }
    }
}

impl Hparams {
    /// Reads hyperparameters from the trial's JSON, naming what is wrong.
    pub fn from_json(v: &serde_json::Value) -> Result<Hparams, String> {
        let h: Hparams =
            serde_json::from_value(v.clone()).map_err(|e| format!("hyperparameters: {e}"))?;
        let bad = |field: &str, why: &str| Err(format!("hyperparameters.{field}: {why}"));
        if !(h.lr > 0.0 && h.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if h.hidden == 0 || h.hidden > HIDDEN_WIDTH_MAX {
            return bad(
                "hidden",
                &format!("must be between 1 and {HIDDEN_WIDTH_MAX}"),
            );
        }
        if h.depth == 0 || h.depth > DEPTH_MAX {
            return bad("depth", &format!("must be between 1 and {DEPTH_MAX}"));
        }
        if h.batch_size == 0 || h.batch_size > 1024 {
            return bad("batch_size", "must be between 1 and 1024");
        }
        if !(0.0..1.0).contains(&h.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if !(h.weight_decay >= 0.0 && h.weight_decay.is_finite()) {
            return bad("weight_decay", "must not be negative");
        }
        if h.validate_every == 0 {
            return bad("validate_every", "must be positive");
        }
        Ok(h)
    }
}

/// The dataset, standardized with the training split's statistics.
pub struct Data {
    pub(crate) train: Vec<(Vec<f32>, f32)>,
    pub(crate) validation: Vec<(Vec<f32>, f32)>,
    /// Features per row.
    pub features: usize,
}

impl Data {
    /// Loads the wine quality dataset.
    pub fn wine() -> Data {
        let d = linfa_datasets::winequality();
        let records = d.records();
        let targets = d.targets();
        let features = records.ncols();
        let rows: Vec<(Vec<f64>, f64)> = (0..records.nrows())
            .map(|i| (records.row(i).to_vec(), targets[i] as f64))
            .collect();
        let (train, validation): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % VALIDATION_EVERY_NTH_ROW != 0);
        let n = train.len() as f64;
        let mut mean = vec![0.0; features];
        let mut sd = vec![0.0; features];
        for (_, (x, _)) in &train {
            for (m, v) in mean.iter_mut().zip(x) {
                *m += v / n;
            }
        }
        for (_, (x, _)) in &train {
            for ((s, v), m) in sd.iter_mut().zip(x).zip(&mean) {
                *s += (v - m) * (v - m) / n;
            }
        }
        let scale = |x: &[f64]| -> Vec<f32> {
            x.iter()
                .zip(&mean)
                .zip(&sd)
                .map(|((v, m), s)| ((v - m) / s.sqrt().max(1e-9)) as f32)
                .collect()
        };
        // Quality 3-8 centred near 0 (a better-conditioned target).
        let target = |q: f64| ((q - 5.6) / 0.8) as f32;
        Data {
            train: train
                .iter()
                .map(|(_, (x, q))| (scale(x), target(*q)))
                .collect(),
            validation: validation
                .iter()
                .map(|(_, (x, q))| (scale(x), target(*q)))
                .collect(),
            features,
        }
    }
}

/// One dense layer's parameters (row-major `out x in` weights, then biases).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Layer {
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    pub(crate) w: Vec<f32>,
    pub(crate) b: Vec<f32>,
}

/// Everything a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub(crate) layers: Vec<Layer>,
    /// Adam first and second moments: per layer, its weights then its biases.
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Batches trained.
    pub step: u64,
    /// Position of the dropout stream (in 32-bit words).
    pub(crate) dropout_word_pos: u128,
    /// The hyperparameters it was trained with.
    pub(crate) hparams: Hparams,
    pub(crate) seed: u32,
}

pub(crate) fn stream(seed: u32, purpose: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&purpose.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A uniform number in [0, 1) from 24 random bits (exact in f32).
pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

impl State {
    /// A fresh network: Kaiming-uniform weights from the trial seed.
    pub fn new(hparams: &Hparams, features: usize, seed: u32) -> State {
        let mut rng = stream(seed, 1);
        let mut layers = Vec::new();
        let mut inputs = features;
        for l in 0..=hparams.depth {
            let outputs = if l == hparams.depth {
                1
            } else {
                hparams.hidden
            };
            let bound = (6.0 / inputs as f32).sqrt();
            let w = (0..inputs * outputs)
                .map(|_| (unit(&mut rng) * 2.0 - 1.0) * bound)
                .collect();
            layers.push(Layer {
                inputs,
                outputs,
                w,
                b: vec![0.0; outputs],
            });
            inputs = outputs;
        }
        let n: usize = layers.iter().map(|l| l.w.len() + l.b.len()).sum();
        State {
            layers,
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
            dropout_word_pos: 0,
            hparams: hparams.clone(),
            seed,
        }
    }

    /// Writes the checkpoint file into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let bytes = resolute_types::codec::encode(self).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(CHECKPOINT_FILE), bytes)
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// Reads a checkpoint written by [`State::save`].
    pub fn load(dir: &Path) -> Result<State, String> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        resolute_types::codec::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Forward pass; with `dropout` set, drops hidden units and remembers masks.
    fn forward(
        &self,
        x: &[f32],
        dropout: Option<(&mut ChaCha8Rng, f32)>,
        acts: &mut Vec<Vec<f32>>,
    ) -> f32 {
        acts.clear();
        acts.push(x.to_vec());
        let mut dropout = dropout;
        for (li, layer) in self.layers.iter().enumerate() {
            let input = &acts[li];
            let mut out = layer.b.clone();
            for (o, val) in out.iter_mut().enumerate() {
                let row = &layer.w[o * layer.inputs..(o + 1) * layer.inputs];
                let mut sum = 0.0f32;
                for (w, a) in row.iter().zip(input) {
                    sum += w * a;
                }
                *val += sum;
            }
            let hidden = li + 1 < self.layers.len();
            if hidden {
                for v in out.iter_mut() {
                    *v = v.max(0.0);
                }
                if let Some((rng, p)) = dropout.as_mut() {
                    let keep = 1.0 - *p;
                    for v in out.iter_mut() {
                        *v = if unit(rng) < *p { 0.0 } else { *v / keep };
                    }
                }
            }
            acts.push(out);
        }
        acts.last().map_or(0.0, |a| a[0])
    }

    /// One AdamW step on a batch; returns the batch's mean squared error.
    fn train_batch(&mut self, batch: &[&(Vec<f32>, f32)], rng: &mut ChaCha8Rng) -> f32 {
        let h = self.hparams.clone();
        let mut grads: Vec<Layer> = self
            .layers
            .iter()
            .map(|l| Layer {
                inputs: l.inputs,
                outputs: l.outputs,
                w: vec![0.0; l.w.len()],
                b: vec![0.0; l.b.len()],
            })
            .collect();
        let mut loss = 0.0f32;
        let mut acts = Vec::new();
        let scale = 1.0 / batch.len() as f32;
        for (x, y) in batch {
            let drop = (h.dropout > 0.0).then_some((&mut *rng, h.dropout as f32));
            let pred = self.forward(x, drop, &mut acts);
            let err = pred - y;
            loss += err * err * scale;
            // Backward: d(loss)/d(out) of the last layer.
            let mut delta = vec![2.0 * err * scale];
            for li in (0..self.layers.len()).rev() {
                let layer = &self.layers[li];
                let input = &acts[li];
                let g = &mut grads[li];
                let mut back = vec![0.0f32; layer.inputs];
                for (o, d) in delta.iter().enumerate() {
                    g.b[o] += d;
                    let row = o * layer.inputs;
                    for i in 0..layer.inputs {
                        g.w[row + i] += d * input[i];
                        back[i] += d * layer.w[row + i];
                    }
                }
                if li > 0 {
                    // Through ReLU (and dropout: a dropped unit's activation is 0).
                    for (b, a) in back.iter_mut().zip(&acts[li]) {
                        if *a <= 0.0 {
                            *b = 0.0;
                        }
                    }
                    if h.dropout > 0.0 {
                        let keep = 1.0 / (1.0 - h.dropout as f32);
                        for b in back.iter_mut() {
                            *b *= keep;
                        }
                    }
                }
                delta = back;
            }
        }
        self.step += 1;
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let (lr, wd) = (h.lr as f32, h.weight_decay as f32);
        let mut k = 0;
        for (layer, g) in self.layers.iter_mut().zip(&grads) {
            for (p, gp) in layer
                .w
                .iter_mut()
                .zip(&g.w)
                .chain(layer.b.iter_mut().zip(&g.b))
            {
                self.m[k] = b1 * self.m[k] + (1.0 - b1) * gp;
                self.v[k] = b2 * self.v[k] + (1.0 - b2) * gp * gp;
                let mhat = self.m[k] / c1;
                let vhat = self.v[k] / c2;
                *p -= lr * (mhat / (vhat.sqrt() + eps) + wd * *p);
                k += 1;
            }
        }
        loss
    }

    /// Mean squared error on `rows` (no dropout).
    fn evaluate(&self, rows: &[(Vec<f32>, f32)]) -> f32 {
        let mut acts = Vec::new();
        let preds: Vec<f32> = rows
            .iter()
            .map(|(x, _)| self.forward(x, None, &mut acts))
            .collect();
        mean_squared_error(&preds, rows)
    }
}

/// Mean squared error of `preds` against the rows' targets, summed in f64 (the
/// CPU and CUDA paths share it, so their validation losses agree bit for bit).
pub(crate) fn mean_squared_error(preds: &[f32], rows: &[(Vec<f32>, f32)]) -> f32 {
    let mut sum = 0.0f64;
    for (pred, (_, y)) in preds.iter().zip(rows) {
        let e = pred - y;
        sum += f64::from(e * e);
    }
    (sum / rows.len().max(1) as f64) as f32
}

/// Where the trainer reports; the trial endpoint in a trial process.
pub trait Reporter {
    /// Training metrics.
    fn training(&mut self, step: u64, loss: f64) -> Result<(), String>;
    /// Validation metrics.
    fn validation(&mut self, step: u64, loss: f64) -> Result<(), String>;
    /// Writes a checkpoint: `write` fills the directory it is given.
    fn checkpoint(
        &mut self,
        step: u64,
        write: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<(), String>;
    /// Whether to checkpoint and stop now.
    fn should_stop(&mut self) -> bool;
    /// Trained to the target (`reached`): whether to go on, and to what target
    /// (the searcher may raise it once the last validation is in). Nothing
    /// raises it by default.
    fn next_target(&mut self, reached: u64) -> Result<Option<u64>, String> {
        let _ = reached;
        Ok(None)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It reached the target.
    Completed,
    /// It was asked to stop (after a checkpoint).
    Stopped,
}

/// The order of epoch `epoch`'s rows (a Fisher-Yates shuffle from the seed).
fn epoch_order(seed: u32, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = stream(seed, 2 + epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The rows of each batch: epoch by epoch, in the order the seed gives each
/// epoch, so a resumed run sees the same batches as one that never stopped.
pub(crate) struct Batches {
    seed: u32,
    batch_size: usize,
    per_epoch: u64,
    epoch: u64,
    order: Vec<usize>,
}

impl Batches {
    pub(crate) fn new(state: &State, data: &Data) -> Batches {
        let batch_size = state.hparams.batch_size;
        Batches {
            seed: state.seed,
            batch_size,
            per_epoch: data.train.len().div_ceil(batch_size) as u64,
            epoch: u64::MAX,
            order: Vec::new(),
        }
    }

    /// The rows of batch `step` (counted from 0 over the whole run).
    pub(crate) fn rows<'a>(&mut self, data: &'a Data, step: u64) -> Vec<&'a (Vec<f32>, f32)> {
        let n = data.train.len();
        let epoch = step / self.per_epoch;
        if epoch != self.epoch {
            self.order = epoch_order(self.seed, epoch, n);
            self.epoch = epoch;
        }
        let start = ((step % self.per_epoch) as usize) * self.batch_size;
        self.order[start..(start + self.batch_size).min(n)]
            .iter()
            .map(|i| &data.train[*i])
            .collect()
    }
}

/// What follows every batch, on either device: training metrics every 10
/// batches; every `validate_every` batches and at the end, the validation loss
/// and a checkpoint (`validate` computes both, the state as of this batch), then
/// a stop if asked. Returns how the run ended, if it did.
pub(crate) fn after_batch(
    step: u64,
    target: u64,
    loss: f32,
    validate_every: u64,
    reporter: &mut dyn Reporter,
    validate: impl FnOnce() -> Result<(f32, State), String>,
) -> Result<Option<Ended>, String> {
    if !loss.is_finite() {
        return Err(format!("training diverged at batch {step} (loss {loss})"));
    }
    if step % 10 == 0 {
        reporter.training(step, f64::from(loss))?;
    }
    if step % validate_every == 0 || step == target {
        let (val, snapshot) = validate()?;
        reporter.validation(step, f64::from(val))?;
        reporter.checkpoint(step, &mut |dir| snapshot.save(dir))?;
        if reporter.should_stop() {
            return Ok(Some(Ended::Stopped));
        }
    }
    Ok(None)
}

/// Trains from `state` until `target` batches (validating and checkpointing
/// every `validate_every` batches and at the end), or until asked to stop.
pub fn train(
    data: &Data,
    mut state: State,
    target: u64,
    reporter: &mut dyn Reporter,
) -> Result<Ended, String> {
    let mut batches = Batches::new(&state, data);
    let mut dropout = stream(state.seed, 0);
    dropout.set_word_pos(state.dropout_word_pos);
    let mut target = target;
    loop {
        while state.step < target {
            let batch = batches.rows(data, state.step);
            let loss = state.train_batch(&batch, &mut dropout);
            state.dropout_word_pos = dropout.get_word_pos();
            let validate = || Ok((state.evaluate(&data.validation), state.clone()));
            let every = state.hparams.validate_every;
            if let Some(ended) = after_batch(state.step, target, loss, every, reporter, validate)? {
                return Ok(ended);
            }
        }
        match reporter.next_target(state.step)? {
            Some(t) if t > state.step => target = t,
            _ => return Ok(Ended::Completed),
        }
    }
}
