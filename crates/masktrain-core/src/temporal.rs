//! Mask frames pooled onto the latent grid in space and time, the way the causal video VAEs
//! (WAN 2.1 / 2.2, TI2V-5B) group frames: latent frame 0 <- pixel frame 0, latent frame k <-
//! pixel frames t(k-1)+1 ..= tk. An image is the case of one frame and t = 1.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::latent::{area_downsample, end_index, start_index, MaskTransform};
use crate::plane::{Mask, Plane};
use crate::pool::pool;

/// How one spatio-temporal cell of mask pixels becomes one latent weight (`--mask_pooling`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooling {
    /// The exact mean: torch's area pool per frame, then the mean over the cell's frames.
    #[default]
    Area,
    /// The brightest pixel, so a subject smaller than a cell keeps its full weight.
    Max,
    /// The pixel at index floor(n/2) along each axis of the cell (pixel 4 of 8, frame 2 of 4).
    Nearest,
}

impl Pooling {
    pub const ALL: [Pooling; 3] = [Pooling::Area, Pooling::Max, Pooling::Nearest];

    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Area => "area",
            Pooling::Max => "max",
            Pooling::Nearest => "nearest",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pooling {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Pooling::ALL.into_iter().find(|mode| mode.as_str() == name).ok_or_else(|| {
            Error::InvalidArgument(format!("mask pooling must be area, max or nearest, got '{name}'"))
        })
    }
}

/// The latent frames a clip of `frames` pixel frames encodes to: `1 + (frames - 1) / t`, or the
/// error naming the count when `frames` is not `1 + t*m`.
pub fn latent_frame_count(frames: usize, temporal_factor: u32) -> Result<usize> {
    if temporal_factor == 0 {
        return Err(Error::InvalidArgument("temporal_factor must be positive".into()));
    }
    let t = temporal_factor as usize;
    if frames == 0 || !(frames - 1).is_multiple_of(t) {
        return Err(Error::FrameCount { frames, temporal_factor });
    }
    Ok(1 + (frames - 1) / t)
}

/// The pixel frames latent frame `k` is made of, for a `t`-frame grouping.
pub fn frame_group(k: usize, t: usize) -> Range<usize> {
    if k == 0 {
        0..1
    } else {
        t * (k - 1) + 1..t * k + 1
    }
}

/// A mask frame that gives its weights in [0, 1] as f32: a unit plane as it is, an 8- or
/// 16-bit mask through [`Mask::to_unit_f32`], so a clip stays at its bit depth until its own
/// group of frames is pooled.
pub trait UnitFrame: Sync {
    /// (width, height, channels).
    fn shape(&self) -> (u32, u32, usize);
    fn to_unit(&self) -> Cow<'_, Plane<f32>>;
}

impl UnitFrame for Plane<f32> {
    fn shape(&self) -> (u32, u32, usize) {
        (self.width, self.height, self.channels)
    }

    fn to_unit(&self) -> Cow<'_, Plane<f32>> {
        Cow::Borrowed(self)
    }
}

impl UnitFrame for Mask {
    fn shape(&self) -> (u32, u32, usize) {
        let (width, height) = self.size();
        let channels = match self {
            Mask::Eight(p) => p.channels,
            Mask::Sixteen(p) => p.channels,
        };
        (width, height, channels)
    }

    fn to_unit(&self) -> Cow<'_, Plane<f32>> {
        Cow::Owned(self.to_unit_f32())
    }
}

