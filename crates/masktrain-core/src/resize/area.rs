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
/// Rows are summed first (a plain vectorisable loop), then each block's columns.
fn block_mean<T: Sample>(src: &Plane<T>, kx: usize, ky: usize, window: Window) -> Plane<T> {
    if kx == 2 && ky == 2 {
        // The common case (a 1024 image onto a 512 bucket), written out so it vectorises.
        return match src.channels {
            1 => half_size::<T, 1>(src, window),
            3 => half_size::<T, 3>(src, window),
            4 => half_size::<T, 4>(src, window),
            cn => panic!("unsupported channel count {cn}"),
        };
    }
    match src.channels {
        1 => block_mean_cn::<T, 1>(src, kx, ky, window),
        3 => block_mean_cn::<T, 3>(src, kx, ky, window),
        4 => block_mean_cn::<T, 4>(src, kx, ky, window),
        cn => panic!("unsupported channel count {cn}"),
    }
}

fn block_mean_cn<T: Sample, const CN: usize>(
    src: &Plane<T>,
    kx: usize,
    ky: usize,
    window: Window,
) -> Plane<T> {
    let row_len = window.width as usize * CN;
    let src_start = window.x0 as usize * kx * CN;
    let src_len = row_len * kx;
    let scale = 1.0f32 / (kx * ky) as f32;
    let mut data = Vec::with_capacity(row_len * window.height as usize);
    let mut column_sums = vec![0u32; src_len];
    for y in 0..window.height as usize {
        let sy0 = (window.y0 as usize + y) * ky;
        for (a, v) in column_sums.iter_mut().zip(&src.row(sy0)[src_start..src_start + src_len]) {
            *a = v.to_u32();
        }
        for sy in sy0 + 1..sy0 + ky {
            for (a, v) in column_sums.iter_mut().zip(&src.row(sy)[src_start..src_start + src_len]) {
                *a += v.to_u32();
            }
        }
        for block in column_sums.chunks_exact(kx * CN) {
            let mut sums = [0u32; CN];
            for px in block.chunks_exact(CN) {
                for c in 0..CN {
                    sums[c] += px[c];
                }
            }
            data.extend(sums.iter().map(|&s| T::from_f32_rounded(s as f32 * scale)));
        }
    }
    Plane::new(window.width, window.height, CN, data)
}

/// 2x2 block means, rounded half up as OpenCV's SIMD path does: `(a + b + c + d + 2) >> 2`.
fn half_size<T: Sample, const CN: usize>(src: &Plane<T>, window: Window) -> Plane<T> {
    let row_len = window.width as usize * CN;
    let start = window.x0 as usize * 2 * CN;
    let mut data = vec![T::default(); row_len * window.height as usize];
    for (y, out) in data.chunks_exact_mut(row_len).enumerate() {
        let sy = (window.y0 as usize + y) * 2;
        let top = &src.row(sy)[start..start + 2 * row_len];
        let bottom = &src.row(sy + 1)[start..start + 2 * row_len];
        for ((o, a), b) in
            out.chunks_exact_mut(CN).zip(top.chunks_exact(2 * CN)).zip(bottom.chunks_exact(2 * CN))
        {
            for c in 0..CN {
                let sum = a[c].to_u32() + a[CN + c].to_u32() + b[c].to_u32() + b[CN + c].to_u32();
                o[c] = T::from_u32_saturating((sum + 2) >> 2);
            }
        }
    }
    Plane::new(window.width, window.height, CN, data)
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
            taps.push(Tap {
                dst,
                src: (sx1 - 1) as usize,
                weight: ((sx1 as f64 - fsx1) / cell_width) as f32,
            });
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
    // Colour runs in four f32 lanes per pixel (the fourth unused for RGB), so one SIMD
    // multiply-add serves all channels of a tap.
    match src.channels {
        1 => coverage_cn::<T, 1, 1>(src, scale_x, scale_y, window),
        3 => coverage_cn::<T, 3, 4>(src, scale_x, scale_y, window),
        4 => coverage_cn::<T, 4, 4>(src, scale_x, scale_y, window),
        cn => panic!("unsupported channel count {cn}"),
    }
}

