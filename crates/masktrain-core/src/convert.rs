//! `convert-alpha`'s per-item job: an image and its mask file become one RGBA PNG with the
//! image's exact RGB (never composited) and the mask as alpha, written atomically.

use std::path::PathBuf;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageBuffer, Rgba};
use rayon::prelude::*;

use crate::atomic::{copy_atomic, write_atomic};
use crate::decode::decode;
use crate::error::{Error, Result};
use crate::geometry::{check_aspect, Source};
use crate::luma::load_mask;
use crate::pool::pool;
use crate::resize::resize_mask_to_size;

#[derive(Clone, Debug)]
pub struct ConvertJob {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub output: PathBuf,
    /// A caption file to copy beside the output: (source, destination).
    pub caption: Option<(PathBuf, PathBuf)>,
}

fn is_sixteen_bit(image: &DynamicImage) -> bool {
    matches!(
        image,
        DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
            | DynamicImage::ImageRgb16(_)
            | DynamicImage::ImageRgba16(_)
    )
}

/// Merge one image and its mask. The PNG is 16-bit when the image or the mask is, so neither
/// loses precision; otherwise 8-bit. A same-aspect mask of another size is scaled onto the image.
pub fn convert_one(job: &ConvertJob, pixel_limit: u64) -> Result<()> {
    let image = decode(&job.image, pixel_limit)?;
    let mask = load_mask(&job.mask, pixel_limit)?;
    let size = (image.width(), image.height());
    check_aspect(&Source::image(&job.image, size), &job.mask, mask.size())?;
    let mask = resize_mask_to_size(&mask, size);

    let rgba = if is_sixteen_bit(&image) || mask.is_sixteen_bit() {
        let data = interleave(image.to_rgb16().as_raw(), &mask.to_u16().data);
        DynamicImage::ImageRgba16(
            ImageBuffer::<Rgba<u16>, Vec<u16>>::from_raw(size.0, size.1, data).expect("rgba16 size"),
        )
    } else {
        let data = interleave(image.to_rgb8().as_raw(), &mask.to_u8().data);
        DynamicImage::ImageRgba8(
            ImageBuffer::<Rgba<u8>, Vec<u8>>::from_raw(size.0, size.1, data).expect("rgba8 size"),
        )
    };

    let mut bytes = Vec::new();
    let encoder = PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, FilterType::Adaptive);
    rgba.write_with_encoder(encoder)
        .map_err(|e| Error::Encode { path: job.output.clone(), reason: e.to_string() })?;
    write_atomic(&job.output, &bytes)?;
    if let Some((source, target)) = &job.caption {
        copy_atomic(source, target)?;
    }
    Ok(())
}

/// RGB samples and one alpha plane into RGBA.
fn interleave<T: Copy>(rgb: &[T], alpha: &[T]) -> Vec<T> {
    rgb.chunks_exact(3).zip(alpha).flat_map(|(c, &a)| [c[0], c[1], c[2], a]).collect()
}

/// Convert many items in parallel; results keep the input order.
pub fn convert_batch(jobs: &[ConvertJob], pixel_limit: u64) -> Vec<Result<()>> {
    pool().install(|| jobs.par_iter().map(|job| convert_one(job, pixel_limit)).collect())
}
