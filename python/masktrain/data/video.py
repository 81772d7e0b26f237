"""Video datasets: decoding a video onto its bucket with PyAV, cutting it into clips the way
musubi-tuner does, and its one static mask.

Decoding runs from the first frame in order, without seeking, so frame indices are exact
whatever the codec's keyframe spacing; ``head`` and ``full`` stop once they have the frames
they can use. Each frame is converted to RGB (``rgb24``) and cover-resized onto the bucket by the
native core; the bucket is chosen from the first frame's size. A JSONL ``video_path`` may be a
directory of frame images instead (sorted by name, decoded by the native core). The container's
rotation metadata is not applied (musubi-tuner does not either).

With ``source_fps`` frames are dropped to the model's rate (WAN: 16 fps) by musubi-tuner's rule:
source frame ``i`` lands on target frame ``int(i * target / source)`` (accumulated in floating
point as musubi does) and only the first frame landing on each target frame is kept. A source
slower than the target keeps every frame; none is duplicated.

Clips from the N kept frames, for each target length T of ``target_frames`` (4k+1, ascending):

- ``head``: ``(0, T)`` when N >= T.
- ``chunk``: ``(i, T)`` for i = 0, T, 2T, ... while i + T <= N.
- ``slide``: ``(i, T)`` for i in ``range(0, N - T + 1, frame_stride)``.
- ``uniform``: ``frame_sample`` starts ``np.linspace(0, N - T, frame_sample)`` truncated to
  int, when N >= T (a start that repeats is one clip).
- ``full``: one clip ``(0, min(N, max_frames))`` rounded down to 4k+1.

A video that yields no clip at all (shorter than every T) fails, naming the file and its length.

The mask is one image per video, matched by basename in ``mask_directory``; it follows the image
rules (luma, 16-bit kept, aspect within 1% of the first frame, cover-resize onto the bucket) and
is pooled onto the latent grid of the encoded clip, then repeated over its latent frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from masktrain import _native
from masktrain._native import AspectMismatchError, MaskTrainError
from masktrain.config.dataset import VideoDatasetConfig
from masktrain.data.buckets import Bucket

#: Frame rate each video model trains at (musubi-tuner's ``VideoDataset.TARGET_FPS_*``).
TARGET_FPS = {"wan": 16.0}
#: Frame counts are 4k+1: the VAEs compress time 4x after the first frame.
FRAME_STEP = 4
#: Mask aspect ratio tolerance, as the native core's (relative, 1 in 100).
_ASPECT_TOLERANCE_INVERSE = 100


class VideoDecodeError(MaskTrainError):
    """A video that cannot be used: empty, unreadable, corrupt, without a video stream, or too
    short for any clip; the message names the file."""


@dataclass(frozen=True)
class ClipSettings:
    """How clips are cut from a video's frames (a dataset's frame-extraction keys plus the model's
    frame rate). All of it is part of each clip file's fingerprint."""

    target_frames: tuple[int, ...]
    extraction: str
    stride: int
    sample: int
    max_frames: int
    source_fps: float | None
    target_fps: float

    @classmethod
    def of(cls, dataset: VideoDatasetConfig, target_fps: float) -> ClipSettings:
        return cls(
            target_frames=dataset.target_frames,
            extraction=dataset.frame_extraction,
            stride=dataset.frame_stride,
            sample=dataset.frame_sample,
            max_frames=dataset.max_frames,
            source_fps=dataset.source_fps,
            target_fps=target_fps,
        )

    @property
    def decode_limit(self) -> int | None:
        """How many kept frames are worth decoding (None: all of them)."""
        if self.extraction == "head":
            return max(self.target_frames)
        if self.extraction == "full":
            return self.max_frames
        return None

    def spans(self, frame_count: int) -> list[tuple[int, int]]:
        """The (start, length) of every clip of a video with `frame_count` kept frames."""
        n = frame_count
        spans: list[tuple[int, int]] = []
        if self.extraction == "full":
            if n > 0:
                length = min(n, self.max_frames)
                spans.append((0, (length - 1) // FRAME_STEP * FRAME_STEP + 1))
            return spans
        for t in self.target_frames:
            if n < t:
                continue
            if self.extraction == "head":
                spans.append((0, t))
            elif self.extraction == "chunk":
                spans.extend((i, t) for i in range(0, n - t + 1, t))
            elif self.extraction == "slide":
                spans.extend((i, t) for i in range(0, n - t + 1, self.stride))
            elif self.extraction == "uniform":
                starts = np.linspace(0, n - t, self.sample, dtype=int)
                spans.extend((int(i), t) for i in starts)
            else:
                raise ValueError(f"frame_extraction {self.extraction!r} is not supported")
        return list(dict.fromkeys(spans))

    def fingerprint_part(self) -> dict[str, object]:
        return asdict(self)


def kept_frames(source_fps: float | None, target_fps: float | None) -> Iterator[bool]:
    """For each decoded frame in order, whether it is kept (musubi-tuner's frame dropping)."""
    if source_fps is None or target_fps is None:
        while True:
            yield True
    delta = target_fps / source_fps
    position, previous = 0.0, -1
    while True:
        index = int(position)
        position += delta
        keep = index != previous
        previous = index
        yield keep


@dataclass
class DecodedVideo:
    frames: np.ndarray
    """(N, H, W, 3) uint8, the kept frames at the bucket size."""
    source_indices: list[int]
    """Index of each kept frame among the decoded frames."""
    original_size: tuple[int, int]
    """(width, height) of the first frame."""
    bucket: Bucket


@contextmanager
def _frames(path: Path) -> Iterator[Iterator[np.ndarray]]:
    """The RGB frames of a video file, or of a directory of frame images."""
    if path.is_dir():
        yield (_native.decode_image(frame)[0] for frame in _native.list_images(path))
        return
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: file is empty (0 bytes)")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield (frame.to_ndarray(format="rgb24") for frame in container.decode(stream))


def decode_video(
    path: Path,
    bucket_for: Callable[[tuple[int, int]], Bucket],
    *,
    limit: int | None = None,
    source_fps: float | None = None,
    target_fps: float | None = None,
) -> DecodedVideo:
    """Decode the kept frames of `path` (at most `limit`) onto the bucket `bucket_for` picks from
    the first frame's (width, height). Raises VideoDecodeError (or the native core's errors for
    frame images, OSError for a missing file), each naming the file."""
    keep = kept_frames(source_fps, target_fps)
    frames: list[np.ndarray] = []
    indices: list[int] = []
    original: tuple[int, int] | None = None
    bucket: Bucket | None = None
    try:
        with _frames(path) as source:
            for index, rgb in enumerate(source):
                if not next(keep):
                    continue
                if bucket is None:
                    original = (rgb.shape[1], rgb.shape[0])
                    bucket = bucket_for(original)
                frames.append(_native.resize_image_to_bucket(rgb, bucket))
                indices.append(index)
                if limit is not None and len(frames) >= limit:
                    break
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{path}: cannot decode video ({error})") from error
    if bucket is None or original is None:
        raise VideoDecodeError(f"{path}: no video frames could be decoded")
    return DecodedVideo(np.stack(frames), indices, original, bucket)


def check_aspect(video: Path, size: tuple[int, int], mask: Path, mask_size: tuple[int, int]) -> None:
    """The native core's image rule: a mask whose aspect ratio differs from the video's by more
    than 1% (relative, in integers so that exactly 1% passes) would be misaligned."""
    cross_video, cross_mask = size[0] * mask_size[1], mask_size[0] * size[1]
    if abs(cross_video - cross_mask) * _ASPECT_TOLERANCE_INVERSE > cross_video:
        raise AspectMismatchError(
            f"{mask}: aspect ratio mismatch: video {video} is {size[0]}x{size[1]} "
            f"(aspect {size[0] / size[1]:.4f}), mask is {mask_size[0]}x{mask_size[1]} "
            f"(aspect {mask_size[0] / mask_size[1]:.4f}); the mask would be misaligned, fix its size"
        )


def bucket_mask(mask_path: Path, video: DecodedVideo, video_path: Path) -> np.ndarray:
    """The video's mask file at the bucket size, uint8 or uint16 (the file's own depth)."""
    mask = _native.load_mask(mask_path)
    check_aspect(video_path, video.original_size, mask_path, (mask.shape[1], mask.shape[0]))
    return _native.resize_mask_to_bucket(mask, video.bucket)


def latent_weights(mask: np.ndarray | None, grid: tuple[int, int]) -> np.ndarray:
    """Weights in [0, 1] on the latent grid (height, width): ``mask / 255`` (``/ 65535`` for
    16-bit) pooled as ``F.interpolate(mode="area")`` does; full weight without a mask."""
    if mask is None:
        return np.ones(grid, np.float32)
    scale = np.float32(65535.0 if mask.dtype == np.uint16 else 255.0)
    return _native.area_downsample(mask.astype(np.float32) / scale, grid)
