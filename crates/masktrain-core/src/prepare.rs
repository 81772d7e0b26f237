//! Batch preparation: for each image, decode, pick its mask (alpha -> mask file -> full weight),
//! resize both onto the chosen bucket and pool the mask onto the latent grid -- in parallel,
//! with one bad file failing only its own item. The mask half is public on its own
//! ([`prepare_mask`]) for sources this module does not decode, such as videos.

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
    pub pixel_limit: u64,
    /// The cache-time transform of every mask, at pixel resolution before pooling.
    pub mask_transform: MaskTransform,
}

impl Default for PrepareOptions<'_> {
    fn default() -> Self {
        PrepareOptions {
            buckets: Vec::new(),
            latent_factor: 8,
            alpha_mask: false,
            require_mask: false,
            mask_index: None,
            pixel_limit: DEFAULT_PIXEL_LIMIT,
            mask_transform: MaskTransform::IDENTITY,
        }
    }
}

impl PrepareOptions<'_> {
    /// Masking is on when any mask source is configured; off, items carry no mask at all.
    pub fn masking_enabled(&self) -> bool {
        self.alpha_mask || self.mask_index.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskSource {
    Alpha,
    File,
    None,
}

impl MaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskSource::Alpha => "alpha",
            MaskSource::File => "file",
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
    pub mask_path: Option<PathBuf>,
    pub bucket: (u32, u32),
    pub original_size: (u32, u32),
}

pub fn prepare_item(path: &Path, options: &PrepareOptions) -> Result<PreparedItem> {
    if options.latent_factor == 0 {
        return Err(Error::InvalidArgument("latent_factor must be positive".into()));
    }
    let decoded = decode_image(path, options.pixel_limit)?;
    let original_size = decoded.rgb.size();
    let bucket = choose_bucket(original_size.0, original_size.1, &options.buckets)
        .ok_or_else(|| Error::InvalidArgument("the bucket list is empty".into()))?;
    let factor = options.latent_factor;
    let transform = options.mask_transform;

    let (mask, mask_source, mask_path) = match (options.alpha_mask, decoded.alpha) {
        (true, Some(alpha)) => (Some(fit_mask(&alpha, bucket, factor, transform)), MaskSource::Alpha, None),
        _ => match mask_file(path, options)? {
            Some(mask_path) => {
                let source = Source::image(path, original_size);
                let mask =
                    prepare_mask_with(&mask_path, &source, bucket, factor, transform, options.pixel_limit)?;
                (Some(mask), MaskSource::File, Some(mask_path))
            }
            None if options.require_mask => return Err(Error::MissingMask { path: path.to_path_buf() }),
            None if options.masking_enabled() => {
                let full = Mask::Eight(Plane::filled(bucket.0, bucket.1, 1, 255));
                (Some(fit_mask(&full, bucket, factor, transform)), MaskSource::None, None)
            }
            None => (None, MaskSource::None, None),
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
    prepare_mask_with(mask_path, source, bucket, latent_factor, MaskTransform::IDENTITY, pixel_limit)
}

/// [`prepare_mask`] with a cache-time `transform` on the latent weights (before pooling).
pub fn prepare_mask_with(
    mask_path: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
    transform: MaskTransform,
    pixel_limit: u64,
) -> Result<PreparedMask> {
    // Before any I/O, so a bad call fails the same way whether or not the file exists.
    check_mask_arguments(source, bucket, latent_factor)?;
    let mask = load_mask(mask_path, pixel_limit)?;
    conform_mask(&mask, mask_path, source, bucket, latent_factor, transform)
}

/// [`prepare_mask`] for a mask already in memory; `mask_name` is what errors call it.
pub fn prepare_loaded_mask(
    mask: &Mask,
    mask_name: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
) -> Result<PreparedMask> {
    check_mask_arguments(source, bucket, latent_factor)?;
    conform_mask(mask, mask_name, source, bucket, latent_factor, MaskTransform::IDENTITY)
}

fn check_mask_arguments(source: &Source, bucket: (u32, u32), latent_factor: u32) -> Result<()> {
    let positive = |(w, h): (u32, u32)| w > 0 && h > 0;
    if !positive(source.size) {
        return Err(Error::InvalidArgument(format!("source size must be positive, got {:?}", source.size)));
    }
    if !positive(bucket) {
        return Err(Error::InvalidArgument(format!("bucket must be positive, got {bucket:?}")));
    }
    if latent_factor == 0 {
        return Err(Error::InvalidArgument("latent_factor must be positive".into()));
    }
    Ok(())
}

fn conform_mask(
    mask: &Mask,
    mask_name: &Path,
    source: &Source,
    bucket: (u32, u32),
    latent_factor: u32,
    transform: MaskTransform,
) -> Result<PreparedMask> {
    check_aspect(source, mask_name, mask.size())?;
    Ok(fit_mask(mask, bucket, latent_factor, transform))
}

/// Resize and pool, shared by mask files, alpha channels and the full-weight default.
fn fit_mask(mask: &Mask, bucket: (u32, u32), latent_factor: u32, transform: MaskTransform) -> PreparedMask {
    let mask = resize_mask_to_bucket(mask, bucket);
    let latent_mask = latent_mask_with(&mask, latent_factor, transform);
    PreparedMask { mask, latent_mask }
}

fn mask_file(image: &Path, options: &PrepareOptions) -> Result<Option<PathBuf>> {
    match options.mask_index {
        Some(index) => Ok(index.get(&stem_of(image))?.map(Path::to_path_buf)),
        None => Ok(None),
    }
}

/// Prepare many images in parallel on the fork-safe pool; results keep the input order.
pub fn prepare_batch(paths: &[PathBuf], options: &PrepareOptions) -> Vec<Result<PreparedItem>> {
    pool().install(|| paths.par_iter().map(|p| prepare_item(p, options)).collect())
}
