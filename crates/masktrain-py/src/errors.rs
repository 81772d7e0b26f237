//! Core errors as Python exceptions: the `MaskTrainError(ValueError)` subclasses that
//! `masktrain.errors` defines for bad input, the built-in `FileNotFoundError` /
//! `PermissionError` / `OSError` for I/O failures. The classes are imported, not created here,
//! so Python has one class per error whether it came from Rust or from Python code.

use masktrain_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;

// Imported on first use, never at module import: `masktrain.errors` needs no extension.
pyo3::import_exception!(masktrain.errors, MaskTrainError);
pyo3::import_exception!(masktrain.errors, DataError);
pyo3::import_exception!(masktrain.errors, ImageDecodeError);
pyo3::import_exception!(masktrain.errors, UnsupportedFormatError);
pyo3::import_exception!(masktrain.errors, ImageTooLargeError);
pyo3::import_exception!(masktrain.errors, AspectMismatchError);
pyo3::import_exception!(masktrain.errors, DuplicateMaskError);
pyo3::import_exception!(masktrain.errors, MissingMaskError);

pub fn to_py_err(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::NotFound { path } => {
            PyFileNotFoundError::new_err((2, "No such file or directory", path.into_os_string()))
        }
        Error::PermissionDenied { path } => {
            PyPermissionError::new_err((13, "Permission denied", path.into_os_string()))
        }
        Error::Io { path, source } => PyOSError::new_err((
            source.raw_os_error().unwrap_or(0),
            source.to_string(),
            path.into_os_string(),
        )),
        Error::EmptyFile { .. } | Error::Decode { .. } => ImageDecodeError::new_err(message),
        Error::UnsupportedFormat { .. } => UnsupportedFormatError::new_err(message),
        Error::TooLarge { .. } => ImageTooLargeError::new_err(message),
        Error::AspectMismatch { .. } => AspectMismatchError::new_err(message),
        Error::DuplicateMask { .. } => DuplicateMaskError::new_err(message),
        Error::MissingMask { .. } => MissingMaskError::new_err(message),
        Error::FrameCount { .. } => DataError::new_err(message),
        Error::Encode { .. } => MaskTrainError::new_err(message),
        Error::InvalidArgument(_) => PyValueError::new_err(message),
    }
}

/// The exception as a value, for batch results that carry per-item failures.
pub fn to_py_exception(py: Python<'_>, error: Error) -> Py<PyAny> {
    to_py_err(error).into_value(py).into_any()
}
