#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Binding of the cached-call hot path (`CachedCall`) over a `Store`.
//!
//! Invariants: a hit never leaves native code except for `on_hit()`; only
//! successful results are stored; at most one thread computes a key at a time
//! (single flight), the others wait detached from the interpreter and get the
//! same result or `Exception`. An owner stopped by a `BaseException` that is
//! not an `Exception` (KeyboardInterrupt, SystemExit...) abandons the flight:
//! that exception stays its own, and one waiter computes instead. A thread
//! whose wait would close a cycle (it computes the key itself, or the owner
//! waits on it through other threads) computes directly. The in-flight table
//! is guarded by the GIL (never held across a fork); a flight made before a
//! `fork()` is dropped in the child, never waited on. An uncontended miss only
//! lists a marker there (key, id, owner thread, fork generation: no
//! allocation for a short key); the waiters' meeting point (outcome, condvar,
//! done flag) is made by the first thread that waits. No Python runs under the
//! table's guard. Calls into Python (the function, `key_func`, `on_hit`, and
//! `__hash__`/`__eq__` of opaque arguments) and re-attaching after a wait are
//! shielded against the forced unwind of interpreter exit (see `guarded.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
#[cfg(not(Py_LIMITED_API))]
use pyo3::types::PyFunction;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::fastcall::{self, Vectorcall};
use super::flight::{begin_wait, end_wait, fork_generation, thread_ident};
use super::guarded::{self, detach, Guarded};
use super::keys::{short_call1, ArgName, Encoder, KeyRef, Mode};
use super::store::PyStore;
use crate::error::CoreError;
use crate::keys::{hash_short, Short};

/// Where a computation stands.
enum Outcome {
    /// Still computing.
    Pending,
    /// Finished: the value, or the `Exception` every waiter re-raises.
    Done(PyResult<Py<PyAny>>),
    /// The owner left without a result (a `BaseException` that is not an
    /// `Exception`, or a panic): a waiter computes instead.
    Abandoned,
}

/// Where the threads waiting on one computation meet its outcome. Made by
/// the first thread that waits: an uncontended miss never allocates one.
struct Flight {
    /// Set once the outcome is published (read by the wait-for graph).
    done: Arc<AtomicBool>,
    outcome: Mutex<Outcome>,
    published: Condvar,
}

/// What a flight is keyed by.
enum FlightKey {
    /// A key without opaque objects of at most 16 bytes, compared in registers.
    Short(Short),
    /// Any other key: equal bytes and identical opaque objects (no Python
    /// runs under the in-flight guard, so equal-but-distinct opaque
    /// arguments compute separately).
    Long(KeyRef),
}

impl FlightKey {
    #[inline]
    fn same(&self, other: &FlightKey) -> bool {
        match (self, other) {
            (FlightKey::Short(a), FlightKey::Short(b)) => a == b,
            (FlightKey::Long(a), FlightKey::Long(b)) => {
                a.bytes == b.bytes
                    && a.opaque.len() == b.opaque.len()
                    && a.opaque
                        .iter()
                        .zip(b.opaque.iter())
                        .all(|(x, y)| x.as_ptr() == y.as_ptr())
            }
            _ => false,
        }
    }
}

/// A key being computed, listed in the in-flight table.
struct InFlight {
    key: FlightKey,
    hash: u64,
    /// Unique among the table's entries ever: how the owner finds its own.
    id: u64,
    /// `threading.get_ident()` of the computing thread.
    owner: u64,
    /// The fork generation it was made in (older: its owner is not in this process).
    generation: u64,
    /// The waiters' meeting point, made by the first one.
    flight: Option<Arc<Flight>>,
}

/// The keys being computed (by hash), and the next entry id.
#[derive(Default)]
struct Flights {
    table: HashTable<InFlight>,
    next_id: u64,
}

/// What a miss does about the key's flight.
enum Step {
    /// Compute it: this thread listed the entry `id`.
    Own(u64),
    /// Wait on `owner`'s computation.
    Wait(u64, Arc<Flight>),
}

/// How often a thread waiting on another's computation checks for signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Completes a flight: unlists its entry and, if a thread waits, publishes
/// the outcome and wakes the waiters. Dropped without [`FlightGuard::finish`]
/// (the owner unwound: a panic), the flight is abandoned.
struct FlightGuard<'a, 'py> {
    py: Python<'py>,
    flights: &'a Guarded<Flights>,
    hash: u64,
    id: u64,
    finished: bool,
}

