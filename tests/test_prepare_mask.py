"""`prepare_mask`: a mask file laid onto a bucket and pooled onto the latent grid on its own (for
video datasets), checked bit for bit against the mask half of `prepare_batch` and against the
reference pipeline (cv2/PIL resize, torch area pooling)."""

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import reference
from masktrain import _native
from masktrain.errors import AspectMismatchError, MaskTrainError

SOURCE_SIZE = (60, 40)
#: (width, height) of mask files with the source's aspect: its own size, half, one and a half.
MASK_SIZES = [(60, 40), (30, 20), (90, 60)]
#: Shrinking every mask, enlarging every mask, and a crop of another aspect (mixed).
BUCKETS = [(24, 16), (96, 64), (56, 40)]


def mask_file(path: Path, size: tuple[int, int], bits: int, seed: int) -> np.ndarray:
    """A tiered mask with soft noise, so resizing and pooling have edges and gradients to get wrong."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    mask = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2, 1.0, 0.3)
    mask = np.clip(mask * (x + 1) / w + rng.uniform(-0.05, 0.05, (h, w)), 0.0, 1.0)
    top = 255 if bits == 8 else 65535
    array = np.round(mask * top).astype(np.uint8 if bits == 8 else np.uint16)
    cv2.imwrite(str(path), array)
    return array


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "photo.png"
    path.parent.mkdir()
    (tmp_path / "masks").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (SOURCE_SIZE[1], SOURCE_SIZE[0], 3), dtype=np.uint8)
    cv2.imwrite(str(path), rgb)
    return path


def batch_item(image: Path, bucket: tuple[int, int], factor: int) -> _native.PreparedItem:
    index = _native.MaskIndex(image.parent.parent / "masks")
    (item,) = _native.prepare_batch([image], [bucket], mask_index=index, latent_factor=factor)
    assert isinstance(item, _native.PreparedItem), item
    assert item.mask_source == "file"
    return item


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("mask_size", MASK_SIZES)
@pytest.mark.parametrize("bucket", BUCKETS)
def test_matches_prepare_batch_and_the_reference(
    source: Path, bits: int, mask_size: tuple[int, int], bucket: tuple[int, int]
) -> None:
    path = source.parent.parent / "masks" / "photo.png"
    original = mask_file(path, mask_size, bits, seed=bits + mask_size[0])
    for factor in (8, 16):
        mask, latent = _native.prepare_mask(path, SOURCE_SIZE, bucket, factor, source=source)
        item = batch_item(source, bucket, factor)

        assert mask.dtype == (np.uint8 if bits == 8 else np.uint16)
        assert mask.shape == (bucket[1], bucket[0])
        assert latent.dtype == np.float32 and latent.shape == (bucket[1] // factor, bucket[0] // factor)
        assert item.mask_bit_depth == bits
        # PreparedItem.mask is the 8-bit view: round(v / 257) for 16-bit masks.
        eight = mask if bits == 8 else ((mask.astype(np.uint32) + 128) // 257).astype(np.uint8)
        np.testing.assert_array_equal(eight, item.mask)
        np.testing.assert_array_equal(latent, item.latent_mask)

        ref_mask = reference.resize_mask_to_bucket(original, bucket)
        np.testing.assert_array_equal(mask, ref_mask)
        full_scale = 255.0 if bits == 8 else 65535.0
        expected = reference.latent_mask(ref_mask, factor, full_scale=full_scale)
        np.testing.assert_allclose(latent, expected, atol=1e-6, rtol=0)


def test_bucket_off_the_latent_multiple_pools_as_prepare_batch_does(source: Path) -> None:
    """Not divisible: the grid is floor(bucket / factor), pooled with torch's overlapping
    windows. Smaller than one latent cell: a 1x1 grid, as in a batch (torch would refuse 0x0)."""
    path = source.parent.parent / "masks" / "photo.png"
    original = mask_file(path, (30, 20), 8, seed=1)
    for bucket, grid in [((36, 20), (2, 4)), ((44, 28), (3, 5)), ((6, 4), (1, 1))]:
        mask, latent = _native.prepare_mask(path, SOURCE_SIZE, bucket, 8)
        item = batch_item(source, bucket, 8)
        assert latent.shape == grid
        np.testing.assert_array_equal(mask, item.mask)
        np.testing.assert_array_equal(latent, item.latent_mask)
        if min(bucket) >= 8:
            expected = reference.latent_mask(reference.resize_mask_to_bucket(original, bucket), 8)
            np.testing.assert_allclose(latent, expected, atol=1e-6, rtol=0)


def test_aspect_mismatch_names_mask_media_and_source(tmp_path: Path) -> None:
    mask = tmp_path / "clip.png"
    mask_file(mask, (48, 48), 8, seed=2)
    video = tmp_path / "videos" / "clip.mp4"
    with pytest.raises(AspectMismatchError, match=r"clip\.png: aspect ratio mismatch: video .*96x48") as info:
        _native.prepare_mask(mask, (96, 48), (64, 32), source=video, media="video")
    message = str(info.value)
    assert message.startswith(f"{mask}: aspect ratio mismatch: video {video} is 96x48 (aspect 2.0000)")
    assert "mask is 48x48 (aspect 1.0000)" in message
    assert isinstance(info.value, MaskTrainError) and isinstance(info.value, ValueError)

    # Images keep prepare_batch's wording; without a source the media word stands alone.
    image = tmp_path / "photo.png"
    with pytest.raises(
        AspectMismatchError, match=re.escape(f"{mask}: aspect ratio mismatch: image {image} is")
    ):
        _native.prepare_mask(mask, (96, 48), (64, 32), source=image)
    with pytest.raises(
        AspectMismatchError, match=re.escape(f"{mask}: aspect ratio mismatch: video is 96x48")
    ):
        _native.prepare_mask(mask, (96, 48), (64, 32), media="video")
    # Within 1% passes.
    _native.prepare_mask(mask, (100, 99), (64, 64), media="video")


def test_bad_arguments(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError) as info:
        _native.prepare_mask(missing, (96, 48), (64, 32))
    assert info.value.filename == str(missing)

    mask = tmp_path / "mask.png"
    mask_file(mask, (96, 48), 8, seed=3)
    for kwargs in [
        {"media": "other"},
        {"media": "Video"},
        {"latent_factor": 0},
        {"bucket": (0, 32)},
        {"image_size": (96, 0)},
    ]:
        arguments = {"image_size": (96, 48), "bucket": (64, 32), **kwargs}
        with pytest.raises(ValueError) as value_error:
            _native.prepare_mask(mask, **arguments)
        # A wrong call, not bad data: a plain ValueError, not a MaskTrainError.
        assert type(value_error.value) is ValueError, kwargs
