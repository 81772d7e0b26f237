//! Nearest neighbour with the pixel-centre rule `src = floor((dst + 0.5) * in / out)`, in exact
//! integer arithmetic: PIL's NEAREST, OpenCV's INTER_NEAREST_EXACT, torch's `nearest-exact`.

use super::Window;
use crate::plane::{Plane, Sample};

pub fn source_index(dst: u32, in_size: u32, out_size: u32) -> usize {
    let src = ((2 * dst as u64 + 1) * in_size as u64) / (2 * out_size as u64);
    src.min(in_size as u64 - 1) as usize
}

pub fn nearest<T: Sample>(src: &Plane<T>, out: (u32, u32), window: Window) -> Plane<T> {
    let cn = src.channels;
    let xs: Vec<usize> =
        (0..window.width).map(|x| source_index(window.x0 + x, src.width, out.0) * cn).collect();
    let mut data = Vec::with_capacity(window.width as usize * window.height as usize * cn);
    for y in 0..window.height {
        let row = src.row(source_index(window.y0 + y, src.height, out.1));
        for &sx in &xs {
            data.extend_from_slice(&row[sx..sx + cn]);
        }
    }
    Plane::new(window.width, window.height, cn, data)
}