impl FlightGuard<'_, '_> {
    /// Publish the owner's `result`: waiters get exactly what the owner gets,
    /// an `Exception` included; a `BaseException` that is not one
    /// (KeyboardInterrupt...) stays the owner's own and abandons the flight.
    #[inline]
    fn finish(mut self, result: &PyResult<Py<PyAny>>) {
        self.finished = true;
        let py = self.py;
        self.complete(|| match result {
            Ok(v) => Outcome::Done(Ok(v.clone_ref(py))),
            Err(e) if e.is_instance_of::<PyException>(py) => Outcome::Done(Err(e.clone_ref(py))),
            Err(_) => Outcome::Abandoned,
        });
    }

    #[inline]
    fn complete(&self, outcome: impl FnOnce() -> Outcome) {
        let id = self.id;
        let removed = self.flights.with(self.py, |f| {
            f.table
                .find_entry(self.hash, |e| e.id == id)
                .ok()
                .map(|e| e.remove().0)
        });
        // Gone: a thread of a forked child replaced the entry (see `miss`).
        let Some(entry) = removed else { return };
        if let Some(flight) = &entry.flight {
            if entry.generation == fork_generation() {
                let old = {
                    let mut o = flight.outcome.lock();
                    std::mem::replace(&mut *o, outcome())
                };
                flight.done.store(true, Ordering::Release);
                flight.published.notify_all();
                drop(old);
            }
            // Else this process was forked from the one that started the
            // flight: no thread here waits on it, and its lock may have been
            // held by a thread of the parent at fork time. Leave it alone.
        }
        // Dropped outside the guard: opaque key objects may run `__del__`.
        drop(entry);
    }
}

impl Drop for FlightGuard<'_, '_> {
    fn drop(&mut self) {
        if !self.finished {
            self.complete(|| Outcome::Abandoned);
        }
    }
}

/// Removes this thread's edge from the wait-for graph when dropped.
struct WaitEdge<'py>(Python<'py>);

impl Drop for WaitEdge<'_> {
    fn drop(&mut self) {
        end_wait(self.0);
    }
}

/// The native hot path of a memory-cached function.
///
/// Calling it builds the key from the arguments (or calls ``key_func``), looks
/// it up in ``store`` and returns a hit without leaving native code (calling
/// ``on_hit()`` first when given). On a miss it calls ``func`` with the same
/// arguments and stores a successful result; exceptions are never stored.
/// Concurrent misses on one key from several threads call ``func`` once: the
/// others wait (without the GIL) and get the same result or exception. If the
/// computing thread is stopped by a ``BaseException`` that is not an
/// ``Exception`` (``KeyboardInterrupt``...), one waiter computes instead. A
/// call whose wait would deadlock (its own thread computes the key, or the
/// computing thread waits on it through other threads) calls ``func`` directly.
/// With ``on_error``, an ``Exception`` raised by ``func`` is handed to
/// ``on_error(exc, args, kwargs)`` (as the exception being handled), whose
/// result or exception is the call's: ``@opero`` passes its retry loop, so
/// the first call runs ``func`` without a Python frame of opero around it.
/// An exception raised binding the arguments of a Python ``func`` (it has no
/// traceback: none of the function's code ran) propagates unchanged.
/// ``coalesced`` counts the calls that waited on another call's computation.
///
/// Instances have a ``__dict__`` (so ``functools.update_wrapper`` works), bind
/// as methods through ``__get__``, and pickle by reference (``__reduce__``
/// returns ``__qualname__``).
///
/// Args:
///     store: Where results live.
///     func: Called on a miss with the call's arguments.
///     key_func: Optional; called with the call's arguments, its result is the key.
///     on_hit: Optional zero-argument callable called on every hit.
///     on_error: Optional; called as ``on_error(exc, args, kwargs)`` when
///         ``func`` raises an ``Exception``.
#[pyclass(
    frozen,
    dict,
    weakref,
    module = "opero._opero_core",
    name = "CachedCall"
)]
// `repr(C)`, `store` first: the order the hit path reads the fields in. With
// rustc's own order (which moved `store` once it became an `Option`) a 1-int
// hit measured 31 ns against 26 ns here, with the same instructions.
#[repr(C)]
pub struct PyCachedCall {
    /// Always `Some` once constructed. An `Option` because the GC may
    /// traverse the object before its fields are written (see
    /// `__traverse__`), and all-zero memory is a valid `None`; a use before
    /// then raises `RuntimeError` ([`not_ready`]).
    store: Option<Py<PyStore>>,
    /// As `store`: always `Some` once constructed.
    func: Option<Py<PyAny>>,
    key_func: Option<Py<PyAny>>,
    on_hit: Option<Py<PyAny>>,
    /// `opero.set_testing(cache=False)`: every call runs `func`, no lookup, no
    /// store (set through `set_bypass` when the switch flips; all-zero is off).
    bypass: AtomicBool,
    /// The vectorcall entry point CPython reads at `tp_vectorcall_offset`
    /// (see [`enable_vectorcall`]); `Some` once constructed on a full-API
    /// build.
    vectorcall: Option<ffi::vectorcallfunc>,
    flights: Guarded<Flights>,
    /// Called as `on_error(exc, args, kwargs)` when `func` raises an
    /// `Exception`; its outcome is the call's (the retry loop of `@opero`).
    on_error: Option<Py<PyAny>>,
    /// `func` is a Python function: an exception it raises without a
    /// traceback was raised binding the arguments, before any of its code ran.
    func_is_function: bool,
    /// Calls that waited on another call's computation of their key and
    /// got its outcome (the waiter path only touches it).
    coalesced: AtomicU64,
}

