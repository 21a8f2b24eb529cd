//! The locks of the bindings (a GIL-aware mutex helper and the GIL-backed
//! guard) and the exit shield of every frame that may re-enter the interpreter.
//!
//! Invariant: no lock here is ever held while Python code runs, and no thread
//! blocks on one while attached to the interpreter (it detaches first), so a
//! lock can never deadlock against the GIL. On a GIL build a [`Guarded`] value
//! is only touched with the GIL held and never across a GIL release, so no
//! other thread can hold it when the GIL holder calls `fork()`.
//!
//! Exit: on Python < 3.14 a daemon thread that takes the GIL back after
//! interpreter finalization has begun is ended by `pthread_exit`, a forced
//! unwind. Crossing PyO3's `catch_unwind` trampoline, that unwind is caught
//! and the process aborts ("FATAL: exception not rethrown"); crossing a C API
//! call that Rust compiled as unable to unwind, it aborts too. So the calls
//! into Python of the cached-call path go through the "C-unwind" declarations
//! below, and those calls and every re-attach run under [`shielded`]: the
//! forced unwind stops there and the thread is parked for good, which is what
//! Python 3.14 itself does with such threads (CPython gh-87135). Not covered:
//! a `__del__` run by a reference dropped in native code at that moment.
//! PyO3 0.30 hangs such a thread itself when it is PyO3 that takes the GIL
//! (`Python::attach`, PyO3 #4874; the re-attach after `Python::detach`, PyO3
//! #6085), but not inside a C API call that runs Python code, where CPython's
//! eval loop takes the GIL back: hence the declarations and the shield here
//! (which stays around `detach` as well, at no cost on the normal path).

use parking_lot::{Mutex, MutexGuard};
use pyo3::ffi;
use pyo3::marker::Ungil;
use pyo3::prelude::*;

#[cfg(not(Py_3_13))]
extern "C" {
    /// Exported by every CPython 3.7-3.12; reads an atomic, callable without the GIL.
    fn _Py_IsFinalizing() -> std::ffi::c_int;
}

/// Whether interpreter finalization has begun (no GIL needed).
fn finalizing() -> bool {
    #[cfg(Py_3_13)]
    // SAFETY: reads the runtime's finalizing field (an atomic); no GIL needed.
    let f = unsafe { ffi::Py_IsFinalizing() };
    #[cfg(not(Py_3_13))]
    // SAFETY: as above, through the 3.7-3.12 spelling.
    let f = unsafe { _Py_IsFinalizing() };
    f != 0
}

/// Armed while a shielded frame runs; its drop only runs when that frame is
/// unwound without returning.
struct ExitShield;

impl Drop for ExitShield {
    #[cold]
    fn drop(&mut self) {
        // A Rust panic goes on to PyO3's trap (it becomes PanicException).
        // Anything else unwinding through here is foreign: at interpreter exit,
        // CPython's `pthread_exit` of a daemon thread (the GIL is not held
        // then). Park the thread instead of letting a `catch_unwind` above
        // abort the process; the process is exiting and takes it along.
        if std::thread::panicking() || !finalizing() {
            return;
        }
        loop {
            std::thread::park();
        }
    }
}

/// Run `f`, which may call Python code or re-attach to the interpreter, so that
/// a thread ended by interpreter finalization inside it parks instead of
/// aborting the process. Costs nothing when `f` returns.
#[inline(always)]
pub(crate) fn shielded<R>(f: impl FnOnce() -> R) -> R {
    let shield = ExitShield;
    let r = f();
    // Disarm: the shield is a zero-sized marker, so forgetting it leaks nothing.
    #[allow(clippy::mem_forget)]
    std::mem::forget(shield);
    r
}

/// The C API entry points that run Python code, declared "C-unwind" so the
/// forced unwind of `pthread_exit` crosses them into the [`shielded`] frame
/// around the call. pyo3-ffi declares them "C": a call site Rust compiles as
/// unable to unwind, where any unwind (forced or not) aborts the process.
#[allow(clashing_extern_declarations)]
mod unwinding {
    use pyo3::ffi::{PyObject, Py_hash_t};
    use std::ffi::c_int;

