//! Decoding: PNG, JPEG, WebP and BMP through the `image` crate, upright (EXIF orientation
//! applied), guarded by a pixel limit, with every failure mapped to a typed error naming the file.

use std::io::Cursor;
use std::path::Path;

use image::error::{ImageError, LimitErrorKind};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::error::{Error, Result};
use crate::plane::{Mask, Plane};

/// PIL's `Image.MAX_IMAGE_PIXELS`: past this many pixels a file is treated as a decompression bomb.
pub const DEFAULT_PIXEL_LIMIT: u64 = 178_956_970;

/// Decode the file at `path` into an upright `DynamicImage`.
pub fn decode(path: &Path, pixel_limit: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::EmptyFile { path: path.to_path_buf() });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::UnsupportedFormat { path: path.to_path_buf() });
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16-bit RGBA plus decoder scratch space.
    limits.max_alloc = Some(pixel_limit.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);

    let mut decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > pixel_limit {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit: pixel_limit,
        });
    }
    // A broken EXIF block must not make a good image unreadable: treat it as "upright".
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, e))?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn decode_error(path: &Path, error: ImageError) -> Error {
    let path = path.to_path_buf();
    match error {
        ImageError::Unsupported(_) => Error::UnsupportedFormat { path },
        ImageError::Limits(ref limit) if matches!(limit.kind(), LimitErrorKind::InsufficientMemory) => {
            Error::Decode { path, reason: "image needs more memory than the pixel limit allows".into() }
        }
        ImageError::IoError(e) => Error::Decode { path, reason: e.to_string() },
        other => Error::Decode { path, reason: other.to_string() },
    }
}

/// An image split into exact RGB (never composited) and its alpha channel, if it has one.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub rgb: Plane<u8>,
    pub alpha: Option<Mask>,
}

/// Decode an image for training: RGB as 8-bit, alpha from every mode that carries it
/// (RGBA, LA, palette + tRNS, 16-bit) at its native depth.
pub fn decode_image(path: &Path, pixel_limit: u64) -> Result<DecodedImage> {
    Ok(split_rgb_alpha(decode(path, pixel_limit)?))
}

pub fn split_rgb_alpha(image: DynamicImage) -> DecodedImage {
    let (width, height) = (image.width(), image.height());
    let alpha = match &image {
        DynamicImage::ImageLumaA8(p) => Some(Mask::Eight(channel_u8(p.as_raw(), 2, 1, width, height))),
        DynamicImage::ImageRgba8(p) => Some(Mask::Eight(channel_u8(p.as_raw(), 4, 3, width, height))),
        DynamicImage::ImageLumaA16(p) => Some(Mask::Sixteen(channel_u16(p.as_raw(), 2, 1, width, height))),
        DynamicImage::ImageRgba16(p) => Some(Mask::Sixteen(channel_u16(p.as_raw(), 4, 3, width, height))),
        DynamicImage::ImageRgba32F(p) => Some(Mask::Sixteen(Plane::new(
            width,
            height,
            1,
            p.as_raw().chunks_exact(4).map(|px| (px[3].clamp(0.0, 1.0) * 65535.0).round() as u16).collect(),
        ))),
        _ => None,
    };
    let rgb = match image {
        DynamicImage::ImageRgb8(p) => p.into_raw(),
        // The image crate drops alpha in colour conversion; it never composites.
        other => other.to_rgb8().into_raw(),
    };
    DecodedImage { rgb: Plane::new(width, height, 3, rgb), alpha }
}

fn channel_u8(raw: &[u8], stride: usize, index: usize, width: u32, height: u32) -> Plane<u8> {
    Plane::new(width, height, 1, raw.chunks_exact(stride).map(|px| px[index]).collect())
}

fn channel_u16(raw: &[u16], stride: usize, index: usize, width: u32, height: u32) -> Plane<u16> {
    Plane::new(width, height, 1, raw.chunks_exact(stride).map(|px| px[index]).collect())
}
