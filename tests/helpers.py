"""Builders the test files share (so no test file imports another): synthetic photos and tiered
masks, video files, and a ``cache`` run on the built-in tiny models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import av
import numpy as np


def tiered(h: int, w: int, seed: int) -> np.ndarray:
    """A tiered mask: body 128 below a hair ring 80 around a face 255, background 0."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.35, 0.5)
    mask = np.zeros((h, w), np.uint8)
    mask[(abs(x - cx) < w * 0.25) & (y > cy)] = 128
    mask[((x - cx) / (w * 0.2)) ** 2 + ((y - cy) / (h * 0.2)) ** 2 < 1] = 80
    mask[((x - cx) / (w * 0.1)) ** 2 + ((y - cy) / (h * 0.1)) ** 2 < 1] = 255
    return mask


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """An RGB gradient with seeded noise."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(-15, 16, (h, w, 3))
    return (
        (np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + noise)
        .clip(0, 255)
        .astype(np.uint8)
    )


def frame(index: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Red = 10 * index (the frame's identity), a green bar that moves, a blue gradient."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 10 * index
    rgb[:, (3 * index) % w, 1] = 255
    rgb[..., 2] = np.arange(w, dtype=np.uint8)[None, :] * 3
    return rgb


def write_video(
    path: Path, count: int, w: int = 64, h: int = 48, fps: int = 30, lossless: bool = True
) -> None:
    """FFV1 in Matroska (lossless RGB, frames decode exactly) or H.264 in MP4."""
    codec, pix_fmt = ("ffv1", "bgr0") if lossless else ("libx264", "yuv420p")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for index in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(index, w, h), format="rgb24")))
        container.mux(stream.encode())


def cache_tiny(root: Path, arch: str = "wan", **overrides: Any) -> Any:
    """``masktrain cache`` of ``root/dataset.toml`` with the tiny models on the CPU; returns the
    summaries."""
    from masktrain.cache import run
    from masktrain.config import CacheConfig

    settings: dict[str, Any] = {
        "dataset_config": root / "dataset.toml",
        "arch": arch,
        "vae": "tiny",
        "text_encoder": "tiny",
        "device": "cpu",
    }
    return run(CacheConfig(**{**settings, **overrides}))


def words(line: str, **paths: object) -> list[str]:
    """A command line written as on a shell, one list item per word; ``{name}`` placeholders are
    filled after the split, so a path with spaces stays one word."""
    return [word.format(**{name: str(value) for name, value in paths.items()}) for word in line.split()]


def masktrain_command(line: str, **paths: object) -> list[str]:
    """``python -m masktrain.cli`` followed by `line` (see :func:`words`)."""
    return [sys.executable, "-m", "masktrain.cli", *words(line, **paths)]


MASKED_PRIOR_SETTINGS_KWARGS: dict[str, Any] = {
    "use_mask_loss": True,
    "mask_gamma": 0.7,
    "prior_preservation_weight": 1.0,
    "prior_mask_threshold": 0.1,
    "normalize_per_sample": True,
}


def make_dataset(root: Path, *, masks: bool = True, count: int = 4) -> Path:
    """`count` 64x64 photos with tiered masks (or none) and captions, in batches of 2."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    mask_lines = ""
    if masks:
        (root / "masks").mkdir()
        mask_lines = 'mask_directory = "masks"'
    for index in range(count):
        Image.fromarray(photo(64, 64, index)).save(images / f"item{index}.png")
        if masks:
            Image.fromarray(tiered(64, 64, index)).save(root / "masks" / f"item{index}.png")
        (images / f"item{index}.txt").write_text(f"a photo of subject {index}")
    toml = root / "dataset.toml"
    toml.write_text(
        f"""
[general]
resolution = [64, 64]
batch_size = 2

[[datasets]]
image_directory = "images"
cache_directory = "cache"
{mask_lines}
"""
    )
    return toml


def cached(root: Path, arch: str = "wan", **kwargs: Any) -> Path:
    """:func:`make_dataset`, cached with the tiny models; returns its TOML."""
    toml = make_dataset(root, **kwargs)
    cache_tiny(root, arch)
    return toml


def train_config(toml: Path, out: Path, arch: str = "wan", **kwargs: Any) -> Any:
    """A small ``TrainConfig`` on the tiny models (masked prior preservation, rank 4)."""
    from masktrain.config import MaskLossSettings, NetworkSettings, OptimSettings, TrainConfig

    defaults: dict[str, Any] = dict(
        dataset_config=toml,
        arch=arch,
        dit="tiny",
        output_dir=out,
        device="cpu",
        max_train_steps=4,
        network=NetworkSettings(network_dim=4, network_alpha=4.0),
        optim=OptimSettings(learning_rate=1e-3),
        mask=MaskLossSettings(**MASKED_PRIOR_SETTINGS_KWARGS),
    )
    defaults.update(kwargs)
    return TrainConfig(**defaults)


def wait_for_steps(process: Any, metrics: Path, steps: int, timeout: float = 120) -> None:
    """Wait until a training `process` has logged `steps` optimizer steps to `metrics`."""
    import time

    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
