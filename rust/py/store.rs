//! Binding of `store::Store` (as `Store`).
//!
//! Locking: the store's guard is never held while Python code runs. Values and
//! keys removed under it are collected and dropped after it is released
//! (their `__del__` may run Python code). Keys holding opaque objects are
//! compared with Python `==` outside the guard: phase 1 collects the stored
//! keys with the same hash and bytes, phase 2 compares them unguarded, phase 3
//! re-enters and acts on the chosen key by identity. Two equal opaque keys
//! inserted concurrently may then coexist as two entries: a wasted slot,
//! never a wrong hit.

use std::ffi::CStr;
use std::sync::Arc;

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3::{PyTraverseError, PyVisit};
use smallvec::SmallVec;

use super::clock::{pick_clock, PyManualClock};
use super::fastcall::MethO;
use super::guarded::Guarded;
use super::keys::{
    py_eq, short_call1, short_value, ArgName, Encoder, KeyData, KeyRef, Mode, PyKey,
};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::keys::{bytes_eq, hash_short, Short};
use crate::store::{check_ttl, Lookup, Policy, Store};

/// A stored key: its short form inline (compared in registers, no pointer
/// chase on the hot path) and, for a key that is not short, the shared key
/// data. A short form is the whole key, so short keys hold no heap data
/// (a 10k `set_many_items` into a 1024-entry store: 0.74 ms with a `KeyData`
/// per entry, 0.43 ms without; `clear` of 10k entries 0.25 to 0.04 ms).
struct SlotKey {
    short: Short,
    key: Option<KeyRef>,
}

type Inner = Store<SlotKey, Py<PyAny>>;
type Removed = Vec<(SlotKey, Py<PyAny>)>;
/// What one insert removes: one evicted or replaced entry, usually, kept
/// inline (a `Vec` allocated and freed on every evicting insert: ~250
/// instructions of a ~1,300 instruction miss).
struct RemovedOne(SmallVec<[(SlotKey, Py<PyAny>); 1]>);

impl RemovedOne {
    fn new() -> Self {
        Self(SmallVec::new())
    }
}

