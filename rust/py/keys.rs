#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Binding of `keys`: walks Python values into the canonical encoding.
//!
//! The hot path (`CachedCall.__call__`, `Store.get_call`) encodes into a
//! reusable thread-local buffer and probes the store with the borrowed bytes:
//! no Python object and no heap allocation on a hit. A [`KeyData`] (one
//! allocation) is built only when a key is stored.

use std::fmt;
use std::sync::Arc;

use pyo3::exceptions::{PyException, PyRecursionError, PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
};
use smallvec::SmallVec;

use crate::keys::{self as k, MAX_DEPTH};

/// Inline capacity of a stored key's bytes: covers a call of a few small ints
/// or short strings without a second allocation.
pub(crate) type KeyBytes = SmallVec<[u8; 48]>;

/// A built key: encoding, hash and opaque objects.
pub(crate) struct KeyData {
    /// In-process hash (bytes hash mixed with the opaque objects' hashes).
    pub hash: u64,
    /// The short form (encodings of at most 16 bytes without opaque objects).
    pub short: k::Short,
    /// The canonical encoding.
    pub bytes: KeyBytes,
    /// Objects outside the canonical set, compared with Python `==`.
    pub opaque: Box<[Py<PyAny>]>,
}

/// Keys are shared between the store, the in-flight table and `Key` objects.
pub(crate) type KeyRef = Arc<KeyData>;

/// Whether to accept opaque objects (in process) or refuse them (stable digest).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Opaque objects are keyed by their `__hash__`/`__eq__`.
    InProcess,
    /// Only the canonical set is accepted.
    Stable,
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
pub(crate) enum ArgName<'a> {
    /// `args[i]`.
    Pos(usize),
    /// `kwargs['name']`.
    Kw(&'a str),
    /// A single value (a store key or a digest input).
    Value(&'static str),
}

impl fmt::Display for ArgName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgName::Pos(i) => write!(f, "args[{i}]"),
            ArgName::Kw(n) => write!(f, "kwargs['{n}']"),
            ArgName::Value(n) => f.write_str(n),
        }
    }
}

/// An encoding in progress.
pub(crate) struct Encoder<'py> {
    /// The bytes written so far.
    pub buf: k::KeyBuf,
    /// Opaque objects met so far, in slot order.
    pub opaque: SmallVec<[Bound<'py, PyAny>; 2]>,
    /// Hash of the opaque objects, mixed in order.
    pub opaque_hash: u64,
    /// Each opaque object's own hash, in slot order.
    hashes: SmallVec<[u64; 2]>,
    mode: Mode,
}

/// Keyword items of a call: (name, value).
type KwItems<'py> = SmallVec<[(Bound<'py, PyString>, Bound<'py, PyAny>); 8]>;

impl<'py> Encoder<'py> {
    /// An empty encoder (its buffer lives on the stack).
    #[inline]
    pub(crate) fn new(mode: Mode) -> Self {
        Self {
            buf: k::KeyBuf::new(),
            opaque: SmallVec::new(),
            opaque_hash: 0,
            hashes: SmallVec::new(),
            mode,
        }
    }

    /// The key's hash.
    #[inline]
    pub(crate) fn hash(&self) -> u64 {
        let h = k::hash_bytes(&self.buf);
        if self.opaque.is_empty() {
            h
        } else {
            k::mix_hash(h, self.opaque_hash)
        }
    }

    /// The short form, when there are no opaque objects and at most 16 bytes.
    #[inline]
    pub(crate) fn short(&self) -> Option<k::Short> {
        if self.opaque.is_empty() {
            k::Short::from_bytes(&self.buf)
        } else {
            None
        }
    }

    /// Copy the encoding into a stored key.
    pub(crate) fn to_key(&self, hash: u64) -> KeyRef {
        Arc::new(KeyData {
            hash,
            short: self.short().unwrap_or(k::Short::NOT_SHORT),
            bytes: KeyBytes::from_slice(&self.buf),
            opaque: self.opaque.iter().map(|o| o.clone().unbind()).collect(),
        })
    }

