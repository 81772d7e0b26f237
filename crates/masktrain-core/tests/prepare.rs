//! Batch preparation on real files: the fallback chain, per-item errors, and convert-alpha.

use std::path::{Path, PathBuf};

use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use masktrain_core::convert::{convert_batch, ConvertJob};
use masktrain_core::decode::{decode_image, DEFAULT_PIXEL_LIMIT};
use masktrain_core::geometry::Source;
use masktrain_core::index::MaskIndex;
use masktrain_core::luma::load_mask;
use masktrain_core::media::Media;
use masktrain_core::prepare::{
    prepare_batch, prepare_loaded_mask, prepare_mask, BatchImage, MaskSource, PrepareOptions, PreparedMask,
};
use masktrain_core::{Error, Mask};

fn batch(paths: &[PathBuf]) -> Vec<BatchImage> {
    paths.iter().cloned().map(BatchImage::from).collect()
}

fn write_rgb(path: &Path, w: u32, h: u32) {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 3) as u8, (y * 5) as u8, 77])).save(path).unwrap();
}

fn write_mask(path: &Path, w: u32, h: u32, value: u8) {
    GrayImage::from_pixel(w, h, Luma([value])).save(path).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    images: PathBuf,
    masks: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let masks = dir.path().join("masks");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    RgbaImage::from_fn(64, 32, |x, _| Rgba([10, 20, 30, if x < 32 { 255 } else { 0 }]))
        .save(images.join("alpha.png"))
        .unwrap();
    write_rgb(&images.join("file.png"), 64, 32);
    write_mask(&masks.join("file.PNG"), 32, 16, 128);
    write_rgb(&images.join("none.png"), 64, 32);
    write_rgb(&images.join("skewed.png"), 64, 32);
    write_mask(&masks.join("skewed.png"), 32, 32, 128);
    std::fs::write(images.join("empty.png"), b"").unwrap();
    let mut cut = std::fs::read(images.join("file.png")).unwrap();
    cut.truncate(cut.len() / 2);
    std::fs::write(images.join("cut.png"), cut).unwrap();
    Fixture { _dir: dir, images, masks }
}

#[test]
fn fallback_chain_and_per_item_errors() {
    let f = fixture();
    let index = MaskIndex::build(&f.masks).unwrap();
    let names = ["alpha", "file", "none", "skewed", "empty", "cut"];
    let paths: Vec<PathBuf> = names.iter().map(|n| f.images.join(format!("{n}.png"))).collect();
    let options = PrepareOptions {
        buckets: vec![(32, 16), (16, 16)],
        alpha_mask: true,
        mask_index: Some(&index),
        ..PrepareOptions::default()
    };
    let results = prepare_batch(&batch(&paths), &options);

    let alpha = results[0].as_ref().unwrap();
    assert_eq!(alpha.mask_source, MaskSource::Alpha);
    assert_eq!(alpha.bucket, (32, 16));
    let latent = alpha.latent_mask.as_ref().unwrap();
    assert_eq!(latent.size(), (4, 2));
    assert_eq!(latent.data, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);

    let file = results[1].as_ref().unwrap();
    assert_eq!(file.mask_source, MaskSource::File);
    assert!(file.latent_mask.as_ref().unwrap().data.iter().all(|&v| v == 128.0 / 255.0));

    let none = results[2].as_ref().unwrap();
    assert_eq!(none.mask_source, MaskSource::None);
    assert_eq!(none.mask, Some(Mask::Eight(masktrain_core::Plane::filled(32, 16, 1, 255))));

    assert!(matches!(results[3], Err(Error::AspectMismatch { .. })));
    assert!(matches!(results[4], Err(Error::EmptyFile { .. })));
    assert!(matches!(results[5], Err(Error::Decode { .. })));
}

#[test]
fn require_mask_and_masking_off() {
    let f = fixture();
    let paths = vec![f.images.join("none.png")];
    let options = PrepareOptions {
        buckets: vec![(32, 16)],
        alpha_mask: true,
        require_mask: true,
        ..Default::default()
    };
    assert!(matches!(prepare_batch(&batch(&paths), &options)[0], Err(Error::MissingMask { .. })));
    let off = PrepareOptions { buckets: vec![(32, 16)], ..Default::default() };
    let item = prepare_batch(&batch(&paths), &off).remove(0).unwrap();
    assert!(item.mask.is_none() && item.latent_mask.is_none());
}

#[test]
fn convert_writes_exact_rgb_and_mask_alpha_atomically() {
    let f = fixture();
    let out = f.images.parent().unwrap().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let jobs = vec![
        ConvertJob {
            image: f.images.join("file.png"),
            mask: f.masks.join("file.PNG"),
            output: out.join("file.png"),
            caption: None,
        },
        ConvertJob {
            image: f.images.join("skewed.png"),
            mask: f.masks.join("skewed.png"),
            output: out.join("skewed.png"),
            caption: None,
        },
    ];
    let results = convert_batch(&jobs, DEFAULT_PIXEL_LIMIT);
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(Error::AspectMismatch { .. })));
    let decoded = decode_image(&out.join("file.png"), DEFAULT_PIXEL_LIMIT).unwrap();
    let source = decode_image(&f.images.join("file.png"), DEFAULT_PIXEL_LIMIT).unwrap();
    assert_eq!(decoded.rgb, source.rgb);
    match decoded.alpha.unwrap() {
        Mask::Eight(p) => assert!(p.data.iter().all(|&v| v == 128)),
        Mask::Sixteen(_) => panic!("8-bit inputs give an 8-bit output"),
    }
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("file.png")]);
}

