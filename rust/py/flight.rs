//! Process-wide state of single flight: the wait-for graph shared by the
//! native flights of `CachedCall` and the Python ones (`FlightToken`), and the
//! fork generation.
//!
//! Invariants: the graph lives behind the GIL ([`Guarded`]), so no thread can
//! hold it across a `fork()`; a `pthread_atfork` child handler bumps the fork
//! generation, and state stamped with an older generation (flights, graph
//! edges) belongs to threads that do not exist in this process: it is
//! dropped, never waited on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};

use pyo3::ffi;
use pyo3::prelude::*;

use super::guarded::Guarded;
use crate::flight::WaitGraph;

/// Bumped in every child process right after `fork()`.
static FORK_GEN: AtomicU64 = AtomicU64::new(0);

/// The wait-for graph of this process and the fork generation it belongs to.
static GRAPH: LazyLock<Guarded<(u64, WaitGraph)>> =
    LazyLock::new(|| Guarded::new((fork_generation(), WaitGraph::new())));

extern "C" fn after_fork_in_child() {
    FORK_GEN.fetch_add(1, Ordering::SeqCst);
}

/// Register the `fork()` child handler (once per process, at module init).
pub(crate) fn install_fork_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that only bumps an atomic (async-signal
        // safe); the function lives as long as the process (the module is
        // never unloaded). A failure (ENOMEM) leaves fork detection off: the
        // result is ignored because nothing better can be done at import.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

/// The number of `fork()`s between the process that loaded opero and this one.
#[inline]
pub(crate) fn fork_generation() -> u64 {
    FORK_GEN.load(Ordering::Acquire)
}

/// The current thread's ident, as `threading.get_ident()` gives it.
#[inline]
pub(crate) fn thread_ident() -> u64 {
    // SAFETY: a plain query of the calling thread, callable at any time.
    unsafe { ffi::PyThread_get_thread_ident() as u64 }
}

/// Record that this thread waits on `owner`'s computation (`done`); `false`
/// when that would close a wait cycle (or `owner` is this thread): then the
/// caller computes directly instead of waiting.
pub(crate) fn begin_wait(py: Python<'_>, owner: u64, done: &Arc<AtomicBool>) -> bool {
    let me = thread_ident();
    let generation = fork_generation();
    GRAPH.with(py, |(graph_gen, graph)| {
        if *graph_gen != generation {
            graph.clear();
            *graph_gen = generation;
        }
        graph.try_wait(me, owner, done)
    })
}

/// This thread stopped waiting.
pub(crate) fn end_wait(py: Python<'_>) {
    let me = thread_ident();
    GRAPH.with(py, |(_, graph)| graph.end_wait(me));
}

/// One computation in progress of a Python-level single flight (the Redis,
/// disk and custom backends).
///
/// Created by the thread that computes; the threads that wait on it go
/// through :meth:`wait_begin` / :meth:`wait_end`, so a wait that would close
/// a cycle of threads waiting on each other (native flights included) is
/// refused and the caller computes directly.
#[pyclass(frozen, module = "opero._opero_core", name = "FlightToken")]
pub struct PyFlightToken {
    owner: u64,
    generation: u64,
    done: Arc<AtomicBool>,
}

#[pymethods]
impl PyFlightToken {
    #[new]
    fn new() -> Self {
        Self {
            owner: thread_ident(),
            generation: fork_generation(),
            done: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The ident of the thread computing (``threading.get_ident()``).
    #[getter]
    fn owner(&self) -> u64 {
        self.owner
    }

    /// Whether :meth:`finish` was called.
    #[getter]
    fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Whether the token was made before a ``fork()`` (its owner thread is
    /// not in this process).
    #[getter]
    fn forked(&self) -> bool {
        self.generation != fork_generation()
    }

    /// Start waiting on this computation from the current thread.
    ///
    /// Returns:
    ///     True when the thread may wait (call :meth:`wait_end` afterwards);
    ///     False when waiting would deadlock (the current thread computes this
    ///     itself, or its owner waits, directly or not, on the current thread):
    ///     compute directly instead.
    fn wait_begin(&self, py: Python<'_>) -> bool {
        begin_wait(py, self.owner, &self.done)
    }

    /// Stop waiting (after a True :meth:`wait_begin`).
    fn wait_end(&self, py: Python<'_>) {
        end_wait(py);
    }

    /// Mark the computation finished (waits on it no longer count).
    fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    fn __repr__(&self) -> String {
        format!(
            "<opero FlightToken owner={} done={}>",
            self.owner,
            self.done.load(Ordering::Acquire)
        )
    }
}
