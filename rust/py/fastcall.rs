#![cfg_attr(Py_LIMITED_API, allow(dead_code, unused_variables))]
//! Calling-convention shims PyO3 0.30 does not offer: a vectorcall entry
//! point for a callable class and a METH_O method. This module knows no
//! class: a class opts in by implementing [`Vectorcall`] or [`MethO`] in its
//! own file, and module init installs the shim ([`enable_vectorcall`],
//! [`install_meth_o`]). So binding files depend on this one, never the
//! reverse.
//!
//! Each shim is a C entry point that runs the Rust body inside PyO3's own
//! trampoline (`pyo3::impl_::trampoline`, doc-hidden, hence the exact pin of
//! pyo3 in Cargo.toml), which marks the thread attached, traps panics and
//! restores errors exactly as for any pymethod. Without the full C API
//! (abi3) both are compiled out and PyO3's conventions stay.
//!
//! Upstream: PyO3 issue #4252 (vectorcall for `#[pyclass]` `__call__`) and
//! issue #3949 (raw FFI methods in a `#[pyclass]`) track what would replace
//! these shims.

use std::ffi::CStr;
#[cfg(not(Py_LIMITED_API))]
use std::marker::PhantomData;

use pyo3::ffi;
#[cfg(not(Py_LIMITED_API))]
use pyo3::impl_::trampoline;
use pyo3::prelude::*;
use pyo3::pyclass::boolean_struct::True;
#[cfg(not(Py_LIMITED_API))]
use pyo3::types::PyTuple;
use pyo3::PyClass;

/// A frozen class whose instances CPython calls through vectorcall.
pub(crate) trait Vectorcall: PyClass<Frozen = True> + Sync {
    /// The instance's `Option<vectorcallfunc>` field, which CPython reads at
    /// `tp_vectorcall_offset`; it holds [`entry_point`] once initialized.
    fn vectorcall_slot(&self) -> *const Option<ffi::vectorcallfunc>;

    /// Handle one call.
    ///
    /// # Safety
    /// `args` points to `PyVectorcall_NARGS(nargsf)` positional pointers
    /// followed by one per name of `kwnames` (a tuple of str), all live for
    /// the call; `nargsf` may carry `PY_VECTORCALL_ARGUMENTS_OFFSET`.
    #[cfg(not(Py_LIMITED_API))]
    unsafe fn vectorcall(
        &self,
        py: Python<'_>,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: Option<&Bound<'_, PyTuple>>,
    ) -> PyResult<Py<PyAny>>;
}

/// A frozen class with one method CPython calls as METH_O (the argument
/// directly, no argument parsing).
pub(crate) trait MethO: PyClass<Frozen = True> + Sync {
    /// The method's name.
    const METHOD_NAME: &'static CStr;
    /// Its docstring, with the `name($self, arg, /)\n--\n\n` signature line.
    const METHOD_DOC: &'static CStr;

