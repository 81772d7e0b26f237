"""Synthetic ~1 MP dataset for the preparation benchmarks.

Three kinds, each under ``{root}/{kind}/``:

- ``png_alpha``: RGBA PNGs in ``images/``, the tiered mask in the alpha channel;
- ``png_mask``: RGB PNGs in ``images/`` plus grayscale PNG masks with the same stems in ``masks/``;
- ``jpeg_mask``: JPEGs (quality 90) in ``images/`` plus grayscale PNG masks in ``masks/``.

The RGB content is a smooth, mildly noisy texture (gradients + low-frequency blobs + noise) so
that PNG and JPEG compress about as well as they do on photos: pure noise would make decoding
unrealistically slow, flat colour unrealistically fast. Generation is seeded and the parameters
are recorded in ``manifest.json``, so a second run with the same parameters reuses the files.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

KINDS = ("png_alpha", "png_mask", "jpeg_mask")
# Bump when the generator changes, so stale datasets are regenerated.
_GENERATOR_VERSION = 1
# Mostly square, with some landscape and portrait images so several buckets are used.
_SIZES = ((1024, 1024), (1024, 1024), (1280, 800), (800, 1280))
# Mask tiers, as in a face/body weighting dataset.
FACE, BODY, HAIR = 255, 128, 80


@dataclass(frozen=True)
class Kind:
    images: Path
    masks: Path | None
    """Separate mask directory; ``None`` when the mask is the image's alpha channel."""

    @property
    def alpha(self) -> bool:
        return self.masks is None


@dataclass(frozen=True)
class _Params:
    count: int
    seed: int
    version: int = _GENERATOR_VERSION


def texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like RGB texture: two-colour gradient, blurred blobs and mild sensor noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1.0) / 2.0
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    image = start + ramp[..., None] * (end - start)
    # Low-frequency blobs: a coarse random grid upscaled smoothly.
    coarse = rng.normal(0, 40, size=(int(rng.integers(4, 10)), int(rng.integers(4, 10)), 3))
    image += cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 4, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def tiered_mask(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Background 0, body 128, hair 80 and face ellipse 255, placed with some jitter."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx = width * rng.uniform(0.4, 0.6)
    cy = height * rng.uniform(0.3, 0.4)
    face_w = min(width, height) * rng.uniform(0.15, 0.22)
    face_h = face_w * rng.uniform(1.2, 1.4)
    body_w = face_w * rng.uniform(2.2, 3.0)
    draw.ellipse((cx - body_w, cy + face_h * 0.8, cx + body_w, height + face_h * 2), fill=BODY)
    draw.ellipse((cx - face_w * 1.2, cy - face_h * 1.25, cx + face_w * 1.2, cy + face_h * 0.6), fill=HAIR)
    draw.ellipse((cx - face_w, cy - face_h, cx + face_w, cy + face_h), fill=FACE)
    return mask


def _write_item(root: Path, index: int, seed: int) -> None:
    # One generator per item, so the content does not depend on thread scheduling.
    rng = np.random.default_rng([seed, index])
    width, height = _SIZES[index % len(_SIZES)]
    rgb = texture(rng, width, height)
    mask = tiered_mask(rng, width, height)
    stem = f"img_{index:04d}"
    rgba = np.dstack([rgb, np.asarray(mask)])
    Image.fromarray(rgba, "RGBA").save(root / "png_alpha" / "images" / f"{stem}.png")
    Image.fromarray(rgb, "RGB").save(root / "png_mask" / "images" / f"{stem}.png")
    Image.fromarray(rgb, "RGB").save(root / "jpeg_mask" / "images" / f"{stem}.jpg", quality=90)
    for kind in ("png_mask", "jpeg_mask"):
        mask.save(root / kind / "masks" / f"{stem}.png")


def layout(root: Path) -> dict[str, Kind]:
    return {
        "png_alpha": Kind(root / "png_alpha" / "images", None),
        "png_mask": Kind(root / "png_mask" / "images", root / "png_mask" / "masks"),
        "jpeg_mask": Kind(root / "jpeg_mask" / "images", root / "jpeg_mask" / "masks"),
    }


def ensure(root: Path, count: int, seed: int = 0) -> dict[str, Kind]:
    """Generate the dataset under `root` unless it already holds one with the same parameters."""
    params = _Params(count=count, seed=seed)
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == asdict(params):
        return layout(root)
    if root.exists():
        shutil.rmtree(root)
    for kind in layout(root).values():
        for directory in (kind.images, kind.masks):
            if directory is not None:
                directory.mkdir(parents=True)
    # PIL's encoders and numpy release the GIL for most of the work.
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda i: _write_item(root, i, seed), range(count)))
    # Written last: an interrupted generation is redone, never reused.
    manifest.write_text(json.dumps(asdict(params)))
    return layout(root)