static METHOD_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A call's arguments as CPython handed them over.
pub(crate) enum CallArgs<'a, 'py> {
    /// Through `tp_call` (`PyObject_Call`, or PyO3's `__call__`).
    Tuple(&'a Bound<'py, PyTuple>, Option<&'a Bound<'py, PyDict>>),
    /// Through vectorcall: `nargs` positional pointers then one per keyword name.
    #[cfg(not(Py_LIMITED_API))]
    Vector {
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: Option<&'a Bound<'py, PyTuple>>,
    },
}

impl<'py> CallArgs<'_, 'py> {
    /// The short key when the call has exactly one positional int or short
    /// str and no keywords.
    #[inline(always)]
    fn short_single(&self, py: Python<'py>) -> Option<Short> {
        match self {
            CallArgs::Tuple(a, k) => {
                if a.len() != 1 || k.is_some_and(|k| !k.is_empty()) {
                    return None;
                }
                // SAFETY: index 0 < len 1.
                let item = unsafe { a.get_borrowed_item_unchecked(0) };
                short_call1(&item)
            }
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                // SAFETY: per the vectorcall protocol.
                let nargs = unsafe { ffi::PyVectorcall_NARGS(*nargsf) };
                if nargs != 1 || kwnames.is_some_and(|k| !k.is_empty()) {
                    return None;
                }
                // SAFETY: nargs is 1, so `args[0]` is in bounds (vectorcall protocol).
                let first = unsafe { **args };
                // SAFETY: the positional argument is a live object for the call.
                let item = unsafe { Borrowed::from_ptr(py, first) };
                short_call1(&item)
            }
        }
    }

    /// Encode the call's key (identical bytes for both forms).
    #[inline]
    fn encode(&self, py: Python<'py>, enc: &mut Encoder<'py>) -> PyResult<()> {
        match self {
            CallArgs::Tuple(a, k) => enc.call(a, *k),
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                // SAFETY: per the vectorcall protocol (a plain bit mask).
                let nargs = unsafe { ffi::PyVectorcall_NARGS(*nargsf) } as usize;
                // SAFETY: the vectorcall protocol guarantees `nargs + len(kwnames)`
                // live pointers at `args` for the duration of the call.
                unsafe { enc.call_vector(py, *args, nargs, *kwnames) }
            }
        }
    }

    /// The call's arguments as a fresh `(args, kwargs)` pair (the failure
    /// path of `on_error` only).
    #[cold]
    fn packed(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
        match self {
            CallArgs::Tuple(a, k) => {
                let kwargs = match k {
                    Some(k) => k.copy()?,
                    None => PyDict::new(py),
                };
                Ok(((*a).clone(), kwargs))
            }
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                // SAFETY: per the vectorcall protocol (a plain bit mask).
                let nargs = unsafe { ffi::PyVectorcall_NARGS(*nargsf) } as usize;
                let nkw = kwnames.map_or(0, |k| k.len());
                // SAFETY: the vectorcall protocol guarantees `nargs + len(kwnames)`
                // live pointers at `args` for the duration of the call.
                let all = unsafe { std::slice::from_raw_parts(*args, nargs + nkw) };
                let positional = PyTuple::new(
                    py,
                    all[..nargs]
                        .iter()
                        // SAFETY: each pointer is a live object for the call.
                        .map(|&p| unsafe { Borrowed::from_ptr(py, p) }),
                )?;
                let kwargs = PyDict::new(py);
                if let Some(names) = kwnames {
                    for (name, &value) in names.iter().zip(all[nargs..].iter()) {
                        // SAFETY: a live object for the call (vectorcall protocol).
                        kwargs.set_item(name, unsafe { Borrowed::from_ptr(py, value) })?;
                    }
                }
                Ok((positional, kwargs))
            }
        }
    }

    /// Call `f` with `first`, then the same arguments, shielded (`TimedCall`'s failure).
    pub(crate) fn call_prepended(
        &self,
        py: Python<'py>,
        f: &Py<PyAny>,
        first: &[Py<PyAny>],
    ) -> PyResult<Py<PyAny>> {
        let r = match self {
            CallArgs::Tuple(a, k) => {
                let mut items: Vec<Bound<'py, PyAny>> =
                    first.iter().map(|o| o.bind(py).clone()).collect();
                items.extend(a.iter());
                let tuple = PyTuple::new(py, items)?;
                let kw = k.map_or(std::ptr::null_mut(), |k| k.as_ptr());
                // SAFETY: `f`, the new tuple and the optional dict are live for the call.
                unsafe { guarded::call(f.as_ptr(), tuple.as_ptr(), kw) }
            }
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                // SAFETY: per the vectorcall protocol (a plain bit mask).
                let nargs = unsafe { ffi::PyVectorcall_NARGS(*nargsf) } as usize;
                let total = nargs + kwnames.map_or(0, |k| k.len());
                let mut vector: Vec<*mut ffi::PyObject> = Vec::with_capacity(first.len() + total);
                vector.extend(first.iter().map(|o| o.as_ptr()));
                if total > 0 {
                    // SAFETY: the vectorcall protocol guarantees `nargs + len(kwnames)`
                    // live pointers at `args` (non-null when there are any) for the call.
                    let passed = unsafe { std::slice::from_raw_parts(*args, total) };
                    vector.extend_from_slice(passed);
                }
                let kw = kwnames.map_or(std::ptr::null_mut(), |k| k.as_ptr());
                // SAFETY: `vector` holds `first.len() + nargs` positional pointers then one
                // per keyword name, all live (borrowed from `first` and our caller).
                unsafe { guarded::vectorcall(f.as_ptr(), vector.as_ptr(), first.len() + nargs, kw) }
            }
        };
        owned_result(py, r)
    }

    /// Call `f` with the same arguments, shielded (see `guarded.rs`); a
    /// `RecursionError` instead when the C stack is nearly full (Python code
    /// called here may recurse into this native call, and Python 3.11 counts
    /// only Python frames).
    #[inline]
    pub(crate) fn call(&self, py: Python<'py>, f: &Py<PyAny>) -> PyResult<Py<PyAny>> {
        stack_check()?;
        let r = match self {
            CallArgs::Tuple(a, k) => {
                let kw = k.map_or(std::ptr::null_mut(), |k| k.as_ptr());
                // SAFETY: `f`, the tuple and the optional dict are live for the call.
                unsafe { guarded::call(f.as_ptr(), a.as_ptr(), kw) }
            }
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                let kw = kwnames.map_or(std::ptr::null_mut(), |k| k.as_ptr());
                // SAFETY: forwarding the arguments we were called with, unchanged
                // (including PY_VECTORCALL_ARGUMENTS_OFFSET, which our caller granted).
                unsafe { guarded::vectorcall(f.as_ptr(), *args, *nargsf, kw) }
            }
        };
        owned_result(py, r)
    }
}

