//! Binding of `backoff::Backoff` with its seedable RNG.

use parking_lot::Mutex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::backoff::{Backoff, SplitMix64};

/// The jittered exponential backoff schedule.
///
/// Delay before retry ``k`` (0-based) is ``min(max_delay, min_delay * factor**k)``;
/// with jitter it is drawn uniformly from ``[d/2, d]`` ("equal jitter"), never
/// below 0 nor above ``max_delay``.
///
/// Args:
///     min_delay: Seconds before the first retry (>= 0, finite). Default 0.1.
///     max_delay: Upper bound in seconds (>= min_delay). Default 30.0.
///     factor: Growth per retry (>= 1, finite). Default 1.5.
///     jitter: Whether to randomize. Default True.
///     seed: Seed of the RNG for reproducible schedules; random by default.
#[pyclass(frozen, module = "opero._opero_core", name = "Backoff")]
pub struct PyBackoff {
    schedule: Backoff,
    rng: Mutex<SplitMix64>,
}

/// Read a 0-based attempt: an int >= 0; beyond 2**64-1 it is capped (the delay is
/// `max_delay` long before that).
fn attempt_of(attempt: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !attempt.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "attempt must be an int >= 0, got {}",
            attempt.get_type().name()?
        )));
    }
    if let Ok(k) = attempt.extract::<u64>() {
        return Ok(k);
    }
    if attempt.lt(0)? {
        return Err(PyValueError::new_err(format!(
            "attempt must be an int >= 0, got {attempt}"
        )));
    }
    Ok(u64::MAX)
}

#[pymethods]
impl PyBackoff {
    #[new]
    #[pyo3(signature = (min_delay = 0.1, max_delay = 30.0, factor = 1.5, jitter = true, seed = None))]
    fn new(
        min_delay: f64,
        max_delay: f64,
        factor: f64,
        jitter: bool,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let schedule = Backoff::new(min_delay, max_delay, factor, jitter)?;
        let rng = match seed {
            None => SplitMix64::from_entropy(),
            Some(s) if s.is_none() => SplitMix64::from_entropy(),
            Some(s) => {
                if !s.is_instance_of::<PyInt>() {
                    return Err(PyTypeError::new_err(format!(
                        "seed must be an int or None, got {}",
                        s.get_type().name()?
                    )));
                }
                // Any int: its low 64 bits seed the RNG.
                let low: u64 = s.call_method1("__and__", (u64::MAX,))?.extract()?;
                SplitMix64::new(low)
            }
        };
        Ok(Self {
            schedule,
            rng: Mutex::new(rng),
        })
    }

    /// Return the delay in seconds before retry ``attempt`` (0-based, >= 0).
    fn delay(&self, attempt: &Bound<'_, PyAny>) -> PyResult<f64> {
        let k = attempt_of(attempt)?;
        Ok(self.schedule.delay(k, &mut self.rng.lock()))
    }

    /// Return the un-jittered delay ``min(max_delay, min_delay * factor**attempt)``.
    fn base_delay(&self, attempt: &Bound<'_, PyAny>) -> PyResult<f64> {
        Ok(self.schedule.base_delay(attempt_of(attempt)?))
    }

    fn __repr__(&self) -> String {
        let s = &self.schedule;
        format!(
            "Backoff(min_delay={:?}, max_delay={:?}, factor={:?}, jitter={})",
            s.min_delay(),
            s.max_delay(),
            s.factor(),
            if s.jitter() { "True" } else { "False" }
        )
    }
}