impl Extend<(SlotKey, Py<PyAny>)> for RemovedOne {
    /// A plain push per item: `SmallVec::extend` reserves from the size hint
    /// first (~50 instructions for the one evicted entry of a miss).
    #[inline]
    fn extend<I: IntoIterator<Item = (SlotKey, Py<PyAny>)>>(&mut self, items: I) {
        for item in items {
            self.0.push(item);
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

/// A bounded store with optional per-entry TTL; thread-safe.
///
/// Keys are any value ``make_key`` accepts as a single argument, or a
/// :class:`Key` (a plain value ``v`` and ``make_key((v,))`` are different
/// keys). TTLs are measured with a monotonic timestamp that a background
/// thread refreshes every millisecond (started at the first TTL check, again
/// in a forked child), so an expiry may be late by about 1 ms, more when that
/// thread waits for a CPU on a loaded machine.
///
/// Args:
///     max_size: The bound on entries (>= 1), ``None`` for unbounded. Default 1024.
///     ttl: Seconds an entry lives (> 0, finite), ``None`` for no expiry.
///     policy: What a full store evicts: ``"lru"`` (least recently used,
///         the default) or ``"tinylfu"`` (W-TinyLFU: a recency window in
///         front of a frequency-gated main region; needs ``max_size``).
///     clock: A :class:`ManualClock` for tests; the monotonic clock by default.
#[pyclass(frozen, weakref, module = "opero._opero_core", name = "Store")]
pub struct PyStore {
    inner: Guarded<Inner>,
    clock: Clock,
    max_size: Option<usize>,
    ttl: Option<f64>,
    policy: Policy,
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
                if let Some(key) = &k.key {
                    if p.same_bytes(key) {
                        candidates.push(key.clone());
                    }
                }
            });
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
                !k.short.is_short()
                    && k.key
                        .as_ref()
                        .is_some_and(|d| d.opaque.is_empty() && bytes_eq(&d.bytes, bytes))
            }
            Target::Stored(s) => k.key.as_ref().is_some_and(|d| Arc::ptr_eq(d, s)),
            Target::Absent => false,
        }
    }

    /// The hot path: look up a short key (passed in registers; building a
    /// `Probe` struct just before cost a store-forwarding stall here, 65% of
    /// the lookup's samples).
    #[inline(always)]
    pub(crate) fn lookup_short(
        &self,
        py: Python<'_>,
        short: Short,
        count_miss: bool,
    ) -> Option<Py<PyAny>> {
        self.lookup_short_said(py, short, count_miss).0
    }

    /// `lookup_short`, and whether it dropped an expired entry (so Python
    /// code, a `__del__`, may have run since the lookup decided).
    #[inline(always)]
    pub(crate) fn lookup_short_said(
        &self,
        py: Python<'_>,
        short: Short,
        count_miss: bool,
    ) -> (Option<Py<PyAny>>, bool) {
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
        let dropped = expired.is_some();
        drop(expired);
        (found, dropped)
    }

    /// Look up an encoded key.
    #[inline(always)]
    pub(crate) fn lookup_enc(
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
    pub(crate) fn insert(
        &self,
        py: Python<'_>,
        key: KeyRef,
        value: Py<PyAny>,
        ttl: Option<Option<f64>>,
    ) -> PyResult<()> {
        let mut out = RemovedOne::new();
        let r = self.insert_into(py, key, value, ttl, &mut out);
        drop(out);
        r
    }

    /// Store `value` under a short key with the store's TTL (a cached
    /// call's miss): no `KeyData`, no heap allocation for what it evicts.
    #[inline]
    pub(crate) fn insert_short_default(&self, py: Python<'_>, short: Short, value: Py<PyAny>) {
        let mut out = RemovedOne::new();
        self.insert_short(py, short, value, None, &mut out);
        drop(out);
    }

    /// Look up a built key (`count_miss` as in [`Self::lookup_enc`]).
    pub(crate) fn lookup_key(
        &self,
        py: Python<'_>,
        key: &KeyData,
        count_miss: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        if key.opaque.is_empty() && key.short.is_short() {
            Ok(self.lookup_short(py, key.short, count_miss))
        } else {
            self.lookup(py, &Probe::from_key(py, key), count_miss)
        }
    }

    /// `insert`, collecting the replaced and evicted entries into `out` for
    /// the caller to drop once it is done with the store (a batch reuses one
    /// vector instead of allocating one per evicting insert).
    fn insert_into(
        &self,
        py: Python<'_>,
        key: KeyRef,
        value: Py<PyAny>,
        ttl: Option<Option<f64>>,
        out: &mut impl Extend<(SlotKey, Py<PyAny>)>,
    ) -> PyResult<()> {
        // The key's short form is already known; only a long key needs its
        // bytes kept for the matcher. Re-deriving the short form and cloning
        // the `Arc` on every insert cost a store-forwarding stall and an
        // atomic pair: skipping them cut a 10k `set_many_items` from 1.18 to
        // 1.00 ms here.
        let t = if key.opaque.is_empty() {
            if key.short.is_short() {
                Target::Short(key.short)
            } else {
                Target::Long
            }
        } else {
            let p = Probe::from_key(py, &key);
            self.target_opaque(py, &p)?
        };
        let hash = key.hash;
        let short = key.short;
        let (probe_key, slot_key) = match t {
            Target::Short(_) => (None, None),
            Target::Long => (Some(key.clone()), Some(key)),
            _ => (None, Some(key)),
        };
        self.inner.with(py, |g| {
            let bytes: &[u8] = probe_key.as_ref().map_or(&[], |k| &k.bytes);
            let slot = SlotKey {
                short,
                key: slot_key,
            };
            g.insert(
                hash,
                slot,
                value,
                ttl,
                || self.clock.now(),
                Self::matcher(bytes, &t),
                out,
            );
        });
        drop(probe_key);
        Ok(())
    }

    /// `insert_into` for a short key, without building its `KeyData`.
    fn insert_short(
        &self,
        py: Python<'_>,
        short: Short,
        value: Py<PyAny>,
        ttl: Option<Option<f64>>,
        out: &mut impl Extend<(SlotKey, Py<PyAny>)>,
    ) {
        self.inner.with(py, |g| {
            g.insert(
                hash_short(short),
                SlotKey { short, key: None },
                value,
                ttl,
                || self.clock.now(),
                |k: &SlotKey| k.short == short,
                out,
            );
        });
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

    /// Look up the key of the call `f(item)` (`make_key((item,))`), counting
    /// a hit or a miss as `get_call` does.
    #[inline]
    fn lookup_item(&self, item: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let py = item.py();
        if let Some(s) = short_call1(item) {
            return Ok(self.lookup_short(py, s, true));
        }
        let mut enc = Encoder::new(Mode::InProcess);
        enc.call1(item)?;
        let hash = enc.hash();
        self.lookup_enc(py, &enc, hash, true)
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

/// Item `i` of `list` (a new reference), or `None` past its end. The length
/// is read on every call: Python code run between two calls (a `__del__`, an
/// `__eq__`) may have resized the list.
#[cfg(not(any(Py_LIMITED_API, Py_GIL_DISABLED)))]
#[inline(always)]
fn list_item<'py>(list: &Bound<'py, PyList>, i: usize) -> Option<Bound<'py, PyAny>> {
    if i < list.len() {
        // SAFETY: `i` is in bounds and we hold the GIL; no Python code runs
        // between the length check and taking the new reference. (PyO3 only
        // offers this on GIL builds, PyO3 #4539: another thread could resize
        // the list in between on a free-threaded one, hence the `cfg`.)
        Some(unsafe { list.get_item_unchecked(i) })
    } else {
        None
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
        signature = (max_size = Some(1024), ttl = None, *, policy = "lru", clock = None),
        text_signature = "(max_size=1024, ttl=None, *, policy='lru', clock=None)"
    )]
    pub(crate) fn new(
        max_size: Option<i64>,
        ttl: Option<f64>,
        policy: &str,
        clock: Option<&Bound<'_, PyManualClock>>,
    ) -> PyResult<Self> {
        let max_size = match max_size {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => return Err(CoreError::value("max_size", "an int >= 1 or None", n).into()),
        };
        let ttl = ttl_arg(ttl)?;
        let policy = Policy::parse(policy)?;
        Ok(Self {
            inner: Guarded::new(Store::with_policy(max_size, ttl, policy)?),
            // TTL checks read the upkeep thread's timestamp: one atomic load,
            // against 2.3 ns for the vDSO coarse clock and 20 ns for `Instant`.
            clock: pick_clock(clock, Clock::Recent),
            max_size,
            ttl,
            policy,
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

    /// The eviction policy: ``"lru"`` or ``"tinylfu"``.
    #[getter]
    fn policy(&self) -> &'static str {
        self.policy.name()
    }

    /// Return the value stored under ``key``; raise ``KeyError`` on a miss.
    pub(crate) fn get(&self, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
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

    /// Look up many one-argument calls at once, without an exception per miss.
    ///
    /// Item ``x`` is looked up under ``make_key((x,))``, the key of the call
    /// ``f(x)``: results are shared with ``get_call((x,))`` and ``set_call``.
    /// Each lookup counts one hit or one miss, as a single ``get_call`` does.
    ///
    /// Args:
    ///     items: An iterable of single arguments.
    ///     default: The value put in place of a miss. Default ``None``.
    ///
    /// Returns:
    ///     ``(values, hits)``: one value per item, in order (``default`` for a
    ///     miss), and the number of hits.
    ///
    /// Raises:
    ///     TypeError: An item cannot be keyed (the message names it).
    #[pyo3(signature = (items, default = None))]
    fn get_many_items(
        &self,
        items: &Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
    ) -> PyResult<(Py<PyList>, usize)> {
        let py = items.py();
        let default = default.unwrap_or_else(|| py.None());
        // A size hint only: an iterable without len() simply grows the vector.
        let mut values: Vec<Py<PyAny>> = Vec::with_capacity(items.len().unwrap_or(0));
        let mut hits = 0;
        let mut visit = |item: &Bound<'_, PyAny>| -> PyResult<()> {
            match self.lookup_item(item)? {
                Some(v) => {
                    hits += 1;
                    values.push(v);
                }
                None => values.push(default.clone_ref(py)),
            }
            Ok(())
        };
        #[cfg(not(any(Py_LIMITED_API, Py_GIL_DISABLED)))]
        if let Ok(list) = items.cast::<PyList>() {
            let mut i = 0;
            while let Some(item) = list_item(list, i) {
                visit(&item)?;
                i += 1;
            }
            return Ok((PyList::new(py, values)?.unbind(), hits));
        }
        for item in items.try_iter()? {
            visit(&item?)?;
        }
        Ok((PyList::new(py, values)?.unbind(), hits))
    }

    /// Store many one-argument call results at once.
    ///
    /// ``set_call((x,), None, v)`` for each pair ``(x, v)`` of ``zip(items, values)``.
    ///
    /// Args:
    ///     items: A sized iterable of single arguments (a list or tuple).
    ///     values: One value per item, same length.
    ///     ttl: Seconds each entry lives, overriding the store's; ``None``
    ///         (default) for the store's TTL.
    ///
    /// Raises:
    ///     ValueError: ``items`` and ``values`` differ in length, or a bad ``ttl``.
    ///     TypeError: An item cannot be keyed (the items before it are stored).
    #[pyo3(signature = (items, values, ttl = None))]
    fn set_many_items(
        &self,
        items: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        ttl: Option<f64>,
    ) -> PyResult<()> {
        let py = items.py();
        let ttl = ttl_arg(ttl)?.map(Some);
        let (n, m) = (items.len()?, values.len()?);
        if n != m {
            return Err(PyValueError::new_err(format!(
                "set_many_items: items and values differ in length ({n} != {m}); \
                 pass one value per item"
            )));
        }
        let mut out: Removed = Vec::new();
        let mut store_one = |item: &Bound<'_, PyAny>, value: Py<PyAny>| -> PyResult<()> {
            // One int or short str: stored by its short form alone, no
            // encoder and no `KeyData` (see `SlotKey`).
            if let Some(short) = short_call1(item) {
                self.insert_short(py, short, value, ttl, &mut out);
            } else {
                let mut enc = Encoder::new(Mode::InProcess);
                enc.call1(item)?;
                let key = enc.to_key(enc.hash());
                self.insert_into(py, key, value, ttl, &mut out)?;
            }
            if out.len() >= 256 {
                // Bound the garbage held across the batch.
                out.clear();
            }
            Ok(())
        };
        // Two lists (what `@opmap` passes): indexed directly. Zipping two
        // `try_iter`s moved a `PyResult` per item through the stack and hit a
        // store-forwarding stall; 10k items into a 1024-entry store went from
        // 0.44 to 0.28 ms here.
        #[cfg(not(any(Py_LIMITED_API, Py_GIL_DISABLED)))]
        if let (Ok(il), Ok(vl)) = (items.cast::<PyList>(), values.cast::<PyList>()) {
            let mut i = 0;
            while let (Some(item), Some(value)) = (list_item(il, i), list_item(vl, i)) {
                store_one(&item, value.unbind())?;
                i += 1;
            }
            return Ok(());
        }
        for (item, value) in items.try_iter()?.zip(values.try_iter()?) {
            store_one(&item?, value?.unbind())?;
        }
        Ok(())
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
                    for o in k.key.iter().flat_map(|d| d.opaque.iter()) {
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
        // SAFETY: tp_clear is only called by the GC, with the thread attached
        // (PyO3 passes `__clear__` no token, so one is assumed here).
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
        let policy = self.policy.name();
        format!("<Store size={len} max_size={max} ttl={ttl} policy={policy}>")
    }
}

/// `Store.get` is the store's hot method and takes one argument: module init
/// re-registers it as METH_O (see `fastcall.rs`).
impl MethO for PyStore {
    const METHOD_NAME: &'static CStr = c"get";
    const METHOD_DOC: &'static CStr =
        c"get($self, key, /)\n--\n\nReturn the value stored under ``key``; raise ``KeyError`` on a miss.";

    #[inline(always)]
    fn call_o(&self, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.get(key)
    }
}
