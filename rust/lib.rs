//! opero's native core: pure-Rust cores (`keys`, `store`, `ratelimit`,
//! `backoff`, `clock`) and, behind the `python` feature, their PyO3 bindings
//! in `py/`. This file only declares modules and registers the Python module.

pub mod backoff;
pub mod clock;
pub mod error;
pub mod flight;
pub mod keys;
pub mod ratelimit;
pub mod store;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// Native core of opero, written in Rust and built by maturin.
#[cfg(feature = "python")]
#[pymodule]
fn _opero_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<py::clock::PyManualClock>()?;
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
    m.add_class::<py::ratelimit::PyTokenBucket>()?;
    m.add_class::<py::backoff::PyBackoff>()?;
    Ok(())
}
