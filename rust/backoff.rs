//! The jittered exponential backoff schedule.
//!
//! Delay before retry `k` (0-based) is `d = min(max_delay, min_delay * factor^k)`;
//! with jitter it is drawn uniformly from `[d/2, d]` ("equal jitter").
//! Invariants: every delay is finite, `>= 0` and `<= max_delay`, for every
//! `k` up to `u64::MAX` (`factor^k` overflowing to infinity is capped at
//! `max_delay`, never NaN). The RNG is SplitMix64, seedable, so a seeded
//! schedule is identical on every platform.

use crate::error::CoreError;

/// SplitMix64: tiny, fast, and good enough for jitter (not for secrets).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// An RNG starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An RNG seeded from the process's random hasher keys.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(crate::clock::monotonic().to_bits());
        Self::new(h.finish())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A validated backoff schedule (the RNG lives with the caller).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min_delay: f64,
    max_delay: f64,
    factor: f64,
    jitter: bool,
}

impl Backoff {
    /// Validate and build a schedule.
    ///
    /// `min_delay` finite and `>= 0`; `max_delay` finite and `>= min_delay`;
    /// `factor` finite and `>= 1`.
    pub fn new(
        min_delay: f64,
        max_delay: f64,
        factor: f64,
        jitter: bool,
    ) -> Result<Self, CoreError> {
        if !(min_delay.is_finite() && min_delay >= 0.0) {
            return Err(CoreError::value(
                "min_delay",
                "a finite number of seconds >= 0",
                min_delay,
            ));
        }
        if !(max_delay.is_finite() && max_delay >= min_delay) {
            return Err(CoreError::value(
                "max_delay",
                "a finite number of seconds >= min_delay",
                max_delay,
            ));
        }
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(CoreError::value("factor", "a finite number >= 1", factor));
        }
        Ok(Self {
            min_delay,
            max_delay,
            factor,
            jitter,
        })
    }

    /// Seconds before the first retry.
    pub fn min_delay(&self) -> f64 {
        self.min_delay
    }

    /// Upper bound of every delay, in seconds.
    pub fn max_delay(&self) -> f64 {
        self.max_delay
    }

    /// Growth per retry.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Whether delays are jittered.
    pub fn jitter(&self) -> bool {
        self.jitter
    }

    /// `min(max_delay, min_delay * factor^attempt)`, capped, never NaN.
    pub fn base_delay(&self, attempt: u64) -> f64 {
        if self.min_delay == 0.0 {
            return 0.0;
        }
        // powi takes an i32; beyond that (or on overflow) the growth is
        // infinite for any factor > 1, and the cap applies.
        let growth = if self.factor == 1.0 {
            1.0
        } else if let Ok(k) = i32::try_from(attempt) {
            self.factor.powi(k)
        } else {
            f64::INFINITY
        };
        let d = self.min_delay * growth;
        if d.is_nan() || d > self.max_delay {
            self.max_delay
        } else {
            d
        }
    }

    /// The delay before retry `attempt`, jittered within `[d/2, d]` when enabled.
    pub fn delay(&self, attempt: u64, rng: &mut SplitMix64) -> f64 {
        let d = self.base_delay(attempt);
        if !self.jitter || d == 0.0 {
            return d;
        }
        let half = d / 2.0;
        (half + half * rng.next_f64()).clamp(half, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_delay_grows_then_caps() {
        let b = Backoff::new(0.1, 1.0, 2.0, false).unwrap();
        let got: Vec<f64> = (0..6).map(|k| b.base_delay(k)).collect();
        assert_eq!(got, vec![0.1, 0.2, 0.4, 0.8, 1.0, 1.0]);
    }

    #[test]
    fn huge_attempts_are_capped_never_inf_or_nan() {
        let b = Backoff::new(0.1, 30.0, 1.5, true).unwrap();
        let mut rng = SplitMix64::new(1);
        for k in [1_000, 1 << 31, u64::MAX] {
            assert_eq!(b.base_delay(k), 30.0);
            let d = b.delay(k, &mut rng);
            assert!((15.0..=30.0).contains(&d));
        }
        let zero = Backoff::new(0.0, 0.0, 10.0, true).unwrap();
        assert_eq!(zero.base_delay(u64::MAX), 0.0);
        assert_eq!(zero.delay(5, &mut rng), 0.0);
    }

    #[test]
    fn factor_one_is_constant() {
        let b = Backoff::new(0.5, 2.0, 1.0, false).unwrap();
        assert_eq!(b.base_delay(0), 0.5);
        assert_eq!(b.base_delay(u64::MAX), 0.5);
    }

    #[test]
    fn jitter_stays_in_band_and_is_seeded() {
        let b = Backoff::new(0.1, 30.0, 1.5, true).unwrap();
        let mut r1 = SplitMix64::new(42);
        let mut r2 = SplitMix64::new(42);
        for k in 0..200 {
            let d = b.base_delay(k);
            let x = b.delay(k, &mut r1);
            assert!(x >= d / 2.0 && x <= d, "{x} outside [{}, {d}]", d / 2.0);
            assert_eq!(x, b.delay(k, &mut r2));
        }
    }

    #[test]
    fn bad_input_is_rejected_naming_the_parameter() {
        let e = Backoff::new(-1.0, 1.0, 2.0, true).unwrap_err();
        assert!(e.to_string().starts_with("min_delay"));
        let e = Backoff::new(2.0, 1.0, 2.0, true).unwrap_err();
        assert!(e.to_string().starts_with("max_delay"));
        let e = Backoff::new(0.1, 1.0, 0.5, true).unwrap_err();
        assert!(e.to_string().starts_with("factor"));
        assert!(Backoff::new(f64::NAN, 1.0, 2.0, true).is_err());
        assert!(Backoff::new(0.1, f64::INFINITY, 2.0, true).is_err());
        assert!(Backoff::new(0.1, 1.0, f64::NAN, true).is_err());
    }

    #[test]
    fn rng_floats_are_in_unit_interval() {
        let mut r = SplitMix64::from_entropy();
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
