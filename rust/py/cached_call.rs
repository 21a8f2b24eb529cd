#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Binding of the cached-call hot path (`CachedCall`) over a `Store`.
//!
//! Invariants: a hit never leaves native code except for `on_hit()`; only
//! successful results are stored; at most one thread computes a key at a time
//! (single flight), the others wait detached from the interpreter and get the
//! same result or exception; the thread computing a key that re-enters it
//! calls the function directly. No Python runs under the in-flight lock.

use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::guarded::lock;
use super::keys::{short_call1, ArgName, Encoder, KeyData, KeyRef, Mode};
use super::store::PyStore;
use crate::error::CoreError;
use crate::keys::Short;

/// One computation in progress, awaited by the other threads missing the same key.
struct Flight {
    owner: ThreadId,
    result: Mutex<Option<PyResult<Py<PyAny>>>>,
    done: Condvar,
}

type Flights = HashTable<(KeyRef, Arc<Flight>)>;

/// How often a thread waiting on another's computation checks for signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Whether `a` is the same call as `b` for single flight: equal bytes and
/// identical opaque objects (no Python runs under the in-flight lock, so
/// equal-but-distinct opaque arguments compute separately).
fn same_flight(a: &KeyData, b: &KeyData) -> bool {
    a.bytes == b.bytes
        && a.opaque.len() == b.opaque.len()
        && a.opaque
            .iter()
            .zip(b.opaque.iter())
            .all(|(x, y)| x.as_ptr() == y.as_ptr())
}

/// Completes a flight when dropped: publishes the result (or, if the owner
/// unwound before publishing, an error) and wakes the waiters.
struct FlightGuard<'a> {
    flights: &'a Mutex<Flights>,
    key: KeyRef,
    flight: Arc<Flight>,
    result: Option<PyResult<Py<PyAny>>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let removed = {
            let mut g = self.flights.lock();
            g.find_entry(self.key.hash, |(k, f)| {
                Arc::ptr_eq(k, &self.key) && Arc::ptr_eq(f, &self.flight)
            })
            .ok()
            .map(|e| e.remove().0)
        };
        let result = self.result.take().unwrap_or_else(|| {
            Err(PyRuntimeError::new_err(
                "opero: the thread computing this cached call failed",
            ))
        });
        *self.flight.result.lock() = Some(result);
        self.flight.done.notify_all();
        drop(removed);
    }
}

/// The native hot path of a memory-cached function.
///
/// Calling it builds the key from the arguments (or calls ``key_func``), looks
/// it up in ``store`` and returns a hit without leaving native code (calling
/// ``on_hit()`` first when given). On a miss it calls ``func`` with the same
/// arguments and stores a successful result; exceptions are never stored.
/// Concurrent misses on one key from several threads call ``func`` once: the
/// others wait (without the GIL) and get the same result or exception. A call
/// that re-enters a key its own thread is computing calls ``func`` directly.
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
#[pyclass(
    frozen,
    dict,
    weakref,
    module = "opero._opero_core",
    name = "CachedCall"
)]
pub struct PyCachedCall {
    /// The vectorcall entry point CPython reads at `tp_vectorcall_offset`
    /// (see [`enable_vectorcall`]); always `Some`.
    pub(crate) vectorcall: Option<ffi::vectorcallfunc>,
    store: Py<PyStore>,
    func: Py<PyAny>,
    key_func: Option<Py<PyAny>>,
    on_hit: Option<Py<PyAny>>,
    flights: Mutex<Flights>,
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
                // SAFETY: one live positional argument at args[0].
                let item = unsafe { Borrowed::from_ptr(py, **args) };
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
                // SAFETY: the vectorcall protocol guarantees `nargs + len(kwnames)`
                // live pointers at `args` for the duration of the call.
                unsafe {
                    enc.call_vector(
                        py,
                        *args,
                        ffi::PyVectorcall_NARGS(*nargsf) as usize,
                        *kwnames,
                    )
                }
            }
        }
    }

    /// Call `f` with the same arguments.
    #[inline]
    fn call(&self, py: Python<'py>, f: &Py<PyAny>) -> PyResult<Py<PyAny>> {
        match self {
            CallArgs::Tuple(a, k) => Ok(f.bind(py).call(*a, *k)?.unbind()),
            #[cfg(not(Py_LIMITED_API))]
            CallArgs::Vector {
                args,
                nargsf,
                kwnames,
            } => {
                let kw = kwnames.map_or(std::ptr::null_mut(), |k| k.as_ptr());
                // SAFETY: forwarding the arguments we were called with, unchanged
                // (including PY_VECTORCALL_ARGUMENTS_OFFSET, which our caller granted).
                let r = unsafe { ffi::PyObject_Vectorcall(f.as_ptr(), *args, *nargsf, kw) };
                if r.is_null() {
                    Err(PyErr::fetch(py))
                } else {
                    // SAFETY: a non-null vectorcall result is a new reference.
                    Ok(unsafe { Bound::from_owned_ptr(py, r) }.unbind())
                }
            }
        }
    }
}

impl PyCachedCall {
    /// The whole call: key, lookup, `on_hit` or the single-flight miss.
    #[inline]
    pub(crate) fn call(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        let store = self.store.get();
        if self.key_func.is_none() {
            // One int or short str argument: key built in registers.
            if let Some(short) = args.short_single(py) {
                if let Some(v) = store.lookup_short(py, short, true) {
                    if let Some(cb) = &self.on_hit {
                        cb.bind(py).call0()?;
                    }
                    return Ok(v);
                }
                let mut enc = Encoder::new(Mode::InProcess);
                args.encode(py, &mut enc)?;
                let hash = enc.hash();
                return self.miss(py, store, &enc, hash, args);
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
                cb.bind(py).call0()?;
            }
            return Ok(v);
        }
        self.miss(py, store, &enc, hash, args)
    }

