//! opero's native core: pure-Rust cores (`keys`, `store`, `ratelimit`,
//! `backoff`, `clock`) and, behind the `python` feature, their PyO3 bindings
//! in `py/`. This file only declares modules and registers the Python module.

pub mod backoff;
pub mod clock;
pub mod error;
pub mod flight;
pub mod keys;
pub mod ratelimit;
pub mod sketch;
pub mod stack;
pub mod store;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// Native core of opero, written in Rust and built by maturin.
// Not declared free-thread safe, so a free-threaded (3.14t) interpreter turns
// the GIL back on at import, with a RuntimeWarning. PyO3 0.30 declares every
// module GIL-free unless told otherwise (opt-out since PyO3 #5564), hence the
// explicit `gil_used = true`. Rust's types make the bindings data-race free
// there (`Guarded` is a real mutex, dicts are keyed from a copy, the unchecked
// list access is compiled out), but the fork invariant of `guarded.rs` does
// not hold: `guarded::lock` takes a store, flight-table or wait-graph mutex
// while detached and then re-attaches, and a `fork()` in between (3.14t's
// stop-the-world does not wait for detached threads) leaves that mutex locked
// in the child, whose first use of it hangs. No free-threaded interpreter
// runs the tests either (`make check-abi` only compiles for 3.14t). Revisit
// both before setting `gil_used = false`.
#[cfg(feature = "python")]
#[pymodule(gil_used = true)]
fn _opero_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<py::clock::PyManualClock>()?;
    m.add_function(wrap_pyfunction!(py::clock::coarse_monotonic, m)?)?;
    m.add_class::<py::keys::PyKey>()?;
    m.add_function(wrap_pyfunction!(py::keys::make_key, m)?)?;
    m.add_function(wrap_pyfunction!(py::keys::stable_digest, m)?)?;
    m.add_function(wrap_pyfunction!(py::keys::stable_digest_call, m)?)?;
    m.add_class::<py::store::PyStore>()?;
    py::fastcall::install_meth_o::<py::store::PyStore>(m.py())?;
    m.add_class::<py::cached_call::PyCachedCall>()?;
    m.add_class::<py::flight::PyFlightToken>()?;
    py::flight::install_fork_hook();
    py::cached_call::enable_vectorcall(m.py())?;
    m.add_class::<py::gate::PyGate>()?;
    m.add_class::<py::timed_call::PyTimedCall>()?;
    py::timed_call::enable_vectorcall(m.py())?;
    m.add_class::<py::ratelimit::PyTokenBucket>()?;
    m.add_class::<py::backoff::PyBackoff>()?;
    Ok(())
}