/// Pool `frames` (one channel, all at the bucket size) onto `1 + (N - 1) / temporal_factor`
/// latent frames of `(W / spatial_factor, H / spatial_factor)` (at least 1x1), each pixel first
/// mapped through the cache-time `transform` as [`crate::latent::latent_mask_with`] does. The
/// spatial windows are torch's adaptive-pool windows, so with one frame `Area` equals
/// `latent_mask_with` bit for bit, and identical frames pool to that same plane in every mode.
pub fn pool_mask_frames<F: UnitFrame>(
    frames: &[F],
    spatial_factor: u32,
    temporal_factor: u32,
    mode: Pooling,
    transform: MaskTransform,
) -> Result<Vec<Plane<f32>>> {
    if spatial_factor == 0 {
        return Err(Error::InvalidArgument("spatial_factor must be positive".into()));
    }
    let count = latent_frame_count(frames.len(), temporal_factor)?;
    let (width, height, _) = frames[0].shape();
    if let Some((i, (w, h, c))) =
        frames.iter().map(F::shape).enumerate().find(|&(_, (w, h, c))| (w, h) != (width, height) || c != 1)
    {
        return Err(Error::InvalidArgument(format!(
            "mask frame {i} is {w}x{h} with {c} channel(s); frame 0 is {width}x{height} with one"
        )));
    }
    if width == 0 || height == 0 {
        return Err(Error::InvalidArgument(format!("mask frames must not be empty, got {width}x{height}")));
    }
    let out = ((width / spatial_factor).max(1), (height / spatial_factor).max(1));
    let grid = Grid { cols: windows(out.0, width), rows: windows(out.1, height) };
    let t = temporal_factor as usize;
    let pooled = pool().install(|| {
        (0..count)
            .into_par_iter()
            .map(|k| {
                let group = &frames[frame_group(k, t)];
                let units = || group.iter().map(|frame| transformed(frame, transform));
                match mode {
                    Pooling::Area => area_group(units(), out),
                    Pooling::Max => grid.max(units()),
                    Pooling::Nearest => grid.nearest(&transformed(&group[group.len() / 2], transform)),
                }
            })
            .collect()
    });
    Ok(pooled)
}

/// The frame's unit plane with `transform` applied to each pixel (a unit plane is borrowed as it
/// is for the identity).
fn transformed<F: UnitFrame>(frame: &F, transform: MaskTransform) -> Cow<'_, Plane<f32>> {
    let unit = frame.to_unit();
    if transform.is_identity() {
        return unit;
    }
    let mut unit = unit.into_owned();
    transform.apply_to(&mut unit);
    Cow::Owned(unit)
}

/// torch's `[start, end)` windows of `out` cells over `input` pixels along one axis.
fn windows(out: u32, input: u32) -> Vec<(usize, usize)> {
    let (out, input) = (out as u64, input as u64);
    (0..out).map(|i| (start_index(i, out, input), end_index(i, out, input))).collect()
}

/// The mean of the frames' area pools, summed in f64: the mean of identical planes is that
/// plane exactly, so a still mask gives the same weights however many frames repeat it.
fn area_group<'a>(group: impl Iterator<Item = Cow<'a, Plane<f32>>>, out: (u32, u32)) -> Plane<f32> {
    let mut sums = vec![0f64; out.0 as usize * out.1 as usize];
    let mut n = 0usize;
    for frame in group {
        for (sum, &v) in sums.iter_mut().zip(&area_downsample(&frame, out).data) {
            *sum += v as f64;
        }
        n += 1;
    }
    let n = n as f64;
    Plane::new(out.0, out.1, 1, sums.into_iter().map(|s| (s / n) as f32).collect())
}

/// The cells of the latent grid as pixel windows: `cols` along x, `rows` along y.
struct Grid {
    cols: Vec<(usize, usize)>,
    rows: Vec<(usize, usize)>,
}