/// A new reference from the C API as a result (NULL: the raised exception).
#[inline]
fn owned_result(py: Python<'_>, r: *mut ffi::PyObject) -> PyResult<Py<PyAny>> {
    if r.is_null() {
        Err(PyErr::fetch(py))
    } else {
        // SAFETY: a non-null result of a call is a new reference.
        Ok(unsafe { Bound::from_owned_ptr(py, r) }.unbind())
    }
}

/// A new reference to `exc.__traceback__`, or NULL.
#[cold]
fn err_traceback(
    py: Python<'_>,
    exc: &Py<pyo3::exceptions::PyBaseException>,
) -> *mut ffi::PyObject {
    let _ = py;
    // SAFETY: attached (the token); `exc` is a live exception object.
    unsafe { ffi::PyException_GetTraceback(exc.as_ptr()) }
}

/// Run `call` (a C-API call into Python) with `exc` as the exception being
/// handled, as in an `except` clause: what it raises chains to `exc`. The
/// current exception state's own handled exception is put back afterwards.
#[cold]
fn while_handling(
    py: Python<'_>,
    exc: &Py<pyo3::exceptions::PyBaseException>,
    call: impl FnOnce() -> *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let saved = OwnExcInfo::take(py);
    let exc_type = exc.bind(py).get_type();
    let exc_tb = err_traceback(py, exc);
    // SAFETY: attached; the three new references passed are stolen (set as
    // the exception being handled); a NULL traceback is allowed.
    unsafe { ffi::PyErr_SetExcInfo(exc_type.into_ptr(), exc.clone_ref(py).into_ptr(), exc_tb) };
    let r = call();
    saved.restore(py);
    r
}

