"""A video's mask as frames on its source's timeline: a still image, a mask video, or a folder of
mask frames, read to gray and laid onto the source video's frames before any clip extraction.

Gray is read the way a mask image is (``_native.load_mask``: luma, 16 bit kept). A mask video's
gray is the luma plane of each frame (Y of a YUV format, the plane of a gray format, PIL's Rec.601
luma of an RGB one), converted by the stream's colour range to full range: an H.264 mask in 4:2:0
limited range stores white as 235, and going through swscale's RGB conversion would also smear the
chroma's blur into it. 8-bit sources give uint8 frames, deeper ones uint16 scaled to 0..65535.

A lossy codec does not keep the tiers (0 / 80 / 128 / 255) exactly; each lossy mask video gets one
warning with its measured tier drift and the lossless alternative.

Alignment (:func:`align`): frame i of a folder is source frame i; a mask video takes, for each
source frame, its frame nearest in time (ties to the earlier), or goes by index when either side has
no timestamps. A mask shorter than the source on the source's timeline is padded with its last frame,
a longer one cut, each with one warning naming both lengths.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from masktrain import _native
from masktrain.errors import DataError, VideoDecodeError

logger = logging.getLogger(__name__)

LOSSLESS_CODECS = frozenset({"ffv1", "png", "rawvideo", "utvideo", "huffyuv", "ffvhuff"})
"""Codecs that always keep every pixel."""
LOSSLESS_WHEN_444 = frozenset({"h264", "hevc"})
"""Codecs lossless in their lossless modes (x264 / x265 ``qp=0``, 4:4:4 chroma): trusted only when
the measured drift is 0."""
TIERS_8BIT = np.array([0, 80, 128, 255], dtype=np.float64)
"""The mask tiers on the 8-bit scale (``masktrain.tiers``: background, hair, body, face)."""
DRIFT_LEVELS = 8
"""A pixel further than this (8-bit levels) from every tier has drifted."""
LOSSLESS_COMMAND = "ffmpeg -i in.mp4 -c:v ffv1 -pix_fmt gray out.mkv"
TIME_SLACK = 1.5e-3
"""Seconds within which two times count as equal: Matroska stores milliseconds, so a frame at 1/16 s
is written at 0.063 and its tie between mask frames at 0 and 0.125 must still go to the earlier."""


@dataclass
class MaskFrames:
    """A mask's gray frames, read once, before alignment."""

    frames: list[np.ndarray]
    """(H, W) uint8 or uint16 (scaled to 0..65535) frames, all of one dtype."""
    times: list[float] | None
    """Seconds from the first frame of each frame of a mask video (None for a folder or a still, or
    a video without timestamps)."""
    path: Path
    static: bool
    """One still image, used for every frame."""
    lossy_drift: float | None = None
    """For a lossy mask video, the share of pixels more than 8 levels from every tier; None when
    the codec keeps the tiers."""
    end_time: float | None = None
    """Where a mask video with timestamps ends (its last frame's time plus that frame's duration)."""


def read_mask_frames(path: Path) -> MaskFrames:
    """The frames of the mask `path`: a folder of frame images, a still image or a mask video.
    Errors name the file."""
    if path.is_dir():
        return MaskFrames(_folder_frames(path), None, path, static=False)
    if path.suffix.lower().lstrip(".") in _native.IMAGE_EXTENSIONS:
        return MaskFrames([_native.load_mask(path)], None, path, static=True)
    return _read_video(path)


# --- folders of frames ----------------------------------------------------------------------------


def _folder_frames(folder: Path) -> list[np.ndarray]:
    numbered: dict[int, Path] = {}
    for image in _native.list_images(folder):
        if not image.stem.isdigit():
            raise DataError(
                f"{image}: a mask frame must be named by its frame number (00000.png, 00001.png, ...)"
            )
        number = int(image.stem)
        if number in numbered:
            raise DataError(
                f"{folder}: {numbered[number].name} and {image.name} are both frame {number}; keep one"
            )
        numbered[number] = image
    if not numbered:
        raise DataError(f"{folder}: the mask folder holds no frame images (00000.png, 00001.png, ...)")
    numbers = sorted(numbered)
    for previous, number in itertools.pairwise(numbers):
        if number != previous + 1:
            width = len(numbered[number].stem)
            raise DataError(
                f"{folder}: mask frame {previous + 1:0{width}d} is missing (found "
                f"{numbered[previous].stem} then {numbered[number].stem}); number the frames "
                "consecutively"
            )
    return _one_dtype([_native.load_mask(numbered[n]) for n in numbers])


