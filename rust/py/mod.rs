//! PyO3 bindings of the pure cores: one file per core file, plus the error
//! conversion. Nothing outside this folder (and `lib.rs`) uses pyo3.

pub mod backoff;
pub mod cached_call;
pub mod clock;
pub mod error;
pub mod fastcall;
pub mod flight;
pub mod guarded;
pub mod keys;
pub mod ratelimit;
pub mod store;