/// The exception "being handled" that the current exception state itself
/// holds, taken out of it (the state is left empty) to be put back.
///
/// `PyErr_GetExcInfo` reports the topmost handled exception: when the current
/// state (a running generator's or coroutine's own) holds none, that is its
/// caller's. Putting that one back into the current state would leave it
/// there: a generator resumed later, outside its caller's `except` block, saw
/// the caller's exception as its own `sys.exception()`. So this finds out
/// whether the current state holds the topmost exception (clearing it changes
/// what is topmost) before it decides what to put back.
struct OwnExcInfo([*mut ffi::PyObject; 3]);

impl OwnExcInfo {
    /// Save the current state's own handled exception and clear the state.
    #[cold]
    fn take(py: Python<'_>) -> Self {
        let _ = py;
        let null = std::ptr::null_mut;
        let mut top = [null(), null(), null()];
        // SAFETY: attached (the token); three out-pointers receiving new
        // references (or NULL) to the topmost handled exception.
        unsafe { ffi::PyErr_GetExcInfo(&mut top[0], &mut top[1], &mut top[2]) };
        if top[1].is_null() {
            // No exception is handled anywhere: the current state is empty.
            return Self(top);
        }
        // SAFETY: attached; clears the current state's own slot (three NULLs
        // stolen). Its old value, if it was `top[1]`, stays alive through `top`.
        unsafe { ffi::PyErr_SetExcInfo(null(), null(), null()) };
        let mut below = [null(), null(), null()];
        // SAFETY: as above: new references (or NULL) to what is topmost now.
        unsafe { ffi::PyErr_GetExcInfo(&mut below[0], &mut below[1], &mut below[2]) };
        let own = below[1] != top[1];
        for p in below {
            // SAFETY: each is NULL or a new reference from `PyErr_GetExcInfo`,
            // released once; the state below still holds the object (no `__del__`).
            unsafe { ffi::Py_XDECREF(p) };
        }
        if own {
            return Self(top);
        }
        // The current state held nothing (or the very exception the state
        // below holds, which cannot be told apart): it gets nothing back.
        for p in top {
            // SAFETY: new references from `PyErr_GetExcInfo`, released once;
            // the state below still holds the object (no `__del__` runs).
            unsafe { ffi::Py_XDECREF(p) };
        }
        Self([null(), null(), null()])
    }

    /// Put the saved exception back as the current state's own.
    #[cold]
    fn restore(self, py: Python<'_>) {
        let _ = py;
        let [t, v, tb] = self.0;
        // SAFETY: attached; the three saved new references (or NULLs) are
        // stolen, each exactly once (`self` is consumed).
        unsafe { ffi::PyErr_SetExcInfo(t, v, tb) };
    }
}

/// `RecursionError` when the C stack is nearly full (see `stack.rs`).
#[inline(always)]
pub(crate) fn stack_check() -> PyResult<()> {
    if crate::stack::nearly_full() {
        Err(stack_exhausted())
    } else {
        Ok(())
    }
}

#[cold]
#[inline(never)]
fn stack_exhausted() -> PyErr {
    pyo3::exceptions::PyRecursionError::new_err(
        "maximum recursion depth exceeded: the C stack is nearly full (a deeply \
         recursive call through opero's native call path; recurse less deeply or \
         lower sys.setrecursionlimit)",
    )
}

/// Call `on_hit()` (shielded); its result is discarded.
#[inline]
fn call_on_hit(py: Python<'_>, cb: &Py<PyAny>) -> PyResult<()> {
    // SAFETY: `cb` is a live callable.
    let r = unsafe { guarded::call0(cb.as_ptr()) };
    owned_result(py, r).map(drop)
}

/// The error for a use of an instance whose fields are not written yet: only
/// Python code run by a collection inside `object.__new__` (a `gc.callbacks`
/// entry walking `gc.get_objects()`) can reach one (see `__traverse__`).
#[cold]
fn not_ready() -> PyErr {
    PyRuntimeError::new_err(
        "this CachedCall is still being constructed (reached through the garbage collector)",
    )
}

impl PyCachedCall {
    /// The store (set by `__new__`).
    #[inline(always)]
    fn store_ref(&self) -> PyResult<&Py<PyStore>> {
        self.store.as_ref().ok_or_else(not_ready)
    }

