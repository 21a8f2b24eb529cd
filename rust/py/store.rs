#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Binding of `store::Store` (as `Store`) and the cached-call hot path
//! (`CachedCall`).
//!
//! Locking: the store's mutex is never held while Python code runs. Values and
//! keys removed under the lock are collected and dropped after it is released
//! (their `__del__` may run Python code). Keys holding opaque objects are
//! compared with Python `==` outside the lock: phase 1 collects the stored
//! keys with the same hash and bytes under the lock, phase 2 compares them
//! unlocked, phase 3 re-locks and acts on the chosen key by identity. Two
//! equal opaque keys inserted concurrently may then coexist as two entries:
//! a wasted slot, never a wrong hit. On a GIL build the lock is never
//! contended (no Python runs while it is held); when it is (free-threaded
//! builds), the thread detaches from the interpreter while it waits.

use std::sync::Arc;
use std::thread::ThreadId;

use hashbrown::HashTable;
use parking_lot::{Condvar, Mutex, MutexGuard};
use pyo3::exceptions::{PyKeyError, PyRuntimeError};
use pyo3::ffi;
#[cfg(not(Py_LIMITED_API))]
use pyo3::impl_::trampoline;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};
use smallvec::SmallVec;

use super::clock::{pick_clock, PyManualClock};
use super::keys::{
    py_eq, short_call1, short_value, ArgName, Encoder, KeyData, KeyRef, Mode, PyKey,
};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::keys::{bytes_eq, hash_short, Short};
use crate::store::{check_ttl, Lookup, Store};

/// A stored key: its short form inline (compared in registers, no pointer
/// chase on the hot path) and the shared key data.
struct SlotKey {
    short: Short,
    key: KeyRef,
}

type Inner = Store<SlotKey, Py<PyAny>>;
type Removed = Vec<(SlotKey, Py<PyAny>)>;

