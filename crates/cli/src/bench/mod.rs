//! `resolute bench`: benchmarks that print figures, each measured against a
//! reference in the same run (these machines are shared and noisy).

pub mod all;
pub mod cluster;
pub mod command;
pub mod gossip;
pub mod log;
pub mod recovery;
pub mod sched;
pub mod search;
pub mod sim;
pub mod state;
pub mod submit;
pub mod transfer;
pub mod wan;

/// The value at quantile `q` (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}

/// An experiment of one built-in-trainer trial that trains until it is stopped,
/// validating and checkpointing every `validate_every` batches (the workload of
/// the benchmarks that run real nodes).
pub fn endless_trial(name: &str, validate_every: u64) -> String {
    format!(
        "name: {name}\n\
         entrypoint: resolute train\n\
         hyperparameters: {{lr: 0.01, hidden: 16, depth: 1, batch_size: 16, dropout: 0.0, weight_decay: 0.0001, validate_every: {validate_every}}}\n\
         searcher: {{name: single, metric: validation_loss, smaller_is_better: true, max_length: {{batches: 100000000}}}}\n\
         max_restarts: 0\n"
    )
}
