//! `masktrain._native`: thin bindings over masktrain-core. Each function extracts its arguments,
//! releases the GIL while the core works, and converts the result. No algorithm lives here.

mod arrays;
mod errors;
mod items;

use std::path::PathBuf;

use masktrain_core::geometry::Source;
use masktrain_core::media::Media;
use masktrain_core::temporal::Pooling;
use masktrain_core::{decode, geometry, index, latent, luma, pool, prepare, resize, temporal, Error};
use numpy::PyReadonlyArray2;
use numpy::PyReadonlyArray3;
use pyo3::prelude::*;

use arrays::{
    check_size, f32_plane_from_py, frames_to_py, mask_frames_from_py, mask_frames_to_py, mask_from_py,
    mask_to_py, plane_to_py, pool_frames_from_py, rgb_from_py, PoolFrames,
};
use errors::to_py_err;

/// The cache-time mask transform of `cache_mask_gamma` (> 0) and `cache_mask_min_weight` ([0, 1)).
fn mask_transform(gamma: f32, min_weight: f32) -> PyResult<latent::MaskTransform> {
    if !(gamma > 0.0 && gamma.is_finite()) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "cache_mask_gamma must be > 0, got {gamma}"
        )));
    }
    if !(0.0..1.0).contains(&min_weight) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "cache_mask_min_weight must be in [0, 1), got {min_weight}"
        )));
    }
    Ok(latent::MaskTransform { gamma, min_weight })
}

/// `mask_pooling` / `mode`: "area", "max" or "nearest" (a ValueError naming the three otherwise).
fn pooling(name: &str) -> PyResult<Pooling> {
    name.parse().map_err(to_py_err)
}

/// Decode an image: `(rgb, alpha)`, rgb (H, W, 3) uint8 exact (never composited), alpha (H, W)
/// uint8 or uint16 (16-bit sources), or None when the image has no alpha. EXIF orientation applied.
#[pyfunction]
#[pyo3(signature = (path, *, pixel_limit = decode::DEFAULT_PIXEL_LIMIT))]
fn decode_image(py: Python<'_>, path: PathBuf, pixel_limit: u64) -> PyResult<(Py<PyAny>, Option<Py<PyAny>>)> {
    let decoded = py.detach(move || decode::decode_image(&path, pixel_limit)).map_err(to_py_err)?;
    Ok((plane_to_py(py, decoded.rgb), decoded.alpha.map(|a| mask_to_py(py, a))))
}

/// Load a mask file upright (EXIF orientation applied) as (H, W) uint8, or uint16 for 16-bit
/// files; colour through PIL's Rec.601 luma, any alpha channel ignored.
#[pyfunction]
#[pyo3(signature = (path, *, pixel_limit = decode::DEFAULT_PIXEL_LIMIT))]
fn load_mask(py: Python<'_>, path: PathBuf, pixel_limit: u64) -> PyResult<Py<PyAny>> {
    let mask = py.detach(move || luma::load_mask(&path, pixel_limit)).map_err(to_py_err)?;
    Ok(mask_to_py(py, mask))
}

/// A mask file laid onto `bucket` for a source of `image_size` (both (width, height)):
/// `(mask, latent_mask)`, the (H, W) uint8/uint16 mask at the bucket size and its (h, w) float32
/// weights on the latent grid, exactly as `prepare_batch` prepares a mask file. An aspect
/// mismatch names the mask and `media` ("image" or "video"), then `source` when given.
/// `mask_pooling` is how each latent cell pools its pixels ("area", "max" or "nearest").
#[pyfunction]
#[pyo3(signature = (mask_path, image_size, bucket, latent_factor = 8, *, source = None, media = "image",
                    pixel_limit = decode::DEFAULT_PIXEL_LIMIT, cache_mask_gamma = 1.0,
                    cache_mask_min_weight = 0.0, mask_pooling = "area"))]
#[allow(clippy::too_many_arguments)]
fn prepare_mask(
    py: Python<'_>,
    mask_path: PathBuf,
    image_size: (u32, u32),
    bucket: (u32, u32),
    latent_factor: u32,
    source: Option<PathBuf>,
    media: &str,
    pixel_limit: u64,
    cache_mask_gamma: f32,
    cache_mask_min_weight: f32,
    mask_pooling: &str,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let media: Media = media.parse().map_err(|e| to_py_err(Error::from(e)))?;
    let transform = mask_transform(cache_mask_gamma, cache_mask_min_weight)?;
    let pooling = pooling(mask_pooling)?;
    let prepared = py
        .detach(move || {
            let source = Source { media, path: source.as_deref(), size: image_size };
            let limit = pixel_limit;
            prepare::prepare_mask_with(&mask_path, &source, bucket, latent_factor, transform, pooling, limit)
        })
        .map_err(to_py_err)?;
    Ok((mask_to_py(py, prepared.mask), plane_to_py(py, prepared.latent_mask)))
}

