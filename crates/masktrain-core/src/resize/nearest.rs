//! Nearest neighbour with the pixel-centre rule `src = floor((dst + 0.5) * in / out)`: PIL's
//! NEAREST, which the reference uses to enlarge masks (also OpenCV's INTER_NEAREST_EXACT and
//! torch's `nearest-exact`). PIL evaluates the rule by accumulating `in / out` in double
//! precision (`ImagingScaleAffine` in `libImaging/Geometry.c`); we do the same, because where
//! `(dst + 0.5) * in / out` is an exact integer the accumulated sum lands just below it and PIL
//! (and OpenCV's fixed-point version) pick the pixel before.

use super::Window;
use crate::plane::{Plane, Sample};

/// Source indices for output indices `first..first + count` of an `in_size -> out_size` axis.
pub fn source_indices(in_size: u32, out_size: u32, first: u32, count: u32) -> Vec<usize> {
    let step = in_size as f32 as f64 / out_size as f64;
    let mut position = step * 0.5;
    let mut indices = Vec::with_capacity(count as usize);
    for dst in 0..first + count {
        if dst >= first {
            // COORD(v): (int)v for v >= 0.
            indices.push((position as usize).min(in_size as usize - 1));
        }
        position += step;
    }
    indices
}

pub fn nearest<T: Sample>(src: &Plane<T>, out: (u32, u32), window: Window) -> Plane<T> {
    let cn = src.channels;
    let xs = source_indices(src.width, out.0, window.x0, window.width);
    let ys = source_indices(src.height, out.1, window.y0, window.height);
    let mut data = Vec::with_capacity(window.width as usize * window.height as usize * cn);
    for &sy in &ys {
        let row = src.row(sy);
        if cn == 1 {
            data.extend(xs.iter().map(|&sx| row[sx]));
        } else {
            for &sx in &xs {
                data.extend_from_slice(&row[sx * cn..sx * cn + cn]);
            }
        }
    }
    Plane::new(window.width, window.height, cn, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_rule_with_pil_accumulation() {
        // 10 -> 3 samples 1, 5, 8 (torch nearest-exact / OpenCV INTER_NEAREST_EXACT).
        assert_eq!(source_indices(10, 3, 0, 3), vec![1, 5, 8]);
        // 56 -> 86 at dst 21: (21.5 * 56 / 86) = 14 exactly; PIL's accumulated sum gives 13.
        assert_eq!(source_indices(56, 86, 21, 1), vec![13]);
        // Enlarging by 2 repeats each pixel twice.
        assert_eq!(source_indices(3, 6, 0, 6), vec![0, 0, 1, 1, 2, 2]);
    }
}
