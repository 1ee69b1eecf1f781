//! The experiment's random number generator.
//!
//! One ChaCha8 stream seeded from `reproducibility.experiment_seed`. Its state is the
//! seed plus the stream position, so a snapshot restores it exactly. The draws are
//! written out here (rather than using `rand`'s distributions) so that the values
//! cannot change with a dependency upgrade.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// A seeded, snapshot-able random number generator.
#[derive(Debug, Clone)]
pub struct ExperimentRng {
    seed: u64,
    rng: ChaCha8Rng,
}

/// The serializable state of an [`ExperimentRng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The experiment seed.
    pub seed: u64,
    /// How many 32-bit words of the stream have been used.
    pub word_pos: u128,
}

impl ExperimentRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        ExperimentRng {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The state to snapshot.
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Restores a snapshot exactly.
    pub fn from_state(state: RngState) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(state.seed);
        rng.set_word_pos(state.word_pos);
        ExperimentRng {
            seed: state.seed,
            rng,
        }
    }

    /// A uniform float in `[0, 1)` with 53 bits of precision.
    pub fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let x = lo + (hi - lo) * self.unit();
        // Rounding can land exactly on `hi`; keep the interval half-open.
        if x >= hi {
            lo
        } else {
            x
        }
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no values");
        // Rejection sampling: discard the top partial copy of 0..n.
        let zone = u64::MAX - (u64::MAX - n + 1) % n;
        loop {
            let x = self.rng.next_u64();
            if x <= zone {
                return x % n;
            }
        }
    }

    /// A trial seed in `0..2^31`, as Determined draws them.
    pub fn trial_seed(&mut self) -> u32 {
        self.below(1 << 31) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_state_round_trips() {
        for seed in 0..50 {
            let mut a = ExperimentRng::new(seed);
            let mut b = ExperimentRng::new(seed);
            for _ in 0..10 {
                assert_eq!(a.below(1000), b.below(1000));
                assert_eq!(a.unit().to_bits(), b.unit().to_bits());
            }
            let mut c = ExperimentRng::from_state(a.state());
            assert_eq!(a.state(), c.state());
            assert_eq!(a.trial_seed(), c.trial_seed());
        }
    }

    #[test]
    fn draws_stay_in_range() {
        let mut r = ExperimentRng::new(7);
        for _ in 0..10_000 {
            assert!(r.below(3) < 3);
            let u = r.uniform(-2.0, 5.0);
            assert!((-2.0..5.0).contains(&u));
        }
    }
}
