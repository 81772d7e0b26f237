//! Bucket geometry: which bucket an image goes to, the cover scale and centre crop that put it
//! there, and the aspect check that keeps a mask from silently sliding off its image or video.

use std::path::Path;

use crate::error::{Error, Result};
use crate::media::Media;

/// One over the largest relative aspect-ratio difference (1%) between an image and its mask
/// that is still "the same aspect" (rounding when a mask was saved at another size).
pub const ASPECT_TOLERANCE_INVERSE: u64 = 100;

/// musubi-tuner's rule: the bucket whose aspect ratio is nearest the image's; ties keep the first.
pub fn choose_bucket(width: u32, height: u32, buckets: &[(u32, u32)]) -> Option<(u32, u32)> {
    let aspect = width as f64 / height as f64;
    let mut best: Option<((u32, u32), f64)> = None;
    for &(bw, bh) in buckets {
        let error = (bw as f64 / bh as f64 - aspect).abs();
        if best.is_none_or(|(_, e)| error < e) {
            best = Some(((bw, bh), error));
        }
    }
    best.map(|(b, _)| b)
}

/// Where a `width x height` source lands on a bucket: scaled to `scaled` (cover: both sides at
/// least the bucket's), then the window `left, top, bucket` is cut out of the middle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoverCrop {
    pub scaled: (u32, u32),
    pub left: u32,
    pub top: u32,
    pub bucket: (u32, u32),
    /// True when the scale is above 1 (enlarging).
    pub enlarging: bool,
}

/// Cover scale `s = max(bw/w, bh/h)`, new size `int(w*s + 0.5)`, centre crop
/// `left = (new_w - bw) // 2` -- the reference's arithmetic, in f64 like Python's floats.
pub fn cover_crop(width: u32, height: u32, bucket: (u32, u32)) -> CoverCrop {
    let (bw, bh) = bucket;
    let scale = f64::max(bw as f64 / width as f64, bh as f64 / height as f64);
    let scaled_w = ((width as f64 * scale + 0.5) as u32).max(bw);
    let scaled_h = ((height as f64 * scale + 0.5) as u32).max(bh);
    CoverCrop {
        scaled: (scaled_w, scaled_h),
        left: (scaled_w - bw) / 2,
        top: (scaled_h - bh) / 2,
        bucket,
        enlarging: scale > 1.0,
    }
}

/// What a mask is checked against and laid onto: an image, or a video (its first frame).
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub media: Media,
    /// The file, named in errors; `None` when the caller knows only the size.
    pub path: Option<&'a Path>,
    /// (width, height) of the upright source.
    pub size: (u32, u32),
}

impl<'a> Source<'a> {
    pub fn image(path: &'a Path, size: (u32, u32)) -> Self {
        Source { media: Media::Image, path: Some(path), size }
    }
}

/// Whether `other` has the aspect ratio of `reference` (both (width, height)): the two differ
/// by at most 1% of `reference`'s aspect. The one aspect rule: `cache` applies it to an image and
/// its mask, `masks apply-instance` to a weighted mask and its instance mask.
pub fn same_aspect(reference: (u32, u32), other: (u32, u32)) -> bool {
    // |rw/rh - ow/oh| / (rw/rh) <= 1%, in integers so that exactly 1% passes.
    let cross_reference = reference.0 as u64 * other.1 as u64;
    let cross_other = other.0 as u64 * reference.1 as u64;
    cross_reference.abs_diff(cross_other) * ASPECT_TOLERANCE_INVERSE <= cross_reference
}

/// An error when the mask's aspect ratio differs from its source's by more than 1% (relative).
pub fn check_aspect(source: &Source, mask: &Path, mask_size: (u32, u32)) -> Result<()> {
    if same_aspect(source.size, mask_size) {
        return Ok(());
    }
    let (source_w, source_h) = source.size;
    Err(Error::AspectMismatch {
        media: source.media,
        source_path: source.path.map(Path::to_path_buf),
        mask: mask.to_path_buf(),
        source_w,
        source_h,
        mask_w: mask_size.0,
        mask_h: mask_size.1,
        source_aspect: source_w as f64 / source_h as f64,
        mask_aspect: mask_size.0 as f64 / mask_size.1 as f64,
        default_mask: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_aspect_wins_and_ties_keep_the_first() {
        let buckets = [(512, 512), (640, 384), (384, 640)];
        assert_eq!(choose_bucket(1000, 1000, &buckets), Some((512, 512)));
        assert_eq!(choose_bucket(1600, 900, &buckets), Some((640, 384)));
        assert_eq!(choose_bucket(900, 1600, &buckets), Some((384, 640)));
        assert_eq!(choose_bucket(10, 10, &[(64, 64), (64, 64)]), Some((64, 64)));
        assert_eq!(choose_bucket(10, 10, &[]), None);
    }

    #[test]
    fn cover_crop_matches_hand_computed_geometry() {
        // 1000x600 onto 512x512: s = 512/600, new = (853, 512), left = 170.
        let c = cover_crop(1000, 600, (512, 512));
        assert_eq!(c.scaled, (853, 512));
        assert_eq!((c.left, c.top), (170, 0));
        assert!(!c.enlarging);
        // 100x50 onto 256x256: s = 5.12, new = (512, 256).
        let c = cover_crop(100, 50, (256, 256));
        assert_eq!(c.scaled, (512, 256));
        assert_eq!((c.left, c.top), (128, 0));
        assert!(c.enlarging);
    }

    #[test]
    fn aspect_check_allows_one_percent() {
        let p = Path::new("i.png");
        let m = Path::new("m.png");
        let check = |size, mask_size| check_aspect(&Source::image(p, size), m, mask_size);
        assert!(check((1000, 500), (500, 250)).is_ok());
        assert!(check((1000, 500), (1000, 504)).is_ok());
        assert!(check((100, 50), (99, 50)).is_ok(), "exactly 1% passes");
        assert!(check((1000, 500), (989, 500)).is_err(), "1.1% fails");
        let err = check((1000, 500), (1000, 600)).unwrap_err().to_string();
        assert_eq!(
            err,
            "m.png: aspect ratio mismatch: image i.png is 1000x500 (aspect 2.0000), mask is 1000x600 \
             (aspect 1.6667); the mask would be misaligned, fix its size"
        );
    }

    #[test]
    fn same_aspect_is_relative_to_the_reference_on_tall_and_wide_photos() {
        // 2:3 and 3:2: 1% of the reference's aspect passes, one pixel more does not.
        assert!(same_aspect((400, 600), (404, 600)));
        assert!(!same_aspect((400, 600), (405, 600)));
        assert!(same_aspect((600, 400), (606, 400)));
        assert!(!same_aspect((600, 400), (607, 400)));
        assert!(same_aspect((600, 400), (300, 200)), "another size, the same aspect");
    }

    #[test]
    fn aspect_error_names_the_media() {
        let m = Path::new("clip.png");
        let video = Source { media: Media::Video, path: Some(Path::new("v/clip.mp4")), size: (96, 48) };
        let err = check_aspect(&video, m, (48, 48)).unwrap_err().to_string();
        assert!(
            err.starts_with("clip.png: aspect ratio mismatch: video v/clip.mp4 is 96x48 (aspect 2.0000)"),
            "{err}"
        );
        let unnamed = Source { path: None, ..video };
        let err = check_aspect(&unnamed, m, (48, 48)).unwrap_err().to_string();
        assert!(err.starts_with("clip.png: aspect ratio mismatch: video is 96x48"), "{err}");
    }
}
