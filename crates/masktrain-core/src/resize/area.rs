//! OpenCV's INTER_AREA for shrinking (`modules/imgproc/src/resize.cpp`), reproduced to its
//! arithmetic: integer scale factors take the block-mean fast path (`resizeAreaFast`), other
//! factors the fractional-coverage path (`resizeArea` with `computeResizeAreaTab`, float sums).

use super::Window;
use crate::plane::{Plane, Sample};

pub fn area<T: Sample>(src: &Plane<T>, out: (u32, u32), window: Window) -> Plane<T> {
    // OpenCV: inv_scale = dsize / ssize, scale = 1 / inv_scale (both double).
    let scale_x = 1.0 / (out.0 as f64 / src.width as f64);
    let scale_y = 1.0 / (out.1 as f64 / src.height as f64);
    let (ix, iy) = (scale_x.round(), scale_y.round());
    if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
        block_mean(src, ix as usize, iy as usize, window)
    } else {
        coverage(src, scale_x, scale_y, window)
    }
}

/// `resizeAreaFast`: the mean of each `kx x ky` block. OpenCV's SIMD path for 2x2 rounds half
/// up (`(sum + 2) >> 2`); other factors multiply by `1.f / area` and round half to even.
fn block_mean<T: Sample>(src: &Plane<T>, kx: usize, ky: usize, window: Window) -> Plane<T> {
    let cn = src.channels;
    let row_len = window.width as usize * cn;
    let scale = 1.0f32 / (kx * ky) as f32;
    let mut data = Vec::with_capacity(row_len * window.height as usize);
    let mut sums = vec![0u32; row_len];
    for y in 0..window.height as usize {
        sums.iter_mut().for_each(|s| *s = 0);
        let sy0 = (window.y0 as usize + y) * ky;
        for sy in sy0..sy0 + ky {
            let row = src.row(sy);
            let start = window.x0 as usize * kx * cn;
            let row = &row[start..start + row_len * kx];
            for (x, block) in row.chunks_exact(kx * cn).enumerate() {
                let acc = &mut sums[x * cn..(x + 1) * cn];
                for px in block.chunks_exact(cn) {
                    for (a, v) in acc.iter_mut().zip(px) {
                        *a += v.to_u32();
                    }
                }
            }
        }
        if kx == 2 && ky == 2 {
            data.extend(sums.iter().map(|&s| T::from_u32_saturating((s + 2) >> 2)));
        } else {
            data.extend(sums.iter().map(|&s| T::from_f32_rounded(s as f32 * scale)));
        }
    }
    Plane::new(window.width, window.height, cn, data)
}

/// One source sample's share of one destination sample.
#[derive(Clone, Copy, Debug)]
struct Tap {
    dst: usize,
    src: usize,
    weight: f32,
}

/// `computeResizeAreaTab` for destination indices `first..first + count`, with `dst` made
/// relative to `first`. Taps come out grouped by destination, in ascending source order.
fn coverage_taps(src_size: u32, scale: f64, first: u32, count: u32) -> Vec<Tap> {
    let ssize = src_size as f64;
    let mut taps = Vec::with_capacity((count as usize) * (scale.ceil() as usize + 2));
    for dx in first..first + count {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell_width = scale.min(ssize - fsx1);
        let mut sx1 = fsx1.ceil() as i64;
        let mut sx2 = fsx2.floor() as i64;
        sx2 = sx2.min(src_size as i64 - 1);
        sx1 = sx1.min(sx2);
        let dst = (dx - first) as usize;
        if sx1 as f64 - fsx1 > 1e-3 {
            taps.push(Tap { dst, src: (sx1 - 1) as usize, weight: ((sx1 as f64 - fsx1) / cell_width) as f32 });
        }
        for sx in sx1..sx2 {
            taps.push(Tap { dst, src: sx as usize, weight: (1.0 / cell_width) as f32 });
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            let w = (fsx2 - sx2 as f64).min(1.0).min(cell_width) / cell_width;
            taps.push(Tap { dst, src: sx2 as usize, weight: w as f32 });
        }
    }
    taps
}

