//! The one conversion from core errors to Python exceptions.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;

use crate::error::CoreError;

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::Value { .. } => PyValueError::new_err(e.to_string()),
            CoreError::Type { .. } => PyTypeError::new_err(e.to_string()),
        }
    }
}
