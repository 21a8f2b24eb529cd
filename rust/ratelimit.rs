//! A token bucket as GCRA (generic cell rate algorithm).
//!
//! State is one number, the theoretical arrival time `tat`. With emission
//! interval `e = 1/rate`, a reservation at time `now` sets
//! `tat = max(tat, now) + e` and may be used at `tat - burst * e`; the delay is
//! how far that lies in the future. Invariants: over any window of `T`
//! seconds at most `burst + rate * T` reservations get a zero delay, and the
//! delayed ones are spaced exactly `e` apart; the bucket never holds more than
//! `burst` tokens; nothing here sleeps, callers wait for the returned delay.

use crate::error::CoreError;

/// The longest interval between tokens, in seconds (about 31.7 years): the
/// delays returned are waits a caller sleeps, and `time.sleep` or a thread
/// wait overflows past about 9.2e9 s. Equal to opero's `MAX_SECONDS`.
pub const MAX_INTERVAL: f64 = 1e9;

/// GCRA state; the caller supplies the time and provides the locking.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    interval: f64,
    burst: u32,
    tat: f64,
    /// The start of the latest reservation that had to wait (`-inf`: none).
    last_start: f64,
}

/// Slack in grant decisions: 1 ns plus a few ulps of the clock reading, so
/// float rounding (`1000.3 - 0.3 > 1000.0`) never denies a token that is due.
#[inline]
fn slack(now: f64) -> f64 {
    1e-9 + 4.0 * f64::EPSILON * now.abs()
}

fn check_rate(rate: f64) -> Result<f64, CoreError> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(CoreError::value(
            "rate",
            "a finite number of calls per second > 0",
            rate,
        ));
    }
    let interval = 1.0 / rate;
    if !(interval.is_finite() && interval > 0.0 && interval <= MAX_INTERVAL) {
        return Err(CoreError::value(
            "rate",
            "at least 1e-9 calls per second (one per 1e9 s: a longer wait cannot be slept)",
            rate,
        ));
    }
    Ok(interval)
}

impl TokenBucket {
    /// A full bucket: `burst` tokens now, then `rate` per second.
    pub fn new(rate: f64, burst: u64) -> Result<Self, CoreError> {
        let interval = check_rate(rate)?;
        if burst < 1 || burst > u64::from(u32::MAX) {
            return Err(CoreError::value(
                "burst",
                "an int between 1 and 2**32-1",
                burst,
            ));
        }
        Ok(Self {
            rate,
            interval,
            burst: burst as u32,
            tat: f64::NEG_INFINITY,
            last_start: f64::NEG_INFINITY,
        })
    }

    /// Tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Tokens available at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Change the rate from `now` on.
    ///
    /// The tokens owed keep their number, rescaled to the new interval, so a
    /// lower rate repays them at the new, slower rate and a rate that goes
    /// down and up again owes what it owed. Reservations already booked keep
    /// their start times (their callers are already waiting): the next one
    /// never starts less than one new interval after the last booked start
    /// (see [`Self::reserve`]), so after a rise new callers are not slotted
    /// between the booked ones, which would break `burst + rate * T`.
    pub fn set_rate(&mut self, rate: f64, now: f64) -> Result<(), CoreError> {
        let interval = check_rate(rate)?;
        if self.tat > now {
            self.tat = now + (self.tat - now) / self.interval * interval;
        }
        self.rate = rate;
        self.interval = interval;
        Ok(())
    }

    /// The start of a reservation whose arrival time is `tat`: `burst`
    /// intervals early, never before one interval after the last booked start.
    #[inline]
    fn start(&self, tat: f64) -> f64 {
        let interval = self.interval;
        (tat - f64::from(self.burst) * interval).max(self.last_start + interval)
    }

    /// Reserve one token; return the seconds to wait before using it.
    #[inline]
    pub fn reserve(&mut self, now: f64) -> f64 {
        let tat = self.tat.max(now) + self.interval;
        self.tat = tat;
        let wait = self.start(tat) - now;
        if wait > slack(now) {
            self.last_start = now + wait;
            wait
        } else {
            0.0
        }
    }

    /// Whether the bucket is full at `now`: nothing owed, every token free.
    /// A full bucket can be dropped and later recreated without loosening
    /// the limit (a new bucket starts full too).
    #[inline]
    pub fn is_full(&self, now: f64) -> bool {
        self.tat <= now && self.last_start <= now
    }

