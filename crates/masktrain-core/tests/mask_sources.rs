//! Where an image's mask comes from (alpha -> its own file -> the mask index -> the default ->
//! full weight), how its pooling is chosen, and mask clips laid onto a bucket frame by frame.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use masktrain_core::geometry::Source;
use masktrain_core::index::MaskIndex;
use masktrain_core::latent::{latent_mask_with, MaskTransform};
use masktrain_core::media::Media;
use masktrain_core::prepare::{
    prepare_batch, prepare_loaded_mask_frames, BatchImage, LoadedMask, MaskSource, PrepareOptions,
};
use masktrain_core::resize::resize_mask_to_bucket;
use masktrain_core::temporal::{pool_mask_frames, Pooling};
use masktrain_core::{Error, Mask, Plane};

fn write_rgb(path: &Path, w: u32, h: u32) {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 3) as u8, (y * 5) as u8, 77])).save(path).unwrap();
}

fn write_mask(path: &Path, w: u32, h: u32, value: u8) {
    GrayImage::from_pixel(w, h, Luma([value])).save(path).unwrap();
}

fn image(dir: &Path, name: &str, own: Option<&str>) -> BatchImage {
    BatchImage { path: dir.join(name), mask_path: own.map(|m| dir.join(m)) }
}

fn level(item: &masktrain_core::prepare::PreparedItem) -> f32 {
    item.latent_mask.as_ref().unwrap().data[0]
}

#[test]
fn precedence_alpha_own_file_index_default_full() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    RgbaImage::from_pixel(64, 32, Rgba([1, 2, 3, 40])).save(d.join("alpha.png")).unwrap();
    for name in ["own.png", "indexed.png", "plain.png"] {
        write_rgb(&d.join(name), 64, 32);
    }
    std::fs::create_dir(d.join("masks")).unwrap();
    write_mask(&d.join("masks/own.png"), 32, 16, 60); // the index's match, which "own" overrides
    write_mask(&d.join("masks/indexed.png"), 32, 16, 80);
    write_mask(&d.join("own_mask.png"), 32, 16, 100);
    let index = MaskIndex::build(&d.join("masks")).unwrap();
    let default = Mask::Eight(Plane::filled(16, 8, 1, 120));
    let default_path = d.join("default.png");
    let options = PrepareOptions {
        buckets: vec![(32, 16)],
        alpha_mask: true,
        mask_index: Some(&index),
        default_mask: Some(LoadedMask { path: &default_path, mask: &default }),
        ..PrepareOptions::default()
    };
    let images = [
        image(d, "alpha.png", Some("own_mask.png")),
        image(d, "own.png", Some("own_mask.png")),
        image(d, "indexed.png", None),
        image(d, "plain.png", None),
    ];
    let items: Vec<_> = prepare_batch(&images, &options).into_iter().map(Result::unwrap).collect();
    let sources: Vec<_> = items.iter().map(|i| i.mask_source).collect();
    assert_eq!(sources, [MaskSource::Alpha, MaskSource::File, MaskSource::File, MaskSource::Default]);
    for (item, value) in items.iter().zip([40.0, 100.0, 80.0, 120.0]) {
        assert!((level(item) - value / 255.0).abs() < 1e-6, "{:?}", item.mask_source);
    }
    assert_eq!(items[1].mask_path.as_deref(), Some(d.join("own_mask.png").as_path()));
    assert_eq!(items[3].mask_path.as_deref(), Some(default_path.as_path()));
    assert_eq!(MaskSource::Default.as_str(), "default");

    // Without the default: full weight, or the require_mask error.
    let options = PrepareOptions { default_mask: None, ..options };
    let plain = &images[3..];
    let full = prepare_batch(plain, &options).remove(0).unwrap();
    assert_eq!((full.mask_source, level(&full)), (MaskSource::None, 1.0));
    let strict = PrepareOptions { require_mask: true, ..options };
    assert!(matches!(prepare_batch(plain, &strict)[0], Err(Error::MissingMask { .. })));

    // Own mask files alone turn masking on for the whole batch.
    let bare = PrepareOptions { buckets: vec![(32, 16)], ..PrepareOptions::default() };
    let results = prepare_batch(&images[1..4], &bare);
    let sources: Vec<_> = results.iter().map(|r| r.as_ref().unwrap().mask_source).collect();
    assert_eq!(sources, [MaskSource::File, MaskSource::None, MaskSource::None]);
    assert!(results.iter().all(|r| r.as_ref().unwrap().latent_mask.is_some()));
    assert!(prepare_batch(&images[2..3], &bare)[0].as_ref().unwrap().mask.is_none());
}

