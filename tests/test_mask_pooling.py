"""``_native.pool_mask_frames``: mask frames pooled onto the latent grid as the causal video VAE
groups frames (latent frame 0 <- frame 0, latent frame k <- frames t(k-1)+1 ... tk), checked
against an independent numpy computation in every mode, with the cache-time transform applied per
pixel before pooling and 8/16-bit frames read as v / 255 and v / 65535."""

from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest

from masktrain import _native
from masktrain.errors import DataError

Array = npt.NDArray[np.float32]


def cells(frames: Array, s: int, t: int) -> list[npt.NDArray[np.float64]]:
    """Each latent frame's cells as an (h, w, frames, s, s) float64 block (sizes multiples of s)."""
    n, height, width = frames.shape
    groups = [range(0, 1)] + [range(t * (k - 1) + 1, t * k + 1) for k in range(1, 1 + (n - 1) // t)]
    blocks = []
    for group in groups:
        clip = frames[list(group)].astype(np.float64)
        blocks.append(clip.reshape(len(group), height // s, s, width // s, s).transpose(1, 3, 0, 2, 4))
    return blocks


def numpy_area(frames: Array, s: int, t: int) -> Array:
    return np.stack([b.mean(axis=(2, 3, 4)) for b in cells(frames, s, t)]).astype(np.float32)


def numpy_max(frames: Array, s: int, t: int) -> Array:
    return np.stack([b.max(axis=(2, 3, 4)) for b in cells(frames, s, t)]).astype(np.float32)


def numpy_nearest(frames: Array, s: int, t: int) -> Array:
    picked = [b[:, :, b.shape[2] // 2, s // 2, s // 2] for b in cells(frames, s, t)]
    return np.stack(picked).astype(np.float32)


REFERENCES: dict[str, Callable[[Array, int, int], Array]] = {
    "area": numpy_area,
    "max": numpy_max,
    "nearest": numpy_nearest,
}


def random_frames(n: int, height: int, width: int, seed: int = 0) -> Array:
    return np.random.default_rng(seed).random((n, height, width), dtype=np.float32)


def numpy_transform(frames: Array, gamma: float, min_weight: float) -> Array:
    """The reference's ``apply_cache_mask_transforms`` per pixel, in float32."""
    m = np.clip(frames, 0.0, 1.0) ** np.float32(gamma)
    return np.clip(m * np.float32(1 - min_weight) + np.float32(min_weight), 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("mode", sorted(REFERENCES))
@pytest.mark.parametrize("s", [8, 16])
@pytest.mark.parametrize(("n", "t"), [(1, 4), (5, 4), (9, 4), (21, 4), (1, 1), (5, 1)])
def test_each_mode_matches_numpy(mode: str, s: int, n: int, t: int) -> None:
    frames = random_frames(n, 4 * s, 6 * s, seed=n + s)
    got = _native.pool_mask_frames(frames, s, t, mode)
    expected = REFERENCES[mode](frames, s, t)
    assert got.dtype == np.float32 and got.shape == (1 + (n - 1) // t, 4, 6)
    if mode == "area":
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", sorted(REFERENCES))
def test_the_cache_transform_comes_before_pooling(mode: Literal["area", "max", "nearest"]) -> None:
    frames = random_frames(9, 32, 48, seed=11)
    got = _native.pool_mask_frames(frames, 8, 4, mode, cache_mask_gamma=0.6, cache_mask_min_weight=0.2)
    expected = REFERENCES[mode](numpy_transform(frames, 0.6, 0.2), 8, 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    if mode == "area":  # the mean does not commute with the transform (max and nearest do)
        assert np.abs(numpy_transform(REFERENCES[mode](frames, 8, 4), 0.6, 0.2) - got).max() > 1e-3


@pytest.mark.parametrize("mode", sorted(REFERENCES))
def test_uint8_and_uint16_frames_pool_as_their_unit_weights(mode: Literal["area", "max", "nearest"]) -> None:
    rng = np.random.default_rng(5)
    for dtype, top in [(np.uint8, 255), (np.uint16, 65535)]:
        ints = rng.integers(0, top + 1, (5, 32, 32)).astype(dtype)
        unit = ints.astype(np.float32) / np.float32(top)
        for gamma, floor in [(1.0, 0.0), (0.7, 0.1)]:
            kwargs = {"cache_mask_gamma": gamma, "cache_mask_min_weight": floor}
            got = _native.pool_mask_frames(ints, 8, 4, mode, **kwargs)
            assert np.array_equal(got, _native.pool_mask_frames(unit, 8, 4, mode, **kwargs)), (dtype, gamma)


def test_one_frame_area_is_area_downsample_exactly() -> None:
    for height, width, s in [(64, 96, 8), (40, 56, 8), (37, 53, 8), (96, 64, 16)]:
        frame = random_frames(1, height, width, seed=height)
        got = _native.pool_mask_frames(frame, s, 1, "area")
        expected = _native.area_downsample(frame[0], (height // s, width // s))
        assert got.shape == (1, *expected.shape)
        assert np.array_equal(got[0], expected)
        # a still mask repeated over a clip pools to the same plane in every latent frame
        clip = np.repeat(frame, 9, axis=0)
        still = _native.pool_mask_frames(clip, s, 4, "area")
        assert np.array_equal(still, np.repeat(expected[None], 3, axis=0))


def test_max_keeps_a_two_pixel_subject_that_area_dilutes() -> None:
    frames = np.zeros((5, 32, 32), dtype=np.float32)
    frames[3, 10, 21:23] = 1.0  # a distant face: 2 pixels in one frame of latent frame 1
    area = _native.pool_mask_frames(frames, 16, 4, "area")
    peak = _native.pool_mask_frames(frames, 16, 4, "max")
    assert area[1, 0, 1] == pytest.approx(2 / (16 * 16 * 4))
    assert peak[1, 0, 1] == 1.0
    assert peak[1].sum() == 1.0 and peak[0].sum() == 0.0


def test_nearest_picks_pixel_half_n_and_frame_4k_minus_1() -> None:
    n, s = 9, 8
    frames = np.zeros((n, 16, 16), dtype=np.float32)
    for i in range(n):
        frames[i] = i + 1  # each frame's number, plus a marker on the picked pixels
        frames[i, 4::8, 4::8] += 0.5
    got = _native.pool_mask_frames(frames, s, 4, "nearest")
    # latent 0 <- frame 0; latent k <- frame 4k-1 of 4k-3 ... 4k (frames 3, 7: numbered 4, 8);
    # the marked pixel 4 of 8 on each axis
    assert got[:, 0, 0].tolist() == [1.5, 4.5, 8.5]
    assert (got == got[:, :1, :1]).all()


@pytest.mark.parametrize(("n", "t", "hint"), [(6, 4, "5 or 9"), (20, 4, "17 or 21"), (0, 4, "1 or 5")])
def test_a_clip_of_the_wrong_length_names_the_counts(n: int, t: int, hint: str) -> None:
    with pytest.raises(DataError, match=rf"^{n} mask frames .* 1 \+ {t}\*m .*{hint}"):
        _native.pool_mask_frames(np.zeros((n, 16, 16), dtype=np.float32), 8, t, "area")


def test_bad_arguments_are_value_errors() -> None:
    frames = np.zeros((5, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="area, max or nearest, got 'mean'"):
        _native.pool_mask_frames(frames, 8, 4, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial_factor must be positive"):
        _native.pool_mask_frames(frames, 0, 4, "max")
    with pytest.raises(ValueError, match="temporal_factor must be positive"):
        _native.pool_mask_frames(frames, 8, 0, "max")
    with pytest.raises(ValueError, match="float32, uint8 or uint16"):
        _native.pool_mask_frames(frames.astype(np.float64), 8, 4, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_mask_gamma must be > 0"):
        _native.pool_mask_frames(frames, 8, 4, "max", cache_mask_gamma=0.0)


def test_strided_views_pool_like_their_copies() -> None:
    frames = random_frames(9, 64, 64, seed=3)[:, ::2, 1::2]
    modes: tuple[Literal["area", "max", "nearest"], ...] = ("area", "max", "nearest")
    for mode in modes:
        got = _native.pool_mask_frames(frames, 8, 4, mode)
        assert np.array_equal(got, _native.pool_mask_frames(np.ascontiguousarray(frames), 8, 4, mode))
