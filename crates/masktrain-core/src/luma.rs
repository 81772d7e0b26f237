//! Mask files: gray as is, colour through Rec.601 luma with exactly PIL's `convert("L")`
//! integer arithmetic, 16-bit kept at 16 bits.

use std::path::Path;

use image::DynamicImage;

use crate::decode::decode;
use crate::error::Result;
use crate::plane::{Mask, Plane};

/// PIL's `L24` macro (Convert.c): `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
#[inline]
pub fn luma601_u8(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// The same weights on 16-bit samples, so 16-bit colour masks keep their precision.
#[inline]
pub fn luma601_u16(r: u16, g: u16, b: u16) -> u16 {
    ((r as u64 * 19595 + g as u64 * 38470 + b as u64 * 7471 + 0x8000) >> 16) as u16
}

/// Load a mask file as a one-channel mask. Any alpha channel of the mask file is ignored,
/// as PIL's `convert("L")` ignores it.
pub fn load_mask(path: &Path, pixel_limit: u64) -> Result<Mask> {
    Ok(mask_from_image(decode(path, pixel_limit)?))
}

pub fn mask_from_image(image: DynamicImage) -> Mask {
    let (w, h) = (image.width(), image.height());
    match image {
        DynamicImage::ImageLuma8(p) => Mask::Eight(Plane::new(w, h, 1, p.into_raw())),
        DynamicImage::ImageLumaA8(p) => {
            Mask::Eight(Plane::new(w, h, 1, p.as_raw().chunks_exact(2).map(|px| px[0]).collect()))
        }
        DynamicImage::ImageRgb8(p) => Mask::Eight(Plane::new(
            w,
            h,
            1,
            p.as_raw().chunks_exact(3).map(|px| luma601_u8(px[0], px[1], px[2])).collect(),
        )),
        DynamicImage::ImageRgba8(p) => Mask::Eight(Plane::new(
            w,
            h,
            1,
            p.as_raw().chunks_exact(4).map(|px| luma601_u8(px[0], px[1], px[2])).collect(),
        )),
        DynamicImage::ImageLuma16(p) => Mask::Sixteen(Plane::new(w, h, 1, p.into_raw())),
        DynamicImage::ImageLumaA16(p) => {
            Mask::Sixteen(Plane::new(w, h, 1, p.as_raw().chunks_exact(2).map(|px| px[0]).collect()))
        }
        DynamicImage::ImageRgb16(p) => Mask::Sixteen(Plane::new(
            w,
            h,
            1,
            p.as_raw().chunks_exact(3).map(|px| luma601_u16(px[0], px[1], px[2])).collect(),
        )),
        DynamicImage::ImageRgba16(p) => Mask::Sixteen(Plane::new(
            w,
            h,
            1,
            p.as_raw().chunks_exact(4).map(|px| luma601_u16(px[0], px[1], px[2])).collect(),
        )),
        other => {
            let rgb = other.to_rgb16();
            Mask::Sixteen(Plane::new(
                w,
                h,
                1,
                rgb.as_raw().chunks_exact(3).map(|px| luma601_u16(px[0], px[1], px[2])).collect(),
            ))
        }
    }
}