    /// The wrapped function (set by `__new__`).
    #[inline(always)]
    fn func_ref(&self) -> PyResult<&Py<PyAny>> {
        self.func.as_ref().ok_or_else(not_ready)
    }

    /// Call `func` with the call's arguments; an `Exception` goes to
    /// `on_error` when set (except one raised binding a Python function's
    /// arguments: it propagates unchanged, as from a wrapper with the
    /// function's own parameters).
    #[inline]
    fn call_func(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        let r = args.call(py, self.func_ref()?);
        match (r, &self.on_error) {
            (Err(e), Some(handler)) => self.recover(py, handler, e, args),
            (r, _) => r,
        }
    }

    /// The failure path of [`Self::call_func`]: hand `err` to `handler` as
    /// the exception being handled (so what it raises chains to `err`, as
    /// from an `except` clause).
    #[cold]
    #[inline(never)]
    fn recover(
        &self,
        py: Python<'_>,
        handler: &Py<PyAny>,
        err: PyErr,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        if !err.is_instance_of::<PyException>(py)
            || (self.func_is_function && err.traceback(py).is_none())
        {
            return Err(err);
        }
        let (positional, kwargs) = args.packed(py)?;
        let exc = err.into_value(py);
        let call_args = PyTuple::new(
            py,
            [exc.bind(py).as_any(), positional.as_any(), kwargs.as_any()],
        )?;
        let r = while_handling(py, &exc, || {
            // SAFETY: `handler` and the args tuple are live; no kwargs.
            unsafe { guarded::call(handler.as_ptr(), call_args.as_ptr(), std::ptr::null_mut()) }
        });
        owned_result(py, r)
    }

    /// A call while `opero.set_testing(cache=False)` is on: `func`, no lookup, no store.
    /// Out of line and cold, so the hit path's code stays as it was.
    #[cold]
    #[inline(never)]
    fn bypassed(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        // Through `on_error` too: a bypassed call is still retried.
        self.call_func(py, args)
    }

    /// The whole call: key, lookup, `on_hit` or the single-flight miss.
    #[inline]
    pub(crate) fn call(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        if self.bypass.load(Ordering::Relaxed) {
            return self.bypassed(py, args);
        }
        let store = self.store_ref()?.get();
        if self.key_func.is_none() {
            // One int or short str argument: key built in registers.
            if let Some(short) = args.short_single(py) {
                let (found, dropped) = store.lookup_short_said(py, short, true);
                if let Some(v) = found {
                    if let Some(cb) = &self.on_hit {
                        call_on_hit(py, cb)?;
                    }
                    return Ok(v);
                }
                // Dropping an expired entry may have run Python code (`__del__`).
                let fresh = !dropped;
                let key = FlightKey::Short(short);
                return self.miss(py, store, &key, hash_short(short), fresh, args);
            }
        }
        let mut enc = Encoder::new(Mode::InProcess);
        match &self.key_func {
            None => args.encode(py, &mut enc)?,
            Some(kf) => {
                let k = args.call(py, kf)?;
                enc.value(k.bind(py), 0, ArgName::Value("the cache_key result"))?;
            }
        }
        let hash = enc.hash();
        let hit = store.lookup_enc(py, &enc, hash, true)?;
        if let Some(v) = hit {
            if let Some(cb) = &self.on_hit {
                call_on_hit(py, cb)?;
            }
            return Ok(v);
        }
        let key = match enc.short() {
            Some(s) => FlightKey::Short(s),
            None => FlightKey::Long(enc.to_key(hash)),
        };
        drop(enc);
        self.miss(py, store, &key, hash, false, args)
    }

