"""The largest batch a run trains, which sets the activations a plan counts: from the cache (what
``train`` will read), from the dataset TOML before caching (each item's bucket and clip length as
``cache`` would choose them, from headers alone: nothing is decoded), or from ``--resolution W H
[--frames N]``. Largest means the most latent cells (latent frames x height x width).

Before caching, an image's size is its header's (turned as its EXIF orientation turns it, as the
decoder does) and a video's its stream's; a video's length is the frame count its
container states (or its duration times its rate), and without either the longest clip the
settings allow. Items discovery fails or whose header cannot be read are left out: ``cache``
reports them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import av
from PIL import ExifTags, Image

from masktrain import _native, catalog
from masktrain.config.dataset import DatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.data import cache_format
from masktrain.data.cached_items import CachedItem, find_cached_items
from masktrain.data.dataset_paths import check_readable
from masktrain.data.discovery import bucket_list, choose_bucket, discover
from masktrain.data.video import ClipSettings, kept_frames
from masktrain.errors import CachedDataError, CacheFileError, ConfigError, DataError, MaskTrainError

TURNED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""


@dataclass(frozen=True)
class Bucket:
    """A run's largest batch: its size, where it came from and, when cached, its text tokens."""

    width: int
    """Pixels."""
    height: int
    frames: int
    """Frames per clip; 1 for images."""
    source: str
    """Where it came from, for the plan: ``the cache (12 items)``, ``dataset.toml before caching
    (12 items)``, ``--resolution``."""
    text_tokens: int | None = None
    """The longest cached caption's tokens (None: not cached)."""
    latent: tuple[int, int, int] | None = None
    """(frames, height, width) of its cached latents (None: not cached); the plan takes these
    over the pixels, since the VAE that made them may not have the arch's factor."""


def from_resolution(width: int, height: int, frames: int = 1) -> Bucket:
    return Bucket(width, height, frames, "--resolution")


def from_dataset(path: Path, arch: str) -> Bucket:
    """The largest bucket of the dataset TOML at `path`: from its cache when every item is cached
    and fresh, else from its sources as ``cache`` would bucket them."""
    datasets = load_dataset_config(path)
    check_readable(datasets)  # a missing folder is one line, as cache says it
    try:
        items = find_cached_items(datasets, arch)
    except (CachedDataError, CacheFileError):  # not cached for `arch`, or not all of it fresh
        return from_sources(datasets, arch)
    return from_cached_items(items, arch)


def from_cached_items(items: Sequence[CachedItem], arch: str) -> Bucket:
    """The largest of the cached `items`: its latents' shape and bucket, read from the headers."""
    if not items:
        raise CachedDataError("no cached items to plan for")
    largest = max(items, key=lambda item: _latent_cells(item.latent_shape))
    metadata = cache_format.read_metadata(largest.latent_path)
    if metadata is None or metadata.bucket is None:
        raise CachedDataError(f"{largest.latent_path}: gone, or names no bucket; run masktrain cache again")
    width, height = metadata.bucket
    latent_frames = largest.latent_shape[1]
    frames = (latent_frames - 1) * catalog.arch(arch).temporal_factor + 1
    tokens = [_text_tokens(path) for path in {item.text_path for item in items}]
    return Bucket(
        width,
        height,
        frames,
        f"the cache ({_items(len(items))})",
        max((count for count in tokens if count is not None), default=None),
        (latent_frames, largest.latent_shape[2], largest.latent_shape[3]),
    )


def from_sources(datasets: DatasetConfig, arch: str) -> Bucket:
    """The largest bucket ``cache`` would make of the `datasets`' items (see the module docstring);
    a :class:`DataError` naming the TOML when no item can be read."""
    spec = catalog.arch(arch)
    found: list[tuple[int, int, int]] = []  # (width, height, frames) per readable item
    for number, dataset in enumerate(datasets.datasets, start=1):
        clips = None
        if isinstance(dataset, VideoDatasetConfig):
            if spec.video_fps is None:
                raise ConfigError(
                    f"{datasets.source}: [[datasets]] #{number}: --arch {arch} is an image model and "
                    f"cannot take a video dataset; video datasets need --arch "
                    f"{' or '.join(catalog.video_arches())}"
                )
            clips = ClipSettings.of(dataset, spec.video_fps, spec.temporal_factor)
        buckets = bucket_list(dataset.buckets, spec.bucket_step)
        for item in discover(dataset).items:
            try:
                size, frames = _image(item.path) if clips is None else _video(item.path, clips)
            except (OSError, ValueError, IndexError, av.FFmpegError):  # cache reports it
                continue
            if frames is not None:  # None: shorter than every target_frames, which cache fails
                found.append((*choose_bucket(size, dataset.buckets, buckets, spec.bucket_step), frames))
    if not found:
        raise DataError(
            f"{datasets.source}: no image or video whose header can be read, so no bucket to plan for; "
            "check its image_directory / video_directory, or pass --resolution W H [--frames N]"
        )
    width, height, frames = max(found, key=lambda bucket: _cells(bucket, spec.temporal_factor))
    return Bucket(width, height, frames, f"{datasets.source.name} before caching ({_items(len(found))})")


def _image(path: Path) -> tuple[tuple[int, int], int]:
    """(width, height) of the image at `path` as the decoder turns it, and its 1 frame."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return ((height, width) if orientation in TURNED else (width, height)), 1


def _video(path: Path, clips: ClipSettings) -> tuple[tuple[int, int], int | None]:
    """(width, height) of the video at `path` (a file, or a folder of frame images) and the
    length of the longest clip `clips` cut from it (None: none)."""
    if path.is_dir():
        frames = _native.list_images(path)
        size, _ = _image(frames[0])
        return size, _longest_clip(clips, len(frames))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = stream.frames
        if not count and container.duration and stream.average_rate:  # Matroska states no count
            count = round(container.duration / av.time_base * stream.average_rate)
        return (stream.width, stream.height), _longest_clip(clips, count or None)


def _longest_clip(clips: ClipSettings, frame_count: int | None) -> int | None:
    """The longest clip of a video of `frame_count` frames (None: unknown, so the longest the
    settings allow); None when it yields none."""
    if frame_count is None:
        kept = max(*clips.target_frames, clips.max_frames)
    else:  # frames dropped to the model's rate (source_fps)
        kept = sum(islice(kept_frames(clips.source_fps, clips.target_fps), frame_count))
    return max((length for _, length in clips.spans(kept)), default=None)


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _latent_cells(latent_shape: tuple[int, ...]) -> int:
    _, frames, height, width = latent_shape
    return frames * height * width


def _cells(bucket: tuple[int, int, int], temporal: int) -> int:
    """Latent cells of a (width, height, frames) bucket, over the spatial factor squared."""
    width, height, frames = bucket
    return ((frames - 1) // temporal + 1) * width * height


def _text_tokens(path: Path) -> int | None:
    """The tokens of a cached caption: its embedding's first dimension (None: unreadable)."""
    try:
        _, shapes = cache_format.read_header(path)
    except (OSError, MaskTrainError):
        return None
    embeds = [shape for key, shape in shapes.items() if key.startswith(cache_format.TEXT_EMBEDS) and shape]
    return max((shape[0] for shape in embeds), default=None)
