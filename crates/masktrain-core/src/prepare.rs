//! Batch preparation: for each image, decode, pick its mask (alpha -> mask file -> full weight),
//! resize both onto the chosen bucket and pool the mask onto the latent grid -- in parallel,
//! with one bad file failing only its own item.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::decode::{decode_image, DEFAULT_PIXEL_LIMIT};
use crate::error::{Error, Result};
use crate::geometry::{check_aspect, choose_bucket};
use crate::index::{stem_of, MaskIndex};
use crate::latent::latent_mask;
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

    let (mask, mask_source, mask_path) = match (options.alpha_mask, decoded.alpha) {
        (true, Some(alpha)) => (Some(alpha), MaskSource::Alpha, None),
        _ => match mask_file(path, options)? {
            Some(mask_path) => {
                let mask = load_mask(&mask_path, options.pixel_limit)?;
                check_aspect(path, original_size, &mask_path, mask.size())?;
                (Some(mask), MaskSource::File, Some(mask_path))
            }
            None if options.require_mask => return Err(Error::MissingMask { path: path.to_path_buf() }),
            None => (None, MaskSource::None, None),
        },
    };

    let image = resize_image_to_bucket(&decoded.rgb, bucket);
    let mask = match mask {
        Some(mask) => Some(resize_mask_to_bucket(&mask, bucket)),
        None if options.masking_enabled() => Some(Mask::Eight(Plane::filled(bucket.0, bucket.1, 1, 255))),
        None => None,
    };
    let latent_mask = mask.as_ref().map(|m| latent_mask(m, options.latent_factor));
    Ok(PreparedItem {
        path: path.to_path_buf(),
        image,
        mask,
        latent_mask,
        mask_source,
        mask_path,
        bucket,
        original_size,
    })
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
