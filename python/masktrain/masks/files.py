"""The files the mask commands read and write, read as ``cache`` reads them (the native core:
``_native.list_images`` lists, ``_native.decode_image`` decodes photos upright, EXIF orientation
applied, ``_native.load_mask`` loads masks upright with 16-bit kept, the same pixel limit), and
single-channel mask PNGs (8- or 16-bit), written atomically. A photo or mask the core refuses
raises the core's one-line error (``masktrain.errors``, or ``OSError``) naming the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from masktrain import _native, atomic
from masktrain.errors import DataError


def list_inputs(folder: Path, flag: str) -> list[Path]:
    """The images directly in `folder` (PNG, JPEG, WebP, BMP), sorted; an error when there are none
    or when two share a basename (both would be written to ``{stem}.png``)."""
    paths = _native.list_images(folder)
    if not paths:
        kinds = ", ".join(f".{extension}" for extension in _native.IMAGE_EXTENSIONS)
        raise DataError(f"{flag} {folder}: no images ({kinds}) there")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise DataError(
                f"{flag} {folder}: {stems[path.stem].name} and {path.name} would both make {path.stem}.png; "
                "keep one of them"
            )
        stems[path.stem] = path
    return paths


def open_upright(path: Path) -> Image.Image:
    """The photo at `path` as an RGB image, upright, exactly the pixels ``cache`` trains on."""
    rgb, _alpha = _native.decode_image(path)
    return Image.fromarray(rgb)


def write_mask(target: Path, mask: np.ndarray) -> None:
    """An (H, W) uint8 or uint16 mask as a single-channel PNG of its bit depth, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    atomic.write_bytes(target, buffer.getvalue())