/// Lock without ever blocking while attached to the interpreter.
#[inline]
fn lock<'a, T: Send>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
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
struct Guarded<T> {
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
    fn new(value: T) -> Self {
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
    fn try_peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
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
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
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

/// A borrowed key to look up: encoding, hash and opaque objects.
struct Probe<'a, 'py> {
    hash: u64,
    bytes: &'a [u8],
    opaque: SmallVec<[Borrowed<'a, 'py, PyAny>; 2]>,
}

impl<'a, 'py> Probe<'a, 'py> {
    fn from_encoder(enc: &'a Encoder<'py>, hash: u64) -> Self {
        Self {
            hash,
            bytes: &enc.buf,
            opaque: enc.opaque.iter().map(|o| o.as_borrowed()).collect(),
        }
    }

    fn from_key(py: Python<'py>, key: &'a KeyData) -> Self {
        Self {
            hash: key.hash,
            bytes: &key.bytes,
            opaque: key.opaque.iter().map(|o| o.bind_borrowed(py)).collect(),
        }
    }

    #[inline]
    fn same_bytes(&self, k: &KeyData) -> bool {
        k.opaque.len() == self.opaque.len() && bytes_eq(&k.bytes, self.bytes)
    }
}

/// How to recognize the probe's entry under the lock without calling Python.
enum Target {
    /// No opaque objects, at most 16 bytes: the inline short form identifies it.
    Short(Short),
    /// No opaque objects, longer: equal bytes identify it.
    Long,
    /// Opaque objects: the stored key found equal in phase 2, by identity.
    Stored(KeyRef),
    /// Opaque objects and no stored key is equal.
    Absent,
}

/// A bounded LRU store with optional per-entry TTL; thread-safe.
///
/// Keys are any value ``make_key`` accepts as a single argument, or a
/// :class:`Key` (a plain value ``v`` and ``make_key((v,))`` are different
/// keys). TTLs are measured with a coarse monotonic clock (resolution one
/// scheduler tick, 1-4 ms), so an expiry may be off by up to one tick.
///
/// Args:
///     max_size: The bound on entries (>= 1), ``None`` for unbounded. Default 1024.
///     ttl: Seconds an entry lives (> 0, finite), ``None`` for no expiry.
///     clock: A :class:`ManualClock` for tests; the monotonic clock by default.
#[pyclass(frozen, weakref, module = "opero._opero_core", name = "Store")]
pub struct PyStore {
    inner: Guarded<Inner>,
    clock: Clock,
    max_size: Option<usize>,
    ttl: Option<f64>,
}

impl PyStore {
    /// Decide how to find `p` under the lock (phases 1 and 2 for opaque keys).
    #[inline]
    fn target(&self, py: Python<'_>, p: &Probe<'_, '_>) -> PyResult<Target> {
        if p.opaque.is_empty() {
            return Ok(match Short::from_bytes(p.bytes) {
                Some(s) => Target::Short(s),
                None => Target::Long,
            });
        }
        self.target_opaque(py, p)
    }

    #[inline(never)]
    fn target_opaque(&self, py: Python<'_>, p: &Probe<'_, '_>) -> PyResult<Target> {
        let mut candidates: SmallVec<[KeyRef; 2]> = SmallVec::new();
        self.inner.with(py, |g| {
            g.for_each_candidate(p.hash, |k| {
                if p.same_bytes(&k.key) {
                    candidates.push(k.key.clone());
                }
            })
        });
        for c in candidates {
            let mut equal = true;
            for (a, b) in c.opaque.iter().zip(p.opaque.iter()) {
                if !py_eq(py, a, b)? {
                    equal = false;
                    break;
                }
            }
            if equal {
                return Ok(Target::Stored(c));
            }
        }
        Ok(Target::Absent)
    }

    #[inline]
    fn matcher<'t>(bytes: &'t [u8], t: &'t Target) -> impl Fn(&SlotKey) -> bool + 't {
        move |k: &SlotKey| match t {
            Target::Short(s) => k.short == *s,
            Target::Long => {
                !k.short.is_short() && k.key.opaque.is_empty() && bytes_eq(&k.key.bytes, bytes)
            }
            Target::Stored(s) => Arc::ptr_eq(&k.key, s),
            Target::Absent => false,
        }
    }

    /// The hot path: look up a short key (passed in registers; building a
    /// `Probe` struct just before cost a store-forwarding stall here, 65% of
    /// the lookup's samples).
    #[inline(always)]
    fn lookup_short(&self, py: Python<'_>, short: Short, count_miss: bool) -> Option<Py<PyAny>> {
        let hash = hash_short(short);
        let mut expired = None;
        let found = self.inner.with(py, |g| {
            match g.get(
                hash,
                || self.clock.now(),
                |k: &SlotKey| k.short == short,
                count_miss,
            ) {
                Lookup::Hit(v) => Some(v.clone_ref(py)),
                Lookup::Miss => None,
                Lookup::Expired(k, v) => {
                    expired = Some((k, v));
                    None
                }
            }
        });
        drop(expired);
        found
    }

    /// Look up an encoded key.
    #[inline(always)]
    fn lookup_enc(
        &self,
        py: Python<'_>,
        enc: &Encoder<'_>,
        hash: u64,
        count_miss: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        match enc.short() {
            Some(s) => Ok(self.lookup_short(py, s, count_miss)),
            None => self.lookup(py, &Probe::from_encoder(enc, hash), count_miss),
        }
    }

    /// Look `p` up; `count_miss` false for the quiet re-check of a single flight.
    #[inline(never)]
    fn lookup(
        &self,
        py: Python<'_>,
        p: &Probe<'_, '_>,
        count_miss: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let t = self.target(py, p)?;
        let mut expired = None;
        let found = self.inner.with(py, |g| {
            match g.get(
                p.hash,
                || self.clock.now(),
                Self::matcher(p.bytes, &t),
                count_miss,
            ) {
                Lookup::Hit(v) => Some(v.clone_ref(py)),
                Lookup::Miss => None,
                Lookup::Expired(k, v) => {
                    expired = Some((k, v));
                    None
                }
            }
        });
        drop(expired);
        Ok(found)
    }

    fn contains_probe(&self, py: Python<'_>, p: &Probe<'_, '_>) -> PyResult<bool> {
        let t = self.target(py, p)?;
        Ok(self.inner.with(py, |g| {
            g.contains(p.hash, || self.clock.now(), Self::matcher(p.bytes, &t))
        }))
    }

    fn delete_probe(&self, py: Python<'_>, p: &Probe<'_, '_>) -> PyResult<bool> {
        let t = self.target(py, p)?;
        let removed = self.inner.with(py, |g| {
            g.remove(p.hash, || self.clock.now(), Self::matcher(p.bytes, &t))
        });
        Ok(matches!(removed, Some((_, true))))
    }

    /// Store `value` under `key` (`ttl`: see `Store::insert`).
    fn insert(
        &self,
        py: Python<'_>,
        key: KeyRef,
        value: Py<PyAny>,
        ttl: Option<Option<f64>>,
    ) -> PyResult<()> {
        let t = {
            let p = Probe::from_key(py, &key);
            self.target(py, &p)?
        };
        let mut out: Removed = Vec::new();
        let probe_key = key.clone();
        self.inner.with(py, |g| {
            let eq = Self::matcher(&probe_key.bytes, &t);
            let slot = SlotKey {
                short: key.short,
                key,
            };
            g.insert(
                slot.key.hash,
                slot,
                value,
                ttl,
                || self.clock.now(),
                eq,
                &mut out,
            );
        });
        drop(out);
        drop(probe_key);
        Ok(())
    }

    /// Encode a single value (or take a `Key` as is) and run `f` on its probe.
    #[inline]
    fn with_key<R>(
        &self,
        key: &Bound<'_, PyAny>,
        f: impl FnOnce(&Probe<'_, '_>, Option<&KeyRef>, &Encoder<'_>) -> PyResult<R>,
    ) -> PyResult<R> {
        let py = key.py();
        if let Ok(k) = key.cast_exact::<PyKey>() {
            let data = &k.get().inner;
            let p = Probe::from_key(py, data);
            let enc = Encoder::new(Mode::InProcess);
            return f(&p, Some(data), &enc);
        }
        let mut enc = Encoder::new(Mode::InProcess);
        enc.value(key, 0, ArgName::Value("key"))?;
        let hash = enc.hash();
        let p = Probe::from_encoder(&enc, hash);
        f(&p, None, &enc)
    }

    fn with_call<R>(
        &self,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        f: impl FnOnce(&Probe<'_, '_>, &Encoder<'_>) -> PyResult<R>,
    ) -> PyResult<R> {
        let mut enc = Encoder::new(Mode::InProcess);
        enc.call(args, kwargs)?;
        let hash = enc.hash();
        let p = Probe::from_encoder(&enc, hash);
        f(&p, &enc)
    }

    fn purge(&self, py: Python<'_>) {
        let mut out: Removed = Vec::new();
        self.inner.with(py, |g| {
            if g.has_timed_entries() {
                g.purge_expired(self.clock.now(), &mut out);
            }
        });
        drop(out);
    }
}

fn ttl_arg(ttl: Option<f64>) -> PyResult<Option<f64>> {
    Ok(ttl.map(check_ttl).transpose()?)
}

fn miss(key: &Bound<'_, PyAny>) -> PyErr {
    PyKeyError::new_err(key.clone().unbind())
}

#[pymethods]
impl PyStore {
    #[new]
    #[pyo3(
        signature = (max_size = Some(1024), ttl = None, *, clock = None),
        text_signature = "(max_size=1024, ttl=None, *, clock=None)"
    )]
    fn new(
        max_size: Option<i64>,
        ttl: Option<f64>,
        clock: Option<&Bound<'_, PyManualClock>>,
    ) -> PyResult<Self> {
        let max_size = match max_size {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => return Err(CoreError::value("max_size", "an int >= 1 or None", n).into()),
        };
        let ttl = ttl_arg(ttl)?;
        Ok(Self {
            inner: Guarded::new(Store::new(max_size, ttl)?),
            // TTL checks read the coarse clock (3 ns against 20 ns here).
            clock: pick_clock(clock, Clock::Coarse),
            max_size,
            ttl,
        })
    }

    /// The bound on entries, ``None`` when unbounded.
    #[getter]
    fn max_size(&self) -> Option<usize> {
        self.max_size
    }

    /// The default time to live of an entry in seconds, ``None`` for no expiry.
    #[getter]
    fn ttl(&self) -> Option<f64> {
        self.ttl
    }

    /// Return the value stored under ``key``; raise ``KeyError`` on a miss.
    fn get(&self, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let py = key.py();
        if let Some(s) = short_value(key) {
            return self.lookup_short(py, s, true).ok_or_else(|| miss(key));
        }
        if let Ok(k) = key.cast_exact::<PyKey>() {
            let p = Probe::from_key(py, &k.get().inner);
            return self.lookup(py, &p, true)?.ok_or_else(|| miss(key));
        }
        let mut enc = Encoder::new(Mode::InProcess);
        enc.value(key, 0, ArgName::Value("key"))?;
        let hash = enc.hash();
        self.lookup_enc(py, &enc, hash, true)?
            .ok_or_else(|| miss(key))
    }

    /// Store ``value``; ``ttl`` overrides the store's for this entry.
    #[pyo3(signature = (key, value, ttl = None))]
    fn set(&self, key: &Bound<'_, PyAny>, value: Py<PyAny>, ttl: Option<f64>) -> PyResult<()> {
        let py = key.py();
        let ttl = ttl_arg(ttl)?.map(Some);
        let k = self.with_key(key, |p, data, enc| {
            Ok(match data {
                Some(d) => d.clone(),
                None => enc.to_key(p.hash),
            })
        })?;
        self.insert(py, k, value, ttl)
    }

    /// Remove ``key``; return whether a live (unexpired) entry was present.
    fn delete(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = key.py();
        self.with_key(key, |p, _, _| self.delete_probe(py, p))
    }

    /// Remove every entry (counters are kept).
    fn clear(&self, py: Python<'_>) {
        let mut out: Removed = Vec::new();
        self.inner.with(py, |g| g.clear(&mut out));
        drop(out);
    }

    /// ``get(make_key(args, kwargs))`` without building the Key object.
    #[pyo3(signature = (args, kwargs = None))]
    fn get_call(
        &self,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let py = args.py();
        self.with_call(args, kwargs, |p, enc| {
            self.lookup_enc(py, enc, p.hash, true)
        })?
        .ok_or_else(|| {
            PyKeyError::new_err((args.clone().unbind(), kwargs.map(|k| k.clone().unbind())))
        })
    }

    /// ``set(make_key(args, kwargs), value)``.
    fn set_call(
        &self,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        value: Py<PyAny>,
    ) -> PyResult<()> {
        let py = args.py();
        let k = self.with_call(args, kwargs, |p, enc| Ok(enc.to_key(p.hash)))?;
        self.insert(py, k, value, None)
    }

    /// ``delete(make_key(args, kwargs))``.
    #[pyo3(signature = (args, kwargs = None))]
    fn delete_call(
        &self,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let py = args.py();
        self.with_call(args, kwargs, |p, _| self.delete_probe(py, p))
    }

    /// Return ``(hits, misses, evictions, expirations, size, max_size)``.
    fn info(&self, py: Python<'_>) -> (u64, u64, u64, u64, usize, Option<usize>) {
        self.purge(py);
        let i = self.inner.with(py, |g| g.info());
        (
            i.hits,
            i.misses,
            i.evictions,
            i.expirations,
            i.size,
            i.max_size,
        )
    }

    fn __getitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.get(key)
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.purge(py);
        self.inner.with(py, |g| g.len())
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = key.py();
        if let Some(s) = short_value(key) {
            let hash = hash_short(s);
            return Ok(self.inner.with(py, |g| {
                g.contains(hash, || self.clock.now(), |k: &SlotKey| k.short == s)
            }));
        }
        self.with_key(key, |p, _, _| self.contains_probe(py, p))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // Called by the GC with the interpreter attached; if the store is in
        // use right now (a re-entrant GC pass, or another thread holding the
        // lock on a free-threaded build), report nothing rather than block.
        self.inner
            .try_peek(|g| {
                let mut r = Ok(());
                g.for_each_entry(|k, v| {
                    if r.is_ok() {
                        r = visit.call(v);
                    }
                    for o in k.key.opaque.iter() {
                        if r.is_ok() {
                            r = visit.call(o);
                        }
                    }
                });
                r
            })
            .unwrap_or(Ok(()))
    }

    fn __clear__(&self) {
        // SAFETY: tp_clear is only called by the GC, with the thread attached.
        let py = unsafe { Python::assume_attached() };
        let mut out: Removed = Vec::new();
        self.inner.with(py, |g| g.clear(&mut out));
        drop(out);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let len = self.inner.with(py, |g| g.len());
        let max = self
            .max_size
            .map_or_else(|| "None".to_owned(), |m| m.to_string());
        let ttl = self
            .ttl
            .map_or_else(|| "None".to_owned(), |t| t.to_string());
        format!("<Store size={len} max_size={max} ttl={ttl}>")
    }
}

/// One computation in progress, awaited by the other threads missing the same key.
struct Flight {
    owner: ThreadId,
    result: Mutex<Option<PyResult<Py<PyAny>>>>,
    done: Condvar,
}

type Flights = HashTable<(KeyRef, Arc<Flight>)>;

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
    vectorcall: Option<ffi::vectorcallfunc>,
    store: Py<PyStore>,
    func: Py<PyAny>,
    key_func: Option<Py<PyAny>>,
    on_hit: Option<Py<PyAny>>,
    flights: Mutex<Flights>,
}

