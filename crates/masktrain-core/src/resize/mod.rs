//! Resizing onto a bucket. Every kernel computes only the window that survives the centre
//! crop, which is exact (each output pixel depends only on its own source footprint) and
//! saves the work the crop would throw away.

mod area;
mod lanczos;
mod nearest;

pub use area::area;
pub use lanczos::lanczos;
pub use nearest::nearest;

use crate::geometry::cover_crop;
use crate::plane::{Mask, Plane, Sample};

/// The part `[x0, x0 + width) x [y0, y0 + height)` of a resize's output that is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub x0: u32,
    pub y0: u32,
    pub width: u32,
    pub height: u32,
}

impl Window {
    pub fn full(size: (u32, u32)) -> Self {
        Window { x0: 0, y0: 0, width: size.0, height: size.1 }
    }
}

/// Image to bucket: cover scale and centre crop; INTER_AREA when shrinking, PIL's LANCZOS
/// when enlarging. An image already at the bucket size is returned unchanged.
pub fn resize_image_to_bucket(rgb: &Plane<u8>, bucket: (u32, u32)) -> Plane<u8> {
    if rgb.size() == bucket {
        return rgb.clone();
    }
    let crop = cover_crop(rgb.width, rgb.height, bucket);
    let window = Window { x0: crop.left, y0: crop.top, width: bucket.0, height: bucket.1 };
    if crop.enlarging {
        lanczos(rgb, crop.scaled, window)
    } else {
        area(rgb, crop.scaled, window)
    }
}

/// Mask to bucket, with the mask's own cover geometry: INTER_AREA when shrinking, pixel-centre
/// nearest (PIL NEAREST, OpenCV INTER_NEAREST_EXACT) when enlarging, so tiers stay crisp.
pub fn resize_mask_to_bucket(mask: &Mask, bucket: (u32, u32)) -> Mask {
    if mask.size() == bucket {
        return mask.clone();
    }
    let (w, h) = mask.size();
    let crop = cover_crop(w, h, bucket);
    let window = Window { x0: crop.left, y0: crop.top, width: bucket.0, height: bucket.1 };
    resize_mask(mask, crop.scaled, window, crop.enlarging)
}

/// Mask stretched onto exactly `size` (no crop), as `convert-alpha` puts a mask onto its image:
/// INTER_AREA when neither side grows, nearest otherwise.
pub fn resize_mask_to_size(mask: &Mask, size: (u32, u32)) -> Mask {
    if mask.size() == size {
        return mask.clone();
    }
    let (w, h) = mask.size();
    let shrinking = size.0 <= w && size.1 <= h;
    resize_mask(mask, size, Window::full(size), !shrinking)
}

fn resize_mask(mask: &Mask, out: (u32, u32), window: Window, use_nearest: bool) -> Mask {
    fn plane<T: Sample>(p: &Plane<T>, out: (u32, u32), window: Window, use_nearest: bool) -> Plane<T> {
        if use_nearest {
            nearest(p, out, window)
        } else {
            area(p, out, window)
        }
    }
    match mask {
        Mask::Eight(p) => Mask::Eight(plane(p, out, window, use_nearest)),
        Mask::Sixteen(p) => Mask::Sixteen(plane(p, out, window, use_nearest)),
    }
}
