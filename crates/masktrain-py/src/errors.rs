//! Core errors as Python exceptions: `MaskTrainError(ValueError)` and its subclasses for bad
//! input, the built-in `FileNotFoundError` / `PermissionError` / `OSError` for I/O failures.

use masktrain_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    masktrain._native,
    MaskTrainError,
    PyValueError,
    "Base class of masktrain's input errors."
);
pyo3::create_exception!(
    masktrain._native,
    ImageDecodeError,
    MaskTrainError,
    "An image file is empty, truncated or corrupt."
);
pyo3::create_exception!(
    masktrain._native,
    UnsupportedFormatError,
    MaskTrainError,
    "A file is not a PNG, JPEG, WebP or BMP image."
);
pyo3::create_exception!(
    masktrain._native,
    ImageTooLargeError,
    MaskTrainError,
    "An image has more pixels than the limit (decompression bomb guard)."
);
pyo3::create_exception!(
    masktrain._native,
    AspectMismatchError,
    MaskTrainError,
    "A mask's aspect ratio differs from its image's by more than 1%."
);
pyo3::create_exception!(
    masktrain._native,
    DuplicateMaskError,
    MaskTrainError,
    "Two mask files share one basename."
);
pyo3::create_exception!(
    masktrain._native,
    MissingMaskError,
    MaskTrainError,
    "require_mask is set and an item has no mask."
);

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
        Error::Encode { .. } => MaskTrainError::new_err(message),
        Error::InvalidArgument(_) => PyValueError::new_err(message),
    }
}

/// The exception as a value, for batch results that carry per-item failures.
pub fn to_py_exception(py: Python<'_>, error: Error) -> Py<PyAny> {
    to_py_err(error).into_value(py).into_any()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MaskTrainError", py.get_type::<MaskTrainError>())?;
    m.add("ImageDecodeError", py.get_type::<ImageDecodeError>())?;
    m.add("UnsupportedFormatError", py.get_type::<UnsupportedFormatError>())?;
    m.add("ImageTooLargeError", py.get_type::<ImageTooLargeError>())?;
    m.add("AspectMismatchError", py.get_type::<AspectMismatchError>())?;
    m.add("DuplicateMaskError", py.get_type::<DuplicateMaskError>())?;
    m.add("MissingMaskError", py.get_type::<MissingMaskError>())?;
    Ok(())
}
