"""Resize and latent-grid parity with the independent references: OpenCV INTER_AREA (shrinking),
PIL NEAREST and OpenCV INTER_NEAREST_EXACT (enlarging masks), PIL LANCZOS (enlarging images),
torch area interpolation (latent grid)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import reference
from masktrain import _native

RNG_SEED = 20261125


def random_sizes(count: int, low: int, high: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(low, high, 4)) for _ in range(count)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_inter_area_matches_opencv_for_arbitrary_shrinks(dtype: type) -> None:
    rng = np.random.default_rng(RNG_SEED)
    top = np.iinfo(dtype).max
    for w, h, ow, oh in random_sizes(120, 8, 260, 1):
        ow, oh = max(1, ow * w // 300), max(1, oh * h // 300)  # both axes shrink
        mask = rng.integers(0, top + 1, (h, w), dtype=dtype)
        ours = _native.resize_mask_to_size(mask, (ow, oh))
        theirs = cv2.resize(mask, (ow, oh), interpolation=cv2.INTER_AREA)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{w}x{h} -> {ow}x{oh}")


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_inter_area_integer_factors_within_one_lsb(factor: int) -> None:
    # OpenCV's SIMD 2x2 path rounds ties up and its scalar tail rounds them to even, so an
    # exact match on every pixel depends on the vector width; 1 LSB is the stated tolerance.
    rng = np.random.default_rng(factor)
    for ch in (1, 3):
        shape = (37 * factor, 53 * factor) + ((ch,) if ch == 3 else ())
        src = rng.integers(0, 256, shape, dtype=np.uint8)
        size = (53, 37)
        ours = (
            _native.resize_image_to_bucket(src, size) if ch == 3 else _native.resize_mask_to_size(src, size)
        )
        theirs = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.01


def test_mask_bucket_resize_matches_reference_pipeline() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for w, h, bw, bh in random_sizes(300, 8, 300, 2):
        mask = rng.integers(0, 256, (h, w), dtype=np.uint8)
        ours = _native.resize_mask_to_bucket(mask, (bw, bh))
        np.testing.assert_array_equal(
            ours, reference.resize_mask_to_bucket(mask, (bw, bh)), f"{w}x{h}->{bw}x{bh}"
        )


def test_mask_enlarging_matches_opencv_nearest_exact_not_nearest() -> None:
    rng = np.random.default_rng(3)
    mismatches_exact = mismatches_floor = 0
    for w, h, ow, oh in random_sizes(200, 4, 120, 3):
        ow, oh = w + ow, h + oh
        mask = rng.integers(0, 256, (h, w), dtype=np.uint8)
        ours = _native.resize_mask_to_size(mask, (ow, oh))
        mismatches_exact += not np.array_equal(
            ours, cv2.resize(mask, (ow, oh), interpolation=cv2.INTER_NEAREST_EXACT)
        )
        mismatches_floor += not np.array_equal(
            ours, cv2.resize(mask, (ow, oh), interpolation=cv2.INTER_NEAREST)
        )
        np.testing.assert_array_equal(
            ours, np.array(Image.fromarray(mask).resize((ow, oh), Image.Resampling.NEAREST))
        )
    assert mismatches_exact == 0
    # INTER_NEAREST floors dst*in/out, shifting the mask by half a pixel: it must disagree.
    assert mismatches_floor > 100


def test_torch_nearest_exact_agrees_on_sizes_without_exact_ties() -> None:
    # 10 -> 24 and 7 -> 16: (dst + 0.5) * in / out is never an integer, so float rounding in
    # torch (f32 scale) and PIL (accumulated f64) cannot pick different pixels.
    mask = np.arange(10 * 7, dtype=np.uint8).reshape(7, 10)
    ours = _native.resize_mask_to_size(mask, (24, 16))
    theirs = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(16, 24), mode="nearest-exact")
    np.testing.assert_array_equal(ours, theirs[0, 0].numpy().astype(np.uint8))


def test_image_bucket_resize_matches_reference_pipeline() -> None:
    # Shrinking: cv2 INTER_AREA exactly; enlarging: PIL LANCZOS exactly (we reproduce its
    # fixed-point arithmetic, so the stated tolerance is 0).
    rng = np.random.default_rng(RNG_SEED + 1)
    enlarged = shrunk = 0
    for w, h, bw, bh in random_sizes(200, 8, 300, 4):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = _native.resize_image_to_bucket(rgb, (bw, bh))
        theirs = reference.resize_image_to_bucket(rgb, (bw, bh))
        np.testing.assert_array_equal(ours, theirs, f"{w}x{h}->{bw}x{bh}")
        if reference.cover_geometry((w, h), (bw, bh))[1] > 1:
            enlarged += 1
        else:
            shrunk += 1
    assert enlarged > 30 and shrunk > 30


def test_lanczos_on_a_smooth_photo_like_image() -> None:
    y, x = np.mgrid[0:90, 0:120].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), (x + y) % 256], axis=-1)
    rgb = rgb.clip(0, 255).astype(np.uint8)
    ours = _native.resize_image_to_bucket(rgb, (320, 240))
    theirs = np.array(Image.fromarray(rgb).resize((320, 240), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(ours, theirs)


def test_same_size_is_returned_unchanged() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_native.resize_image_to_bucket(rgb, (64, 48)), rgb)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((64, 48), (8, 6)),
        ((1024, 1000), (128, 125)),
        ((67, 45), (8, 5)),
        ((100, 100), (12, 12)),
        ((30, 20), (7, 9)),
        ((37, 37), (4, 4)),
        ((5, 3), (9, 7)),
        ((1, 1), (1, 1)),
    ],
)
def test_latent_downsample_matches_torch_area(shape: tuple[int, int], size: tuple[int, int]) -> None:
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    ours = _native.area_downsample(x, size)
    theirs = F.interpolate(torch.from_numpy(x)[None, None], size=size, mode="area")[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_latent_downsample_random_shapes() -> None:
    rng = np.random.default_rng(5)
    for H, W, h, w in random_sizes(200, 1, 160, 5):
        x = rng.random((H, W), dtype=np.float32)
        h, w = max(1, h // 3), max(1, w // 3)
        ours = _native.area_downsample(x, (h, w))
        theirs = F.interpolate(torch.from_numpy(x)[None, None], size=(h, w), mode="area")[0, 0].numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