def _one_dtype(frames: list[np.ndarray]) -> list[np.ndarray]:
    """8-bit frames among 16-bit ones raised to 16 bit (x257), so all stack into one array."""
    if all(frame.dtype == frames[0].dtype for frame in frames):
        return frames
    return [f.astype(np.uint16) * 257 if f.dtype == np.uint8 else f for f in frames]


# --- mask videos ----------------------------------------------------------------------------------


def _read_video(path: Path) -> MaskFrames:
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: file is empty (0 bytes)")
    frames: list[np.ndarray] = []
    times: list[float | None] = []
    end: float | None = None
    pixel_formats: set[str] = set()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            codec = stream.codec_context.codec.canonical_name
            for frame in container.decode(stream):
                frames.append(luma_full_range(frame, path))
                pixel_formats.add(frame.format.name)
                times.append(frame.time)
                if frame.time is not None and frame.duration and frame.time_base is not None:
                    end = frame.time + float(frame.duration * frame.time_base)
                elif frame.time is not None:
                    end = None
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{path}: cannot decode video ({error})") from error
    if not frames:
        raise VideoDecodeError(f"{path}: no video frames could be decoded")
    frames = _one_dtype(frames)
    known = [t for t in times if t is not None]
    timeline = [t - known[0] for t in known] if len(known) == len(times) else None
    if timeline is not None:
        end = _end_time(timeline, None if end is None else end - known[0])
    drift = _lossy_drift(path, codec, pixel_formats, frames)
    return MaskFrames(frames, timeline, path, static=False, lossy_drift=drift, end_time=end)


def _end_time(times: list[float], end: float | None) -> float:
    """The end of the last frame: from its duration, else one typical frame interval after it."""
    if end is not None and end > times[-1]:
        return end
    if len(times) > 1:
        return times[-1] + float(np.median(np.diff(times)))
    return times[-1] + TIME_SLACK * 2


def luma_full_range(frame: av.VideoFrame, path: Path) -> np.ndarray:
    """The gray of one decoded frame: (H, W) uint8 for 8-bit formats, uint16 on 0..65535 for deeper
    ones, in full range."""
    pixel_format = frame.format
    bits = pixel_format.components[0].bits
    if pixel_format.is_rgb or pixel_format.has_palette:
        return _rgb_luma(frame, bits)
    gray = pixel_format.name.startswith(("gray", "ya"))
    if not gray and not pixel_format.is_planar:
        if bits > 8:
            raise VideoDecodeError(
                f"{path}: pixel format {pixel_format.name} is not supported for masks; re-encode "
                f"losslessly: {LOSSLESS_COMMAND}"
            )
        frame = frame.reformat(format="yuv444p")  # packed YUV to planes: Y is copied as is
    luma = _plane(frame, bits)
    limited = _range_is_limited(frame, gray)
    if bits <= 8 and not limited:
        return luma
    top = 255 if bits <= 8 else 65535
    samples = luma.astype(np.float64)
    if limited:
        black, white = 16 << (bits - 8), 235 << (bits - 8)
        samples = (samples - black) * (top / (white - black))
    else:
        samples *= top / ((1 << bits) - 1)
    full: np.ndarray = np.rint(samples).clip(0, top)
    return full.astype(np.uint8 if bits <= 8 else np.uint16)


def _range_is_limited(frame: av.VideoFrame, gray: bool) -> bool:
    """The frame's colour range: tagged MPEG (1) or JPEG (2); untagged, full for gray and yuvj*,
    limited for other YUV (FFmpeg's convention)."""
    tagged = int(frame.color_range or 0)
    if tagged in (1, 2):
        return tagged == 1
    return not (gray or frame.format.name.startswith("yuvj"))


def _plane(frame: av.VideoFrame, bits: int) -> np.ndarray:
    """Plane 0 (luma, or the gray plane) without its row padding, in native integer samples."""
    plane = frame.planes[0]
    name = frame.format.name
    wide = ">u2" if frame.format.is_big_endian else "<u2"
    dtype: np.dtype[Any] = np.dtype(np.uint8 if bits <= 8 else wide)
    rows = np.frombuffer(memoryview(plane), dtype=dtype).reshape(
        plane.height, plane.line_size // dtype.itemsize
    )
    samples = rows[:, : frame.width].astype(dtype.newbyteorder("="))
    if bits > 8 and name.startswith(("p01", "p21", "p41")):
        samples >>= 16 - bits  # P010-style formats keep their bits at the top of each sample
    return samples


def _rgb_luma(frame: av.VideoFrame, bits: int) -> np.ndarray:
    """Rec.601 luma with PIL's integer rounding (``_native.load_mask``'s, on 8 or 16 bits)."""
    deep = bits > 8
    rgb = frame.to_ndarray(format="rgb48le" if deep else "rgb24").astype(np.uint64)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint16 if deep else np.uint8)


