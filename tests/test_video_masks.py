"""Per-frame video masks through ``masktrain cache`` with the tiny WAN models: a mask video, a folder
of mask frames and a JSONL ``mask_path`` laid onto the clip's frames and pooled as the causal VAE
groups frames (latent 0 <- frame 0, latent k <- frames 4k-3 .. 4k), checked against an independent
numpy computation for every frame-extraction mode; the pad / cut warnings; the fingerprint; the
dataset ``default_mask``; other trainers' keys; and the three example TOMLs cached and trained."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cache_tiny, train_config
from mask_videos import write_frame_folder, write_mask_video
from masktrain.config import ConfigError
from masktrain.data import cache_format as fmt

EXAMPLES = Path(__file__).parent.parent / "examples" / "video_masks"
SIZE, FRAMES, SIDE = 64, 34, 16  # make_data.py's clip
FACTOR, TEMPORAL = 8, 4  # the tiny WAN VAE's


def square_mask(frame: int) -> np.ndarray:
    """make_data.py's mask of `frame`, written again here: the square moves one pixel per frame."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[24 : 24 + SIDE, 4 + frame : 4 + frame + SIDE] = 255
    return mask


def pooled(masks: list[np.ndarray], mode: str = "area") -> np.ndarray:
    """Latent weights of a clip's mask frames, by hand: frame groups [0], [1..4], [5..8], ...;
    within a group and an 8x8 cell the mean (area), the maximum (max) or the middle pixel of the
    middle frame (nearest)."""
    frames = np.stack(masks).astype(np.float64) / 255.0
    groups = [[0]] + [list(range(4 * k - 3, 4 * k + 1)) for k in range(1, (len(masks) - 1) // TEMPORAL + 1)]
    h, w = SIZE // FACTOR, SIZE // FACTOR
    out = []
    for group in groups:
        cells = frames[group].reshape(len(group), h, FACTOR, w, FACTOR)
        if mode == "area":
            out.append(cells.mean(axis=(0, 2, 4)))
        elif mode == "max":
            out.append(cells.max(axis=(0, 2, 4)))
        else:
            out.append(cells[len(group) // 2, :, FACTOR // 2, :, FACTOR // 2])
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def example_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example folder with its data, made by the user's command."""
    root = tmp_path_factory.mktemp("examples") / "video_masks"
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("data", "cache", "__pycache__"))
    subprocess.run([sys.executable, str(root / "make_data.py"), str(root / "data")], check=True)
    return root


def run_cache(root: Path, toml: str = "dataset.toml", **flags: object) -> object:
    if toml != "dataset.toml":
        shutil.copy(root / toml, root / "dataset.toml")
    (summary,) = cache_tiny(root, **flags)
    return summary


def clip_weights(cache: Path) -> dict[tuple[int, int], np.ndarray]:
    """Each clip file's (start, count) and its (F, h, w) mask weights."""
    found = {}
    for path in sorted(cache.glob("*_wan.safetensors")):
        if path.name.endswith("_te.safetensors"):
            continue
        tensors, metadata = fmt.load_cache_file(path)
        (key,) = [k for k in tensors if k.startswith(fmt.MASK_WEIGHTS)]
        span = int(metadata.extra["frame_start"]), int(metadata.extra["frame_count"])
        found[span] = tensors[key][0].numpy()
    return found


def write_toml(root: Path, lines: str) -> None:
    (root / "dataset.toml").write_text(f"[general]\nresolution = [{SIZE}, {SIZE}]\n\n[[datasets]]\n{lines}\n")


@pytest.mark.parametrize("toml", ["mask_video.toml", "mask_frames.toml", "jsonl_mask_path.toml"])
def test_the_cached_mask_follows_the_moving_square_latent_frame_by_latent_frame(
    example_data: Path, toml: str
) -> None:
    summary = run_cache(example_data, toml)
    assert summary.failed == [] and summary.sources["file"] == 1
    cache = example_data / "cache" / toml.removesuffix(".toml")
    weights = clip_weights(cache)
    assert set(weights) == {(0, 17), (17, 17)}
    for (start, count), got in weights.items():
        want = pooled([square_mask(start + i) for i in range(count)])
        np.testing.assert_allclose(got, want, atol=1e-6)
        # the square moves: its latent frames differ (a static mask would repeat one)
        assert not np.allclose(got[0], got[-1])


@pytest.mark.parametrize(
    ("extraction", "keys", "kept"),
    [
        ("head", 'target_frames = [9, 13]\nframe_extraction = "head"', range(FRAMES)),
        ("chunk", 'target_frames = [9]\nframe_extraction = "chunk"', range(FRAMES)),
        ("slide", 'target_frames = [13]\nframe_extraction = "slide"\nframe_stride = 10', range(FRAMES)),
        ("uniform", 'target_frames = [9]\nframe_extraction = "uniform"\nframe_sample = 3', range(FRAMES)),
        ("full", 'frame_extraction = "full"\nmax_frames = 30', range(FRAMES)),
        ("32 fps", 'target_frames = [9]\nframe_extraction = "chunk"\nsource_fps = 32', range(0, FRAMES, 2)),
    ],
)
def test_every_extraction_mode_pools_the_clips_own_mask_frames(
    example_data: Path, tmp_path: Path, extraction: str, keys: str, kept: range
) -> None:
    """Each clip's weights are its own frames' masks (after source_fps drops every other frame at
    32 -> 16 fps), grouped as the VAE groups them."""
    root = tmp_path / "d"
    shutil.copytree(example_data / "data", root / "data")
    write_toml(root, f'video_directory = "data/videos"\nmask_directory = "data/mask_frames"\n{keys}')
    summary = run_cache(root)
    assert summary.failed == []
    weights = clip_weights(root / "data" / "videos")
    kept_frames = list(kept)
    assert weights, extraction
    for (start, count), got in weights.items():
        want = pooled([square_mask(kept_frames[start + i]) for i in range(count)])
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{extraction} clip {start}+{count}")


@pytest.mark.parametrize("mode", ["max", "nearest"])
def test_mask_pooling_modes_pool_each_cell_as_documented(
    example_data: Path, tmp_path: Path, mode: str
) -> None:
    root = tmp_path / "d"
    shutil.copytree(example_data / "data", root / "data")
    write_toml(
        root, 'video_directory = "data/videos"\nmask_directory = "data/mask_videos"\ntarget_frames = [17]'
    )
    assert run_cache(root, mask_pooling=mode).failed == []
    ((_, got),) = clip_weights(root / "data" / "videos").items()
    np.testing.assert_allclose(got, pooled([square_mask(i) for i in range(17)], mode), atol=1e-6)
    path = next((root / "data" / "videos").glob("square_00000-017_*_wan.safetensors"))
    metadata = fmt.read_metadata(path)
    assert metadata is not None and metadata.extra[fmt.KEY_MASK_POOLING] == mode


@pytest.mark.parametrize("form", ["mask video", "frame folder"])
def test_a_short_mask_is_padded_and_a_long_one_cut_each_with_one_warning(
    example_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """A 20-frame and a 40-frame mask on the 34-frame clip (a mask video at the clip's 16 fps, or
    a folder of frames): the short one's last frame repeats, the long one's tail is dropped."""
    root = tmp_path / "d"
    shutil.copytree(example_data / "data" / "videos", root / "videos")
    for name, count in (("short", 20), ("long", 40)):
        frames = [square_mask(min(i, FRAMES - 1)) for i in range(count)]
        if form == "mask video":
            (root / name).mkdir()
            write_mask_video(root / name / "square.mkv", frames, fps=16)
        else:
            write_frame_folder(root / name / "square", frames, [f"{i:05d}" for i in range(count)])
    lines = 'video_directory = "videos"\ntarget_frames = [17]\nframe_extraction = "chunk"\n'
    write_toml(root, lines + 'mask_directory = "short"')
    with caplog.at_level(logging.WARNING):
        assert run_cache(root).failed == []
    said = [r.getMessage() for r in caplog.records if "has 20 frames" in r.getMessage()]
    assert len(said) == 1 and "(34 frames)" in said[0], caplog.text
    padded = [square_mask(min(i, 19)) for i in range(17, 34)]  # frames 20.. repeat frame 19
    np.testing.assert_allclose(clip_weights(root / "videos")[(17, 17)], pooled(padded), atol=1e-6)

    caplog.clear()
    write_toml(root, lines + 'mask_directory = "long"')
    with caplog.at_level(logging.WARNING):
        assert run_cache(root).failed == []
    said = [r.getMessage() for r in caplog.records if "has 40 frames" in r.getMessage()]
    assert len(said) == 1 and "(34 frames)" in said[0], caplog.text
    np.testing.assert_allclose(
        clip_weights(root / "videos")[(17, 17)], pooled([square_mask(i) for i in range(17, 34)]), atol=1e-6
    )


def test_the_fingerprint_covers_every_mask_frame_and_the_pooling_mode(
    example_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    shutil.copytree(example_data / "data", root / "data")
    write_toml(
        root, 'video_directory = "data/videos"\nmask_directory = "data/mask_frames"\ntarget_frames = [17]'
    )
    assert run_cache(root).written == 1
    assert run_cache(root).skipped == 1
    frame = root / "data" / "mask_frames" / "square" / "00009.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(frame)  # the square vanishes in frame 9
    summary = run_cache(root)
    assert (summary.written, summary.rebuilt) == (1, 1)
    ((_, got),) = clip_weights(root / "data" / "videos").items()
    masks = [square_mask(i) for i in range(17)]
    masks[9] = np.zeros((SIZE, SIZE), np.uint8)
    np.testing.assert_allclose(got, pooled(masks), atol=1e-6)
    assert run_cache(root, mask_pooling="max").rebuilt == 1
    assert run_cache(root, mask_pooling="max").skipped == 1
    assert run_cache(root).rebuilt == 1  # back to area


def test_default_mask_fills_videos_without_their_own_and_is_its_own_mask_source(
    example_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "d"
    shutil.copytree(example_data / "data" / "videos", root / "videos")
    shutil.copy(root / "videos" / "square.mkv", root / "videos" / "other.mkv")
    (root / "masks").mkdir()
    Image.fromarray(square_mask(0)).save(root / "masks" / "square.png")
    oval = np.zeros((SIZE * 2, SIZE * 2), np.uint8)
    oval[32:96, 16:112] = 128
    Image.fromarray(oval).save(root / "everyone.png")
    write_toml(root, 'video_directory = "videos"\nmask_directory = "masks"\ndefault_mask = "everyone.png"')
    summary = run_cache(root)
    assert (summary.sources["file"], summary.sources["default"], summary.failed) == (1, 1, [])
    assert "default=1" in summary.line()
    other = next((root / "videos").glob("other_*_wan.safetensors"))
    metadata = fmt.read_metadata(other)
    assert metadata is not None and metadata.mask_source == "default"
    ((_, got),) = [(k, v) for k, v in clip_weights(root / "videos").items()]
    assert got.shape == (1, 8, 8)

    Image.fromarray(np.zeros((SIZE, SIZE * 2), np.uint8)).save(root / "everyone.png")  # 2:1, not 1:1
    summary = run_cache(root)
    ((path, reason),) = summary.failed
    assert path.name == "other.mkv" and "everyone.png" in reason


def test_mask_path_in_an_image_jsonl_wins_over_the_directory_and_the_default(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(images / f"{name}.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(tmp_path / "own.png")
    Image.fromarray(np.full((SIZE, SIZE), 128, np.uint8)).save(masks / "a.png")
    Image.fromarray(np.full((SIZE, SIZE), 128, np.uint8)).save(masks / "b.png")
    Image.fromarray(np.full((SIZE, SIZE), 80, np.uint8)).save(tmp_path / "default.png")
    records = [
        {"image_path": "images/a.png", "caption": "a", "mask_path": "own.png"},
        {"image_path": "images/b.png", "caption": "b"},
        {"image_path": "images/c.png", "caption": "c"},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_toml(
        tmp_path,
        'image_jsonl_file = "items.jsonl"\ncache_directory = "cache"\nmask_directory = "masks"\n'
        'default_mask = "default.png"',
    )
    summary = run_cache(tmp_path)
    assert (summary.sources["file"], summary.sources["default"], summary.failed) == (2, 1, [])
    for name, level in (("a", 255), ("b", 128), ("c", 80)):
        (path,) = (tmp_path / "cache").glob(f"{name}_*_wan.safetensors")
        tensors, _ = fmt.load_cache_file(path)
        (key,) = [k for k in tensors if k.startswith(fmt.MASK_WEIGHTS)]
        np.testing.assert_allclose(tensors[key].numpy(), level / 255, atol=1e-6)


def test_require_mask_fails_a_video_without_any_mask(example_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(example_data / "data" / "videos", root / "videos")
    (root / "masks").mkdir()
    write_toml(root, 'video_directory = "videos"\nmask_directory = "masks"\nrequire_mask = true')
    ((path, reason),) = run_cache(root).failed
    assert path.name == "square.mkv" and "require_mask=true" in reason


def test_two_masks_for_one_video_name_both(example_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(example_data / "data" / "videos", root / "videos")
    shutil.copytree(example_data / "data" / "mask_frames", root / "masks")
    shutil.copy(example_data / "data" / "mask_videos" / "square.mkv", root / "masks" / "square.mkv")
    write_toml(root, 'video_directory = "videos"\nmask_directory = "masks"')
    ((_, reason),) = run_cache(root).failed
    assert "masks/square" in reason and "masks/square.mkv" in reason


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (
            'default_loss_mask_path = "m.png"',
            "'default_loss_mask_path' is another trainer's key; masktrain's is default_mask",
        ),
        ('loss_mask_directory = "m"', "masktrain's is mask_directory"),
    ],
)
def test_other_trainers_keys_name_masktrains(tmp_path: Path, line: str, says: str) -> None:
    from masktrain.config import load_dataset_config

    write_toml(tmp_path, f'video_directory = "v"\n{line}')
    with pytest.raises(ConfigError, match=says):
        load_dataset_config(tmp_path / "dataset.toml")


def test_a_jsonl_loss_mask_path_names_mask_path(tmp_path: Path) -> None:
    from masktrain.config import load_dataset_config
    from masktrain.data.discovery import discover

    (tmp_path / "items.jsonl").write_text(
        json.dumps({"video_path": "a.mp4", "loss_mask_path": "m.mp4"}) + "\n"
    )
    write_toml(tmp_path, 'video_jsonl_file = "items.jsonl"\ncache_directory = "cache"')
    (dataset,) = load_dataset_config(tmp_path / "dataset.toml").datasets
    with pytest.raises(
        ConfigError,
        match=r"items.jsonl:1: 'loss_mask_path' is another trainer's key; masktrain's is 'mask_path'",
    ):
        discover(dataset)


@pytest.mark.parametrize("toml", ["mask_video.toml", "mask_frames.toml", "jsonl_mask_path.toml"])
def test_the_example_tomls_cache_and_train(example_data: Path, tmp_path: Path, toml: str) -> None:
    from masktrain.train.loop import run as run_train

    root = tmp_path / "example"
    shutil.copytree(example_data, root, ignore=shutil.ignore_patterns("cache"))
    assert run_cache(root, toml).failed == []
    run_train(train_config(root / "dataset.toml", tmp_path / "out", max_train_steps=2))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["prior_loss"] > 0  # the prior region (off the square) trains toward the base
