//! Times each preparation stage on one image (and its mask file), single-threaded, best of 15:
//! `cargo run --release --example stages -- IMAGE [MASK] [BUCKET_W BUCKET_H]`.

use std::path::PathBuf;
use std::time::Instant;

use masktrain_core::decode::{decode_image, DEFAULT_PIXEL_LIMIT};
use masktrain_core::latent::latent_mask;
use masktrain_core::luma::load_mask;
use masktrain_core::resize::{resize_image_to_bucket, resize_mask_to_bucket};

fn best_ms<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut out = f();
    for _ in 0..15 {
        let start = Instant::now();
        out = f();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[0], out)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let image = PathBuf::from(&args[0]);
    let bucket = match (args.get(2), args.get(3)) {
        (Some(w), Some(h)) => (w.parse().unwrap(), h.parse().unwrap()),
        _ => (512, 512),
    };
    let (ms, decoded) = best_ms(|| decode_image(&image, DEFAULT_PIXEL_LIMIT).unwrap());
    println!("decode image      {ms:8.3} ms  {:?}", decoded.rgb.size());
    let (ms, _) = best_ms(|| resize_image_to_bucket(&decoded.rgb, bucket));
    println!("resize image      {ms:8.3} ms  -> {bucket:?}");
    let mask = match args.get(1) {
        Some(m) if m != "-" => {
            let (ms, mask) = best_ms(|| load_mask(&PathBuf::from(m), DEFAULT_PIXEL_LIMIT).unwrap());
            println!("load mask         {ms:8.3} ms");
            mask
        }
        _ => decoded.alpha.clone().expect("image has no alpha and no mask was given"),
    };
    let (ms, resized) = best_ms(|| resize_mask_to_bucket(&mask, bucket));
    println!("resize mask       {ms:8.3} ms");
    let (ms, _) = best_ms(|| latent_mask(&resized, 8));
    println!("latent mask       {ms:8.3} ms");
}
