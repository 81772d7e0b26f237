//! Decoding: PNG, JPEG, WebP and BMP through the `image` crate, upright (EXIF orientation
//! applied), guarded by a pixel limit, with every failure mapped to a typed error naming the file.

use std::io::Cursor;
use std::path::Path;

use image::error::{ImageError, LimitErrorKind};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};
use crate::jpeg_end::jpeg_is_complete;
use crate::plane::{Mask, Plane};

/// PIL's `Image.MAX_IMAGE_PIXELS`: past this many pixels a file is treated as a decompression bomb.
pub const DEFAULT_PIXEL_LIMIT: u64 = 178_956_970;

/// Decode the file at `path` into an upright `DynamicImage`.
pub fn decode(path: &Path, pixel_limit: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::EmptyFile { path: path.to_path_buf() });
    }
    if image::guess_format(&bytes).ok() == Some(ImageFormat::Jpeg) && !jpeg_is_complete(&bytes) {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            reason: "JPEG data ends before its end-of-image marker".into(),
        });
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::io(path, e))?;
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
        return Err(Error::TooLarge { path: path.to_path_buf(), width, height, pixels, limit: pixel_limit });
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
    let (rgb, alpha) = match image {
        DynamicImage::ImageRgb8(p) => (p.into_raw(), None),
        DynamicImage::ImageRgba8(p) => {
            // One pass: this runs on every RGBA training image.
            let raw = p.as_raw();
            let mut rgb = Vec::with_capacity(raw.len() / 4 * 3);
            let mut alpha = Vec::with_capacity(raw.len() / 4);
            for px in raw.chunks_exact(4) {
                rgb.extend_from_slice(&px[..3]);
                alpha.push(px[3]);
            }
            (rgb, Some(Mask::Eight(Plane::new(width, height, 1, alpha))))
        }
        DynamicImage::ImageLumaA8(ref p) => {
            let alpha = channel_u8(p.as_raw(), 2, 1, width, height);
            (image.to_rgb8().into_raw(), Some(Mask::Eight(alpha)))
        }
        DynamicImage::ImageLumaA16(ref p) => {
            let alpha = channel_u16(p.as_raw(), 2, 1, width, height);
            (image.to_rgb8().into_raw(), Some(Mask::Sixteen(alpha)))
        }
        DynamicImage::ImageRgba16(ref p) => {
            let alpha = channel_u16(p.as_raw(), 4, 3, width, height);
            (image.to_rgb8().into_raw(), Some(Mask::Sixteen(alpha)))
        }
        DynamicImage::ImageRgba32F(ref p) => {
            let alpha = p.as_raw().chunks_exact(4).map(|px| (px[3].clamp(0.0, 1.0) * 65535.0).round() as u16);
            let alpha = Plane::new(width, height, 1, alpha.collect());
            (image.to_rgb8().into_raw(), Some(Mask::Sixteen(alpha)))
        }
        // The image crate drops alpha in colour conversion; it never composites.
        other => (other.to_rgb8().into_raw(), None),
    };
    DecodedImage { rgb: Plane::new(width, height, 3, rgb), alpha }
}

fn channel_u8(raw: &[u8], stride: usize, index: usize, width: u32, height: u32) -> Plane<u8> {
    Plane::new(width, height, 1, raw.chunks_exact(stride).map(|px| px[index]).collect())
}

fn channel_u16(raw: &[u16], stride: usize, index: usize, width: u32, height: u32) -> Plane<u16> {
    Plane::new(width, height, 1, raw.chunks_exact(stride).map(|px| px[index]).collect())
}
