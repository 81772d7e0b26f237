"""Mask videos and mask-frame folders written for the tests with PyAV and PIL: gray frames in a
chosen codec, pixel format and frame rate, and raw luma planes read back without masktrain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image


def tier_frames(count: int, h: int = 32, w: int = 48) -> list[np.ndarray]:
    """Frames of flat 16-pixel blocks in the tiers 0 / 80 / 128 / 255, shifted one tier per frame."""
    tiers = np.array([0, 80, 128, 255], np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    return [tiers[(y // 16 + x // 16 + index) % 4] for index in range(count)]


def write_mask_video(
    path: Path,
    frames: Sequence[np.ndarray],
    *,
    codec: str = "ffv1",
    pix_fmt: str = "gray",
    fps: int = 8,
    options: dict[str, str] | None = None,
) -> Path:
    """`frames` ((H, W) uint8 or uint16) encoded as `codec` in `pix_fmt` at `fps`."""
    source_format = "gray16le" if frames[0].dtype == np.uint16 else "gray"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        for gray in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(gray, format=source_format)))
        container.mux(stream.encode())
    return path


def write_frame_folder(folder: Path, frames: Sequence[np.ndarray], names: Sequence[str]) -> Path:
    """Each frame saved as a PNG named `names[i]` (a stem) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for gray, name in zip(frames, names, strict=True):
        Image.fromarray(gray).save(folder / f"{name}.png")
    return folder


def raw_luma_planes(path: Path, dtype: type[np.unsignedinteger] = np.uint8) -> list[np.ndarray]:
    """Each decoded frame's plane 0 as stored (samples of `dtype`, little-endian), unconverted."""
    planes = []
    size = np.dtype(dtype).itemsize
    with av.open(str(path)) as container:
        for decoded in container.decode(video=0):
            plane = decoded.planes[0]
            rows = np.frombuffer(plane, dtype).reshape(plane.height, plane.line_size // size)
            planes.append(rows[:, : decoded.width].copy())
    return planes


def frame_times(path: Path) -> list[float]:
    """Seconds from the first frame of every frame of a video, as PyAV reports them."""
    with av.open(str(path)) as container:
        times = [float(decoded.time) for decoded in container.decode(video=0)]
    return [t - times[0] for t in times]