    fn miss(
        &self,
        py: Python<'_>,
        store: &PyStore,
        enc: &Encoder<'_>,
        hash: u64,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        let key = enc.to_key(hash);
        let me = std::thread::current().id();
        let waiting = {
            let mut g = lock(py, &self.flights);
            match g.find(hash, |(k, _)| same_flight(k, &key)) {
                Some((_, f)) => Some(f.clone()),
                None => {
                    g.insert_unique(
                        hash,
                        (
                            key.clone(),
                            Arc::new(Flight {
                                owner: me,
                                result: Mutex::new(None),
                                done: Condvar::new(),
                            }),
                        ),
                        |(k, _)| k.hash,
                    );
                    None
                }
            }
        };
        if let Some(flight) = waiting {
            if flight.owner == me {
                // Re-entry from the thread computing this key: waiting on
                // ourselves would deadlock, so compute directly.
                return args.call(py, &self.func);
            }
            // Wait detached, waking every 50 ms to let a pending signal
            // (Ctrl-C in the main thread) interrupt the wait.
            loop {
                let done = py.detach(|| {
                    let mut r = flight.result.lock();
                    if r.is_none() {
                        flight.done.wait_for(&mut r, SIGNAL_POLL);
                    }
                    r.is_some()
                });
                if done {
                    break;
                }
                py.check_signals()?;
            }
            let r = flight.result.lock();
            return match r.as_ref() {
                Some(Ok(v)) => Ok(v.clone_ref(py)),
                Some(Err(e)) => Err(e.clone_ref(py)),
                None => Err(PyRuntimeError::new_err(
                    "opero: single-flight result missing",
                )),
            };
        }
        let flight = {
            let g = lock(py, &self.flights);
            g.find(hash, |(k, _)| Arc::ptr_eq(k, &key))
                .map(|(_, f)| f.clone())
        };
        let Some(flight) = flight else {
            return Err(PyRuntimeError::new_err(
                "opero: single-flight entry vanished",
            ));
        };
        let mut guard = FlightGuard {
            flights: &self.flights,
            key: key.clone(),
            flight,
            result: None,
        };
        let outcome = self.compute(py, store, enc, hash, key, args);
        // Waiters get exactly what the owner gets, error included.
        guard.result = Some(match &outcome {
            Ok(v) => Ok(v.clone_ref(py)),
            Err(e) => Err(e.clone_ref(py)),
        });
        outcome
    }

    /// The owner's work on a miss: re-check the store, call, store a success.
    fn compute(
        &self,
        py: Python<'_>,
        store: &PyStore,
        enc: &Encoder<'_>,
        hash: u64,
        key: KeyRef,
        args: &CallArgs<'_, '_>,
    ) -> PyResult<Py<PyAny>> {
        // A thread may have stored the value between our miss and our flight.
        if let Some(v) = store.lookup_enc(py, enc, hash, false)? {
            return Ok(v);
        }
        let v = args.call(py, &self.func)?;
        store.insert(py, key, v.clone_ref(py), None)?;
        Ok(v)
    }
}

#[pymethods]
impl PyCachedCall {
    #[new]
    #[pyo3(signature = (store, func, *, key_func = None, on_hit = None))]
    pub(crate) fn new(
        store: Py<PyStore>,
        func: &Bound<'_, PyAny>,
        key_func: Option<&Bound<'_, PyAny>>,
        on_hit: Option<&Bound<'_, PyAny>>,
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
            store,
            func: func.clone().unbind(),
            key_func: callable("key_func", key_func)?,
            on_hit: callable("on_hit", on_hit)?,
            flights: Mutex::new(HashTable::new()),
            #[cfg(not(Py_LIMITED_API))]
            vectorcall: Some(super::fastcall::vectorcall),
            #[cfg(Py_LIMITED_API)]
            vectorcall: None,
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
            Err(_) => slf.get().func.bind(py).getattr("__qualname__")?,
        };
        Ok(name.cast_into::<PyString>()?.into_any().unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<opero CachedCall of {}>",
            self.func.bind(py).repr()?
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // `#[pyclass(dict)]` instances are created by `object.__new__`, which on
        // CPython 3.11 tracks the object and then allocates its `__dict__`; that
        // allocation can run a collection that traverses this object before PyO3 has
        // written the fields (zeroed memory). Visiting the null `store` then crashed
        // in `visit_decref` (reproduced with `gc.set_threshold(1, 1, 1)`). The field
        // is read as a raw pointer, a valid read for any bit pattern, and a null one
        // means "not initialized yet: nothing to visit".
        // SAFETY: `Py<T>` is a `#[repr(transparent)]` non-null pointer, so the field's
        // bytes are a pointer-sized value readable as a raw pointer.
        let raw =
            unsafe { std::ptr::read(std::ptr::addr_of!(self.store).cast::<*mut ffi::PyObject>()) };
        if raw.is_null() {
            return Ok(());
        }
        visit.call(&self.store)?;
        visit.call(&self.func)?;
        visit.call(&self.key_func)?;
        visit.call(&self.on_hit)?;
        Ok(())
    }

    /// Where results live.
    #[getter]
    fn store(&self, py: Python<'_>) -> Py<PyStore> {
        self.store.clone_ref(py)
    }

    /// The wrapped function, called on a miss.
    #[getter]
    fn func(&self, py: Python<'_>) -> Py<PyAny> {
        self.func.clone_ref(py)
    }
}