fn coverage_cn<T: Sample, const CN: usize, const LANES: usize>(
    src: &Plane<T>,
    scale_x: f64,
    scale_y: f64,
    window: Window,
) -> Plane<T> {
    let width = window.width as usize;
    let xtaps = TapTable::new(&coverage_taps(src.width, scale_x, window.x0, window.width), width);
    let ytaps = coverage_taps(src.height, scale_y, window.y0, window.height);

    let mut data = vec![T::default(); width * CN * window.height as usize];
    let mut sum = vec![[0f32; LANES]; width];
    let mut buf = vec![[0f32; LANES]; width];
    let mut row_f32 = Vec::with_capacity(src.width as usize + xtaps.width);
    let mut buf_row = usize::MAX;
    let mut current_dst = usize::MAX;
    let flush = |data: &mut Vec<T>, dst: usize, sum: &[[f32; LANES]]| {
        let out = &mut data[dst * width * CN..(dst + 1) * width * CN];
        for (o, s) in out.chunks_exact_mut(CN).zip(sum) {
            for c in 0..CN {
                o[c] = T::from_f32_rounded(s[c]);
            }
        }
    };
    for tap in &ytaps {
        if tap.src != buf_row {
            horizontal::<T, CN, LANES>(src.row(tap.src), &xtaps, &mut row_f32, &mut buf);
            buf_row = tap.src;
        }
        let w = tap.weight;
        // Flat f32 loops: the pattern the auto-vectoriser handles best.
        let (sum_flat, buf_flat) = (sum.as_flattened_mut(), buf.as_flattened());
        if tap.dst != current_dst {
            if current_dst != usize::MAX {
                flush(&mut data, current_dst, &sum);
            }
            current_dst = tap.dst;
            let sum_flat = sum.as_flattened_mut();
            for (s, &b) in sum_flat.iter_mut().zip(buf_flat) {
                *s = w * b;
            }
        } else {
            for (s, &b) in sum_flat.iter_mut().zip(buf_flat) {
                *s += w * b;
            }
        }
    }
    if current_dst != usize::MAX {
        flush(&mut data, current_dst, &sum);
    }
    Plane::new(window.width, window.height, CN, data)
}

/// Horizontal taps in a dense table: every destination gets `width` taps from `starts[d]`
/// on, the missing ones padded with weight 0. Padding leaves the sums bit-identical (adding
/// `x * 0.0 = +0.0` to a non-negative f32 changes nothing) and lets the inner loop run a fixed
/// count, which matters when each destination has only two or three taps.
struct TapTable {
    starts: Vec<usize>,
    width: usize,
    weights: Vec<f32>,
}

impl TapTable {
    fn new(taps: &[Tap], count: usize) -> Self {
        let mut starts = vec![usize::MAX; count];
        let mut lengths = vec![0usize; count];
        for tap in taps {
            starts[tap.dst] = starts[tap.dst].min(tap.src);
            lengths[tap.dst] += 1;
        }
        let width = lengths.iter().copied().max().unwrap_or(1).max(1);
        let mut weights = vec![0f32; count * width];
        for tap in taps {
            weights[tap.dst * width + (tap.src - starts[tap.dst])] = tap.weight;
        }
        TapTable { starts, width, weights }
    }
}

/// One source row through the horizontal taps into `buf` (one pixel of f32 lanes per
/// destination). `row_f32` is scratch space for the row as f32, padded so padded taps stay
/// in bounds.
fn horizontal<T: Sample, const CN: usize, const LANES: usize>(
    row: &[T],
    taps: &TapTable,
    row_f32: &mut Vec<[f32; LANES]>,
    buf: &mut [[f32; LANES]],
) {
    row_f32.clear();
    row_f32.extend(row.chunks_exact(CN).map(|px| {
        let mut lanes = [0f32; LANES];
        for c in 0..CN {
            lanes[c] = px[c].to_f32();
        }
        lanes
    }));
    row_f32.resize(row_f32.len() + taps.width, [0.0; LANES]);
    match taps.width {
        1 => horizontal_fixed::<LANES, 1>(row_f32, taps, buf),
        2 => horizontal_fixed::<LANES, 2>(row_f32, taps, buf),
        3 => horizontal_fixed::<LANES, 3>(row_f32, taps, buf),
        4 => horizontal_fixed::<LANES, 4>(row_f32, taps, buf),
        _ => {
            for ((out, &start), weights) in
                buf.iter_mut().zip(&taps.starts).zip(taps.weights.chunks_exact(taps.width))
            {
                let mut acc = [0f32; LANES];
                for (px, &w) in row_f32[start..start + taps.width].iter().zip(weights) {
                    for l in 0..LANES {
                        acc[l] += px[l] * w;
                    }
                }
                *out = acc;
            }
        }
    }
}

fn horizontal_fixed<const LANES: usize, const K: usize>(
    pixels: &[[f32; LANES]],
    taps: &TapTable,
    buf: &mut [[f32; LANES]],
) {
    let (weights, _) = taps.weights.as_chunks::<K>();
    for ((out, &start), weights) in buf.iter_mut().zip(&taps.starts).zip(weights) {
        let source: &[[f32; LANES]; K] = pixels[start..start + K].try_into().expect("K taps");
        // Summed from zero in tap order, as OpenCV adds each tap into a zeroed buffer.
        let mut acc = [0f32; LANES];
        for k in 0..K {
            for l in 0..LANES {
                acc[l] += source[k][l] * weights[k];
            }
        }
        *out = acc;
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