    /// Encode a call: positional items, then keyword items sorted by name.
    #[inline]
    pub(crate) fn call(
        &mut self,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<()> {
        k::put_header(&mut self.buf, k::CALL, args.len());
        for (i, item) in args.iter_borrowed().enumerate() {
            self.value(&item, 0, ArgName::Pos(i))?;
        }
        if let Some(kw) = kwargs {
            if !kw.is_empty() {
                let n = kw.len();
                // Built in place (see `call_vector`).
                let mut items: KwItems<'py> = SmallVec::new();
                // Not pyo3's dict iterator: it panics if the dict changes size
                // (another thread on a free-threaded build).
                for_each_item(kw, |name, value| {
                    if items.len() >= n {
                        return Err(changed(ArgName::Value("kwargs"), "dict"));
                    }
                    let name = name.cast_into_exact::<PyString>().map_err(|e| {
                        PyTypeError::new_err(format!(
                            "kwargs keys must be str, got {}",
                            e.into_inner()
                                .get_type()
                                .name()
                                .map(|n| n.to_string())
                                .unwrap_or_default()
                        ))
                    })?;
                    items.push((name, value));
                    Ok(())
                })?;
                if items.len() != n {
                    return Err(changed(ArgName::Value("kwargs"), "dict"));
                }
                self.kwargs(&items)?;
            }
        }
        Ok(())
    }

    /// Encode a call with one positional argument and no keywords: the same
    /// bytes as [`Self::call`] on `(item,)`, without building the tuple.
    #[inline]
    pub(crate) fn call1(&mut self, item: &Bound<'py, PyAny>) -> PyResult<()> {
        k::put_header(&mut self.buf, k::CALL, 1);
        self.value(item, 0, ArgName::Pos(0))
    }

    /// Encode a vectorcall: `args[..nargs]` positional, then one value per
    /// name of `kwnames`; the same bytes as [`Self::call`] for the same call.
    ///
    /// # Safety
    /// `args` must point to `nargs + len(kwnames)` live object pointers
    /// (the vectorcall protocol guarantees it for the duration of the call).
    #[inline]
    pub(crate) unsafe fn call_vector(
        &mut self,
        py: Python<'py>,
        args: *const *mut ffi::PyObject,
        nargs: usize,
        kwnames: Option<&Bound<'py, PyTuple>>,
    ) -> PyResult<()> {
        k::put_header(&mut self.buf, k::CALL, nargs);
        for i in 0..nargs {
            // SAFETY: i < nargs: in bounds of the caller's array.
            let ptr = unsafe { *args.wrapping_add(i) };
            // SAFETY: the caller guarantees the pointers are live objects.
            let item = unsafe { Borrowed::from_ptr(py, ptr) };
            self.value(&item, 0, ArgName::Pos(i))?;
        }
        if let Some(names) = kwnames {
            let m = names.len();
            if m > 0 {
                // `new`, not `with_capacity`: built in place (`with_capacity`
                // returned it by value, a 136-byte memcpy per hit); a call
                // with more than 8 keywords spills to the heap as it fills.
                let mut items: KwItems<'py> = SmallVec::new();
                for (j, name) in names.iter().enumerate() {
                    // SAFETY: kwnames holds only str (vectorcall protocol).
                    let name = unsafe { name.cast_into_unchecked::<PyString>() };
                    // SAFETY: j < len(kwnames): in bounds of the caller's array.
                    let ptr = unsafe { *args.wrapping_add(nargs + j) };
                    // SAFETY: the caller guarantees the pointers are live objects.
                    let value = unsafe { Borrowed::from_ptr(py, ptr) }.to_owned();
                    items.push((name, value));
                }
                self.kwargs(&items)?;
            }
        }
        Ok(())
    }

    fn kwargs(&mut self, items: &KwItems<'py>) -> PyResult<()> {
        let m = items.len();
        // Built in place (see `call_vector`).
        let mut names: SmallVec<[&str; 8]> = SmallVec::new();
        for (name, _) in items {
            names.push(name.to_str()?);
        }
        k::put_header(&mut self.buf, k::KWARGS, m);
        if m == 1 {
            k::put_bytes(&mut self.buf, k::STR, names[0].as_bytes());
            return self.value(&items[0].1, 0, ArgName::Kw(names[0]));
        }
        let mut order: SmallVec<[usize; 8]> = (0..m).collect();
        order.sort_unstable_by(|a, b| names[*a].cmp(names[*b]));
        for i in order {
            k::put_bytes(&mut self.buf, k::STR, names[i].as_bytes());
            self.value(&items[i].1, 0, ArgName::Kw(names[i]))?;
        }
        Ok(())
    }

    /// Encode one value.
    pub(crate) fn value(
        &mut self,
        obj: &Bound<'py, PyAny>,
        depth: usize,
        name: ArgName<'_>,
    ) -> PyResult<()> {
        // Exact-type checks only: subclasses (bool of int aside, which is its
        // own exact type) are opaque.
        if obj.is_exact_instance_of::<PyInt>() {
            let mut overflow: std::os::raw::c_int = 0;
            // SAFETY: `obj` is an exact int (checked above) and we hold the GIL.
            let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
            if overflow == 0 && !(v == -1 && PyErr::occurred(obj.py())) {
                k::put_int(&mut self.buf, v);
                return Ok(());
            }
            return self.bigint(obj);
        }
        if obj.is_exact_instance_of::<PyString>() {
            // SAFETY: checked to be an exact str.
            let s = unsafe { obj.cast_unchecked::<PyString>() };
            match s.to_str() {
                Ok(text) => k::put_bytes(&mut self.buf, k::STR, text.as_bytes()),
                Err(_) => {
                    let raw = s.call_method1("encode", ("utf-8", "surrogatepass"))?;
                    let raw = raw.cast_into::<PyBytes>()?;
                    k::put_bytes(&mut self.buf, k::STR_SURROGATE, raw.as_bytes());
                }
            }
            return Ok(());
        }
        if obj.is_none() {
            self.buf.push(k::NONE);
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyBool>() {
            self.buf
                .push(if obj.is_truthy()? { k::TRUE } else { k::FALSE });
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyFloat>() {
            // SAFETY: checked to be an exact float.
            let f = unsafe { obj.cast_unchecked::<PyFloat>() }.value();
            k::put_float(&mut self.buf, f);
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyBytes>() {
            // SAFETY: checked to be exact bytes.
            let b = unsafe { obj.cast_unchecked::<PyBytes>() };
            k::put_bytes(&mut self.buf, k::BYTES, b.as_bytes());
            return Ok(());
        }
        if depth >= MAX_DEPTH {
            return Err(PyRecursionError::new_err(format!(
                "{name} is nested deeper than {MAX_DEPTH} levels (or contains itself) and cannot be \
                 used as a cache key; pass cache_key= to @opero to key it yourself"
            )));
        }
        if obj.is_exact_instance_of::<PyTuple>() {
            // SAFETY: checked to be an exact tuple.
            let t = unsafe { obj.cast_unchecked::<PyTuple>() };
            k::put_header(&mut self.buf, k::TUPLE, t.len());
            for item in t.iter_borrowed() {
                self.value(&item, depth + 1, name)?;
            }
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyList>() {
            // SAFETY: checked to be an exact list.
            let l = unsafe { obj.cast_unchecked::<PyList>() };
            // Iterate by index: a list may change length while an item's
            // `__hash__` (or a `__del__` run by the collector) runs.
            let n = l.len();
            k::put_header(&mut self.buf, k::LIST, n);
            for i in 0..n {
                if l.len() != n {
                    return Err(changed(name, "list"));
                }
                let item = l.get_item(i)?;
                self.value(&item, depth + 1, name)?;
            }
            if l.len() != n {
                return Err(changed(name, "list"));
            }
            return Ok(());
        }
        if obj.is_exact_instance_of::<PyDict>() {
            // SAFETY: checked to be an exact dict.
            let d = unsafe { obj.cast_unchecked::<PyDict>() };
            return self.dict(d, depth, name);
        }
        let is_set = obj.is_exact_instance_of::<PySet>();
        if is_set || obj.is_exact_instance_of::<PyFrozenSet>() {
            let n = obj.len()?;
            k::put_header(&mut self.buf, if is_set { k::SET } else { k::FROZENSET }, n);
            let start = self.buf.len();
            let first = self.opaque.len();
            let mut bounds = Bounds::with_capacity(n);
            // The set iterator raises RuntimeError if the set changes size.
            for item in obj.try_iter()? {
                self.value(&item?, depth + 1, name)?;
                bounds.push(self.buf.len(), self.opaque.len());
            }
            if bounds.len() != n {
                return Err(changed(name, "set"));
            }
            return self.unordered(start, first, &bounds);
        }
        self.opaque_value(obj, name)
    }

    /// Encode a dict's items, iterated without a snapshot (no allocation);
    /// a dict that changes size while an item's `__hash__` runs is a
    /// `RuntimeError`, as in Python's own iteration.
    fn dict(&mut self, d: &Bound<'py, PyDict>, depth: usize, name: ArgName<'_>) -> PyResult<()> {
        let n = d.len();
        k::put_header(&mut self.buf, k::DICT, n);
        let start = self.buf.len();
        let first = self.opaque.len();
        let mut bounds = Bounds::with_capacity(n);
        for_each_item(d, |key, value| {
            if bounds.len() >= n || d.len() != n {
                return Err(changed(name, "dict"));
            }
            self.value(&key, depth + 1, name)?;
            self.value(&value, depth + 1, name)?;
            bounds.push(self.buf.len(), self.opaque.len());
            Ok(())
        })?;
        if bounds.len() != n || d.len() != n {
            return Err(changed(name, "dict"));
        }
        self.unordered(start, first, &bounds)
    }

    /// Make the items written since `start` (ends and opaque counts in
    /// `bounds`) independent of their order. Items of built-ins only are
    /// sorted bytewise (deterministic, so the stable digest is too).
    ///
    /// Items holding opaque objects are sorted by their bytes, then by the
    /// hash of their objects (equal objects have equal hashes), with the
    /// objects moved along: equal containers then give the same sequence
    /// whatever their order, without calling Python, and single flight still
    /// sees the caller's own objects. Only when two items tie on both (a hash
    /// collision) is that order not canonical; the container then becomes
    /// `UNORDERED` + one opaque `frozenset` of per-item `Key`s, which Python's
    /// set equality (each item's hash, then `==`) matches in any order.
    fn unordered(&mut self, start: usize, first: usize, bounds: &Bounds) -> PyResult<()> {
        if self.opaque.len() == first {
            k::sort_items(&mut self.buf, start, &bounds.ends);
            return Ok(());
        }
        if self.sort_with_objects(start, first, bounds) {
            return Ok(());
        }
        self.as_frozenset(start, first, bounds)
    }

    /// Sort items holding opaque objects by (bytes, objects' hash); false,
    /// leaving everything as it was, if two items tie.
    fn sort_with_objects(&mut self, start: usize, first: usize, bounds: &Bounds) -> bool {
        let mut items: SmallVec<[Item; 16]> = SmallVec::with_capacity(bounds.len());
        let (mut s, mut o) = (start, first);
        for (&e, &oe) in bounds.ends.iter().zip(&bounds.objects) {
            let h = self
                .hashes
                .get(o..oe)
                .unwrap_or_default()
                .iter()
                .fold(0, |acc, &x| k::mix_hash(acc, x));
            items.push((s, e, o, oe, h));
            (s, o) = (e, oe);
        }
        let buf = &self.buf;
        let bytes = |a: usize, b: usize| buf.get(a..b).unwrap_or_default();
        items.sort_unstable_by(|x, y| bytes(x.0, x.1).cmp(bytes(y.0, y.1)).then(x.4.cmp(&y.4)));
        let tie = items
            .windows(2)
            .any(|w| w[0].4 == w[1].4 && bytes(w[0].0, w[0].1) == bytes(w[1].0, w[1].1));
        if tie {
            return false;
        }
        let mut sorted = k::KeyBuf::new();
        let mut objects: SmallVec<[Bound<'py, PyAny>; 2]> = SmallVec::new();
        let mut hashes: SmallVec<[u64; 2]> = SmallVec::new();
        for &(a, b, oa, ob, _) in &items {
            sorted.extend_from_slice(bytes(a, b));
            objects.extend(self.opaque.get(oa..ob).unwrap_or_default().iter().cloned());
            hashes.extend_from_slice(self.hashes.get(oa..ob).unwrap_or_default());
        }
        self.buf.truncate(start);
        self.buf.extend_from_slice(&sorted);
        self.opaque.truncate(first);
        self.opaque.extend(objects);
        self.hashes.truncate(first);
        self.hashes.extend_from_slice(&hashes);
        self.opaque_hash = self.hashes.iter().fold(0, |acc, &x| k::mix_hash(acc, x));
        true
    }

    /// Replace the items by `UNORDERED` and one opaque `frozenset` of their keys.
    fn as_frozenset(&mut self, start: usize, first: usize, bounds: &Bounds) -> PyResult<()> {
        let py = match self.opaque.first() {
            Some(o) => o.py(),
            None => return Ok(()),
        };
        let mut items: Vec<Bound<'py, PyKey>> = Vec::with_capacity(bounds.len());
        let (mut s, mut o) = (start, first);
        for (&e, &oe) in bounds.ends.iter().zip(&bounds.objects) {
            let bytes = self.buf.get(s..e).unwrap_or_default();
            let objects = self.opaque.get(o..oe).unwrap_or_default();
            let hashes = self.hashes.get(o..oe).unwrap_or_default();
            let h = k::hash_bytes(bytes);
            let hash = if objects.is_empty() {
                h
            } else {
                k::mix_hash(h, hashes.iter().fold(0, |acc, &x| k::mix_hash(acc, x)))
            };
            let data = KeyData {
                hash,
                short: k::Short::NOT_SHORT,
                bytes: KeyBytes::from_slice(bytes),
                opaque: objects.iter().map(|x| x.clone().unbind()).collect(),
            };
            items.push(Bound::new(
                py,
                PyKey {
                    inner: Arc::new(data),
                },
            )?);
            (s, o) = (e, oe);
        }
        let set = PyFrozenSet::new(py, &items)?;
        self.buf.truncate(start);
        self.opaque.truncate(first);
        self.hashes.truncate(first);
        self.opaque_hash = self.hashes.iter().fold(0, |acc, &x| k::mix_hash(acc, x));
        let h = set.hash()?;
        self.buf.push(k::UNORDERED);
        self.push_opaque(set.into_any(), h as u64);
        Ok(())
    }

    fn push_opaque(&mut self, obj: Bound<'py, PyAny>, hash: u64) {
        // The object's place is its order among the key's opaque objects: no
        // slot number is written, so an item's bytes do not depend on its position.
        self.buf.push(k::OPAQUE);
        self.opaque_hash = k::mix_hash(self.opaque_hash, hash);
        self.hashes.push(hash);
        self.opaque.push(obj);
    }

    fn bigint(&mut self, obj: &Bound<'py, PyAny>) -> PyResult<()> {
        // Rare path (|n| >= 2**63): (bit_length + 8) // 8 bytes always hold the
        // sign bit, and the length is a function of the value, so it is canonical.
        let bits: u64 = obj.call_method0("bit_length")?.extract()?;
        let len = bits / 8 + 1;
        let kwargs = PyDict::new(obj.py());
        kwargs.set_item("signed", true)?;
        let raw = obj.call_method("to_bytes", (len, "little"), Some(&kwargs))?;
        let raw = raw.cast_into::<PyBytes>()?;
        k::put_bigint(&mut self.buf, raw.as_bytes());
        Ok(())
    }

    fn opaque_value(&mut self, obj: &Bound<'py, PyAny>, name: ArgName<'_>) -> PyResult<()> {
        let tp = obj.get_type();
        let tp_name = tp
            .qualname()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".to_owned());
        if self.mode == Mode::Stable {
            return Err(PyTypeError::new_err(format!(
                "{name} of type '{tp_name}' has no stable digest: only None, bool, int, float, str, \
                 bytes and tuple/list/dict/set/frozenset of these can be keyed across processes; \
                 pass cache_key= to @opero to key it yourself"
            )));
        }
        let py = obj.py();
        // A `__hash__` may key another call (a cached function, `make_key` on
        // itself...): count each such re-entry against Python's recursion
        // limit, as CPython's own recursive C code does, so it ends in a
        // RecursionError long before the native stack runs out.
        // Python's limit alone is not enough on 3.11 with a raised
        // `sys.setrecursionlimit`, so re-entries are also capped here.
        let depth = HASH_DEPTH.with(|d| d.get());
        if depth >= MAX_HASH_DEPTH {
            return Err(PyRecursionError::new_err(format!(
                "{name}: keying re-entered itself more than {MAX_HASH_DEPTH} times from \
                 __hash__ methods; pass cache_key= to @opero to key it yourself"
            )));
        }
        // SAFETY: a plain C API call with the GIL held; every successful
        // enter is paired with the leave below.
        if unsafe { ffi::Py_EnterRecursiveCall(c" while hashing a cache key argument".as_ptr()) }
            != 0
        {
            return Err(PyErr::fetch(py));
        }
        HASH_DEPTH.with(|d| d.set(depth + 1));
        let hashed = super::guarded::hash(obj);
        HASH_DEPTH.with(|d| d.set(depth));
        // SAFETY: pairs the successful enter above.
        unsafe { ffi::Py_LeaveRecursiveCall() };
        let h = match hashed {
            Ok(h) => h,
            // Not wrapped: KeyboardInterrupt, SystemExit, CancelledError... must
            // reach the caller unchanged, and a RecursionError from nested
            // keying would nest its message once per level.
            Err(err)
                if err.is_instance_of::<PyRecursionError>(py)
                    || !err.is_instance_of::<PyException>(py) =>
            {
                return Err(err)
            }
            Err(err) => {
                let mut why = err.value(py).to_string();
                if why.len() > 200 {
                    let mut cut = 200;
                    while !why.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    why.truncate(cut);
                    why.push_str("...");
                }
                let new = PyTypeError::new_err(format!(
                    "{name} of type '{tp_name}' cannot be used as a cache key ({why}); pass \
                     cache_key= to @opero to key it yourself"
                ));
                new.set_cause(py, Some(err));
                return Err(new);
            }
        };
        self.push_opaque(obj.clone(), h as u64);
        Ok(())
    }
}

/// One item of an unordered container: bytes start and end, opaque objects
/// start and end, and the mixed hash of those objects.
type Item = (usize, usize, usize, usize, u64);

/// Deepest nesting of keys built from within `__hash__` methods on one thread.
const MAX_HASH_DEPTH: u32 = 64;

thread_local! {
    /// How many `__hash__` calls made while keying are active on this thread
    /// (only opaque arguments touch it, never the int/str hot path).
    static HASH_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Where each item of an unordered container ends: in the buffer, and in the
/// opaque objects (kept apart so the common case sorts `ends` in place).
struct Bounds {
    ends: SmallVec<[usize; 16]>,
    objects: SmallVec<[usize; 16]>,
}

impl Bounds {
    fn with_capacity(n: usize) -> Self {
        Self {
            ends: SmallVec::with_capacity(n),
            objects: SmallVec::with_capacity(n),
        }
    }

    #[inline]
    fn push(&mut self, end: usize, objects: usize) {
        self.ends.push(end);
        self.objects.push(objects);
    }

    #[inline]
    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// The error for a container that changed while being keyed.
fn changed(name: ArgName<'_>, kind: &str) -> PyErr {
    PyRuntimeError::new_err(format!(
        "{name}: {kind} changed size during iteration while its cache key was built (a \
         __hash__ or __eq__ of an item changed it); pass an unchanging value or cache_key= to \
         @opero"
    ))
}

/// Call `f` on each (key, value) of `d`, stopping at its first error. Walks
/// the dict's entries in place (`PyDict_Next`, no allocation), taking a
/// reference to each key and value before any Python code runs; `f` checks
/// the size. On free-threaded builds another thread may change `d` at any
/// moment, so a private copy is walked instead.
fn for_each_item<'py>(
    d: &Bound<'py, PyDict>,
    mut f: impl FnMut(Bound<'py, PyAny>, Bound<'py, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    #[cfg(Py_GIL_DISABLED)]
    let snapshot = d.copy()?;
    #[cfg(Py_GIL_DISABLED)]
    let d = &snapshot;
    let py = d.py();
    let mut pos: ffi::Py_ssize_t = 0;
    let mut key: *mut ffi::PyObject = std::ptr::null_mut();
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    loop {
        // SAFETY: `d` is a live dict and we hold the GIL; PyDict_Next checks
        // `pos` against the dict's current entries, so a dict resized by `f`
        // is never read out of bounds.
        let more = unsafe { ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut key, &mut value) };
        if more == 0 {
            return Ok(());
        }
        // SAFETY: PyDict_Next returned a borrowed, non-null key; it is made
        // owned before `f` runs any Python code.
        let k = unsafe { Bound::from_borrowed_ptr(py, key) };
        // SAFETY: likewise for the value.
        let v = unsafe { Bound::from_borrowed_ptr(py, value) };
        f(k, v)?;
    }
}

/// The int in `obj` if it is an exact int fitting `i64`.
#[inline(always)]
fn small_int(obj: &Bound<'_, PyAny>) -> Option<i64> {
    if !obj.is_exact_instance_of::<PyInt>() {
        return None;
    }
    let mut overflow: std::os::raw::c_int = 0;
    // SAFETY: `obj` is an exact int and we hold the GIL.
    let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
    // With an exact int the only failure is overflow (reported in `overflow`).
    (overflow == 0).then_some(v)
}

/// The UTF-8 of `obj` if it is an exact str.
#[inline(always)]
fn exact_str<'a>(obj: &'a Bound<'_, PyAny>) -> Option<&'a [u8]> {
    if !obj.is_exact_instance_of::<PyString>() {
        return None;
    }
    // SAFETY: checked to be an exact str.
    let s = unsafe { obj.cast_unchecked::<PyString>() };
    // A str with lone surrogates has no UTF-8: leave it to the general path
    // (and clear the error it set).
    s.to_str().ok().map(str::as_bytes)
}

/// The short key of one value (an int or a short str), built in registers.
#[inline(always)]
pub(crate) fn short_value(obj: &Bound<'_, PyAny>) -> Option<k::Short> {
    if let Some(v) = small_int(obj) {
        return Some(k::Short::int(v));
    }
    exact_str(obj).and_then(k::Short::str)
}

/// The short key of a call with one positional argument (an int or a short str).
#[inline(always)]
pub(crate) fn short_call1(obj: &Bound<'_, PyAny>) -> Option<k::Short> {
    if let Some(v) = small_int(obj) {
        return Some(k::Short::call_int(v));
    }
    exact_str(obj).and_then(k::Short::call_str)
}

/// Python `==` with the identity shortcut, errors propagated.
#[inline]
pub(crate) fn py_eq(py: Python<'_>, a: &Py<PyAny>, b: &Bound<'_, PyAny>) -> PyResult<bool> {
    if a.as_ptr() == b.as_ptr() {
        return Ok(true);
    }
    // SAFETY: both pointers are live objects and we hold the GIL.
    let r = unsafe { super::guarded::eq(a.as_ptr(), b.as_ptr()) };
    if r < 0 {
        Err(PyErr::fetch(py))
    } else {
        Ok(r == 1)
    }
}

/// An exact, typed, hashable key built from call arguments.
///
/// Two keys are equal only when the arguments are: ``1``, ``1.0`` and
/// ``True`` give different keys; lists, dicts and sets are keyed by
/// structure; other objects by their own ``__hash__``/``__eq__``.
#[pyclass(frozen, module = "opero._opero_core", name = "Key")]
pub struct PyKey {
    pub(crate) inner: KeyRef,
}

#[pymethods]
impl PyKey {
    fn __hash__(&self) -> isize {
        let h = self.inner.hash as isize;
        // -1 is reserved for errors by CPython's hash protocol.
        if h == -1 {
            -2
        } else {
            h
        }
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Ok(other) = other.cast::<PyKey>() else {
            return Ok(false);
        };
        let (a, b) = (&self.inner, &other.get().inner);
        if Arc::ptr_eq(a, b) {
            return Ok(true);
        }
        if a.hash != b.hash || a.bytes != b.bytes || a.opaque.len() != b.opaque.len() {
            return Ok(false);
        }
        for (x, y) in a.opaque.iter().zip(b.opaque.iter()) {
            if !py_eq(py, x, y.bind(py))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn __repr__(&self) -> String {
        let mut hex = String::with_capacity(2 * self.inner.bytes.len().min(32));
        for b in self.inner.bytes.iter().take(32) {
            hex.push_str(&format!("{b:02x}"));
        }
        let more = if self.inner.bytes.len() > 32 {
            "..."
        } else {
            ""
        };
        format!("<Key {hex}{more} opaque={}>", self.inner.opaque.len())
    }
}

/// Build the in-process key of a call; keyword order does not matter.
///
/// Positional and keyword arguments are distinct (``f(1)`` and ``f(x=1)``
/// give different keys: the signature is not consulted). ``-0.0`` and
/// ``0.0`` give one key (they are equal), and every NaN gives one key.
/// Subclasses of builtins (``IntEnum``, ``str`` subclasses) are keyed by
/// their own ``__hash__``/``__eq__``, never as the builtin. Dicts and sets
/// give one key whatever their order, objects inside included.
///
/// Raises:
///     TypeError: An argument is unhashable and not a built-in container; the
///         message names the argument (``args[1]`` or ``kwargs['x']``) and
///         points to ``cache_key=``.
///     RuntimeError: A dict, list or set changed size while it was keyed (an
///         item's ``__hash__`` changed it).
///     RecursionError: Containers nested deeper than 200 levels, or a
///         ``__hash__`` that keys its argument again.
#[pyfunction]
#[pyo3(signature = (args, kwargs = None))]
pub(crate) fn make_key(
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyKey> {
    let mut enc = Encoder::new(Mode::InProcess);
    enc.call(args, kwargs)?;
    let hash = enc.hash();
    Ok(PyKey {
        inner: enc.to_key(hash),
    })
}

/// Return the stable hex digest (SHA-256 of the canonical encoding) of one value.
///
/// Identical across processes, runs and machines. Raises ``TypeError`` for a
/// value outside None/bool/int/float/str/bytes/tuple/list/dict/set/frozenset.
#[pyfunction]
pub(crate) fn stable_digest(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut enc = Encoder::new(Mode::Stable);
    enc.value(value, 0, ArgName::Value("value"))?;
    Ok(k::stable_digest(&enc.buf))
}

/// Return the stable hex digest of a call's arguments (keyword order ignored).
#[pyfunction]
#[pyo3(signature = (args, kwargs = None))]
pub(crate) fn stable_digest_call(
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let mut enc = Encoder::new(Mode::Stable);
    enc.call(args, kwargs)?;
    Ok(k::stable_digest(&enc.buf))
}
