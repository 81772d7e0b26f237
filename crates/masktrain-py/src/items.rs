//! The batch entry points: `MaskIndex`, `prepare_batch` -> `PreparedItem`s, `convert_alpha_batch`.
//! Per-item failures come back as exception objects in the result list, not raised.

use std::path::PathBuf;
use std::sync::Arc;

use masktrain_core::convert::{self, ConvertJob};
use masktrain_core::decode::DEFAULT_PIXEL_LIMIT;
use masktrain_core::index::MaskIndex as CoreMaskIndex;
use masktrain_core::luma::load_mask;
use masktrain_core::prepare::{self, BatchImage, LoadedMask, PrepareOptions};
use pyo3::prelude::*;

use crate::arrays::{check_size, plane_to_py};
use crate::errors::{to_py_err, to_py_exception};

/// Mask files of a directory by basename (stem); extensions matched case-insensitively.
#[pyclass(frozen, module = "masktrain._native")]
pub struct MaskIndex {
    inner: Arc<CoreMaskIndex>,
    /// The directory the index lists.
    #[pyo3(get)]
    directory: PathBuf,
}

#[pymethods]
impl MaskIndex {
    #[new]
    fn new(py: Python<'_>, directory: PathBuf) -> PyResult<Self> {
        let dir = directory.clone();
        let inner = py.detach(move || CoreMaskIndex::build(&dir)).map_err(to_py_err)?;
        Ok(MaskIndex { inner: Arc::new(inner), directory })
    }

    /// The mask path for `stem`, or None; raises DuplicateMaskError naming both files.
    fn get(&self, stem: &str) -> PyResult<Option<PathBuf>> {
        Ok(self.inner.get(stem).map_err(to_py_err)?.map(|p| p.to_path_buf()))
    }

    /// Stems held by two files: `[(stem, first, second), ...]`, sorted.
    #[getter]
    fn duplicates(&self) -> Vec<(String, PathBuf, PathBuf)> {
        self.inner.duplicates()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!("MaskIndex({:?}, {} masks)", self.directory, self.inner.len())
    }
}

/// One prepared image: arrays at the bucket size and the mask on the latent grid.
#[pyclass(frozen, module = "masktrain._native")]
pub struct PreparedItem {
    /// The image file.
    #[pyo3(get)]
    path: PathBuf,
    /// (H, W, 3) uint8 RGB at the bucket size.
    #[pyo3(get)]
    image: Py<PyAny>,
    /// (H, W) uint8 mask at the bucket size, or None when masking is off.
    #[pyo3(get)]
    mask: Option<Py<PyAny>>,
    /// (h, w) float32 weights in [0, 1] on the latent grid, or None when masking is off.
    #[pyo3(get)]
    latent_mask: Option<Py<PyAny>>,
    /// "alpha", "file" (the item's own mask file or its mask-index match), "default" (the
    /// dataset's default_mask) or "none".
    #[pyo3(get)]
    mask_source: &'static str,
    /// The mask file when `mask_source` is "file" or "default", else None.
    #[pyo3(get)]
    mask_path: Option<PathBuf>,
    /// (width, height).
    #[pyo3(get)]
    bucket: (u32, u32),
    /// (width, height) of the decoded, upright image.
    #[pyo3(get)]
    original_size: (u32, u32),
    /// 8 or 16: the bit depth of the mask's source (16-bit masks keep their precision).
    #[pyo3(get)]
    mask_bit_depth: u8,
}

#[pymethods]
impl PreparedItem {
    fn __repr__(&self) -> String {
        format!("PreparedItem({:?}, bucket={:?}, mask_source={:?})", self.path, self.bucket, self.mask_source)
    }
}

fn to_item(py: Python<'_>, item: prepare::PreparedItem) -> PreparedItem {
    let mask_bit_depth = if item.mask.as_ref().is_some_and(|m| m.is_sixteen_bit()) { 16 } else { 8 };
    PreparedItem {
        path: item.path,
        image: plane_to_py(py, item.image),
        mask: item.mask.map(|m| plane_to_py(py, m.to_u8())),
        latent_mask: item.latent_mask.map(|l| plane_to_py(py, l)),
        mask_source: item.mask_source.as_str(),
        mask_path: item.mask_path,
        bucket: item.bucket,
        original_size: item.original_size,
        mask_bit_depth,
    }
}