/// `resizeArea`: each output is the coverage-weighted mean of its source footprint,
/// accumulated in f32 in OpenCV's order (horizontal taps per source row, then rows).
fn coverage<T: Sample>(src: &Plane<T>, scale_x: f64, scale_y: f64, window: Window) -> Plane<T> {
    let cn = src.channels;
    let row_len = window.width as usize * cn;
    let xtaps = coverage_taps(src.width, scale_x, window.x0, window.width);
    let ytaps = coverage_taps(src.height, scale_y, window.y0, window.height);

    let mut data = vec![T::default(); row_len * window.height as usize];
    let mut sum = vec![0f32; row_len];
    let mut buf = vec![0f32; row_len];
    let mut buf_row = usize::MAX;
    let mut current_dst = usize::MAX;
    let flush = |data: &mut Vec<T>, dst: usize, sum: &[f32]| {
        for (o, &s) in data[dst * row_len..(dst + 1) * row_len].iter_mut().zip(sum) {
            *o = T::from_f32_rounded(s);
        }
    };
    for tap in &ytaps {
        if tap.src != buf_row {
            horizontal(src.row(tap.src), &xtaps, cn, &mut buf);
            buf_row = tap.src;
        }
        if tap.dst != current_dst {
            if current_dst != usize::MAX {
                flush(&mut data, current_dst, &sum);
            }
            current_dst = tap.dst;
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s = tap.weight * b;
            }
        } else {
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s += tap.weight * b;
            }
        }
    }
    if current_dst != usize::MAX {
        flush(&mut data, current_dst, &sum);
    }
    Plane::new(window.width, window.height, cn, data)
}

fn horizontal<T: Sample>(row: &[T], taps: &[Tap], cn: usize, buf: &mut [f32]) {
    buf.iter_mut().for_each(|b| *b = 0.0);
    for tap in taps {
        let s = &row[tap.src * cn..tap.src * cn + cn];
        let d = &mut buf[tap.dst * cn..tap.dst * cn + cn];
        for (o, v) in d.iter_mut().zip(s) {
            *o += v.to_f32() * tap.weight;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_by_two_rounds_half_up_and_other_factors_half_even() {
        // 2x2 blocks summing to 2 (mean 0.5): OpenCV's SIMD path gives 1.
        let src = Plane::new(4, 2, 1, vec![1u8, 0, 1, 1, 1, 0, 0, 0]);
        let out = area(&src, (2, 1), Window::full((2, 1)));
        assert_eq!(out.data, vec![1, 1]);
        // 3x1 blocks with mean 2.5 and 3.5: half to even gives 2 and 4.
        let src = Plane::new(6, 1, 1, vec![2u8, 3, 2, 4, 3, 4]);
        let src = Plane::new(6, 2, 1, [src.data.clone(), src.data].concat());
        let out = area(&src, (2, 1), Window::full((2, 1)));
        assert_eq!(out.data, vec![2, 4]);
    }

    #[test]
    fn fractional_coverage_weights_partial_pixels() {
        // 3 -> 2: dst 0 covers src 0 fully and half of src 1.
        let src = Plane::new(3, 1, 1, vec![0u8, 90, 180]);
        let out = area(&src, (2, 1), Window::full((2, 1)));
        // (0 + 90 * 0.5) / 1.5 = 30; (90 * 0.5 + 180) / 1.5 = 150.
        assert_eq!(out.data, vec![30, 150]);
    }

    #[test]
    fn window_is_the_crop_of_the_full_output() {
        let data: Vec<u8> = (0..(30 * 20 * 3)).map(|i| (i * 7 % 251) as u8).collect();
        let src = Plane::new(30, 20, 3, data);
        for out in [(15, 10), (13, 9), (30, 20)] {
            let full = area(&src, out, Window::full(out));
            let win = Window { x0: 2, y0: 1, width: out.0 - 4, height: out.1 - 3 };
            let part = area(&src, out, win);
            for y in 0..win.height as usize {
                let full_row = &full.row(y + 1)[2 * 3..(2 + win.width as usize) * 3];
                assert_eq!(part.row(y), full_row);
            }
        }
    }
}