impl Grid {
    fn max<'a>(&self, group: impl Iterator<Item = Cow<'a, Plane<f32>>>) -> Plane<f32> {
        let width = self.cols.len();
        let mut data = vec![f32::NEG_INFINITY; width * self.rows.len()];
        for frame in group {
            for (out_row, &(r0, r1)) in data.chunks_mut(width).zip(&self.rows) {
                for r in r0..r1 {
                    let row = frame.row(r);
                    for (cell, &(c0, c1)) in out_row.iter_mut().zip(&self.cols) {
                        *cell = row[c0..c1].iter().fold(*cell, |m, &v| m.max(v));
                    }
                }
            }
        }
        Plane::new(width as u32, self.rows.len() as u32, 1, data)
    }

    fn nearest(&self, frame: &Plane<f32>) -> Plane<f32> {
        let middle = |&(start, end): &(usize, usize)| start + (end - start) / 2;
        let data = self
            .rows
            .iter()
            .flat_map(|r| {
                let row = frame.row(middle(r));
                self.cols.iter().map(move |c| row[middle(c)])
            })
            .collect();
        Plane::new(self.cols.len() as u32, self.rows.len() as u32, 1, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: [f32; 4]) -> Plane<f32> {
        Plane::new(2, 2, 1, data.to_vec())
    }

    /// Five 2x2 frames pooled by 2 in space and 4 in time: two latent frames of one cell each.
    fn five_frames() -> Vec<Plane<f32>> {
        vec![
            frame([0.0, 0.0, 0.0, 1.0]),
            frame([1.0, 0.0, 0.0, 0.0]),
            frame([0.0, 1.0, 0.0, 0.0]),
            frame([0.0, 0.0, 1.0, 0.75]),
            frame([0.0, 0.0, 0.0, 0.5]),
        ]
    }

    fn pooled(frames: &[Plane<f32>], mode: Pooling) -> Vec<Vec<f32>> {
        pool_mask_frames(frames, 2, 4, mode, MaskTransform::IDENTITY)
            .unwrap()
            .into_iter()
            .map(|p| p.data)
            .collect()
    }

    #[test]
    fn area_is_the_mean_of_each_cell() {
        // latent 0: frame 0 alone, 1/4; latent 1: frames 1-4, (1 + 1 + 1.75 + 0.5) / 16
        assert_eq!(pooled(&five_frames(), Pooling::Area), vec![vec![0.25], vec![0.265625]]);
    }

    #[test]
    fn max_is_the_brightest_pixel_of_each_cell() {
        assert_eq!(pooled(&five_frames(), Pooling::Max), vec![vec![1.0], vec![1.0]]);
    }

    #[test]
    fn nearest_takes_index_half_n_on_each_axis() {
        // pixel (1, 1) of frame 0, then of frame 1 + 4/2 = 3
        assert_eq!(pooled(&five_frames(), Pooling::Nearest), vec![vec![1.0], vec![0.75]]);
        // 16 pixels in 2 cells per axis: indices 4 and 12 (pixel 4 of 8)
        let ramp = Plane::new(16, 16, 1, (0..256).map(|v| v as f32).collect());
        let out = pool_mask_frames(&[ramp], 8, 1, Pooling::Nearest, MaskTransform::IDENTITY).unwrap();
        assert_eq!(
            out[0].data,
            vec![4.0 * 16.0 + 4.0, 4.0 * 16.0 + 12.0, 12.0 * 16.0 + 4.0, 12.0 * 16.0 + 12.0]
        );
    }

    #[test]
    fn one_frame_area_is_area_downsample_bit_for_bit_and_still_frames_change_nothing() {
        for (w, h, s) in [(16u32, 8u32, 8u32), (40, 24, 8), (37, 21, 8), (48, 32, 16), (5, 3, 8)] {
            let mut seed = 0x2545_f491_u32;
            let data = (0..w * h)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32
                })
                .collect();
            let still = Plane::new(w, h, 1, data);
            let expected = area_downsample(&still, ((w / s).max(1), (h / s).max(1)));
            assert_eq!(
                pool_mask_frames(std::slice::from_ref(&still), s, 1, Pooling::Area, MaskTransform::IDENTITY)
                    .unwrap(),
                vec![expected.clone()]
            );
            let clip = vec![still.clone(); 9];
            for mode in Pooling::ALL {
                let out = pool_mask_frames(&clip, s, 4, mode, MaskTransform::IDENTITY).unwrap();
                assert_eq!(out.len(), 3);
                assert!(out.iter().all(|p| *p == out[0]), "{mode} {w}x{h}");
            }
            assert_eq!(
                pool_mask_frames(&clip, s, 4, Pooling::Area, MaskTransform::IDENTITY).unwrap()[2],
                expected
            );
        }
    }

    #[test]
    fn the_transform_comes_before_pooling_and_masks_pool_at_their_depth() {
        use crate::latent::latent_mask_with;
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 16
        };
        let eight: Vec<u8> = (0..40 * 24).map(|_| next() as u8).collect();
        let sixteen: Vec<u16> = (0..40 * 24).map(|_| next() as u16).collect();
        let transform = MaskTransform { gamma: 0.6, min_weight: 0.15 };
        for mask in [Mask::Eight(Plane::new(40, 24, 1, eight)), Mask::Sixteen(Plane::new(40, 24, 1, sixteen))]
        {
            // one frame of area is latent_mask_with exactly, transform included
            let area = pool_mask_frames(std::slice::from_ref(&mask), 8, 1, Pooling::Area, transform).unwrap();
            assert_eq!(area, vec![latent_mask_with(&mask, 8, transform)]);
            // a mask pools as its unit plane with the transform applied first, in every mode
            let unit = mask.to_unit_f32().map(|v| transform.apply(v));
            for mode in Pooling::ALL {
                let clip = vec![mask.clone(); 5];
                let expected = pool_mask_frames(&vec![unit.clone(); 5], 8, 4, mode, MaskTransform::IDENTITY);
                assert_eq!(
                    pool_mask_frames(&clip, 8, 4, mode, transform).unwrap(),
                    expected.unwrap(),
                    "{mode}"
                );
            }
        }
        // max of transformed pixels, not the transform of the max: a floor lifts the empty cell
        let half = Plane::new(2, 1, 1, vec![0.0f32, 0.25]);
        let floor = MaskTransform { gamma: 2.0, min_weight: 0.5 };
        let out = pool_mask_frames(&[half], 1, 1, Pooling::Max, floor).unwrap();
        assert_eq!(out[0].data, vec![0.5, 0.53125]);
    }

    #[test]
    fn groups_follow_the_causal_vae() {
        assert_eq!(frame_group(0, 4), 0..1);
        assert_eq!(frame_group(1, 4), 1..5);
        assert_eq!(frame_group(20, 4), 77..81);
        assert_eq!(latent_frame_count(81, 4).unwrap(), 21);
        assert_eq!(latent_frame_count(1, 4).unwrap(), 1);
        assert_eq!(latent_frame_count(3, 1).unwrap(), 3);
    }

    #[test]
    fn a_clip_of_the_wrong_length_names_the_counts() {
        let clip = vec![frame([0.0; 4]); 6];
        let message =
            pool_mask_frames(&clip, 2, 4, Pooling::Area, MaskTransform::IDENTITY).unwrap_err().to_string();
        assert!(message.starts_with("6 mask frames") && message.contains("5 or 9 would do"), "{message}");
        let message = pool_mask_frames::<Plane<f32>>(&[], 2, 4, Pooling::Area, MaskTransform::IDENTITY)
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("0 mask frames") && message.contains("1 or 5"), "{message}");
    }

    #[test]
    fn bad_arguments_are_invalid() {
        let odd = vec![frame([0.0; 4]), Plane::filled(4, 2, 1, 0.0)];
        assert!(matches!(
            pool_mask_frames(&odd, 2, 1, Pooling::Max, MaskTransform::IDENTITY),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pool_mask_frames(&odd[..1], 0, 1, Pooling::Max, MaskTransform::IDENTITY),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pool_mask_frames(&odd[..1], 2, 0, Pooling::Max, MaskTransform::IDENTITY),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!("nearest".parse::<Pooling>().unwrap(), Pooling::Nearest);
        assert!("mean".parse::<Pooling>().unwrap_err().to_string().contains("'mean'"));
    }
}