/// Prepare images in parallel. Returns one entry per path, in order: a PreparedItem, or the
/// exception (a `masktrain.errors.MaskTrainError` subclass or OSError) that item failed with.
/// Each item's mask: its alpha (with `alpha_mask`), else `mask_paths[i]` (its own file), else its
/// `mask_index` match, else `default_mask` (loaded once; a failure to load it is raised), else the
/// `require_mask` error or full weight. `mask_pooling` is "area", "max" or "nearest".
#[pyfunction]
#[pyo3(signature = (paths, buckets, *, mask_index = None, alpha_mask = false, require_mask = false,
                    latent_factor = 8, pixel_limit = DEFAULT_PIXEL_LIMIT, cache_mask_gamma = 1.0,
                    cache_mask_min_weight = 0.0, mask_paths = None, default_mask = None,
                    mask_pooling = "area"))]
#[allow(clippy::too_many_arguments)]
fn prepare_batch(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    buckets: Vec<(u32, u32)>,
    mask_index: Option<&Bound<'_, MaskIndex>>,
    alpha_mask: bool,
    require_mask: bool,
    latent_factor: u32,
    pixel_limit: u64,
    cache_mask_gamma: f32,
    cache_mask_min_weight: f32,
    mask_paths: Option<Vec<Option<PathBuf>>>,
    default_mask: Option<PathBuf>,
    mask_pooling: &str,
) -> PyResult<Vec<Py<PyAny>>> {
    let mask_transform = crate::mask_transform(cache_mask_gamma, cache_mask_min_weight)?;
    let mask_pooling = crate::pooling(mask_pooling)?;
    let mask_paths = mask_paths.unwrap_or_else(|| vec![None; paths.len()]);
    if mask_paths.len() != paths.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "mask_paths has {} entries for {} paths; give one per path (None for no mask file)",
            mask_paths.len(),
            paths.len()
        )));
    }
    let images: Vec<BatchImage> =
        paths.into_iter().zip(mask_paths).map(|(path, mask_path)| BatchImage { path, mask_path }).collect();
    if buckets.is_empty() {
        return Err(pyo3::exceptions::PyValueError::new_err("buckets must not be empty"));
    }
    for &b in &buckets {
        check_size("bucket", b)?;
    }
    if latent_factor == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err("latent_factor must be positive"));
    }
    let index = mask_index.map(|i| Arc::clone(&i.get().inner));
    let results = py
        .detach(move || {
            let default = default_mask
                .map(|path| load_mask(&path, pixel_limit).map(|mask| (path, mask)))
                .transpose()?;
            let options = PrepareOptions {
                buckets,
                latent_factor,
                alpha_mask,
                require_mask,
                mask_index: index.as_deref(),
                default_mask: default.as_ref().map(|(path, mask)| LoadedMask { path, mask }),
                pixel_limit,
                mask_transform,
                mask_pooling,
            };
            Ok(prepare::prepare_batch(&images, &options))
        })
        .map_err(to_py_err)?;
    results
        .into_iter()
        .map(|r| match r {
            Ok(item) => Ok(Py::new(py, to_item(py, item))?.into_any()),
            Err(e) => Ok(to_py_exception(py, e)),
        })
        .collect()
}

/// `(image, mask, output, caption_source, caption_target)` as Python passes it.
type PyConvertJob = (PathBuf, PathBuf, PathBuf, Option<PathBuf>, Option<PathBuf>);

/// Merge (image, mask) pairs into RGBA PNGs in parallel. Each job is
/// `(image, mask, output, caption_source or None, caption_target or None)`. Returns one entry
/// per job: None on success, or the exception it failed with.
#[pyfunction]
#[pyo3(signature = (jobs, *, pixel_limit = DEFAULT_PIXEL_LIMIT))]
fn convert_alpha_batch(py: Python<'_>, jobs: Vec<PyConvertJob>, pixel_limit: u64) -> Vec<Option<Py<PyAny>>> {
    let jobs: Vec<ConvertJob> = jobs
        .into_iter()
        .map(|(image, mask, output, caption_source, caption_target)| ConvertJob {
            image,
            mask,
            output,
            caption: caption_source.zip(caption_target),
        })
        .collect();
    let results = py.detach(move || convert::convert_batch(&jobs, pixel_limit));
    results.into_iter().map(|r| r.err().map(|e| to_py_exception(py, e))).collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MaskIndex>()?;
    m.add_class::<PreparedItem>()?;
    m.add_function(wrap_pyfunction!(prepare_batch, m)?)?;
    m.add_function(wrap_pyfunction!(convert_alpha_batch, m)?)?;
    Ok(())
}
