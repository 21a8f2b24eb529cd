//! The locks of the bindings: a GIL-aware mutex helper and the store's guard.
//!
//! Invariant: no lock here is ever held while Python code runs, and no thread
//! blocks on one while attached to the interpreter (it detaches first), so a
//! lock can never deadlock against the GIL.

use parking_lot::{Mutex, MutexGuard};
use pyo3::prelude::*;

/// Lock without ever blocking while attached to the interpreter.
#[inline]
pub(crate) fn lock<'a, T: Send>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    if let Some(g) = m.try_lock() {
        return g;
    }
    py.detach(|| m.lock())
}

/// The store's lock.
///
/// On a GIL build the GIL is the lock: the closures passed to [`Guarded::with`]
/// never run Python code, never release the GIL and never drop Python objects,
/// so holding the GIL excludes every other thread. A mutex there cost one
/// uncontended lock/unlock pair, about 7 ns of a 45 ns `Store.get` here
/// (perf: the two `lock cmpxchg` took 75% of the lookup's samples). A
/// re-entrant use (a logic error in this file) panics instead of aliasing.
/// On a free-threaded build it is a real mutex.
pub(crate) struct Guarded<T> {
    #[cfg(not(Py_GIL_DISABLED))]
    cell: std::cell::UnsafeCell<T>,
    #[cfg(not(Py_GIL_DISABLED))]
    busy: std::cell::Cell<bool>,
    #[cfg(Py_GIL_DISABLED)]
    mutex: Mutex<T>,
}

// SAFETY: on GIL builds every access goes through `with`, which requires a
// `Python` token (the GIL is held) and does not release the GIL before it
// returns, so accesses from different threads never overlap. `T: Send`
// because the value may be used from any thread holding the GIL.
#[cfg(not(Py_GIL_DISABLED))]
unsafe impl<T: Send> Sync for Guarded<T> {}

impl<T: Send> Guarded<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            #[cfg(not(Py_GIL_DISABLED))]
            cell: std::cell::UnsafeCell::new(value),
            #[cfg(not(Py_GIL_DISABLED))]
            busy: std::cell::Cell::new(false),
            #[cfg(Py_GIL_DISABLED)]
            mutex: Mutex::new(value),
        }
    }

    /// Run `f` on the value if nobody holds it now (for GC traversal, which
    /// must not block).
    pub(crate) fn try_peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        #[cfg(not(Py_GIL_DISABLED))]
        {
            if self.busy.get() {
                return None;
            }
            // SAFETY: the GC runs with the GIL held and we are not inside `with`
            // (busy is false), so nothing mutates the value meanwhile.
            Some(f(unsafe { &*self.cell.get() }))
        }
        #[cfg(Py_GIL_DISABLED)]
        {
            self.mutex.try_lock().map(|g| f(&g))
        }
    }

    /// Run `f` with exclusive access. `f` must not run Python code.
    #[inline]
    pub(crate) fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(not(Py_GIL_DISABLED))]
        {
            let _ = py;
            assert!(!self.busy.replace(true), "opero: re-entrant store access");
            struct Release<'a>(&'a std::cell::Cell<bool>);
            impl Drop for Release<'_> {
                fn drop(&mut self) {
                    self.0.set(false);
                }
            }
            let _release = Release(&self.busy);
            // SAFETY: the GIL is held (we have a token), `busy` rules out
            // re-entry on this thread, and `f` does not release the GIL.
            f(unsafe { &mut *self.cell.get() })
        }
        #[cfg(Py_GIL_DISABLED)]
        {
            f(&mut lock(py, &self.mutex))
        }
    }
}
