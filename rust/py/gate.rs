//! `Gate`: a flag a Python object keeps and a native call reads without Python.
//!
//! A `CircuitBreaker` keeps its `Gate` equal to its `_check` attribute (the
//! state says every call must ask the breaker); a `TimedCall` built with that
//! gate reads it with one atomic load (no attribute lookup, no Python call) and
//! sends the call to its slow path only when it is set, or while every gate is
//! forced open (`Gate.set_forced(True)`: call counting is on, and only the
//! slow paths, the generated wrappers, count calls).

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;

/// Every gate reads as set for the native calls (`Gate.set_forced`).
static FORCED: AtomicBool = AtomicBool::new(false);

/// A boolean flag shared between Python code and native calls.
///
/// Args:
///     value: The initial value.
#[pyclass(frozen, module = "opero._opero_core", name = "Gate")]
pub struct PyGate {
    flag: AtomicBool,
}

impl PyGate {
    /// Whether a native call must take its slow path: the flag, or every gate
    /// forced (relaxed atomic loads: the writers hold the GIL, or a lock of
    /// their own, and a reader a moment late is as good as a reader a moment
    /// early).
    #[inline(always)]
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || FORCED.load(Ordering::Relaxed)
    }
}

#[pymethods]
impl PyGate {
    #[new]
    #[pyo3(signature = (value = false))]
    fn new(value: bool) -> Self {
        Self {
            flag: AtomicBool::new(value),
        }
    }

    /// Set the flag to ``value``.
    fn set(&self, value: bool) {
        self.flag.store(value, Ordering::Relaxed);
    }

    /// Return the flag's value (not forced: see ``set_forced``).
    fn get(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Make every gate read as set for the native calls (``True``), or as its flag.
    #[staticmethod]
    fn set_forced(value: bool) {
        FORCED.store(value, Ordering::Relaxed);
    }

    /// Return whether every gate is forced (``set_forced``).
    #[staticmethod]
    fn forced() -> bool {
        FORCED.load(Ordering::Relaxed)
    }

    fn __repr__(&self) -> String {
        format!(
            "<opero Gate {}>",
            if self.flag.load(Ordering::Relaxed) {
                "set"
            } else {
                "clear"
            }
        )
    }
}
