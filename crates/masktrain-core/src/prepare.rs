//! Batch preparation: for each image, decode, pick its mask (alpha -> its own mask file -> the
//! mask index -> the dataset's default mask -> full weight), resize both onto the chosen bucket
//! and pool the mask onto the latent grid -- in parallel, with one bad file failing only its own
//! item. The mask half is public on its own ([`prepare_mask`], [`prepare_loaded_mask_with`],
//! [`prepare_loaded_mask_frames`]) for sources this module does not decode, such as videos.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::decode::{decode_image, DEFAULT_PIXEL_LIMIT};
use crate::error::{Error, Result};
use crate::geometry::{check_aspect, choose_bucket, Source};
use crate::index::{stem_of, MaskIndex};
use crate::latent::{latent_mask_with, MaskTransform};
use crate::luma::load_mask;
use crate::plane::{Mask, Plane};
use crate::pool::pool;
use crate::resize::{resize_image_to_bucket, resize_mask_to_bucket};
use crate::temporal::{pool_mask_frames, Pooling};

#[derive(Clone, Debug)]
pub struct PrepareOptions<'a> {
    /// Candidate buckets as (width, height); each image takes the one nearest its aspect ratio.
    pub buckets: Vec<(u32, u32)>,
    /// Spatial compression of the VAE: 8 (WAN 2.1, Qwen-Image) or 16 (WAN 2.2 TI2V-5B).
    pub latent_factor: u32,
    /// Take the mask from the image's alpha channel when it has one.
    pub alpha_mask: bool,
    /// Fail an item that ends up with no mask instead of giving it full weight.
    pub require_mask: bool,
    pub mask_index: Option<&'a MaskIndex>,
    /// The dataset's `default_mask`, loaded once: the mask of items that have none of their own.
    pub default_mask: Option<LoadedMask<'a>>,
    pub pixel_limit: u64,
    /// The cache-time transform of every mask, at pixel resolution before pooling.
    pub mask_transform: MaskTransform,
    /// How each latent cell pools its mask pixels; `Area` is the original code path, bit for bit.
    pub mask_pooling: Pooling,
}

impl Default for PrepareOptions<'_> {
    fn default() -> Self {
        PrepareOptions {
            buckets: Vec::new(),
            latent_factor: 8,
            alpha_mask: false,
            require_mask: false,
            mask_index: None,
            default_mask: None,
            pixel_limit: DEFAULT_PIXEL_LIMIT,
            mask_transform: MaskTransform::IDENTITY,
            mask_pooling: Pooling::Area,
        }
    }
}

impl PrepareOptions<'_> {
    /// Masking is on when any mask source is configured; off, items carry no mask at all.
    /// (Items' own mask files turn it on for their whole batch: see [`prepare_batch`].)
    pub fn masking_enabled(&self) -> bool {
        self.alpha_mask || self.mask_index.is_some() || self.default_mask.is_some()
    }
}

/// A mask already in memory and the file it came from, which errors name.
#[derive(Clone, Copy, Debug)]
pub struct LoadedMask<'a> {
    pub path: &'a Path,
    pub mask: &'a Mask,
}

/// One image of a batch and the mask file it names itself (a JSONL `mask_path`), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchImage {
    pub path: PathBuf,
    pub mask_path: Option<PathBuf>,
}

