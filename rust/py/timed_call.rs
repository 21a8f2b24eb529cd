//! `TimedCall`: the native first call of `@opero(timeout=...)`.
//!
//! The deadline of a call needs the time it started, and the first attempt's
//! own duration counts toward it; but a success must cost (almost) nothing.
//! A Python wrapper reading a clock pays a builtin call (60-100 ns, as much as
//! the whole retry wrapper); this class reads the coarse clock in Rust (a few
//! ns), calls the function with the arguments it received (vectorcall,
//! unchanged), and only when the function raises an `Exception` calls
//! `on_fail(exc, start, *args, **kwargs)`, whose result it returns. A
//! `BaseException` that is not an `Exception` (`KeyboardInterrupt`,
//! `SystemExit`...) propagates untouched.
//!
//! With a circuit breaker, the breaker's `Gate` (see `gate.rs`) says whether a
//! call must ask the breaker (open, half-open, failures counted, shared in
//! Redis): then the call goes to `slow` (the generated wrapper, which does it
//! all); while the gate is clear, a call costs one more atomic load.

use pyo3::exceptions::PyException;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::cached_call::CallArgs;
use super::fastcall::{self, Vectorcall};
use super::gate::PyGate;
use crate::error::CoreError;

/// The first call of a function decorated with ``timeout=``.
///
/// Calling it reads a coarse monotonic clock, then calls ``func`` with the
/// same arguments and returns its result. If ``func`` raises an
/// ``Exception``, it returns ``on_fail(exc, start, *args, **kwargs)``
/// instead (``start`` is the clock reading in seconds). Other
/// ``BaseException`` subclasses propagate.
///
/// With ``gate``, a call made while the gate is set returns
/// ``slow(*args, **kwargs)`` instead (no clock read, no ``on_fail``).
///
/// Instances have a ``__dict__``, bind as methods through ``__get__`` and
/// pickle by reference (``__reduce__`` returns ``__qualname__``).
///
/// Args:
///     func: The function to call.
///     on_fail: Called as ``on_fail(exc, start, *args, **kwargs)`` after an
///         ``Exception``.
///     gate: A ``Gate``; while it is set, calls go to ``slow``.
///     slow: The callable taking the calls while ``gate`` is set (required
///         with ``gate``).
#[pyclass(
    frozen,
    dict,
    weakref,
    module = "opero._opero_core",
    name = "TimedCall"
)]
#[repr(C)]
pub struct PyTimedCall {
    /// Always `Some` once constructed (an `Option` for the GC; see `CachedCall`).
    func: Option<Py<PyAny>>,
    /// As `func`.
    on_fail: Option<Py<PyAny>>,
    /// `Some` with `slow`: while set, calls go to `slow`.
    gate: Option<Py<PyGate>>,
    /// The callable taking the calls while `gate` is set.
    slow: Option<Py<PyAny>>,
    /// The vectorcall entry point CPython reads at `tp_vectorcall_offset`.
    vectorcall: Option<ffi::vectorcallfunc>,
}

static METHOD_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn not_ready() -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(
        "this TimedCall is still being constructed (reached through the garbage collector)",
    )
}

impl PyTimedCall {
    #[inline]
    fn call(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        let func = self.func.as_ref().ok_or_else(not_ready)?;
        if let Some(gate) = &self.gate {
            if gate.get().is_set() {
                return self.slow(py, args);
            }
        }
        let start = crate::clock::coarse();
        match args.call(py, func) {
            Ok(value) => Ok(value),
            Err(err) => self.failed(py, args, err, start),
        }
    }

    /// The gated path (the breaker must be asked), out of line.
    #[cold]
    #[inline(never)]
    fn slow(&self, py: Python<'_>, args: &CallArgs<'_, '_>) -> PyResult<Py<PyAny>> {
        let slow = self.slow.as_ref().ok_or_else(not_ready)?;
        args.call(py, slow)
    }

    /// The failure path, out of line: the success path's frame stays small (each
    /// level of a recursive decorated function costs C stack).
    #[cold]
    #[inline(never)]
    fn failed(
        &self,
        py: Python<'_>,
        args: &CallArgs<'_, '_>,
        err: PyErr,
        start: f64,
    ) -> PyResult<Py<PyAny>> {
        if !err.is_instance_of::<PyException>(py) {
            return Err(err);
        }
        let on_fail = self.on_fail.as_ref().ok_or_else(not_ready)?;
        let exc = err.into_value(py).into_any();
        let start = PyFloat::new(py, start).into_any().unbind();
        args.call_prepended(py, on_fail, &[exc, start])
    }
}

#[pymethods]
impl PyTimedCall {
    #[new]
    #[pyo3(signature = (func, on_fail, *, gate = None, slow = None))]
    fn new(
        func: &Bound<'_, PyAny>,
        on_fail: &Bound<'_, PyAny>,
        gate: Option<&Bound<'_, PyGate>>,
        slow: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let slow = match (gate, slow) {
            (None, None) => None,
            (Some(_), Some(s)) => Some(s),
            (Some(_), None) => {
                return Err(CoreError::type_("slow", "a callable (gate= needs slow=)", "NoneType").into())
            }
            (None, Some(_)) => {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "TimedCall(slow=...) needs gate=: slow only takes the calls made while the gate is set",
                ))
            }
        };
        let checked = [
            ("func", Some(func)),
            ("on_fail", Some(on_fail)),
            ("slow", slow),
        ];
        for (name, f) in checked.into_iter().filter_map(|(n, f)| f.map(|f| (n, f))) {
            if !f.is_callable() {
                return Err(CoreError::type_(
                    name,
                    "a callable",
                    f.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                )
                .into());
            }
        }
        Ok(Self {
            func: Some(func.clone().unbind()),
            on_fail: Some(on_fail.clone().unbind()),
            gate: gate.map(|g| g.clone().unbind()),
            slow: slow.map(|s| s.clone().unbind()),
            vectorcall: fastcall::entry_point::<Self>(),
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
            Err(_) => slf
                .get()
                .func
                .as_ref()
                .ok_or_else(not_ready)?
                .bind(py)
                .getattr("__qualname__")?,
        };
        Ok(name.cast_into::<PyString>()?.into_any().unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let func = self.func.as_ref().ok_or_else(not_ready)?;
        Ok(format!("<opero TimedCall of {}>", func.bind(py).repr()?))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // Fields may still be all-zero (`None`) here: see `CachedCall::__traverse__`.
        visit.call(&self.func)?;
        visit.call(&self.on_fail)?;
        visit.call(&self.gate)?;
        visit.call(&self.slow)?;
        Ok(())
    }

    /// The wrapped function.
    #[getter]
    fn func(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.func.as_ref().ok_or_else(not_ready)?.clone_ref(py))
    }
}

impl Vectorcall for PyTimedCall {
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

/// Turn on vectorcall for `TimedCall` (at module init), as for `CachedCall`.
pub(crate) fn enable_vectorcall(py: Python<'_>) -> PyResult<()> {
    let len = py.import("builtins")?.getattr("len")?;
    let probe = Bound::new(py, PyTimedCall::new(&len, &len, None, None)?)?;
    fastcall::enable_vectorcall(&probe)
}
