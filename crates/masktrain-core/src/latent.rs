//! The latent-grid mask: `mask / 255` then exactly `torch.nn.functional.interpolate(mode="area")`,
//! which is adaptive average pooling (`aten/src/ATen/native/cpu/AdaptiveAvgPoolKernel.cpp`).

use crate::plane::{Mask, Plane};

/// torch's `start_index`: `floor(i * in / out)`.
fn start_index(i: u64, out: u64, input: u64) -> usize {
    ((i * input) / out) as usize
}

/// torch's `end_index`: `ceil((i + 1) * in / out)`.
fn end_index(i: u64, out: u64, input: u64) -> usize {
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

/// The latent-grid weights of a bucket-sized mask for a VAE with `factor`x spatial
/// compression (8 for WAN 2.1 / Qwen-Image, 16 for WAN 2.2 TI2V-5B).
pub fn latent_mask(mask: &Mask, factor: u32) -> Plane<f32> {
    let (w, h) = mask.size();
    area_downsample(&mask.to_unit_f32(), ((w / factor).max(1), (h / factor).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
