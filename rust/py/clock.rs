//! Binding of `clock::ManualClock`.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::clock::{Clock, ManualClock};

/// Seconds of a cheap monotonic clock: ``CLOCK_MONOTONIC_COARSE`` read from
/// the vDSO on Linux (resolution one scheduler tick, 1-4 ms; same epoch as
/// ``time.monotonic``), ``time.monotonic``'s clock elsewhere.
///
/// The deadline clock of ``@opero(timeout=...)``, read once per call.
#[pyfunction]
pub(crate) fn coarse_monotonic() -> f64 {
    crate::clock::coarse()
}

/// A clock for tests that moves only when told to.
///
/// Args:
///     start: The initial reading, in seconds.
#[pyclass(frozen, module = "opero._opero_core", name = "ManualClock")]
pub struct PyManualClock {
    pub(crate) inner: Arc<ManualClock>,
}

#[pymethods]
impl PyManualClock {
    #[new]
    #[pyo3(signature = (start = 0.0))]
    fn new(start: f64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(ManualClock::new(start)?),
        })
    }

    /// Return the current reading, in seconds.
    fn now(&self) -> f64 {
        self.inner.now()
    }

    /// Move the clock forward by ``seconds`` (must be >= 0 and finite).
    fn advance(&self, seconds: f64) -> PyResult<()> {
        Ok(self.inner.advance(seconds)?)
    }

    fn __repr__(&self) -> String {
        format!("ManualClock({:?})", self.inner.now())
    }
}

/// The clock a store or bucket uses: the manual one when given, else `default`.
pub(crate) fn pick_clock(clock: Option<&Bound<'_, PyManualClock>>, default: Clock) -> Clock {
    match clock {
        Some(c) => Clock::Manual(c.get().inner.clone()),
        None => default,
    }
}
