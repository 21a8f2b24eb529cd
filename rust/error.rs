//! The one error type of the pure cores.
//!
//! Every message names the offending parameter and the accepted range, so the
//! binding can raise it as is (`ValueError` or `TypeError`, see `py/error.rs`).

use std::fmt;

/// A validation error from a core constructor or method.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// A value out of its accepted range (becomes `ValueError`).
    Value {
        /// The parameter's name as the user spells it.
        param: &'static str,
        /// What is accepted, e.g. "a finite number > 0".
        expected: &'static str,
        /// The rejected value, rendered.
        got: String,
    },
    /// A value of the wrong kind (becomes `TypeError`).
    Type {
        /// The parameter's name as the user spells it.
        param: &'static str,
        /// What is accepted.
        expected: &'static str,
        /// The rejected value's type or rendering.
        got: String,
    },
}

impl CoreError {
    /// A `Value` error for `param`.
    pub fn value(param: &'static str, expected: &'static str, got: impl fmt::Display) -> Self {
        CoreError::Value {
            param,
            expected,
            got: got.to_string(),
        }
    }

    /// A `Type` error for `param`.
    pub fn type_(param: &'static str, expected: &'static str, got: impl fmt::Display) -> Self {
        CoreError::Type {
            param,
            expected,
            got: got.to_string(),
        }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Value {
                param,
                expected,
                got,
            }
            | CoreError::Type {
                param,
                expected,
                got,
            } => write!(f, "{param} must be {expected}, got {got}"),
        }
    }
}

impl std::error::Error for CoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_parameter_and_range() {
        let e = CoreError::value("rate", "a finite number > 0", -1.0);
        assert_eq!(e.to_string(), "rate must be a finite number > 0, got -1");
    }
}
