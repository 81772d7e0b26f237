//! PIL's LANCZOS resampling (`libImaging/Resample.c`) reproduced to its arithmetic: coefficients
//! in double, normalised, quantised to 22-bit fixed point; horizontal pass first into an 8-bit
//! intermediate, then the vertical pass; a pass whose size does not change is skipped.

use super::Window;
use crate::plane::Plane;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_filter(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point taps for output indices `first..first + count` of an `in_size -> out_size` pass.
struct Coefficients {
    /// (first source index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coefficients(in_size: u32, out_size: u32, first: u32, count: u32) -> Coefficients {
    // `(double)(in1 - in0) / outSize` with in0, in1 as C floats (exact for image sizes).
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(count as usize);
    let mut weights = vec![0i32; ksize * count as usize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in (first..first + count).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = lanczos_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            weights[i * ksize + x] = if v < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients { bounds, ksize, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

pub fn lanczos(src: &Plane<u8>, out: (u32, u32), window: Window) -> Plane<u8> {
    let cn = src.channels;
    let need_horizontal = out.0 != src.width;
    let need_vertical = out.1 != src.height;

    let vert = need_vertical.then(|| coefficients(src.height, out.1, window.y0, window.height));
    // Source rows the vertical pass reads (or the window's rows when there is none).
    let (row_first, row_last) = match &vert {
        Some(c) => (
            c.bounds.iter().map(|b| b.0).min().unwrap_or(0),
            c.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0),
        ),
        None => (window.y0 as usize, (window.y0 + window.height) as usize),
    };

    // Horizontal pass: rows row_first..row_last, only the window's columns.
    let temp: Plane<u8> = if need_horizontal {
        let horiz = coefficients(src.width, out.0, window.x0, window.width);
        let width = window.width as usize;
        let mut data = vec![0u8; (row_last - row_first) * width * cn];
        for (r, y) in (row_first..row_last).enumerate() {
            let row = src.row(y);
            let dst = &mut data[r * width * cn..(r + 1) * width * cn];
            for x in 0..width {
                let (xmin, xmax) = horiz.bounds[x];
                let k = &horiz.weights[x * horiz.ksize..x * horiz.ksize + xmax];
                for c in 0..cn {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        ss = ss.wrapping_add(row[(xmin + i) * cn + c] as i32 * w);
                    }
                    dst[x * cn + c] = clip8(ss);
                }
            }
        }
        Plane::new(window.width, (row_last - row_first) as u32, cn, data)
    } else {
        // Columns of the window, rows row_first..row_last, straight from the source.
        let x0 = window.x0 as usize * cn;
        let mut data = Vec::with_capacity((row_last - row_first) * window.width as usize * cn);
        for y in row_first..row_last {
            data.extend_from_slice(&src.row(y)[x0..x0 + window.width as usize * cn]);
        }
        Plane::new(window.width, (row_last - row_first) as u32, cn, data)
    };

    let Some(vert) = vert else {
        return temp;
    };
    let row_len = window.width as usize * cn;
    let mut data = Vec::with_capacity(row_len * window.height as usize);
    let mut acc = vec![0i32; row_len];
    for y in 0..window.height as usize {
        let (ymin, ymax) = vert.bounds[y];
        let k = &vert.weights[y * vert.ksize..y * vert.ksize + ymax];
        acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
        // Row by row rather than pixel by pixel: integer sums, so the order does not matter.
        for (i, &w) in k.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(temp.row(ymin - row_first + i)) {
                *a = a.wrapping_add(v as i32 * w);
            }
        }
        data.extend(acc.iter().map(|&a| clip8(a)));
    }
    Plane::new(window.width, window.height, cn, data)
}
