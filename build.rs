//! Emits PyO3's interpreter cfgs (`Py_GIL_DISABLED`, `Py_LIMITED_API`) for the
//! bindings; the pure cores need nothing.

fn main() {
    #[cfg(feature = "python")]
    pyo3_build_config::use_pyo3_cfgs();
}
