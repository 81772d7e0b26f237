//! Batch preparation on real files: the fallback chain, per-item errors, and convert-alpha.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use masktrain_core::convert::{convert_batch, ConvertJob};
use masktrain_core::decode::{decode_image, DEFAULT_PIXEL_LIMIT};
use masktrain_core::index::MaskIndex;
use masktrain_core::prepare::{prepare_batch, MaskSource, PrepareOptions};
use masktrain_core::{Error, Mask};

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
    let results = prepare_batch(&paths, &options);

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
    assert!(matches!(prepare_batch(&paths, &options)[0], Err(Error::MissingMask { .. })));
    let off = PrepareOptions { buckets: vec![(32, 16)], ..Default::default() };
    let item = prepare_batch(&paths, &off).remove(0).unwrap();
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