    /// Handle one call with the single argument `arg`.
    fn call_o(&self, arg: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>>;
}

/// The value of a `T` instance's vectorcall field: the entry point, or
/// `None` without the full C API (CPython then always uses `tp_call`).
pub(crate) fn entry_point<T: Vectorcall>() -> Option<ffi::vectorcallfunc> {
    #[cfg(not(Py_LIMITED_API))]
    {
        Some(vectorcall::<T>)
    }
    #[cfg(Py_LIMITED_API)]
    {
        None
    }
}

#[cfg(not(Py_LIMITED_API))]
/// The body of the vectorcall entry point, run inside PyO3's trampoline.
///
/// # Safety
/// Called by CPython through [`vectorcall`] with `slf` an instance of `T`
/// (or of a subclass) and the vectorcall arguments of the call.
unsafe fn vectorcall_body<T: Vectorcall>(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython passes the callable itself, live for the call; only
    // instances of `T` (or of a subclass, same layout prefix) carry this
    // entry point, because `entry_point::<T>` is only stored in a `T`.
    let slf = unsafe { Borrowed::from_ptr(py, slf) };
    // SAFETY: as above, `slf` is a `T`.
    let this = unsafe { slf.cast_unchecked::<T>() };
    // SAFETY: the vectorcall protocol makes `kwnames` NULL or a tuple of str,
    // live for the call.
    let kwnames = unsafe { Borrowed::from_ptr_or_opt(py, kwnames) };
    // SAFETY: as above, a tuple whenever it is not NULL.
    let kwnames = kwnames.map(|k| unsafe { k.cast_unchecked::<PyTuple>() });
    // The trampoline's ABI narrowed `nargsf` (a `size_t` in C) to a signed
    // size; the cast restores the same bits, offset flag included.
    let nargsf = nargsf as usize;
    // SAFETY: `args`, `nargsf` and `kwnames` are the call's own, as CPython
    // handed them to `vectorcall`.
    let r = unsafe { this.get().vectorcall(py, args, nargsf, kwnames.as_deref()) };
    Ok(r?.into_ptr())
}

#[cfg(not(Py_LIMITED_API))]
/// [`vectorcall_body`] for `T` as the constant PyO3's trampoline is generic over.
struct VectorcallDef<T>(PhantomData<T>);

#[cfg(not(Py_LIMITED_API))]
impl<T: Vectorcall> trampoline::MethodDef<trampoline::fastcall_cfunction_with_keywords::Func>
    for VectorcallDef<T>
{
    const METH: trampoline::fastcall_cfunction_with_keywords::Func = vectorcall_body::<T>;
}

#[cfg(not(Py_LIMITED_API))]
/// The vectorcall entry point of `T`.
///
/// PyO3 0.30 gives `#[pyclass]` `__call__` only `tp_call` (PyO3 #4252), so
/// CPython builds an args tuple (and a kwargs dict) per call. Vectorcall skips
/// both: measured in one run on `CachedCall`, a 1-int hit takes 26 ns with it
/// and 47 ns without, a 3-positional + 2-keyword hit 146 ns against 330 ns.
/// It reuses PyO3's fastcall trampoline, whose ABI is the vectorcall one
/// (bar the signedness of `nargsf`), so panics and errors are handled as in
/// any pymethod.
///
/// # Safety
/// Only CPython calls this, per the vectorcall protocol, on a `T`.
unsafe extern "C" fn vectorcall<T: Vectorcall>(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the arguments are forwarded unchanged (`nargsf` bit for bit);
    // the trampoline requires an attached thread, which CPython guarantees
    // for every call.
    unsafe {
        trampoline::fastcall_cfunction_with_keywords::<VectorcallDef<T>>(
            callable,
            args,
            nargsf as ffi::Py_ssize_t,
            kwnames,
        )
    }
}

/// Turn on vectorcall for `T` (at module init, before any user instance).
///
/// The offset of the vectorcall field inside the object is measured on
/// `probe` (PyO3 owns the layout, which is fixed per type), then written to
/// `tp_vectorcall_offset` with `Py_TPFLAGS_HAVE_VECTORCALL`. `tp_call`
/// (PyO3's `__call__`) stays as the fallback CPython requires.
#[cfg(not(Py_LIMITED_API))]
pub(crate) fn enable_vectorcall<T: Vectorcall>(probe: &Bound<'_, T>) -> PyResult<()> {
    let base = probe.as_ptr() as usize;
    let field = probe.get().vectorcall_slot() as usize;
    let offset = field
        .checked_sub(base)
        .and_then(|o| ffi::Py_ssize_t::try_from(o).ok())
        .ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err(
                "opero: the vectorcall field lies outside its object",
            )
        })?;
    let tp_ptr = probe.py().get_type::<T>().as_type_ptr();
    // SAFETY: `tp_ptr` is `T`'s own heap type, fully initialized, and no
    // instance but the probe exists yet; `offset` points at an
    // `Option<vectorcallfunc>` (a nullable C function pointer, the layout
    // CPython reads) inside every instance.
    unsafe {
        (*tp_ptr).tp_vectorcall_offset = offset;
    }
    #[cfg(not(Py_GIL_DISABLED))]
    // SAFETY: as above; module init runs attached, nothing else reads the
    // flags of this type concurrently.
    unsafe {
        (*tp_ptr).tp_flags |= ffi::Py_TPFLAGS_HAVE_VECTORCALL;
    }
    #[cfg(Py_GIL_DISABLED)]
    // SAFETY: as above; free-threaded builds keep the flags atomic.
    unsafe {
        (*tp_ptr).tp_flags.fetch_or(
            ffi::Py_TPFLAGS_HAVE_VECTORCALL,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    // SAFETY: a valid type object, attached (module init).
    unsafe { ffi::PyType_Modified(tp_ptr) };
    Ok(())
}

/// Without the full C API (abi3) `T` is called through `tp_call` only.
#[cfg(Py_LIMITED_API)]
pub(crate) fn enable_vectorcall<T: Vectorcall>(_probe: &Bound<'_, T>) -> PyResult<()> {
    Ok(())
}

/// The body of the METH_O method, run inside PyO3's trampoline.
///
/// # Safety
/// Called by CPython with `slf` a `T` and `arg` a live object.
#[cfg(not(Py_LIMITED_API))]
unsafe fn meth_o_body<T: MethO>(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: the method descriptor is bound to `T`'s type, and CPython
    // checks `self` against it before calling (so `slf` is a live `T`).
    let slf = unsafe { Borrowed::from_ptr(py, slf) };
    // SAFETY: as above, `slf` is a `T`.
    let this = unsafe { slf.cast_unchecked::<T>() };
    // SAFETY: `arg` is the single argument, a live object for the call.
    let arg = unsafe { Borrowed::from_ptr(py, arg) };
    Ok(this.get().call_o(&arg)?.into_ptr())
}

#[cfg(not(Py_LIMITED_API))]
/// [`meth_o_body`] for `T` as the constant PyO3's trampoline is generic over.
struct MethODef<T>(PhantomData<T>);

#[cfg(not(Py_LIMITED_API))]
impl<T: MethO> trampoline::MethodDef<trampoline::binaryfunc::Func> for MethODef<T> {
    const METH: trampoline::binaryfunc::Func = meth_o_body::<T>;
}

/// The METH_O entry point of `T`'s method.
///
/// PyO3 gives every method with arguments METH_FASTCALL|METH_KEYWORDS and a
/// generic argument parser (a raw-method escape hatch is PyO3 #3949); METH_O
/// hands over the argument directly. Measured in one run on `Store.get`:
/// 28.8 ns per `store.get(17)` before, against 20.3 ns for
/// `cachebox.LRUCache[17]`.
///
/// # Safety
/// Only CPython calls this, as a METH_O method of `T`.
#[cfg(not(Py_LIMITED_API))]
unsafe extern "C" fn meth_o<T: MethO>(
    slf: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: forwarded unchanged; CPython calls methods attached.
    unsafe { trampoline::binaryfunc::<MethODef<T>>(slf, arg) }
}

/// Replace PyO3's descriptor of `T::METHOD_NAME` by a METH_O one (at module init).
#[cfg(not(Py_LIMITED_API))]
pub(crate) fn install_meth_o<T: MethO>(py: Python<'_>) -> PyResult<()> {
    // The method definition must outlive the type: leak one (32 bytes, once
    // per class).
    let def: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: T::METHOD_NAME.as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunction: meth_o::<T>,
        },
        ml_flags: ffi::METH_O,
        ml_doc: T::METHOD_DOC.as_ptr(),
    }));
    let tp_ptr = py.get_type::<T>().as_type_ptr();
    // SAFETY: `tp_ptr` is `T`'s fully initialized heap type and `def` lives
    // forever; the result is a new reference or NULL with an exception set.
    let descr = unsafe { ffi::PyDescr_NewMethod(tp_ptr, def) };
    // SAFETY: as above, a new reference (or NULL, turned into the error).
    let descr = unsafe { Bound::from_owned_ptr_or_err(py, descr) }?;
    // SAFETY: `tp_ptr` is a valid type object (see above).
    let dict = unsafe { (*tp_ptr).tp_dict };
    // SAFETY: the `tp_dict` of a ready type is a live dict; it takes its own
    // reference to the descriptor.
    if unsafe { ffi::PyDict_SetItemString(dict, T::METHOD_NAME.as_ptr(), descr.as_ptr()) } < 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a valid type object whose dict changed, attached.
    unsafe { ffi::PyType_Modified(tp_ptr) };
    Ok(())
}

/// Without the full C API (abi3) the method keeps PyO3's calling convention.
#[cfg(Py_LIMITED_API)]
pub(crate) fn install_meth_o<T: MethO>(_py: Python<'_>) -> PyResult<()> {
    Ok(())
}
