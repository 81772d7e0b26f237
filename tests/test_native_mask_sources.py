"""Where ``prepare_batch`` takes an image's mask from (alpha -> the item's own ``mask_paths`` file ->
the ``mask_index`` match -> the dataset's ``default_mask`` -> full weight), ``mask_pooling`` on image
masks against numpy, and the in-memory mask entry points the video cacher uses
(``prepare_loaded_mask``, ``prepare_loaded_mask_frames``) against their file-based twins."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from helpers import TickCounter
from masktrain import _native
from masktrain.errors import AspectMismatchError, MissingMaskError

Pooling = Literal["area", "max", "nearest"]
MODES: tuple[Pooling, ...] = ("area", "max", "nearest")


def write_rgb(path: Path, width: int, height: int, alpha: int | None = None) -> Path:
    rgb = np.random.default_rng(width + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if alpha is None:
        cv2.imwrite(str(path), rgb)
    else:
        cv2.imwrite(str(path), np.dstack([rgb, np.full((height, width), alpha, np.uint8)]))
    return path


def write_mask(path: Path, mask: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> Path:
    cv2.imwrite(str(path), mask)
    return path


def level(value: int) -> npt.NDArray[np.uint8]:
    return np.full((16, 32), value, np.uint8)


def numpy_pool(unit: npt.NDArray[np.float32], s: int, mode: Pooling) -> npt.NDArray[np.float32]:
    """One (H, W) plane pooled in s x s blocks (H, W multiples of s), independently of the core."""
    h, w = unit.shape
    blocks = unit.astype(np.float64).reshape(h // s, s, w // s, s).transpose(0, 2, 1, 3)
    if mode == "area":
        pooled = blocks.mean(axis=(2, 3))
    elif mode == "max":
        pooled = blocks.max(axis=(2, 3))
    else:
        pooled = blocks[:, :, s // 2, s // 2]
    return np.asarray(pooled, dtype=np.float32)


def only(results: Sequence[object]) -> list[_native.PreparedItem]:
    assert all(isinstance(r, _native.PreparedItem) for r in results), results
    return [r for r in results if isinstance(r, _native.PreparedItem)]


def test_precedence_alpha_own_file_index_default_then_full(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    images = [
        write_rgb(tmp_path / "alpha.png", 64, 32, alpha=40),
        write_rgb(tmp_path / "own.png", 64, 32),
        write_rgb(tmp_path / "indexed.png", 64, 32),
        write_rgb(tmp_path / "plain.png", 64, 32),
    ]
    write_mask(masks / "own.png", level(60))  # the index's match, which the item's own file overrides
    write_mask(masks / "indexed.png", level(80))
    own = write_mask(tmp_path / "own_mask.png", level(100))
    default = write_mask(tmp_path / "default.png", level(120)[:8, :16])
    index = _native.MaskIndex(masks)
    mask_paths = [own, own, None, None]
    items = only(
        _native.prepare_batch(
            images, [(32, 16)], mask_index=index, alpha_mask=True, mask_paths=mask_paths, default_mask=default
        )
    )
    assert [i.mask_source for i in items] == ["alpha", "file", "file", "default"]
    assert [i.mask_path for i in items] == [None, own, masks / "indexed.png", default]
    for item, value in zip(items, [40, 100, 80, 120], strict=True):
        assert item.latent_mask is not None
        np.testing.assert_allclose(item.latent_mask, value / 255, rtol=0, atol=1e-6)

    # no default: full weight, or the require_mask error naming the image
    (full,) = only(_native.prepare_batch(images[3:], [(32, 16)], mask_index=index, mask_paths=[None]))
    assert full.mask_source == "none" and full.latent_mask is not None and (full.latent_mask == 1.0).all()
    (missing,) = _native.prepare_batch(images[3:], [(32, 16)], mask_index=index, require_mask=True)
    assert isinstance(missing, MissingMaskError) and "plain.png" in str(missing)

    # the items' own files alone turn masking on for the whole batch; with no source it stays off
    on = only(_native.prepare_batch(images[1:4], [(32, 16)], mask_paths=[own, None, None]))
    assert [i.mask_source for i in on] == ["file", "none", "none"] and on[2].latent_mask is not None
    (off,) = only(_native.prepare_batch(images[3:], [(32, 16)], mask_paths=[None]))
    assert off.mask is None and off.latent_mask is None


def test_bad_batch_arguments_are_value_errors(tmp_path: Path) -> None:
    image = write_rgb(tmp_path / "a.png", 64, 32)
    with pytest.raises(ValueError, match="mask_paths has 2 entries for 1 paths"):
        _native.prepare_batch([image], [(32, 16)], mask_paths=[None, None])
    with pytest.raises(ValueError, match="area, max or nearest, got 'mean'"):
        _native.prepare_batch([image], [(32, 16)], mask_pooling="mean")  # type: ignore[arg-type]
    mask = write_mask(tmp_path / "a_mask.png", level(9))
    with pytest.raises(ValueError, match="area, max or nearest, got 'mean'"):
        _native.prepare_mask(mask, (64, 32), (32, 16), mask_pooling="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="area, max or nearest, got 'Max'"):
        _native.prepare_loaded_mask(level(9), mask, (64, 32), (32, 16), mask_pooling="Max")  # type: ignore[arg-type]
    # a missing default mask is the whole batch's error; a missing own file is its item's
    with pytest.raises(FileNotFoundError):
        _native.prepare_batch([image], [(32, 16)], default_mask=tmp_path / "missing.png")
    (error,) = _native.prepare_batch([image], [(32, 16)], mask_paths=[tmp_path / "missing.png"])
    assert isinstance(error, FileNotFoundError) and error.filename == str(tmp_path / "missing.png")


def test_a_default_mask_of_another_aspect_says_it_is_the_default(tmp_path: Path) -> None:
    image = write_rgb(tmp_path / "wide.png", 64, 32)
    default = write_mask(tmp_path / "square.png", np.full((16, 16), 255, np.uint8))
    (error,) = _native.prepare_batch([image], [(32, 16)], default_mask=default)
    assert isinstance(error, AspectMismatchError)
    message = str(error)
    assert message.startswith(f"{default} (the dataset's default_mask): aspect ratio mismatch: image {image}")
    assert "give this item its own mask" in message


@pytest.mark.parametrize("mode", MODES)
def test_image_masks_pool_like_numpy_in_every_mode(tmp_path: Path, mode: Pooling) -> None:
    rng = np.random.default_rng(7)
    mask = rng.integers(0, 256, (32, 64), dtype=np.uint8)
    image = write_rgb(tmp_path / "photo.png", 64, 32)
    mask_path = write_mask(tmp_path / "photo_mask.png", mask)
    unit = mask.astype(np.float32) / np.float32(255)
    transformed = np.clip(unit ** np.float32(0.5) * np.float32(0.75) + np.float32(0.25), 0, 1)
    for gamma, floor, values in [(1.0, 0.0, unit), (0.5, 0.25, transformed)]:
        weights: dict[str, Any] = {"cache_mask_gamma": gamma, "cache_mask_min_weight": floor}
        (item,) = only(
            _native.prepare_batch([image], [(64, 32)], mask_paths=[mask_path], mask_pooling=mode, **weights)
        )
        assert item.latent_mask is not None and item.mask is not None and np.array_equal(item.mask, mask)
        np.testing.assert_allclose(item.latent_mask, numpy_pool(values, 8, mode), rtol=0, atol=1e-6)
        # the mask half on its own pools the same, and one frame of pool_mask_frames too
        _, alone = _native.prepare_mask(mask_path, (64, 32), (64, 32), mask_pooling=mode, **weights)
        assert np.array_equal(alone, item.latent_mask)
        frames = _native.pool_mask_frames(mask[None], 8, 1, mode, **weights)
        assert np.array_equal(frames[0], item.latent_mask)
        if mode == "area" and gamma == 1.0:  # today's path, bit for bit: torch's area pool of v / 255
            (plain,) = only(_native.prepare_batch([image], [(64, 32)], mask_paths=[mask_path]))
            assert np.array_equal(item.latent_mask, _native.area_downsample(unit, (4, 8)))
            assert plain.latent_mask is not None and np.array_equal(plain.latent_mask, item.latent_mask)


def test_max_keeps_a_two_pixel_subject_that_area_dilutes(tmp_path: Path) -> None:
    image = write_rgb(tmp_path / "crowd.png", 64, 32)
    mask = np.zeros((32, 64), np.uint8)
    mask[5, 10:12] = 255  # a distant face
    mask_path = write_mask(tmp_path / "crowd_mask.png", mask)
    latent: dict[str, npt.NDArray[np.float32] | None] = {}
    for mode in MODES:
        (item,) = only(_native.prepare_batch([image], [(64, 32)], mask_paths=[mask_path], mask_pooling=mode))
        latent[mode] = item.latent_mask
    assert latent["area"] is not None and latent["max"] is not None
    assert latent["area"][0, 1] == pytest.approx(2 / 64, abs=1e-7)
    assert latent["max"][0, 1] == 1.0 and latent["max"].sum() == 1.0


@pytest.mark.parametrize("bits", [8, 16])
def test_prepare_loaded_mask_is_prepare_mask_of_the_same_file(tmp_path: Path, bits: int) -> None:
    top, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    mask: Any = np.random.default_rng(bits).integers(0, top + 1, (40, 60)).astype(dtype)
    path = write_mask(tmp_path / "still.png", mask)
    loaded = _native.load_mask(path)
    assert loaded.dtype == dtype
    for bucket in [(24, 16), (96, 64), (56, 40)]:
        for factor, mode in [(8, "area"), (8, "max"), (16, "nearest")]:
            kwargs: dict[str, Any] = {"cache_mask_gamma": 0.8, "cache_mask_min_weight": 0.1}
            kwargs["mask_pooling"] = mode
            expected = _native.prepare_mask(path, (120, 80), bucket, factor, media="video", **kwargs)
            got = _native.prepare_loaded_mask(loaded, path, (120, 80), bucket, factor, **kwargs)
            assert got[0].dtype == dtype and np.array_equal(got[0], expected[0])
            assert np.array_equal(got[1], expected[1]), (bucket, factor, mode)
    with pytest.raises(AspectMismatchError) as file_error:
        _native.prepare_mask(path, (80, 80), (32, 32), source="clips/walk.mp4", media="video")
    with pytest.raises(AspectMismatchError) as loaded_error:
        _native.prepare_loaded_mask(loaded, path, (80, 80), (32, 32), source="clips/walk.mp4")
    assert str(loaded_error.value) == str(file_error.value)
    assert str(loaded_error.value).startswith(f"{path}: aspect ratio mismatch: video clips/walk.mp4 is 80x80")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_prepare_loaded_mask_frames_resizes_each_frame_as_resize_mask_to_bucket(dtype: type) -> None:
    top = np.iinfo(dtype).max
    frames: Any = np.random.default_rng(3).integers(0, top + 1, (9, 40, 60)).astype(dtype)
    for bucket in [(24, 16), (96, 64), (56, 40)]:
        got = _native.prepare_loaded_mask_frames(frames, "walk_masks", (120, 80), bucket)
        expected = np.stack([_native.resize_mask_to_bucket(f, bucket) for f in frames])
        assert got.dtype == dtype and got.shape == (9, bucket[1], bucket[0])
        assert np.array_equal(got, expected)
    message = r"^walk_masks: aspect ratio mismatch: video walk.mp4 is 80x80"
    with pytest.raises(AspectMismatchError, match=message):
        _native.prepare_loaded_mask_frames(frames, "walk_masks", (80, 80), (32, 32), source="walk.mp4")
    with pytest.raises(ValueError, match="uint8 or uint16"):
        _native.prepare_loaded_mask_frames(frames.astype(np.float32), "m", (120, 80), (24, 16))


def test_mask_frames_are_resized_with_the_gil_released() -> None:
    """A pure-Python thread keeps counting while a clip's mask frames are resized in Rust."""
    frames = np.random.default_rng(9).integers(0, 256, (65, 360, 640), dtype=np.uint8)
    with TickCounter() as ticks:
        before = ticks.count
        out = _native.prepare_loaded_mask_frames(frames, "clip_masks", (640, 360), (416, 240))
        during = ticks.count - before
    assert out.shape == (65, 240, 416)
    assert during > 20, during  # held throughout, the counter would stall (0-2 ticks)