    /// Join the key's flight (or start it) until this call has an outcome.
    ///
    /// `fresh`: no Python code ran since the lookup that missed (it dropped
    /// no expired entry). Then, on a GIL build, no other thread can have
    /// stored the key before this one lists it, and the owner skips
    /// re-checking the store. Not inlined: it would make the
    /// hit path's frame bigger (8 more instructions per hit).
    #[inline(never)]
    fn miss(
        &self,
        py: Python<'_>,
        store: &PyStore,
        key: &FlightKey,
        hash: u64,
        mut fresh: bool,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        // Before listing a flight: a waiter never gets another thread's
        // exhausted stack as its outcome (`CallArgs::call` checks again).
        stack_check()?;
        loop {
            let generation = fork_generation();
            let mut stale = None;
            let step = self.flights.with(py, |f| {
                // One probe: the key's entry, or where to list it.
                let entry = f.table.entry(hash, |e| e.key.same(key), |e| e.hash);
                let id = f.next_id;
                let listed = || InFlight {
                    key: match key {
                        FlightKey::Short(s) => FlightKey::Short(*s),
                        FlightKey::Long(k) => FlightKey::Long(k.clone()),
                    },
                    hash,
                    id,
                    owner: thread_ident(),
                    generation,
                    flight: None,
                };
                match entry {
                    Entry::Occupied(mut o) if o.get().generation == generation => {
                        let e = o.get_mut();
                        let flight = e.flight.get_or_insert_with(|| {
                            Arc::new(Flight {
                                done: Arc::new(AtomicBool::new(false)),
                                outcome: Mutex::new(Outcome::Pending),
                                published: Condvar::new(),
                            })
                        });
                        return Step::Wait(e.owner, flight.clone());
                    }
                    // Started before a fork by a thread that is not in this
                    // process: take its place.
                    Entry::Occupied(mut o) => {
                        stale = Some(std::mem::replace(o.get_mut(), listed()));
                    }
                    Entry::Vacant(v) => {
                        v.insert(listed());
                    }
                }
                f.next_id = id.wrapping_add(1);
                Step::Own(id)
            });
            drop(stale);
            let recheck = !fresh || cfg!(Py_GIL_DISABLED);
            // Listed or waiting: Python code may run from here on.
            fresh = false;
            let (owner, flight) = match step {
                Step::Own(id) => return self.own(py, store, key, hash, id, recheck, args),
                Step::Wait(owner, flight) => (owner, flight),
            };
            if !begin_wait(py, owner, &flight.done) {
                // This thread computes the key itself (re-entry), or the owner
                // waits on it through other threads: waiting would deadlock,
                // so compute directly.
                return self.call_func(py, args);
            }
            let edge = WaitEdge(py);
            // Wait detached, waking every 50 ms to let a pending signal
            // (Ctrl-C in the main thread) interrupt the wait.
            loop {
                let finished = detach(py, || {
                    let mut o = flight.outcome.lock();
                    if matches!(*o, Outcome::Pending) {
                        flight.published.wait_for(&mut o, SIGNAL_POLL);
                    }
                    !matches!(*o, Outcome::Pending)
                });
                if finished {
                    break;
                }
                py.check_signals()?;
            }
            drop(edge);
            let o = flight.outcome.lock();
            if matches!(*o, Outcome::Done(_)) {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
            }
            match &*o {
                Outcome::Done(Ok(v)) => return Ok(v.clone_ref(py)),
                Outcome::Done(Err(e)) => return Err(e.clone_ref(py)),
                // The owner was interrupted: try again (one waiter computes).
                Outcome::Abandoned | Outcome::Pending => {}
            }
        }
    }

    /// Compute as the flight's owner (entry `id`) and publish the outcome to
    /// its waiters.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn own(
        &self,
        py: Python<'_>,
        store: &PyStore,
        key: &FlightKey,
        hash: u64,
        id: u64,
        recheck: bool,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        let guard = FlightGuard {
            py,
            flights: &self.flights,
            hash,
            id,
            finished: false,
        };
        let result = self.compute(py, store, key, recheck, args);
        guard.finish(&result);
        result
    }

    /// The owner's work on a miss: re-check the store (`recheck`), call,
    /// store a success.
    #[inline]
    fn compute(
        &self,
        py: Python<'_>,
        store: &PyStore,
        key: &FlightKey,
        recheck: bool,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        if recheck {
            // A thread may have stored the value between our miss and our flight.
            let stored = match key {
                FlightKey::Short(s) => store.lookup_short(py, *s, false),
                FlightKey::Long(k) => store.lookup_key(py, k, false)?,
            };
            if let Some(v) = stored {
                return Ok(v);
            }
        }
        let v = self.call_func(py, args)?;
        match key {
            FlightKey::Short(s) => store.insert_short_default(py, *s, v.clone_ref(py)),
            FlightKey::Long(k) => store.insert(py, k.clone(), v.clone_ref(py), None)?,
        }
        Ok(v)
    }
}