def tier_drift(frames: Sequence[np.ndarray]) -> float:
    """The share of pixels, over all `frames`, more than 8 levels (8-bit scale) from every tier."""
    drifted = total = 0
    for frame in frames:
        levels = frame.astype(np.float64) / (257.0 if frame.dtype == np.uint16 else 1.0)
        distance = np.abs(levels[..., None] - TIERS_8BIT).min(axis=-1)
        drifted += int(np.count_nonzero(distance > DRIFT_LEVELS))
        total += distance.size
    return drifted / total


def _lossy_drift(path: Path, codec: str, pixel_formats: set[str], frames: list[np.ndarray]) -> float | None:
    """The tier drift of a lossy mask video (and its one warning); None for a lossless one."""
    if codec in LOSSLESS_CODECS:
        return None
    drift = tier_drift(frames)
    full_chroma = all(name.startswith(("yuv444p", "yuvj444p", "gbrp")) for name in pixel_formats)
    if codec in LOSSLESS_WHEN_444 and full_chroma and drift == 0.0:
        return None
    logger.warning(
        "mask video %s is encoded with the lossy codec %s: %.2f%% of its pixels are more than %d "
        "levels from the mask tiers (0/80/128/255); store masks losslessly as FFV1 or PNG frames, "
        "e.g. `%s`",
        path,
        codec,
        drift * 100.0,
        DRIFT_LEVELS,
        LOSSLESS_COMMAND,
    )
    return drift


# --- alignment ------------------------------------------------------------------------------------


def align(
    mask: MaskFrames,
    source_frames: int | None,
    source_times: Sequence[float] | None,
    source: Path,
) -> np.ndarray:
    """The index into `mask.frames` of every frame of the source video `source` (before any clip
    extraction or frame-rate resampling).

    `source_frames` is the source's frame count (None when its decoding stopped early: then the
    result covers the decoded frames, `source_times`, or else the mask's own length, and a longer
    mask is not reported). `source_times` are the source frames' seconds from its first frame.
    """
    decoded = len(source_times) if source_times is not None else None
    known = source_frames if source_frames is not None else decoded
    if mask.static:
        return np.zeros(known if known is not None else 1, dtype=np.int64)
    if mask.times is not None and source_times is not None and len(source_times) > 0:
        times = np.asarray(source_times, dtype=np.float64)
        on_source = _nearest(np.asarray(mask.times, dtype=np.float64), times)
        length = _covered(mask, times)
    else:
        on_source = np.arange(len(mask.frames), dtype=np.int64)
        length = len(mask.frames)
    count = known if known is not None else length
    if length < count:
        logger.warning(
            "mask %s has %d frames on the timeline of source %s (%s%d frames); its last frame is "
            "repeated for the remaining %d",
            mask.path,
            length,
            source,
            "" if source_frames is not None else "at least ",
            count,
            count - length,
        )
    elif length > count and source_frames is not None:
        logger.warning(
            "mask %s has %d frames on the timeline of source %s (%d frames); its last %d are not used",
            mask.path,
            length,
            source,
            count,
            length - count,
        )
    if len(on_source) < count:
        padding = np.full(count - len(on_source), len(mask.frames) - 1, dtype=np.int64)
        on_source = np.concatenate([on_source, padding])
    return on_source[:count]


def _nearest(mask_times: np.ndarray, source_times: np.ndarray) -> np.ndarray:
    """For each source time, the mask frame nearest in time (ties to the earlier)."""
    if len(mask_times) == 1:
        return np.zeros(len(source_times), dtype=np.int64)
    after = np.clip(np.searchsorted(mask_times, source_times, side="left"), 1, len(mask_times) - 1)
    before = after - 1
    to_before = source_times - mask_times[before]
    to_after = mask_times[after] - source_times
    return np.where(to_before <= to_after + TIME_SLACK, before, after).astype(np.int64)


def _covered(mask: MaskFrames, source_times: np.ndarray) -> int:
    """How many source frames the mask video's time span covers (those starting before its end),
    counted past the decoded source frames at their typical interval."""
    assert mask.times is not None
    end_time = mask.end_time if mask.end_time is not None else _end_time(mask.times, None)
    end = end_time - TIME_SLACK
    covered = int(np.count_nonzero(source_times < end))
    if covered < len(source_times) or len(source_times) < 2:
        return covered
    interval = float(np.median(np.diff(source_times)))
    return max(covered, int(np.floor((end - float(source_times[0])) / interval)) + 1)
