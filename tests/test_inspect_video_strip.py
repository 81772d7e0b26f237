"""``masktrain inspect``'s strip of a video clip's latent frames (issue 24): on a synthetic clip whose
mask square moves two cells per latent frame, each latent frame shows the pixel frame the VAE puts
last in its group (0, 4, 8, ...) with that frame's weights, so the red overlay moves with the square.
And an inspected video whose cached mask moves: its numbers count every latent frame of its first
clip, and its picture is the strip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from masktrain.config.inspect import InspectConfig
from masktrain.inspect.page import LABEL_HEIGHT, STRIP_GAP, latent_frame_pixels, strip

FRAMES, HEIGHT, WIDTH, CELL = 9, 48, 64, 8
GREY, BLUE_STEP = 100, 25
"""Every pixel grey 100 but its blue channel, 25 times its frame's index: a tile names its frame."""


def moving_square() -> tuple[np.ndarray, np.ndarray]:
    """9 frames (N, H, W, 3) and their (3, 6, 8) weights: a 2x2-cell square at rows 2-3 and columns
    2k .. 2k+1 in latent frame k, 0 elsewhere."""
    frames = np.full((FRAMES, HEIGHT, WIDTH, 3), GREY, np.uint8)
    frames[..., 2] = (BLUE_STEP * np.arange(FRAMES, dtype=np.uint8))[:, None, None]
    raw = np.zeros((3, HEIGHT // CELL, WIDTH // CELL), np.float32)
    for k in range(3):
        raw[k, 2:4, 2 * k : 2 * k + 2] = 1.0
    return frames, raw


def tiles(png: bytes, count: int) -> list[np.ndarray]:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    assert pixels.shape == (HEIGHT + LABEL_HEIGHT, count * WIDTH + (count - 1) * STRIP_GAP, 3)
    return [pixels[:HEIGHT, k * (WIDTH + STRIP_GAP) : k * (WIDTH + STRIP_GAP) + WIDTH] for k in range(count)]


def test_each_latent_frame_shows_the_last_pixel_frame_of_its_group() -> None:
    assert latent_frame_pixels(1, 4) == [0]
    assert latent_frame_pixels(21, 4) == [0, *range(4, 81, 4)]  # 81 frames: 0, then 4k of 4k-3 .. 4k


def test_the_strips_overlay_follows_the_moving_square() -> None:
    frames, raw = moving_square()
    shown = tiles(strip(frames, raw, 4, InspectConfig(Path("unused.toml"))), 3)
    for k, tile in enumerate(shown):
        red = tile[..., 0] - tile[..., 1] > 60  # weight 1: +97 red over green; weight 0: 0
        expected = np.zeros((HEIGHT, WIDTH), bool)
        expected[2 * CELL : 4 * CELL, 2 * k * CELL : (2 * k + 2) * CELL] = True
        np.testing.assert_array_equal(red, expected, err_msg=f"latent frame {k}")
        # weight 0 dims to 0.35 of the frame: blue 0.35 * 25 * i names pixel frame i = 4k
        blue = tile[0, 0, 2] / (0.35 * BLUE_STEP)
        assert blue == pytest.approx(4 * k, abs=0.2)


def test_the_prior_region_moves_too() -> None:
    frames, raw = moving_square()
    config = InspectConfig(Path("unused.toml"), prior_mask_threshold=0.1)
    for k, tile in enumerate(tiles(strip(frames, raw, 4, config), 3)):
        blue = tile[..., 2] - tile[..., 0] > 30  # the prior region (raw < 0.1): all but the square
        assert not blue[2 * CELL : 4 * CELL, 2 * k * CELL : (2 * k + 2) * CELL].any()
        assert blue.sum() == HEIGHT * WIDTH - 4 * CELL * CELL


def test_a_clip_too_short_for_its_latent_frames_is_refused() -> None:
    frames, raw = moving_square()
    with pytest.raises(ValueError, match="a clip of 8 frames has no frame 8 for its latent frame 2"):
        strip(frames[:8], raw, 4, InspectConfig(Path("unused.toml")))


def test_an_inspected_video_counts_every_latent_frame_and_shows_its_strip(tmp_path: Path) -> None:
    """A 9-frame video whose mask frames (a folder) hold a 255 square moving 8 pixels a frame: from
    the sources and then from the cache, its numbers are its clip's over all 3 latent frames
    (counted here from the cached weights), and its picture is a strip of 3 whose red moves right."""
    from helpers import cache_tiny, write_video
    from masktrain.inspect.page import run

    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "clip.mkv", FRAMES)
    (tmp_path / "videos" / "clip.txt").write_text("a clip")
    folder = tmp_path / "masks" / "clip"
    folder.mkdir(parents=True)
    for index in range(FRAMES):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[16:32, 8 * index : 8 * index + 16] = 255
        Image.fromarray(mask).save(folder / f"{index:05d}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nresolution = [64, 48]\n\n[[datasets]]\nvideo_directory = "videos"\n'
        f'mask_directory = "masks"\ncache_directory = "cache"\ntarget_frames = [{FRAMES}]\n'
    )
    (before,) = run(InspectConfig(toml, output_dir=tmp_path / "before"))
    cache_tiny(tmp_path)
    (after,) = run(InspectConfig(toml, output_dir=tmp_path / "after"))
    (path,) = (tmp_path / "cache").glob("clip_*_wan.safetensors")
    raw = next(v for k, v in load_file(str(path)).items() if k.startswith("mask_weights"))[0]
    assert raw.shape == (3, HEIGHT // CELL, WIDTH // CELL)
    face, subject = float((raw >= 0.75).mean()), float((raw >= 0.05).mean())
    assert face < float((raw[0] >= 0.75).mean())  # the first frame's numbers would differ
    for report, read_from in ((before, "sources"), (after, "cache")):
        (item,) = report.items
        assert (item.read_from, item.latent_frames, item.grid) == (read_from, 3, (8, 6))
        assert (item.face, item.face + item.body) == pytest.approx((face, subject), abs=1e-9)
        assert item.mean_weight == pytest.approx(float(raw.mean()), rel=1e-5)
    for out in ("before", "after"):
        shown = tiles((tmp_path / out / "overlays" / "0_clip.png").read_bytes(), 3)
        columns = [np.nonzero((tile[..., 0] - tile[..., 1] > 60).any(axis=0))[0] for tile in shown]
        assert all(len(c) for c in columns)
        assert columns[0].min() < columns[1].min() < columns[2].min()
        assert 'class="strip"' in (tmp_path / out / "index.html").read_text()