/// `prepare_mask` for an (H, W) uint8/uint16 mask already in memory (a video's still mask,
/// decoded by Python): `(mask at the bucket size in the input's dtype, (h, w) float32 weights)`.
/// `mask_name` is what an aspect mismatch calls the mask, against `source_size` = (width, height)
/// of `media` ("video" or "image") and `source` when given.
#[pyfunction]
#[pyo3(signature = (mask, mask_name, source_size, bucket, latent_factor = 8, *, source = None,
                    media = "video", cache_mask_gamma = 1.0, cache_mask_min_weight = 0.0,
                    mask_pooling = "area"))]
#[allow(clippy::too_many_arguments)]
fn prepare_loaded_mask(
    py: Python<'_>,
    mask: &Bound<'_, PyAny>,
    mask_name: PathBuf,
    source_size: (u32, u32),
    bucket: (u32, u32),
    latent_factor: u32,
    source: Option<PathBuf>,
    media: &str,
    cache_mask_gamma: f32,
    cache_mask_min_weight: f32,
    mask_pooling: &str,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let mask = mask_from_py(mask)?;
    let media: Media = media.parse().map_err(|e| to_py_err(Error::from(e)))?;
    let transform = mask_transform(cache_mask_gamma, cache_mask_min_weight)?;
    let pooling = pooling(mask_pooling)?;
    let prepared = py
        .detach(move || {
            let source = Source { media, path: source.as_deref(), size: source_size };
            prepare::prepare_loaded_mask_with(
                &mask,
                &mask_name,
                &source,
                bucket,
                latent_factor,
                transform,
                pooling,
            )
        })
        .map_err(to_py_err)?;
    Ok((mask_to_py(py, prepared.mask), plane_to_py(py, prepared.latent_mask)))
}

/// (N, H, W) uint8/uint16 mask frames (a mask video or a folder of mask frames) laid onto
/// `bucket` = (width, height): (N, Hb, Wb) in the input's dtype, each frame aspect-checked
/// against `source_size` and cover-resized by the mask rule (area down, nearest up), in
/// parallel. `pool_mask_frames` then pools each clip's frames onto the latent grid.
#[pyfunction]
#[pyo3(signature = (frames, mask_name, source_size, bucket, *, source = None, media = "video"))]
fn prepare_loaded_mask_frames(
    py: Python<'_>,
    frames: &Bound<'_, PyAny>,
    mask_name: PathBuf,
    source_size: (u32, u32),
    bucket: (u32, u32),
    source: Option<PathBuf>,
    media: &str,
) -> PyResult<Py<PyAny>> {
    let (frames, sixteen) = mask_frames_from_py(frames)?;
    let media: Media = media.parse().map_err(|e| to_py_err(Error::from(e)))?;
    let out = py
        .detach(move || {
            let source = Source { media, path: source.as_deref(), size: source_size };
            prepare::prepare_loaded_mask_frames(&frames, &mask_name, &source, bucket)
        })
        .map_err(to_py_err)?;
    Ok(mask_frames_to_py(py, out, bucket, sixteen))
}

/// Cover-scale and centre-crop an (H, W, 3) uint8 image onto `bucket` = (width, height).
#[pyfunction]
fn resize_image_to_bucket(
    py: Python<'_>,
    rgb: PyReadonlyArray3<'_, u8>,
    bucket: (u32, u32),
) -> PyResult<Py<PyAny>> {
    let rgb = rgb_from_py(rgb)?;
    let bucket = check_size("bucket", bucket)?;
    let out = py.detach(move || resize::resize_image_to_bucket(&rgb, bucket));
    Ok(plane_to_py(py, out))
}

/// Cover-scale and centre-crop an (H, W) uint8/uint16 mask onto `bucket` = (width, height).
#[pyfunction]
fn resize_mask_to_bucket(py: Python<'_>, mask: &Bound<'_, PyAny>, bucket: (u32, u32)) -> PyResult<Py<PyAny>> {
    let mask = mask_from_py(mask)?;
    let bucket = check_size("bucket", bucket)?;
    let out = py.detach(move || resize::resize_mask_to_bucket(&mask, bucket));
    Ok(mask_to_py(py, out))
}

/// Stretch an (H, W) mask onto exactly `size` = (width, height), as convert-alpha does.
#[pyfunction]
fn resize_mask_to_size(py: Python<'_>, mask: &Bound<'_, PyAny>, size: (u32, u32)) -> PyResult<Py<PyAny>> {
    let mask = mask_from_py(mask)?;
    let size = check_size("size", size)?;
    let out = py.detach(move || resize::resize_mask_to_size(&mask, size));
    Ok(mask_to_py(py, out))
}