static METHOD_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A call's arguments as CPython handed them over.
enum CallArgs<'a, 'py> {
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

#[cfg(not(Py_LIMITED_API))]
/// The body of the vectorcall entry point, run inside PyO3's trampoline (which
/// marks the thread attached, traps panics and restores errors).
///
/// # Safety
/// Called by CPython through [`vectorcall`] with `slf` a `CachedCall`.
unsafe fn vectorcall_body(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython passes the callable itself, a live CachedCall (only this
    // type's instances carry this function pointer).
    let slf = unsafe { Borrowed::from_ptr(py, slf) };
    let this = unsafe { slf.cast_unchecked::<PyCachedCall>() }.get();
    // SAFETY: kwnames is NULL or a tuple of str, live for the call.
    let kwnames = unsafe { Borrowed::from_ptr_or_opt(py, kwnames) };
    let kwnames = kwnames.map(|k| unsafe { k.cast_unchecked::<PyTuple>() });
    let call = CallArgs::Vector {
        args,
        nargsf: nargsf as usize,
        kwnames: kwnames.as_deref(),
    };
    Ok(this.call(py, &call)?.into_ptr())
}

#[cfg(not(Py_LIMITED_API))]
struct VectorcallDef;

#[cfg(not(Py_LIMITED_API))]
impl trampoline::MethodDef<trampoline::fastcall_cfunction_with_keywords::Func> for VectorcallDef {
    const METH: trampoline::fastcall_cfunction_with_keywords::Func = vectorcall_body;
}

#[cfg(not(Py_LIMITED_API))]
/// The vectorcall entry point of `CachedCall`.
///
/// PyO3 0.30 gives `#[pyclass]` `__call__` only `tp_call`, so CPython builds
/// an args tuple (and a kwargs dict) per call. Vectorcall skips both:
/// measured in one run, a 1-int hit takes 26 ns with it and 47 ns without,
/// a 3-positional + 2-keyword hit 146 ns against 330 ns. It reuses PyO3's
/// own (doc-hidden, pinned by Cargo.lock) fastcall trampoline, whose ABI is
/// the vectorcall one, so panics and errors are handled as in any pymethod.
///
/// # Safety
/// Only CPython calls this, per the vectorcall protocol.
unsafe extern "C" fn vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: forwarded unchanged; the trampoline requires an attached thread,
    // which CPython guarantees for every call.
    unsafe {
        trampoline::fastcall_cfunction_with_keywords::<VectorcallDef>(
            callable,
            args,
            nargsf as ffi::Py_ssize_t,
            kwnames,
        )
    }
}

/// Turn on vectorcall for `CachedCall` (at module init, before any user instance).
///
/// The offset of the `vectorcall` field inside the object is measured on a
/// probe instance (PyO3 owns the layout, which is fixed per type), then written
/// to `tp_vectorcall_offset` with `Py_TPFLAGS_HAVE_VECTORCALL`. `tp_call`
/// (PyO3's `__call__`) stays as the fallback CPython requires.
#[cfg(not(Py_LIMITED_API))]
pub fn enable_vectorcall(py: Python<'_>) -> PyResult<()> {
    let store = Py::new(py, PyStore::new(Some(1), None, None)?)?;
    let func = py.import("builtins")?.getattr("len")?;
    let probe = Bound::new(py, PyCachedCall::new(store, &func, None, None)?)?;
    let base = probe.as_ptr() as usize;
    let field = std::ptr::addr_of!(probe.get().vectorcall) as usize;
    let offset = field - base;
    let tp = py.get_type::<PyCachedCall>();
    let tp_ptr = tp.as_type_ptr();
    // SAFETY: `tp_ptr` is our own heap type, fully initialized, with no
    // instance but the probe; the offset points at an `Option<vectorcallfunc>`
    // (a nullable function pointer) inside every instance.
    unsafe {
        (*tp_ptr).tp_vectorcall_offset = offset as ffi::Py_ssize_t;
        #[cfg(not(Py_GIL_DISABLED))]
        {
            (*tp_ptr).tp_flags |= ffi::Py_TPFLAGS_HAVE_VECTORCALL;
        }
        #[cfg(Py_GIL_DISABLED)]
        (*tp_ptr).tp_flags.fetch_or(
            ffi::Py_TPFLAGS_HAVE_VECTORCALL,
            std::sync::atomic::Ordering::Relaxed,
        );
        ffi::PyType_Modified(tp_ptr);
    }
    Ok(())
}

/// The body of the METH_O `Store.get`, run inside PyO3's trampoline.
///
/// # Safety
/// Called by CPython with `slf` a `Store` and `key` a live object.
#[cfg(not(Py_LIMITED_API))]
unsafe fn store_get_body(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    key: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: the method descriptor is bound to `Store`, which CPython checks
    // before calling; `key` is the single argument, live for the call.
    let slf = unsafe { Borrowed::from_ptr(py, slf) };
    let this = unsafe { slf.cast_unchecked::<PyStore>() }.get();
    let key = unsafe { Borrowed::from_ptr(py, key) };
    Ok(this.get(&key)?.into_ptr())
}

#[cfg(not(Py_LIMITED_API))]
struct StoreGetDef;

#[cfg(not(Py_LIMITED_API))]
impl trampoline::MethodDef<trampoline::binaryfunc::Func> for StoreGetDef {
    const METH: trampoline::binaryfunc::Func = store_get_body;
}

/// `Store.get` as a METH_O method.
///
/// PyO3 gives every method with arguments METH_FASTCALL|METH_KEYWORDS and a
/// generic argument parser; `get` is the store's hot method and takes one
/// positional argument, so it is re-registered as METH_O, which CPython calls
/// with the argument directly. Measured in one run: 28.8 ns per
/// `store.get(17)` before, against 20.3 ns for `cachebox.LRUCache[17]`.
///
/// # Safety
/// Only CPython calls this, as a METH_O method of `Store`.
#[cfg(not(Py_LIMITED_API))]
unsafe extern "C" fn store_get_meth_o(
    slf: *mut ffi::PyObject,
    key: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: forwarded unchanged; CPython calls methods attached.
    unsafe { trampoline::binaryfunc::<StoreGetDef>(slf, key) }
}

/// Replace PyO3's `Store.get` descriptor by a METH_O one (at module init).
#[cfg(not(Py_LIMITED_API))]
pub fn install_fast_get(py: Python<'_>) -> PyResult<()> {
    // The method definition must outlive the type: leak one (24 bytes, once).
    let def: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"get".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunction: store_get_meth_o,
        },
        ml_flags: ffi::METH_O,
        ml_doc: c"get($self, key, /)\n--\n\nReturn the value stored under ``key``; raise ``KeyError`` on a miss.".as_ptr(),
    }));
    let tp = py.get_type::<PyStore>();
    let tp_ptr = tp.as_type_ptr();
    // SAFETY: `tp_ptr` is our fully initialized heap type and `def` lives
    // forever; the descriptor is a new reference, handed to the type dict.
    unsafe {
        let descr = ffi::PyDescr_NewMethod(tp_ptr, def);
        if descr.is_null() {
            return Err(PyErr::fetch(py));
        }
        let descr = Bound::from_owned_ptr(py, descr);
        if ffi::PyDict_SetItemString((*tp_ptr).tp_dict, c"get".as_ptr(), descr.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        ffi::PyType_Modified(tp_ptr);
    }
    Ok(())
}