    /// Take a token only if one is free at `now`.
    #[inline]
    pub fn try_acquire(&mut self, now: f64) -> bool {
        let tat = self.tat.max(now) + self.interval;
        if self.start(tat) - now <= slack(now) {
            self.tat = tat;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_free_then_spaced() {
        let mut b = TokenBucket::new(10.0, 3).unwrap();
        let d: Vec<f64> = (0..6).map(|_| b.reserve(100.0)).collect();
        assert_eq!(&d[..3], &[0.0, 0.0, 0.0]);
        for (i, x) in d[3..].iter().enumerate() {
            assert!((x - 0.1 * (i + 1) as f64).abs() < 1e-9, "{d:?}");
        }
    }

    #[test]
    fn try_acquire_takes_only_free_tokens() {
        let mut b = TokenBucket::new(1.0, 2).unwrap();
        assert!(b.try_acquire(0.0));
        assert!(b.try_acquire(0.0));
        assert!(!b.try_acquire(0.0));
        assert!(!b.try_acquire(0.5));
        assert!(b.try_acquire(1.0));
        assert!(!b.try_acquire(1.0));
    }

    #[test]
    fn window_bound_holds_for_zero_delay_grants() {
        // Calls every 1 ms for 10 s at rate 7/s, burst 4: count free grants in
        // every 1 s window.
        let (rate, burst) = (7.0, 4u64);
        let mut b = TokenBucket::new(rate, burst).unwrap();
        let mut granted = Vec::new();
        for i in 0..10_000 {
            let now = f64::from(i) * 0.001;
            if b.try_acquire(now) {
                granted.push(now);
            }
        }
        for (i, start) in granted.iter().enumerate() {
            let n = granted[i..]
                .iter()
                .take_while(|t| **t <= start + 1.0)
                .count();
            assert!(n as f64 <= burst as f64 + rate * 1.0 + 1e-9);
        }
        assert!(granted.len() >= 70);
    }

    #[test]
    fn idle_time_refills_only_up_to_burst() {
        let mut b = TokenBucket::new(1.0, 2).unwrap();
        assert_eq!(b.reserve(0.0), 0.0);
        let free = (0..5).filter(|_| b.try_acquire(1000.0)).count();
        assert_eq!(free, 2);
    }

    #[test]
    fn float_rounding_never_denies_a_due_token() {
        let mut b = TokenBucket::new(10.0, 3).unwrap();
        let free = (0..10).filter(|_| b.try_acquire(1000.0)).count();
        assert_eq!(free, 3);
        let mut b = TokenBucket::new(7.0, 1).unwrap();
        for i in 0..10_000 {
            assert_eq!(b.reserve(1e6 + f64::from(i) / 7.0), 0.0, "step {i}");
        }
    }

    #[test]
    fn lowering_the_rate_rescales_the_debt() {
        let mut b = TokenBucket::new(10.0, 1).unwrap();
        assert_eq!(b.reserve(0.0), 0.0);
        assert!((b.reserve(0.0) - 0.1).abs() < 1e-12);
        // Two tokens are owed at 10/s (tat = 0.2); at 1/s they are owed over 2 s.
        b.set_rate(1.0, 0.0).unwrap();
        assert!((b.reserve(0.0) - 2.0).abs() < 1e-12);
        assert_eq!(b.rate(), 1.0);
    }

    #[test]
    fn raising_the_rate_keeps_booked_starts() {
        // 1 free then 20 booked at 50/s: they start at 0.02 .. 0.40.
        let mut b = TokenBucket::new(50.0, 1).unwrap();
        let booked: Vec<f64> = (0..21).map(|_| b.reserve(0.0)).collect();
        assert!((booked[20] - 0.4).abs() < 1e-9);
        b.set_rate(100.0, 0.0).unwrap();
        // The next start comes one new interval after the last booked one.
        let next: Vec<f64> = (0..3).map(|_| b.reserve(0.0)).collect();
        for (i, d) in next.iter().enumerate() {
            assert!((d - (0.41 + 0.01 * i as f64)).abs() < 1e-9, "{next:?}");
        }
    }

    #[test]
    fn alternating_rates_never_inflate_the_debt() {
        // Drops and rises in turn, all at one instant: the debt must stay the
        // tokens actually reserved, not grow by the ratio of the rates each cycle.
        let mut b = TokenBucket::new(200.0, 5).unwrap();
        let mut last = 0.0;
        for i in 0..400 {
            let rate = if i % 2 == 0 { 200.0 } else { 2.0 };
            b.set_rate(rate, 0.0).unwrap();
            last = b.reserve(0.0);
        }
        // 400 reservations, at worst all at the slow interval: at most 200 s.
        assert!(last.is_finite() && last <= 400.0 * 0.5, "{last}");
        assert!(last > 0.0);
    }

    #[test]
    fn raising_the_rate_of_an_idle_bucket_frees_tokens_at_once() {
        let mut b = TokenBucket::new(1.0, 10).unwrap();
        assert!((0..5).all(|_| b.try_acquire(0.0)));
        b.set_rate(100.0, 0.0).unwrap();
        // 5 of 10 tokens were used; the other 5 stay free, then 1 per 10 ms.
        assert_eq!((0..10).filter(|_| b.try_acquire(0.0)).count(), 5);
        assert!(b.try_acquire(0.01));
    }

    #[test]
    fn is_full_only_once_the_debt_is_repaid() {
        let mut b = TokenBucket::new(2.0, 2).unwrap();
        assert!(b.is_full(0.0));
        assert_eq!(b.reserve(0.0), 0.0);
        assert!(!b.is_full(0.0));
        assert!(!b.is_full(0.4));
        assert!(b.is_full(0.5));
        assert!((b.reserve(0.5) - 0.0).abs() < 1e-12);
        assert_eq!(b.reserve(0.5), 0.0);
        assert!((b.reserve(0.5) - 0.5).abs() < 1e-9);
        assert!(!b.is_full(1.4));
        assert!(b.is_full(2.0));
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(TokenBucket::new(0.0, 1).is_err());
        assert!(TokenBucket::new(-1.0, 1).is_err());
        assert!(TokenBucket::new(f64::NAN, 1).is_err());
        assert!(TokenBucket::new(f64::INFINITY, 1).is_err());
        assert!(TokenBucket::new(1e-320, 1).is_err());
        assert!(TokenBucket::new(1e-300, 1).is_err());
        assert!(TokenBucket::new(0.9e-9, 1).is_err());
        assert!(TokenBucket::new(1e-9, 1).is_ok());
        let e = TokenBucket::new(1.0, 0).unwrap_err();
        assert!(e.to_string().starts_with("burst"));
        let mut b = TokenBucket::new(1.0, 1).unwrap();
        assert!(b.set_rate(0.0, 0.0).is_err());
        assert_eq!(b.rate(), 1.0);
    }
}