    extern "C-unwind" {
        pub(crate) fn PyObject_Call(
            callable: *mut PyObject,
            args: *mut PyObject,
            kwargs: *mut PyObject,
        ) -> *mut PyObject;
        #[cfg(not(Py_LIMITED_API))]
        pub(crate) fn PyObject_Vectorcall(
            callable: *mut PyObject,
            args: *const *mut PyObject,
            nargsf: usize,
            kwnames: *mut PyObject,
        ) -> *mut PyObject;
        pub(crate) fn PyObject_CallNoArgs(callable: *mut PyObject) -> *mut PyObject;
        pub(crate) fn PyObject_Hash(obj: *mut PyObject) -> Py_hash_t;
        pub(crate) fn PyObject_RichCompareBool(
            a: *mut PyObject,
            b: *mut PyObject,
            op: c_int,
        ) -> c_int;
    }
}

/// `PyObject_Call`, shielded.
///
/// # Safety
/// As `PyObject_Call`: attached, live `callable` and `args` tuple, `kwargs` a
/// dict or NULL.
#[inline(always)]
pub(crate) unsafe fn call(
    callable: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the caller guarantees an attached thread, a live callable and
    // args tuple, and `kwargs` a dict or NULL (this function's contract); the
    // declaration matches CPython's prototype, only the ABI string differs.
    shielded(|| unsafe { unwinding::PyObject_Call(callable, args, kwargs) })
}

/// `PyObject_Vectorcall`, shielded.
///
/// # Safety
/// As `PyObject_Vectorcall`: attached, live callable, `nargs + len(kwnames)`
/// live pointers at `args`.
#[cfg(not(Py_LIMITED_API))]
#[inline(always)]
pub(crate) unsafe fn vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the caller guarantees an attached thread, a live callable and
    // `nargs + len(kwnames)` live pointers at `args` (this function's contract).
    shielded(|| unsafe { unwinding::PyObject_Vectorcall(callable, args, nargsf, kwnames) })
}

/// `PyObject_CallNoArgs`, shielded.
///
/// # Safety
/// Attached, live `callable`.
#[inline(always)]
pub(crate) unsafe fn call0(callable: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the caller guarantees an attached thread and a live callable.
    shielded(|| unsafe { unwinding::PyObject_CallNoArgs(callable) })
}

/// `hash(obj)`, shielded (a Python `__hash__` may run).
pub(crate) fn hash(obj: &Bound<'_, PyAny>) -> PyResult<isize> {
    // SAFETY: attached (we hold a `Bound`), live object.
    let h = shielded(|| unsafe { unwinding::PyObject_Hash(obj.as_ptr()) });
    if h == -1 {
        // -1 only ever means an error (a `__hash__` returning -1 gives -2).
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(h)
}

/// `a == b` as `PyObject_RichCompareBool` gives it (1, 0, or -1 with an
/// exception set), shielded (a Python `__eq__` may run).
///
/// # Safety
/// Attached, live `a` and `b`.
#[inline]
pub(crate) unsafe fn eq(a: *mut ffi::PyObject, b: *mut ffi::PyObject) -> std::ffi::c_int {
    // SAFETY: the caller guarantees an attached thread and live `a` and `b`;
    // `Py_EQ` is a valid comparison operator.
    shielded(|| unsafe { unwinding::PyObject_RichCompareBool(a, b, ffi::Py_EQ) })
}

/// `py.detach(f)`, shielded: re-attaching at interpreter exit parks the thread.
#[inline]
pub(crate) fn detach<T: Ungil, F: Ungil + FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    shielded(|| py.detach(f))
}

/// Lock without ever blocking while attached to the interpreter (the guard of
/// free-threaded builds).
#[inline]
#[cfg_attr(not(Py_GIL_DISABLED), allow(dead_code))]
pub(crate) fn lock<'a, T: Send>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    if let Some(g) = m.try_lock() {
        return g;
    }
    detach(py, || m.lock())
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
