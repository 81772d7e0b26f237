"""The files the mask commands read and write: photos opened upright (their EXIF orientation
applied, as ``cache`` reads them) and single-channel mask PNGs, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from masktrain import atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def open_upright(path: Path) -> Image.Image:
    """`path` as RGB, its EXIF orientation applied."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def write_mask(target: Path, mask: np.ndarray) -> None:
    """An (H, W) uint8 mask as a single-channel PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    atomic.write_bytes(target, buffer.getvalue())
