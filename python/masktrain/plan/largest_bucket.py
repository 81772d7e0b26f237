"""The largest batch a run trains, which sets the activations a plan counts: from the cache (what
``train`` will read), from the dataset TOML before caching (each item's bucket as ``cache`` would
choose it, from the image's header alone), or from ``--resolution W H [--frames N]``. Largest
means the most latent cells (frames x height x width)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from masktrain.catalog import arch as arch_spec
from masktrain.config.dataset import DatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.data import cache_format
from masktrain.data.cached_items import CachedItem, find_cached_items
from masktrain.data.dataset_paths import check_readable
from masktrain.data.discovery import bucket_list, choose_bucket, discover
from masktrain.errors import CachedDataError, DataError, MaskTrainError

TI2V_CHANNELS = 48
"""WAN 2.2 TI2V-5B latents: 48 channels from a 16x VAE."""


@dataclass(frozen=True)
class Bucket:
    """A batch's size in pixels and frames, where it came from, and its text tokens when known."""

    width: int
    height: int
    frames: int
    source: str
    text_tokens: int | None = None


def from_resolution(width: int, height: int, frames: int = 1) -> Bucket:
    return Bucket(width, height, frames, "--resolution")


def from_cached_items(items: Sequence[CachedItem], arch: str) -> Bucket:
    """The largest of the cached `items` (their latents' shapes, read from the headers)."""
    if not items:
        raise CachedDataError("no cached items to plan for")
    spec = arch_spec(arch)
    largest = max(items, key=lambda item: _cells(item.latent_shape))
    channels, frames, height, width = largest.latent_shape
    spatial = 16 if arch == "wan" and channels == TI2V_CHANNELS else spec.spatial_factor
    counts = [count for count in (_text_tokens(item.text_path) for item in items) if count is not None]
    tokens = max(counts, default=None)
    return Bucket(
        width * spatial,
        height * spatial,
        (frames - 1) * spec.temporal_factor + 1,
        f"the cache ({len(items)} items)",
        tokens,
    )


def from_dataset(path: Path, arch: str) -> Bucket:
    """The largest bucket of the dataset TOML at `path`: from its cache when every item is cached
    and fresh, else from its sources as ``cache`` would bucket them."""
    datasets = load_dataset_config(path)
    check_readable(datasets)  # a missing folder is one line, as cache says it
    try:
        return from_cached_items(find_cached_items(datasets, arch), arch)
    except CachedDataError:
        return _from_sources(datasets, path)


def _from_sources(datasets: DatasetConfig, path: Path) -> Bucket:
    best: tuple[int, int, int] | None = None
    count = 0
    for dataset in datasets.datasets:
        buckets = bucket_list(dataset.buckets)
        frames = max(dataset.target_frames) if isinstance(dataset, VideoDatasetConfig) else 1
        for item in discover(dataset).items:
            size = _size(item.path)
            if size is None:
                continue
            width, height = choose_bucket(size, dataset.buckets, buckets)
            count += 1
            if best is None or frames * width * height > best[0] * best[1] * best[2]:
                best = (frames, width, height)
    if best is None:
        raise DataError(f"{path}: no readable image or video to plan for")
    frames, width, height = best
    return Bucket(width, height, frames, f"{path.name} before caching ({count} items)")


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image from its header, or of a video's first frame; None when
    unreadable (``cache`` reports those)."""
    try:
        if path.is_dir():  # a video as a folder of frames
            path = min(child for child in path.iterdir() if child.is_file())
        if path.suffix.lower() in {".mp4", ".mov", ".webm", ".mkv", ".avi"}:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                return int(stream.width), int(stream.height)
        with Image.open(path) as image:
            size: tuple[int, int] = image.size
            return size
    except (OSError, ValueError, IndexError):
        return None


def _cells(latent_shape: tuple[int, ...]) -> int:
    _, frames, height, width = latent_shape
    return frames * height * width


def _text_tokens(path: Path) -> int | None:
    try:
        _, shapes = cache_format.read_header(path)
    except (OSError, MaskTrainError):
        return None
    return max((shape[0] for shape in shapes.values() if shape), default=None)