#[test]
fn a_default_mask_of_another_aspect_names_itself_and_the_image() {
    let dir = tempfile::tempdir().unwrap();
    write_rgb(&dir.path().join("wide.png"), 64, 32);
    let default = Mask::Eight(Plane::filled(16, 16, 1, 255));
    let default_path = PathBuf::from("data/default.png");
    let options = PrepareOptions {
        buckets: vec![(32, 16)],
        default_mask: Some(LoadedMask { path: &default_path, mask: &default }),
        ..PrepareOptions::default()
    };
    let err = prepare_batch(&[dir.path().join("wide.png").into()], &options).remove(0).unwrap_err();
    assert!(matches!(err, Error::AspectMismatch { default_mask: true, .. }));
    let message = err.to_string();
    let image = dir.path().join("wide.png");
    assert!(message.starts_with("data/default.png (the dataset's default_mask): aspect ratio mismatch"));
    assert!(message.contains(&format!("image {} is 64x32", image.display())), "{message}");
}

#[test]
fn max_and_nearest_pool_the_image_mask_through_the_frame_grid_and_area_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_rgb(&d.join("dot.png"), 64, 32);
    // a 2-pixel subject: area dilutes it to 2/64 of its cell, max keeps it whole
    let mut dot = GrayImage::new(64, 32);
    dot.put_pixel(10, 5, Luma([255]));
    dot.put_pixel(11, 5, Luma([255]));
    dot.save(d.join("dot_mask.png")).unwrap();
    let transform = MaskTransform { gamma: 0.5, min_weight: 0.1 };
    let loaded = Mask::Eight(Plane::new(64, 32, 1, dot.into_raw()));
    for pooling in Pooling::ALL {
        let options = PrepareOptions {
            buckets: vec![(64, 32)],
            mask_transform: transform,
            mask_pooling: pooling,
            ..PrepareOptions::default()
        };
        let item = prepare_batch(&[image(d, "dot.png", Some("dot_mask.png"))], &options).remove(0).unwrap();
        let bucketed = resize_mask_to_bucket(&loaded, (64, 32));
        let expected = match pooling {
            Pooling::Area => latent_mask_with(&bucketed, 8, transform),
            _ => pool_mask_frames(&[bucketed], 8, 1, pooling, transform).unwrap().remove(0),
        };
        let latent = item.latent_mask.unwrap();
        assert_eq!(latent, expected, "{pooling}");
        let cell = latent.data[1];
        match pooling {
            Pooling::Area => assert!((cell - (0.1 + 0.9 * 2.0 / 64.0)).abs() < 1e-6, "{cell}"),
            Pooling::Max => assert_eq!(cell, 1.0),
            Pooling::Nearest => assert!((cell - 0.1).abs() < 1e-7, "{cell}"),
        }
    }
}

#[test]
fn mask_frames_are_checked_and_resized_one_by_one() {
    let frames: Vec<Mask> = (0..5u32)
        .map(|k| {
            Mask::Sixteen(Plane::new(48, 24, 1, (0..48 * 24).map(|i| (i * 37 + k * 1000) as u16).collect()))
        })
        .collect();
    let source = Source { media: Media::Video, path: Some(Path::new("walk.mp4")), size: (96, 48) };
    for bucket in [(32, 16), (128, 64), (40, 16)] {
        let out = prepare_loaded_mask_frames(&frames, Path::new("walk_mask"), &source, bucket).unwrap();
        let expected: Vec<Mask> = frames.iter().map(|f| resize_mask_to_bucket(f, bucket)).collect();
        assert_eq!(out, expected);
    }
    let skewed = vec![frames[0].clone(), Mask::Eight(Plane::filled(24, 24, 1, 0))];
    let err = prepare_loaded_mask_frames(&skewed, Path::new("walk_mask"), &source, (32, 16)).unwrap_err();
    assert!(
        err.to_string().starts_with("walk_mask: aspect ratio mismatch: video walk.mp4 is 96x48"),
        "{err}"
    );
    let err = prepare_loaded_mask_frames(&frames, Path::new("m"), &source, (0, 16)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
}