impl From<PathBuf> for BatchImage {
    fn from(path: PathBuf) -> Self {
        BatchImage { path, mask_path: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskSource {
    Alpha,
    /// A mask file: the item's own, or its match in the mask index.
    File,
    /// The dataset's `default_mask`.
    Default,
    None,
}

impl MaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskSource::Alpha => "alpha",
            MaskSource::File => "file",
            MaskSource::Default => "default",
            MaskSource::None => "none",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PreparedItem {
    pub path: PathBuf,
    /// RGB at the bucket size.
    pub image: Plane<u8>,
    /// The mask at the bucket size, at its source's bit depth; `None` when masking is off.
    pub mask: Option<Mask>,
    /// The mask pooled onto the latent grid, weights in [0, 1]; `None` when masking is off.
    pub latent_mask: Option<Plane<f32>>,
    pub mask_source: MaskSource,
    /// The mask file for `File` and `Default`, else `None`.
    pub mask_path: Option<PathBuf>,
    pub bucket: (u32, u32),
    pub original_size: (u32, u32),
}

/// Prepare one image; masking is on when `options` configure a mask source or the image names
/// its own mask file.
pub fn prepare_item(image: &BatchImage, options: &PrepareOptions) -> Result<PreparedItem> {
    prepare_one(image, options, options.masking_enabled() || image.mask_path.is_some())
}

fn prepare_one(image: &BatchImage, options: &PrepareOptions, masking: bool) -> Result<PreparedItem> {
    if options.latent_factor == 0 {
        return Err(Error::InvalidArgument("latent_factor must be positive".into()));
    }
    let path = image.path.as_path();
    let decoded = decode_image(path, options.pixel_limit)?;
    let original_size = decoded.rgb.size();
    let bucket = choose_bucket(original_size.0, original_size.1, &options.buckets)
        .ok_or_else(|| Error::InvalidArgument("the bucket list is empty".into()))?;
    let (factor, transform, pooling) = (options.latent_factor, options.mask_transform, options.mask_pooling);
    let fit = |mask: &Mask| fit_mask(mask, bucket, factor, transform, pooling);
    // A mask file: the aspect check against this image, then the bucket and the latent grid.
    let lay = |mask: &Mask, name: &Path| {
        check_aspect(&Source::image(path, original_size), name, mask.size())?;
        fit(mask)
    };

    let (mask, mask_source, mask_path) = match (options.alpha_mask, decoded.alpha) {
        (true, Some(alpha)) => (Some(fit(&alpha)?), MaskSource::Alpha, None),
        _ => match (mask_file(image, options)?, options.default_mask) {
            (Some(mask_path), _) => {
                let mask = load_mask(&mask_path, options.pixel_limit)?;
                (Some(lay(&mask, &mask_path)?), MaskSource::File, Some(mask_path))
            }
            (None, Some(default)) => {
                let mask = lay(default.mask, default.path).map_err(as_default_mask)?;
                (Some(mask), MaskSource::Default, Some(default.path.to_path_buf()))
            }
            (None, None) if options.require_mask => {
                return Err(Error::MissingMask { path: path.to_path_buf() })
            }
            (None, None) if masking => {
                let full = Mask::Eight(Plane::filled(bucket.0, bucket.1, 1, 255));
                (Some(fit(&full)?), MaskSource::None, None)
            }
            (None, None) => (None, MaskSource::None, None),
        },
    };

    let (mask, latent_mask) = mask.map(|m| (m.mask, m.latent_mask)).unzip();
    Ok(PreparedItem {
        path: path.to_path_buf(),
        image: resize_image_to_bucket(&decoded.rgb, bucket),
        mask,
        latent_mask,
        mask_source,
        mask_path,
        bucket,
        original_size,
    })
}

/// An aspect mismatch of the default mask says so: the fix is not to resize the file.
fn as_default_mask(mut error: Error) -> Error {
    if let Error::AspectMismatch { default_mask, .. } = &mut error {
        *default_mask = true;
    }
    error
}

/// A mask laid onto a bucket: what training weighs its loss with.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedMask {
    /// The mask at the bucket size, at its source's bit depth.
    pub mask: Mask,
    /// The mask pooled onto the latent grid (bucket / latent factor), weights in [0, 1].
    pub latent_mask: Plane<f32>,
}

/// The mask half of [`prepare_item`] for a mask file: load it (luma, 16 bits kept), check its
/// aspect ratio against `source` (1%), cover-resize it onto `bucket` and pool it onto the latent
/// grid. Videos use it with their first frame's size, so images and videos share one rule.
pub fn prepare_mask(
    mask_path: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
    pixel_limit: u64,
) -> Result<PreparedMask> {
    let identity = MaskTransform::IDENTITY;
    prepare_mask_with(mask_path, source, bucket, latent_factor, identity, Pooling::Area, pixel_limit)
}

/// [`prepare_mask`] with a cache-time `transform` (per pixel, before pooling) and a `pooling`.
pub fn prepare_mask_with(
    mask_path: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
    transform: MaskTransform,
    pooling: Pooling,
    pixel_limit: u64,
) -> Result<PreparedMask> {
    // Before any I/O, so a bad call fails the same way whether or not the file exists.
    check_mask_arguments(source, bucket)?;
    check_latent_factor(latent_factor)?;
    let mask = load_mask(mask_path, pixel_limit)?;
    check_aspect(source, mask_path, mask.size())?;
    fit_mask(&mask, bucket, latent_factor, transform, pooling)
}

/// [`prepare_mask`] for a mask already in memory; `mask_name` is what errors call it.
pub fn prepare_loaded_mask(
    mask: &Mask,
    mask_name: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
) -> Result<PreparedMask> {
    let identity = MaskTransform::IDENTITY;
    prepare_loaded_mask_with(mask, mask_name, source, bucket, latent_factor, identity, Pooling::Area)
}

/// [`prepare_loaded_mask`] with a cache-time `transform` and a `pooling`, as [`prepare_mask_with`].
pub fn prepare_loaded_mask_with(
    mask: &Mask,
    mask_name: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
    transform: MaskTransform,
    pooling: Pooling,
) -> Result<PreparedMask> {
    check_mask_arguments(source, bucket)?;
    check_latent_factor(latent_factor)?;
    check_aspect(source, mask_name, mask.size())?;
    fit_mask(mask, bucket, latent_factor, transform, pooling)
}

/// The frames of a mask clip (a mask video or a folder of mask frames) laid onto `bucket`: each
/// checked against `source`'s aspect ratio and cover-resized by the mask rule (area down,
/// nearest up, bit depth kept), in parallel. [`pool_mask_frames`] then pools them per clip.
pub fn prepare_loaded_mask_frames(
    frames: &[Mask],
    mask_name: &Path,
    source: &Source,
    bucket: (u32, u32),
) -> Result<Vec<Mask>> {
    check_mask_arguments(source, bucket)?;
    for frame in frames {
        check_aspect(source, mask_name, frame.size())?;
    }
    Ok(pool().install(|| frames.par_iter().map(|frame| resize_mask_to_bucket(frame, bucket)).collect()))
}

fn check_mask_arguments(source: &Source, bucket: (u32, u32)) -> Result<()> {
    let positive = |(w, h): (u32, u32)| w > 0 && h > 0;
    if !positive(source.size) {
        return Err(Error::InvalidArgument(format!("source size must be positive, got {:?}", source.size)));
    }
    if !positive(bucket) {
        return Err(Error::InvalidArgument(format!("bucket must be positive, got {bucket:?}")));
    }
    Ok(())
}

fn check_latent_factor(latent_factor: u32) -> Result<()> {
    if latent_factor == 0 {
        return Err(Error::InvalidArgument("latent_factor must be positive".into()));
    }
    Ok(())
}

/// Resize and pool, shared by mask files, alpha channels, the default and full weight. `Area`
/// takes the original path (bit for bit, so existing caches stay valid); `Max` and `Nearest`
/// pool the one frame through the grid of [`pool_mask_frames`].
fn fit_mask(
    mask: &Mask,
    bucket: (u32, u32),
    latent_factor: u32,
    transform: MaskTransform,
    pooling: Pooling,
) -> Result<PreparedMask> {
    let mask = resize_mask_to_bucket(mask, bucket);
    let latent_mask = match pooling {
        Pooling::Area => latent_mask_with(&mask, latent_factor, transform),
        Pooling::Max | Pooling::Nearest => {
            let mut pooled =
                pool_mask_frames(std::slice::from_ref(&mask), latent_factor, 1, pooling, transform)?;
            pooled.remove(0)
        }
    };
    Ok(PreparedMask { mask, latent_mask })
}

/// The item's own mask file, else its match in the mask index.
fn mask_file(image: &BatchImage, options: &PrepareOptions) -> Result<Option<PathBuf>> {
    if let Some(own) = &image.mask_path {
        return Ok(Some(own.clone()));
    }
    match options.mask_index {
        Some(index) => Ok(index.get(&stem_of(&image.path))?.map(Path::to_path_buf)),
        None => Ok(None),
    }
}

/// Prepare many images in parallel on the fork-safe pool; results keep the input order. When
/// any image names its own mask file, masking is on for all of them (the others get the mask
/// index, the default or full weight), so one batch never mixes masked and unmasked items.
pub fn prepare_batch(images: &[BatchImage], options: &PrepareOptions) -> Vec<Result<PreparedItem>> {
    let masking = options.masking_enabled() || images.iter().any(|image| image.mask_path.is_some());
    pool().install(|| images.par_iter().map(|image| prepare_one(image, options, masking)).collect())
}
