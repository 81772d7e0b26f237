//! The latent-grid mask: `mask / 255` then exactly `torch.nn.functional.interpolate(mode="area")`,
//! which is adaptive average pooling (`aten/src/ATen/native/cpu/AdaptiveAvgPoolKernel.cpp`).

use crate::plane::{Mask, Plane};

/// torch's `start_index`: `floor(i * in / out)`.
pub(crate) fn start_index(i: u64, out: u64, input: u64) -> usize {
    ((i * input) / out) as usize
}

/// torch's `end_index`: `ceil((i + 1) * in / out)`.
pub(crate) fn end_index(i: u64, out: u64, input: u64) -> usize {
    ((i + 1) * input).div_ceil(out) as usize
}

/// Adaptive average pooling of a one-channel f32 plane to `out` (any sizes, multiples or not).
/// Each output averages a `[floor(i*in/out), ceil((i+1)*in/out))` window with equal weights,
/// summed in f32 row by row and divided by the window's height then width, as torch does.
pub fn area_downsample(src: &Plane<f32>, out: (u32, u32)) -> Plane<f32> {
    assert_eq!(src.channels, 1, "area_downsample takes one channel");
    assert!(out.0 > 0 && out.1 > 0, "output size must be positive");
    let (in_w, in_h) = (src.width as u64, src.height as u64);
    let (out_w, out_h) = (out.0 as u64, out.1 as u64);
    let cols: Vec<(usize, usize)> =
        (0..out_w).map(|j| (start_index(j, out_w, in_w), end_index(j, out_w, in_w))).collect();
    let mut data = Vec::with_capacity((out_w * out_h) as usize);
    let mut sums = vec![0f32; out_w as usize];
    for i in 0..out_h {
        let (r0, r1) = (start_index(i, out_h, in_h), end_index(i, out_h, in_h));
        let kh = (r1 - r0) as f32;
        // Rows outermost, outputs inner: each output still adds its window row by row, left to
        // right (torch's order, so the f32 sums are identical), but the outputs' additions are
        // independent and overlap in the CPU instead of forming one long dependency chain.
        sums.fill(0.0);
        for r in r0..r1 {
            let row = src.row(r);
            for (sum, &(c0, c1)) in sums.iter_mut().zip(&cols) {
                for &v in &row[c0..c1] {
                    *sum += v;
                }
            }
        }
        data.extend(sums.iter().zip(&cols).map(|(&sum, &(c0, c1))| sum / kh / (c1 - c0) as f32));
    }
    Plane::new(out.0, out.1, 1, data)
}

/// A cache-time mask transform (`masktrain cache --cache_mask_gamma G --cache_mask_min_weight W`,
/// the reference's `apply_cache_mask_transforms`): per pixel of the unit mask, before pooling,
/// `clamp(clamp(m, 0, 1)^G * (1 - W) + W, 0, 1)`, in f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskTransform {
    pub gamma: f32,
    pub min_weight: f32,
}

impl MaskTransform {
    pub const IDENTITY: MaskTransform = MaskTransform { gamma: 1.0, min_weight: 0.0 };

    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }

    pub fn apply(&self, value: f32) -> f32 {
        let mut m = value.clamp(0.0, 1.0);
        if self.gamma != 1.0 {
            m = m.powf(self.gamma);
        }
        if self.min_weight > 0.0 {
            m = m * (1.0 - self.min_weight) + self.min_weight;
        }
        m.clamp(0.0, 1.0)
    }

    /// [`apply`](Self::apply) to every pixel of a unit plane, in place.
    pub fn apply_to(&self, unit: &mut Plane<f32>) {
        if self.is_identity() {
            return;
        }
        for value in unit.data.iter_mut() {
            *value = self.apply(*value);
        }
    }
}

impl Default for MaskTransform {
    fn default() -> Self {
        Self::IDENTITY
    }
}

/// The latent-grid weights of a bucket-sized mask for a VAE with `factor`x spatial
/// compression (8 for WAN 2.1 / Qwen-Image, 16 for WAN 2.2 TI2V-5B).
pub fn latent_mask(mask: &Mask, factor: u32) -> Plane<f32> {
    latent_mask_with(mask, factor, MaskTransform::IDENTITY)
}

/// [`latent_mask`] with a cache-time `transform` applied at pixel resolution, before pooling.
pub fn latent_mask_with(mask: &Mask, factor: u32, transform: MaskTransform) -> Plane<f32> {
    let (w, h) = mask.size();
    let mut unit = mask.to_unit_f32();
    transform.apply_to(&mut unit);
    area_downsample(&unit, ((w / factor).max(1), (h / factor).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_transform_pins_the_references_values() {
        // apply_cache_mask_transforms([0, .5, 1], gamma .5, min .2) = [0.2, 0.7656854, 1.0]
        let t = MaskTransform { gamma: 0.5, min_weight: 0.2 };
        let got: Vec<f32> = [0.0f32, 0.5, 1.0].iter().map(|&v| t.apply(v)).collect();
        assert!((got[0] - 0.2).abs() < 1e-7 && (got[1] - 0.7656854).abs() < 1e-6 && got[2] == 1.0);
        // before pooling: an 8x8 alpha of 80 on the top half, 0 below, gamma .7 -> one cell
        // (80/255)^0.7 * 0.5 = 0.2221032 (pooling first would give (80/255 * 0.5)^0.7 = 0.2734411)
        let mut data = vec![80u8; 32];
        data.extend(vec![0u8; 32]);
        let mask = Mask::Eight(Plane::new(8, 8, 1, data));
        let cell = latent_mask_with(&mask, 8, MaskTransform { gamma: 0.7, min_weight: 0.0 });
        assert!((cell.data[0] - 0.2221032).abs() < 1e-6, "{}", cell.data[0]);
        assert_eq!(latent_mask_with(&mask, 8, MaskTransform::IDENTITY), latent_mask(&mask, 8));
    }

    #[test]
    fn block_mean_for_multiples() {
        let src = Plane::new(4, 2, 1, vec![0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.25, 0.75]);
        let out = area_downsample(&src, (2, 1));
        assert_eq!(out.data, vec![0.5, 0.5]);
    }

    #[test]
    fn overlapping_windows_for_non_multiples() {
        // 3 -> 2: windows [0, 2) and [1, 3).
        let src = Plane::new(3, 1, 1, vec![0.0, 1.0, 4.0]);
        let out = area_downsample(&src, (2, 1));
        assert_eq!(out.data, vec![0.5, 2.5]);
    }
}