/// `torch.nn.functional.interpolate(x[None, None], size=size, mode="area")[0, 0]` for an
/// (H, W) float32 array; `size` = (height, width) as in torch.
#[pyfunction]
fn area_downsample(
    py: Python<'_>,
    values: PyReadonlyArray2<'_, f32>,
    size: (u32, u32),
) -> PyResult<Py<PyAny>> {
    let plane = f32_plane_from_py(values);
    let (h, w) = check_size("size", size)?;
    let out = py.detach(move || latent::area_downsample(&plane, (w, h)));
    Ok(plane_to_py(py, out))
}

/// Pool (N, H, W) mask frames at the bucket size onto the latent grid as the causal video VAE
/// groups frames: (F, H / spatial_factor, W / spatial_factor) float32 with
/// F = 1 + (N - 1) / temporal_factor; latent frame 0 <- frame 0, latent frame k <- frames
/// t(k-1)+1 ..= tk. Frames are float32 weights, or uint8 / uint16 masks (v / 255, v / 65535).
/// Each pixel first goes through the cache-time transform (`cache_mask_gamma`,
/// `cache_mask_min_weight`), then `mode` pools each cell: "area" (the exact mean), "max" or
/// "nearest". N must be 1 + temporal_factor * m (a DataError names the counts otherwise).
#[pyfunction]
#[pyo3(signature = (frames, spatial_factor, temporal_factor, mode, *, cache_mask_gamma = 1.0,
                    cache_mask_min_weight = 0.0))]
fn pool_mask_frames(
    py: Python<'_>,
    frames: &Bound<'_, PyAny>,
    spatial_factor: u32,
    temporal_factor: u32,
    mode: &str,
    cache_mask_gamma: f32,
    cache_mask_min_weight: f32,
) -> PyResult<Py<PyAny>> {
    let mode = pooling(mode)?;
    let transform = mask_transform(cache_mask_gamma, cache_mask_min_weight)?;
    let frames = pool_frames_from_py(frames)?;
    let out = py
        .detach(move || match &frames {
            PoolFrames::Unit(f) => {
                temporal::pool_mask_frames(f, spatial_factor, temporal_factor, mode, transform)
            }
            PoolFrames::Masks(f) => {
                temporal::pool_mask_frames(f, spatial_factor, temporal_factor, mode, transform)
            }
        })
        .map_err(to_py_err)?;
    Ok(frames_to_py(py, out))
}

/// The bucket (width, height) nearest the image's aspect ratio.
#[pyfunction]
fn choose_bucket(width: u32, height: u32, buckets: Vec<(u32, u32)>) -> PyResult<(u32, u32)> {
    geometry::choose_bucket(width, height, &buckets)
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("the bucket list is empty"))
}

/// Whether `other` has the aspect ratio of `reference` (both (width, height)): within 1% of
/// `reference`'s aspect, the rule `cache` applies to an image (`reference`) and its mask.
#[pyfunction]
fn same_aspect(reference: (u32, u32), other: (u32, u32)) -> PyResult<bool> {
    Ok(geometry::same_aspect(check_size("reference", reference)?, check_size("other", other)?))
}

/// Image files directly inside `directory`, sorted (extensions matched case-insensitively).
#[pyfunction]
fn list_images(py: Python<'_>, directory: PathBuf) -> PyResult<Vec<PathBuf>> {
    py.detach(move || index::list_images(&directory)).map_err(to_py_err)
}

/// Number of threads batch functions use (`MASKTRAIN_NUM_THREADS` or one per core).
#[pyfunction]
fn thread_count() -> usize {
    pool::thread_count()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_PIXEL_LIMIT", decode::DEFAULT_PIXEL_LIMIT)?;
    m.add("IMAGE_EXTENSIONS", index::IMAGE_EXTENSIONS.to_vec())?;
    m.add("TEMP_SUFFIX", masktrain_core::atomic::TEMP_SUFFIX)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(load_mask, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_mask, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_loaded_mask, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_loaded_mask_frames, m)?)?;
    m.add_function(wrap_pyfunction!(resize_image_to_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(resize_mask_to_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(resize_mask_to_size, m)?)?;
    m.add_function(wrap_pyfunction!(area_downsample, m)?)?;
    m.add_function(wrap_pyfunction!(pool_mask_frames, m)?)?;
    m.add_function(wrap_pyfunction!(choose_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(same_aspect, m)?)?;
    m.add_function(wrap_pyfunction!(list_images, m)?)?;
    m.add_function(wrap_pyfunction!(thread_count, m)?)?;
    items::register(m)?;
    Ok(())
}
