//! Conversions between core planes and numpy arrays. Outputs move their buffer into numpy
//! without a copy; inputs are copied once into an owned plane so the GIL can be released.

use masktrain_core::{Mask, Plane};
use numpy::ndarray::{Array2, Array3, Axis};
use numpy::{Element, IntoPyArray, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// (H, W) for one channel, (H, W, C) otherwise.
pub fn plane_to_py<T: Element>(py: Python<'_>, plane: Plane<T>) -> Py<PyAny> {
    let (w, h, c) = (plane.width as usize, plane.height as usize, plane.channels);
    if c == 1 {
        Array2::from_shape_vec((h, w), plane.data).expect("plane shape").into_pyarray(py).into_any().unbind()
    } else {
        Array3::from_shape_vec((h, w, c), plane.data)
            .expect("plane shape")
            .into_pyarray(py)
            .into_any()
            .unbind()
    }
}

pub fn mask_to_py(py: Python<'_>, mask: Mask) -> Py<PyAny> {
    match mask {
        Mask::Eight(p) => plane_to_py(py, p),
        Mask::Sixteen(p) => plane_to_py(py, p),
    }
}

fn plane2<T: Element + Copy>(array: PyReadonlyArray2<'_, T>) -> Plane<T> {
    let shape = array.shape();
    let (h, w) = (shape[0], shape[1]);
    let data: Vec<T> = array.as_array().iter().copied().collect();
    Plane::new(w as u32, h as u32, 1, data)
}

/// An (H, W, 3) uint8 RGB array.
pub fn rgb_from_py(array: PyReadonlyArray3<'_, u8>) -> PyResult<Plane<u8>> {
    let shape = array.shape();
    if shape[2] != 3 {
        return Err(PyValueError::new_err(format!(
            "expected an (H, W, 3) uint8 RGB array, got shape {shape:?}"
        )));
    }
    let data: Vec<u8> = array.as_array().iter().copied().collect();
    Ok(Plane::new(shape[1] as u32, shape[0] as u32, 3, data))
}

/// An (H, W) uint8 or uint16 mask array.
pub fn mask_from_py(array: &Bound<'_, PyAny>) -> PyResult<Mask> {
    if let Ok(a) = array.extract::<PyReadonlyArray2<'_, u8>>() {
        return Ok(Mask::Eight(plane2(a)));
    }
    if let Ok(a) = array.extract::<PyReadonlyArray2<'_, u16>>() {
        return Ok(Mask::Sixteen(plane2(a)));
    }
    Err(PyValueError::new_err("expected an (H, W) uint8 or uint16 mask array"))
}

/// An (H, W) float32 array.
pub fn f32_plane_from_py(array: PyReadonlyArray2<'_, f32>) -> Plane<f32> {
    plane2(array)
}

/// An (N, H, W) array as N one-channel planes.
fn planes3<T: Element + Copy>(array: PyReadonlyArray3<'_, T>) -> Vec<Plane<T>> {
    let array = array.as_array();
    let (h, w) = (array.shape()[1] as u32, array.shape()[2] as u32);
    array.axis_iter(Axis(0)).map(|frame| Plane::new(w, h, 1, frame.iter().copied().collect())).collect()
}

/// Mask frames to pool: float32 weights as they are, or 8/16-bit masks that the core turns into
/// weights one group of frames at a time.
pub enum PoolFrames {
    Unit(Vec<Plane<f32>>),
    Masks(Vec<Mask>),
}

/// An (N, H, W) float32, uint8 or uint16 array of mask frames.
pub fn pool_frames_from_py(array: &Bound<'_, PyAny>) -> PyResult<PoolFrames> {
    if let Ok(a) = array.extract::<PyReadonlyArray3<'_, f32>>() {
        return Ok(PoolFrames::Unit(planes3(a)));
    }
    match mask_frames_from_py(array) {
        Ok((masks, _)) => Ok(PoolFrames::Masks(masks)),
        Err(_) => Err(PyValueError::new_err("expected (N, H, W) float32, uint8 or uint16 mask frames")),
    }
}

/// An (N, H, W) uint8 or uint16 array of mask frames, and whether it is uint16.
pub fn mask_frames_from_py(array: &Bound<'_, PyAny>) -> PyResult<(Vec<Mask>, bool)> {
    if let Ok(a) = array.extract::<PyReadonlyArray3<'_, u8>>() {
        return Ok((planes3(a).into_iter().map(Mask::Eight).collect(), false));
    }
    if let Ok(a) = array.extract::<PyReadonlyArray3<'_, u16>>() {
        return Ok((planes3(a).into_iter().map(Mask::Sixteen).collect(), true));
    }
    Err(PyValueError::new_err("expected (N, H, W) uint8 or uint16 mask frames"))
}

/// Mask frames of one size `(width, height)` as an (N, H, W) uint16 array when `sixteen`, else uint8.
pub fn mask_frames_to_py(py: Python<'_>, frames: Vec<Mask>, size: (u32, u32), sixteen: bool) -> Py<PyAny> {
    let shape = (frames.len(), size.1 as usize, size.0 as usize);
    if sixteen {
        let data = frames.iter().flat_map(|m| m.to_u16().data).collect();
        Array3::<u16>::from_shape_vec(shape, data).expect("frames shape").into_pyarray(py).into_any().unbind()
    } else {
        let data = frames.iter().flat_map(|m| m.to_u8().data).collect();
        Array3::<u8>::from_shape_vec(shape, data).expect("frames shape").into_pyarray(py).into_any().unbind()
    }
}

/// One-channel planes of one size as an (N, H, W) array.
pub fn frames_to_py<T: Element>(py: Python<'_>, frames: Vec<Plane<T>>) -> Py<PyAny> {
    let (w, h) = frames.first().map_or((0, 0), |p| (p.width as usize, p.height as usize));
    let n = frames.len();
    let data: Vec<T> = frames.into_iter().flat_map(|p| p.data).collect();
    Array3::from_shape_vec((n, h, w), data).expect("frames shape").into_pyarray(py).into_any().unbind()
}

pub fn check_size(name: &str, size: (u32, u32)) -> PyResult<(u32, u32)> {
    if size.0 == 0 || size.1 == 0 {
        return Err(PyValueError::new_err(format!("{name} must be positive, got {size:?}")));
    }
    Ok(size)
}
