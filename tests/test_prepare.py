"""Batch preparation against the reference pipeline (PIL decode, cv2/PIL resize, torch area):
the fallback chain alpha -> file -> full weight, buckets, latent masks, 16-bit precision."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import reference
from masktrain import _native

BUCKETS = [(64, 64), (80, 48), (48, 80), (96, 32)]


def tiered_mask(h: int, w: int, seed: int) -> np.ndarray:
    """Face 255, body 128, hair 80, background 0 -- the guide's recipe."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.3, 0.5), w * rng.uniform(0.4, 0.6)
    mask = np.zeros((h, w), np.uint8)
    mask[(abs(x - cx) < w * 0.25) & (y > cy)] = 128
    mask[((x - cx) / (w * 0.2)) ** 2 + ((y - cy + h * 0.1) / (h * 0.2)) ** 2 < 1] = 80
    mask[((x - cx) / (w * 0.12)) ** 2 + ((y - cy) / (h * 0.12)) ** 2 < 1] = 255
    return mask


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
    return (base + rng.integers(-20, 21, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """alpha.png (RGBA), file.jpg + masks/file.png, small.png (enlarged) + masks/small.png at
    half size, bare.png with no mask, rgb_alpha.png (RGBA, also with a mask file)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    expected_masks = {}
    m = tiered_mask(120, 200, 1)
    Image.fromarray(np.dstack([photo(120, 200, 1), m]), "RGBA").save(images / "alpha.png")
    expected_masks["alpha"] = m
    m = tiered_mask(150, 100, 2)
    Image.fromarray(photo(150, 100, 2)).save(images / "file.jpg", quality=95)
    Image.fromarray(m).save(masks / "file.png")
    expected_masks["file"] = m
    m = tiered_mask(20, 30, 3)
    Image.fromarray(photo(40, 60, 3)).save(images / "small.png")
    Image.fromarray(m).save(masks / "small.png")
    expected_masks["small"] = m
    Image.fromarray(photo(64, 64, 4)).save(images / "bare.png")
    m_alpha, m_file = tiered_mask(70, 70, 5), tiered_mask(70, 70, 6)
    Image.fromarray(np.dstack([photo(70, 70, 5), m_alpha]), "RGBA").save(images / "rgb_alpha.png")
    Image.fromarray(m_file).save(masks / "rgb_alpha.png")
    expected_masks["rgb_alpha:alpha"] = m_alpha
    expected_masks["rgb_alpha:file"] = m_file
    return images, masks, expected_masks


def reference_item(image_path: Path, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    pil = Image.open(image_path)
    rgb = np.array(pil)[..., :3] if pil.mode == "RGBA" else np.array(pil.convert("RGB"))
    bucket = reference.nearest_aspect_bucket(pil.size, BUCKETS)
    image = reference.resize_image_to_bucket(rgb, bucket)
    if mask is None:
        return image, None, bucket
    # A same-aspect mask of another size goes through its own cover geometry, as in the reference.
    return image, reference.resize_mask_to_bucket(mask, bucket), bucket


def prepare(images: Path, names: list[str], **options) -> dict[str, _native.PreparedItem]:
    paths = [next(images.glob(f"{n}.*")) for n in names]
    results = _native.prepare_batch(paths, BUCKETS, **options)
    for r in results:
        assert isinstance(r, _native.PreparedItem), r
    return dict(zip(names, results, strict=True))


def test_fallback_chain_alpha_then_file_then_full_weight(dataset) -> None:
    images, masks, expected = dataset
    names = ["alpha", "file", "small", "bare", "rgb_alpha"]
    items = prepare(images, names, mask_index=_native.MaskIndex(masks), alpha_mask=True)
    assert {n: items[n].mask_source for n in names} == {
        "alpha": "alpha",
        "file": "file",
        "small": "file",
        "bare": "none",
        "rgb_alpha": "alpha",
    }
    assert items["file"].mask_path == masks / "file.png"
    assert items["alpha"].mask_path is None

    for name, key in [
        ("alpha", "alpha"),
        ("file", "file"),
        ("small", "small"),
        ("rgb_alpha", "rgb_alpha:alpha"),
    ]:
        item = items[name]
        ref_image, ref_mask, bucket = reference_item(item.path, expected[key])
        assert item.bucket == bucket
        np.testing.assert_array_equal(item.mask, ref_mask, err_msg=name)
        np.testing.assert_allclose(item.latent_mask, reference.latent_mask(ref_mask), atol=1e-6, rtol=0)
        if name != "file":  # JPEG decoders differ slightly; checked below with a tolerance
            np.testing.assert_array_equal(item.image, ref_image, err_msg=name)
    jpeg_ref, _, _ = reference_item(items["file"].path, None)
    assert np.abs(items["file"].image.astype(int) - jpeg_ref.astype(int)).mean() < 1.5

    bare = items["bare"]
    assert bare.mask is not None and (bare.mask == 255).all()
    assert bare.latent_mask is not None and (bare.latent_mask == 1.0).all()


def test_without_alpha_mask_the_file_wins(dataset) -> None:
    images, masks, expected = dataset
    item = prepare(images, ["rgb_alpha"], mask_index=_native.MaskIndex(masks))["rgb_alpha"]
    assert item.mask_source == "file"
    _, ref_mask, _ = reference_item(item.path, expected["rgb_alpha:file"])
    np.testing.assert_array_equal(item.mask, ref_mask)


def test_masking_off_gives_no_mask(dataset) -> None:
    images, _, _ = dataset
    item = prepare(images, ["alpha"])["alpha"]
    assert item.mask is None and item.latent_mask is None and item.mask_source == "none"
    assert item.image.shape == (item.bucket[1], item.bucket[0], 3)


@pytest.mark.parametrize("factor", [8, 16])
def test_latent_grid_shape_and_values(dataset, factor: int) -> None:
    images, masks, _ = dataset
    item = prepare(images, ["file"], mask_index=_native.MaskIndex(masks), latent_factor=factor)["file"]
    bw, bh = item.bucket
    assert item.latent_mask.shape == (bh // factor, bw // factor)
    assert item.latent_mask.dtype == np.float32
    np.testing.assert_allclose(item.latent_mask, reference.latent_mask(item.mask, factor), atol=1e-6, rtol=0)


def test_sixteen_bit_mask_keeps_precision_to_the_latent_grid(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(photo(64, 64, 9)).save(images / "a.png")
    # Values 8-bit cannot hold: v / 65535 is the weight, not round(v / 257) / 255.
    mask16 = np.random.default_rng(9).integers(0, 65536, (64, 64), dtype=np.uint16)
    cv2.imwrite(str(masks / "a.png"), mask16)
    item = prepare(images, ["a"], mask_index=_native.MaskIndex(masks))["a"]
    assert item.mask_bit_depth == 16
    expected = reference.latent_mask(mask16, 8, full_scale=65535.0)
    np.testing.assert_allclose(item.latent_mask, expected, atol=1e-6, rtol=0)
    eight_bit = reference.latent_mask(((mask16.astype(np.uint32) + 128) // 257).astype(np.uint8))
    assert np.abs(item.latent_mask - eight_bit).max() > 1e-4
    np.testing.assert_array_equal(item.mask, ((mask16.astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_order_is_kept_and_results_are_deterministic(dataset) -> None:
    images, masks, _ = dataset
    paths = sorted(images.iterdir()) * 5
    first = _native.prepare_batch(paths, BUCKETS, mask_index=_native.MaskIndex(masks), alpha_mask=True)
    second = _native.prepare_batch(paths, BUCKETS, mask_index=_native.MaskIndex(masks), alpha_mask=True)
    assert [r.path for r in first] == paths
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.latent_mask, b.latent_mask)


def test_choose_bucket_is_nearest_aspect() -> None:
    assert _native.choose_bucket(200, 120, BUCKETS) == (80, 48)
    assert _native.choose_bucket(100, 150, BUCKETS) == (48, 80)
    assert _native.choose_bucket(300, 90, BUCKETS) == (96, 32)
    with pytest.raises(ValueError, match="empty"):
        _native.choose_bucket(1, 1, [])