/// A mask file prepared on its own is the mask half of `prepare_batch`, at any depth and size.
#[test]
fn prepare_mask_is_the_mask_half_of_prepare_item() {
    let f = fixture();
    let gradient16 =
        ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(32, 16, |x, y| Luma([(x * 2000 + y * 7) as u16]));
    gradient16.save(f.masks.join("deep.png")).unwrap();
    write_rgb(&f.images.join("deep.png"), 64, 32);
    let index = MaskIndex::build(&f.masks).unwrap();
    for (name, bucket) in [("file", (32, 16)), ("file", (96, 48)), ("deep", (24, 12)), ("deep", (128, 64))] {
        for factor in [8, 16] {
            let image = f.images.join(format!("{name}.png"));
            let options = PrepareOptions {
                buckets: vec![bucket],
                latent_factor: factor,
                mask_index: Some(&index),
                ..PrepareOptions::default()
            };
            let item = prepare_batch(&batch(std::slice::from_ref(&image)), &options).remove(0).unwrap();
            let mask_path = item.mask_path.clone().unwrap();
            let source = Source::image(&image, item.original_size);
            let alone = prepare_mask(&mask_path, &source, bucket, factor, DEFAULT_PIXEL_LIMIT).unwrap();
            assert_eq!(Some(&alone.mask), item.mask.as_ref(), "{name} {bucket:?}");
            assert_eq!(Some(&alone.latent_mask), item.latent_mask.as_ref(), "{name} {bucket:?}");
            assert_eq!(alone.mask.is_sixteen_bit(), name == "deep");
            assert_eq!(alone.latent_mask.size(), ((bucket.0 / factor).max(1), (bucket.1 / factor).max(1)));

            let loaded = load_mask(&mask_path, DEFAULT_PIXEL_LIMIT).unwrap();
            let in_memory = prepare_loaded_mask(&loaded, &mask_path, &source, bucket, factor).unwrap();
            assert_eq!(in_memory, alone);
        }
    }

    // At the mask's own size the 16-bit values pass untouched and each latent weight is the
    // mean of its 8x8 block over 65535.
    let source = Source::image(Path::new("deep.png"), (64, 32));
    let alone = prepare_mask(&f.masks.join("deep.png"), &source, (32, 16), 8, DEFAULT_PIXEL_LIMIT).unwrap();
    assert_eq!(alone.mask, Mask::Sixteen(masktrain_core::Plane::new(32, 16, 1, gradient16.into_raw())));
    let Mask::Sixteen(mask) = &alone.mask else { unreachable!() };
    for (i, &weight) in alone.latent_mask.data.iter().enumerate() {
        let (bx, by) = (i % 4 * 8, i / 4 * 8);
        let sum: f64 = (by..by + 8)
            .flat_map(|y| (bx..bx + 8).map(move |x| (x, y)))
            .map(|(x, y)| mask.row(y)[x] as f64 / 65535.0)
            .sum();
        assert!((weight as f64 - sum / 64.0).abs() < 1e-6, "block {i}");
    }
}

#[test]
fn prepare_mask_names_the_video_and_checks_its_arguments() {
    let f = fixture();
    let mask = f.masks.join("skewed.png");
    let video = Path::new("clips/walk.mp4");
    let source = Source { media: Media::Video, path: Some(video), size: (96, 48) };
    let err = prepare_mask(&mask, &source, (32, 16), 8, DEFAULT_PIXEL_LIMIT).unwrap_err();
    assert!(matches!(err, Error::AspectMismatch { media: Media::Video, .. }));
    let expected = format!("{}: aspect ratio mismatch: video clips/walk.mp4 is 96x48", mask.display());
    assert!(err.to_string().starts_with(&expected), "{err}");

    let missing = f.masks.join("missing.png");
    let err = prepare_mask(&missing, &source, (32, 16), 8, DEFAULT_PIXEL_LIMIT).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    for (size, bucket, factor) in [((0, 48), (32, 16), 8), ((96, 48), (32, 0), 8), ((96, 48), (32, 16), 0)] {
        let source = Source { size, ..source };
        let err = prepare_mask(&missing, &source, bucket, factor, DEFAULT_PIXEL_LIMIT).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
}

/// A bucket that is not a multiple of the latent factor pools onto the floor-divided grid
/// with torch's overlapping windows, the same as a batch item.
#[test]
fn prepare_mask_pools_buckets_off_the_latent_multiple() {
    let f = fixture();
    let source = Source::image(Path::new("file.png"), (64, 32));
    let prepared: PreparedMask =
        prepare_mask(&f.masks.join("file.PNG"), &source, (36, 18), 8, DEFAULT_PIXEL_LIMIT).unwrap();
    assert_eq!(prepared.mask.size(), (36, 18));
    assert_eq!(prepared.latent_mask.size(), (4, 2));
    assert!(prepared.latent_mask.data.iter().all(|&v| v == 128.0 / 255.0));
}
