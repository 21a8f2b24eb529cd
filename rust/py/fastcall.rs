#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Calling-convention shims for the two hot entry points, installed at module
//! init: vectorcall for `CachedCall` and METH_O for `Store.get`.
//!
//! PyO3 0.30 offers neither, so each shim is a C entry point that runs the
//! Rust body inside PyO3's own (doc-hidden, pinned by Cargo.lock) trampoline,
//! which marks the thread attached, traps panics and restores errors exactly
//! as for any pymethod. Without the full C API (abi3) they are compiled out
//! and PyO3's conventions stay. Every `unsafe` block says why it holds.

#[cfg(not(Py_LIMITED_API))]
use pyo3::ffi;
#[cfg(not(Py_LIMITED_API))]
use pyo3::impl_::trampoline;
use pyo3::prelude::*;
#[cfg(not(Py_LIMITED_API))]
use pyo3::types::PyTuple;

#[cfg(not(Py_LIMITED_API))]
use super::cached_call::{CallArgs, PyCachedCall};
#[cfg(not(Py_LIMITED_API))]
use super::store::PyStore;

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
pub(crate) unsafe extern "C" fn vectorcall(
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
    let store = Py::new(py, PyStore::new(Some(1), None, "lru", None)?)?;
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
