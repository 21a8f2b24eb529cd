//! Binding of `ratelimit::TokenBucket`.
//!
//! Fork safety: the bucket's mutex is held only for a few arithmetic
//! operations, by a thread attached to the interpreter that neither runs
//! Python code nor detaches meanwhile. `os.fork` runs on an attached thread
//! too (on free-threaded builds after stopping the world), so no other thread
//! can be inside the lock at the fork and a child never inherits it locked.

use parking_lot::Mutex;
use pyo3::prelude::*;

use super::clock::{pick_clock, PyManualClock};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::ratelimit::TokenBucket;

/// A token bucket (GCRA): ``rate`` calls per second sustained, ``burst`` at once.
///
/// Over any window of T seconds at most ``burst + rate * T`` reservations are
/// granted without delay. The bucket never sleeps: :meth:`reserve` returns how
/// long the caller must wait before using the token it reserved.
///
/// Args:
///     rate: Tokens per second (finite, at least 1e-9: one per 1e9 s).
///     burst: Tokens available at once (>= 1). Default 1.
///     clock: A :class:`ManualClock` for tests; the monotonic clock by default.
#[pyclass(frozen, weakref, module = "opero._opero_core", name = "TokenBucket")]
pub struct PyTokenBucket {
    inner: Mutex<TokenBucket>,
    clock: Clock,
}

#[pymethods]
impl PyTokenBucket {
    #[new]
    #[pyo3(signature = (rate, burst = 1, *, clock = None))]
    fn new(rate: f64, burst: i64, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        let burst = u64::try_from(burst)
            .map_err(|_| CoreError::value("burst", "an int between 1 and 2**32-1", burst))?;
        Ok(Self {
            inner: Mutex::new(TokenBucket::new(rate, burst)?),
            clock: pick_clock(clock, Clock::Monotonic),
        })
    }

    /// Tokens per second.
    #[getter]
    fn rate(&self) -> f64 {
        self.inner.lock().rate()
    }

    /// Tokens available at once.
    #[getter]
    fn burst(&self) -> u32 {
        self.inner.lock().burst()
    }

    /// Change the rate from now on (at least 1e-9); waiting calls keep their start.
    fn set_rate(&self, rate: f64) -> PyResult<()> {
        let now = self.clock.now();
        Ok(self.inner.lock().set_rate(rate, now)?)
    }

    /// Reserve one token; return the seconds to wait before using it (0.0 if free now).
    fn reserve(&self) -> f64 {
        let mut b = self.inner.lock();
        b.reserve(self.clock.now())
    }

    /// Whether every token is free now (nothing owed): such a bucket can be
    /// dropped and recreated full without loosening the limit.
    fn is_full(&self) -> bool {
        let now = self.clock.now();
        self.inner.lock().is_full(now)
    }

    /// Take a token only if one is free now; return whether it was taken.
    fn try_acquire(&self) -> bool {
        let mut b = self.inner.lock();
        b.try_acquire(self.clock.now())
    }

    fn __repr__(&self) -> String {
        let b = self.inner.lock();
        format!("TokenBucket(rate={:?}, burst={})", b.rate(), b.burst())
    }
}
