"""The files the mask commands read and write, read as ``cache`` reads them (the native core:
``_native.list_images`` lists, ``_native.decode_image`` decodes photos upright, EXIF orientation
applied, ``_native.load_mask`` loads masks upright with 16-bit kept, the same pixel limit), and
single-channel mask PNGs (8- or 16-bit), written atomically. A photo or mask the core refuses
raises the core's one-line error (``masktrain.errors``, or ``OSError``) naming the file; those of a
file that cannot be read at all (:data:`UNREADABLE`) make that file one failed item of a command.

A command's output folder is held for the run (:func:`output_folder`): its lock marks the
temporaries it writes as live, and a killed run's temporaries there are removed first."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from masktrain import _native, atomic
from masktrain.errors import DataError, ImageDecodeError, ImageTooLargeError, UnsupportedFormatError

UNREADABLE = (OSError, ImageDecodeError, UnsupportedFormatError, ImageTooLargeError)
"""What reading one photo or mask raises when the file cannot be used (missing, unreadable, not an
image, truncated, over the pixel limit: a decompression bomb): that item fails, the others go on."""


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


@contextmanager
def output_folder(folder: Path) -> Iterator[None]:
    """Hold `folder` (created if need be) as this run's output: ``atomic.run_lock`` for the block,
    after the temporaries of runs that are gone (killed mid-write) are removed. A folder that cannot
    be written is one line naming it, as a mask that cannot be written is."""
    with ExitStack() as held:
        try:
            held.enter_context(atomic.run_lock(folder))
        except OSError as error:
            raise atomic.write_error(error, folder) from None
        atomic.remove_stale_temporaries(folder)
        yield