/// Without the full C API (abi3) `Store.get` keeps PyO3's calling convention.
#[cfg(Py_LIMITED_API)]
pub fn install_fast_get(_py: Python<'_>) -> PyResult<()> {
    Ok(())
}

/// Without the full C API (abi3) `CachedCall` is called through `tp_call` only.
#[cfg(Py_LIMITED_API)]
pub fn enable_vectorcall(_py: Python<'_>) -> PyResult<()> {
    Ok(())
}

impl PyCachedCall {
    /// The whole call: key, lookup, `on_hit` or the single-flight miss.
    #[inline]
    fn call(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
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
            py.detach(|| {
                let mut r = flight.result.lock();
                while r.is_none() {
                    flight.done.wait(&mut r);
                }
            });
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
        // A thread may have stored the value between our miss and our flight.
        if let Some(v) = store.lookup_enc(py, enc, hash, false)? {
            guard.result = Some(Ok(v.clone_ref(py)));
            return Ok(v);
        }
        match args.call(py, &self.func) {
            Ok(v) => {
                store.insert(py, key, v.clone_ref(py), None)?;
                guard.result = Some(Ok(v.clone_ref(py)));
                Ok(v)
            }
            Err(e) => {
                guard.result = Some(Err(e.clone_ref(py)));
                Err(e)
            }
        }
    }
}

#[pymethods]
impl PyCachedCall {
    #[new]
    #[pyo3(signature = (store, func, *, key_func = None, on_hit = None))]
    fn new(
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
            vectorcall: Some(vectorcall),
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
