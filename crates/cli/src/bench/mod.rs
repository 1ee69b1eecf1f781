//! `resolute bench`: benchmarks that print figures, each measured against a
//! reference in the same run (these machines are shared and noisy).

pub mod all;
pub mod gossip;
pub mod log;
pub mod recovery;
pub mod sched;
pub mod search;
pub mod sim;
pub mod submit;
pub mod transfer;

/// The value at quantile `q` (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}
