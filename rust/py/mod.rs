//! PyO3 bindings of the pure cores: one file per core file, plus the error
//! conversion. Nothing outside this folder (and `lib.rs`) uses pyo3.

pub(crate) mod backoff;
pub(crate) mod cached_call;
pub(crate) mod clock;
pub(crate) mod error;
pub(crate) mod fastcall;
pub(crate) mod flight;
pub(crate) mod gate;
pub(crate) mod guarded;
pub(crate) mod keys;
pub(crate) mod ratelimit;
pub(crate) mod store;
pub(crate) mod timed_call;