#[pymethods]
impl PyCachedCall {
    #[new]
    #[pyo3(signature = (store, func, *, key_func = None, on_hit = None, on_error = None))]
    pub(crate) fn new(
        store: Py<PyStore>,
        func: &Bound<'_, PyAny>,
        key_func: Option<&Bound<'_, PyAny>>,
        on_hit: Option<&Bound<'_, PyAny>>,
        on_error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        fn callable(
            name: &'static str,
            f: Option<&Bound<'_, PyAny>>,
        ) -> PyResult<Option<Py<PyAny>>> {
            match f {
                Some(f) if f.is_none() => Ok(None),
                Some(f) if !f.is_callable() => Err(CoreError::type_(
                    name,
                    "a callable or None",
                    f.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                )
                .into()),
                Some(f) => Ok(Some(f.clone().unbind())),
                None => Ok(None),
            }
        }
        if !func.is_callable() {
            return Err(CoreError::type_(
                "func",
                "a callable",
                func.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            )
            .into());
        }
        Ok(Self {
            store: Some(store),
            func: Some(func.clone().unbind()),
            key_func: callable("key_func", key_func)?,
            on_hit: callable("on_hit", on_hit)?,
            bypass: AtomicBool::new(false),
            flights: Guarded::new(Flights::default()),
            vectorcall: fastcall::entry_point::<Self>(),
            on_error: callable("on_error", on_error)?,
            #[cfg(not(Py_LIMITED_API))]
            func_is_function: func.is_instance_of::<PyFunction>(),
            #[cfg(Py_LIMITED_API)]
            func_is_function: false,
            coalesced: AtomicU64::new(0),
        })
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.call(py, &CallArgs::Tuple(args, kwargs))
    }

    fn __get__(
        slf: &Bound<'_, Self>,
        obj: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        match obj {
            Some(o) if !o.is_none() => {
                let mt = METHOD_TYPE.import(py, "types", "MethodType")?;
                Ok(mt.call1((slf, o))?.unbind())
            }
            _ => Ok(slf.clone().into_any().unbind()),
        }
    }

    fn __reduce__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let name = match slf.getattr("__qualname__") {
            Ok(n) => n,
            Err(_) => slf.get().func_ref()?.bind(py).getattr("__qualname__")?,
        };
        Ok(name.cast_into::<PyString>()?.into_any().unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<opero CachedCall of {}>",
            self.func_ref()?.bind(py).repr()?
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // `#[pyclass(dict)]` instances are created by `object.__new__`, which on
        // CPython 3.11 and 3.12 tracks the object and then eagerly creates its
        // `__dict__` (`_PyObject_InitializeDict`; PyO3 0.30 carries that dict over,
        // PyO3 #6234). That allocation can run a collection, and PyO3's `tp_traverse`
        // then calls this method before PyO3 has written the fields: the memory is
        // still the zeroes of `tp_alloc`. Visiting a null `Py` crashed in
        // `visit_decref` (reproduced with `gc.set_threshold(1, 1, 1)`). So every
        // field read here is an `Option`, whose all-zero value is `None` (visited as
        // nothing); `flights`, whose zeroes are not a valid table, is never read here.
        visit.call(&self.store)?;
        visit.call(&self.func)?;
        visit.call(&self.key_func)?;
        visit.call(&self.on_hit)?;
        visit.call(&self.on_error)?;
        Ok(())
    }

    /// Where results live.
    #[getter]
    fn store(&self, py: Python<'_>) -> PyResult<Py<PyStore>> {
        Ok(self.store_ref()?.clone_ref(py))
    }

    /// The wrapped function, called on a miss.
    #[getter]
    fn func(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.func_ref()?.clone_ref(py))
    }

    /// Calls that waited on another call's computation of their key (single
    /// flight) and got its result or exception, since creation.
    #[getter]
    fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Whether every call bypasses the store (calls `func`, no lookup, no store).
    #[getter]
    fn bypass(&self) -> bool {
        self.bypass.load(Ordering::Relaxed)
    }

    /// Turn the bypass on or off (``opero.set_testing(cache=False)`` does).
    fn set_bypass(&self, on: bool) {
        self.bypass.store(on, Ordering::Relaxed);
    }
}

impl Vectorcall for PyCachedCall {
    fn vectorcall_slot(&self) -> *const Option<ffi::vectorcallfunc> {
        std::ptr::addr_of!(self.vectorcall)
    }

    #[cfg(not(Py_LIMITED_API))]
    #[inline(always)]
    unsafe fn vectorcall(
        &self,
        py: Python<'_>,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: Option<&Bound<'_, PyTuple>>,
    ) -> PyResult<Py<PyAny>> {
        self.call(
            py,
            &CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            },
        )
    }
}

/// Turn on vectorcall for `CachedCall` (at module init): measures the
/// field's offset on a probe instance (see [`fastcall::enable_vectorcall`]).
pub(crate) fn enable_vectorcall(py: Python<'_>) -> PyResult<()> {
    let store = Py::new(py, PyStore::new(Some(1), None, "lru", None)?)?;
    let func = py.import("builtins")?.getattr("len")?;
    let probe = Bound::new(py, PyCachedCall::new(store, &func, None, None, None)?)?;
    fastcall::enable_vectorcall(&probe)
}
