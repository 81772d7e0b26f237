//! Property tests of the resize kernels, the latent downsample and the luma conversion.

use masktrain_core::latent::area_downsample;
use masktrain_core::luma::luma601_u8;
use masktrain_core::plane::{Mask, Plane};
use masktrain_core::resize::{
    area, lanczos, nearest, resize_image_to_bucket, resize_mask_to_bucket, resize_mask_to_size, Window,
};
use proptest::prelude::*;

fn plane_u8(max_side: u32, channels: usize) -> impl Strategy<Value = Plane<u8>> {
    (1..max_side, 1..max_side).prop_flat_map(move |(w, h)| {
        proptest::collection::vec(any::<u8>(), (w * h) as usize * channels)
            .prop_map(move |data| Plane::new(w, h, channels, data))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn constant_images_stay_constant(w in 1u32..80, h in 1u32..80, ow in 1u32..120, oh in 1u32..120, v in any::<u8>()) {
        let src = Plane::filled(w, h, 3, v);
        if ow <= w && oh <= h {
            prop_assert!(area(&src, (ow, oh), Window::full((ow, oh))).data.iter().all(|&x| x == v));
        }
        prop_assert!(lanczos(&src, (ow, oh), Window::full((ow, oh))).data.iter().all(|&x| x == v));
        prop_assert!(nearest(&src, (ow, oh), Window::full((ow, oh))).data.iter().all(|&x| x == v));
    }

    #[test]
    fn area_stays_within_the_input_range(src in plane_u8(64, 1), fx in 1u32..8, fy in 1u32..8) {
        let out = ((src.width / fx).max(1), (src.height / fy).max(1));
        let result = area(&src, out, Window::full(out));
        let (lo, hi) = (*src.data.iter().min().unwrap(), *src.data.iter().max().unwrap());
        prop_assert!(result.data.iter().all(|&x| x >= lo && x <= hi));
    }

    #[test]
    fn nearest_only_copies_source_values(src in plane_u8(40, 1), ow in 1u32..100, oh in 1u32..100) {
        let result = nearest(&src, (ow, oh), Window::full((ow, oh)));
        prop_assert!(result.data.iter().all(|v| src.data.contains(v)));
    }

    #[test]
    fn integer_enlargement_repeats_pixels(src in plane_u8(20, 1), k in 1u32..5) {
        let out = (src.width * k, src.height * k);
        let result = nearest(&src, out, Window::full(out));
        for y in 0..out.1 as usize {
            for x in 0..out.0 as usize {
                prop_assert_eq!(result.row(y)[x], src.row(y / k as usize)[x / k as usize]);
            }
        }
    }

    #[test]
    fn bucket_outputs_have_the_bucket_size(src in plane_u8(90, 3), bw in 1u32..120, bh in 1u32..120) {
        let image = resize_image_to_bucket(&src, (bw, bh));
        prop_assert_eq!(image.size(), (bw, bh));
        let mask = Mask::Eight(Plane::new(src.width, src.height, 1, src.data.iter().step_by(3).copied().collect()));
        prop_assert_eq!(resize_mask_to_bucket(&mask, (bw, bh)).size(), (bw, bh));
        prop_assert_eq!(resize_mask_to_size(&mask, (bw, bh)).size(), (bw, bh));
    }

    #[test]
    fn latent_downsample_preserves_the_mean_for_multiples(w in 1u32..20, h in 1u32..20, f in 1u32..9, seed in any::<u64>()) {
        let mut state = seed | 1;
        let data: Vec<f32> = (0..(w * f * h * f)).map(|_| {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            (state % 1000) as f32 / 999.0
        }).collect();
        let src = Plane::new(w * f, h * f, 1, data);
        let out = area_downsample(&src, (w, h));
        let mean_in: f64 = src.data.iter().map(|&v| v as f64).sum::<f64>() / src.data.len() as f64;
        let mean_out: f64 = out.data.iter().map(|&v| v as f64).sum::<f64>() / out.data.len() as f64;
        prop_assert!((mean_in - mean_out).abs() < 1e-5);
        prop_assert!(out.data.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn gray_colours_keep_their_value_through_luma(v in any::<u8>()) {
        prop_assert_eq!(luma601_u8(v, v, v), v);
    }
}
