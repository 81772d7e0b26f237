"""Video datasets: decoding a video onto its bucket with PyAV and cutting it into clips the way
musubi-tuner does.

Decoding runs from the first frame in order, without seeking, so frame indices are exact
whatever the codec's keyframe spacing; ``head`` and ``full`` stop once they have the frames
they can use. Each frame is converted to RGB (``rgb24``) and cover-resized onto the bucket by the
native core; the bucket is chosen from the first frame's size. A JSONL ``video_path`` may be a
directory of frame images instead (sorted by name, decoded by the native core). The container's
rotation metadata is not applied (musubi-tuner does not either).

With ``source_fps`` frames are dropped to the family's rate (``catalog``: WAN 16 fps) by
musubi-tuner's rule:
source frame ``i`` lands on target frame ``int(i * target / source)`` (accumulated in floating
point as musubi does) and only the first frame landing on each target frame is kept. A source
slower than the target keeps every frame; none is duplicated.

Clips from the N kept frames, for each target length T of ``target_frames`` (4k+1, ascending):

- ``head``: ``(0, T)`` when N >= T.
- ``chunk``: ``(i, T)`` for i = 0, T, 2T, ... while i + T <= N.
- ``slide``: ``(i, T)`` for i in ``range(0, N - T + 1, frame_stride)``.
- ``uniform``: ``frame_sample`` starts ``np.linspace(0, N - T, frame_sample)`` truncated to
  int, when N >= T (a start that repeats is one clip).
- ``full``: one clip ``(0, min(N, max_frames))`` rounded down to 4k+1 (k: the VAE's temporal factor).

A video that yields no clip at all (shorter than every T) fails, naming the file and its length.

Each decoded video keeps the timeline of its source (every decoded frame's time, and the total
frame count when it was decoded to the end), so a mask video or a folder of mask frames can be laid
onto the same kept frames (``cache.video_masks``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from masktrain import _native
from masktrain.config.dataset import VideoDatasetConfig
from masktrain.data.buckets import Bucket
from masktrain.errors import VideoDecodeError


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
    frame_step: int
    """Frames per latent frame after the first (the VAE's temporal factor): lengths are 4k+1."""

    @classmethod
    def of(cls, dataset: VideoDatasetConfig, target_fps: float, frame_step: int) -> ClipSettings:
        return cls(
            target_frames=dataset.target_frames,
            extraction=dataset.frame_extraction,
            stride=dataset.frame_stride,
            sample=dataset.frame_sample,
            max_frames=dataset.max_frames,
            source_fps=dataset.source_fps,
            target_fps=target_fps,
            frame_step=frame_step,
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
                spans.append((0, (length - 1) // self.frame_step * self.frame_step + 1))
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
        part = asdict(self)
        del part["frame_step"]  # the VAE's, and the VAE's identity is in the fingerprint already
        return part


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
    source_times: list[float] | None = None
    """Seconds from the first frame of every decoded frame, kept or not (None for a folder of frame
    images, or a stream without timestamps)."""
    source_frame_count: int | None = None
    """Frames in the source, when it was decoded to its end (None when decoding stopped early)."""


@contextmanager
def _frames(path: Path) -> Iterator[Iterator[tuple[np.ndarray, float | None]]]:
    """The RGB frames of a video file, or of a directory of frame images, each with its time."""
    if path.is_dir():
        yield ((_native.decode_image(frame)[0], None) for frame in _native.list_images(path))
        return
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: file is empty (0 bytes)")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield ((frame.to_ndarray(format="rgb24"), frame.time) for frame in container.decode(stream))


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
    times: list[float | None] = []
    original: tuple[int, int] | None = None
    bucket: Bucket | None = None
    stopped = False
    try:
        with _frames(path) as source:
            for index, (rgb, time) in enumerate(source):
                times.append(time)
                if not next(keep):
                    continue
                if bucket is None:
                    original = (rgb.shape[1], rgb.shape[0])
                    bucket = bucket_for(original)
                frames.append(_native.resize_image_to_bucket(rgb, bucket))
                indices.append(index)
                if limit is not None and len(frames) >= limit:
                    stopped = True
                    break
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{path}: cannot decode video ({error})") from error
    if bucket is None or original is None:
        raise VideoDecodeError(f"{path}: no video frames could be decoded")
    known = [float(t) for t in times if t is not None]
    timeline = [t - known[0] for t in known] if len(known) == len(times) else None
    count = None if stopped else len(times)
    return DecodedVideo(np.stack(frames), indices, original, bucket, timeline, count)
