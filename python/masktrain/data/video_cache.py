"""``masktrain cache`` for one video dataset: every clip of every video becomes one safetensors
file ``{stem}_{start:05d}-{count:03d}_{W:04d}x{H:04d}_{arch}.safetensors`` (W x H: the first
frame's own size) holding ``latents_{F}x{h}x{w}_<dtype>`` and, when ``mask_directory`` is set,
``mask_weights_{F}x{h}x{w}_float32``: the video's static mask pooled onto the latent grid and
repeated over the F latent frames (a video without a mask file gets full weight, counted as
mask source ``none``).

Every clip file of a video carries the video's fingerprint (its file, its mask file, the bucket
and frame-extraction settings, the VAE) and the list of all its clips. A video is skipped when
every listed clip file is there with the fingerprint this run would write; otherwise all its
clips are rebuilt, and clip files of that video that the new settings no longer produce (another
``target_frames``, extraction mode or length) are deleted once the new ones are written, so
training never picks up clips of an old extraction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from masktrain import _native
from masktrain.config.dataset import VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import video
from masktrain.data.discovery import MediaItem, bucket_list, choose_bucket, discover_videos
from masktrain.data.pipeline import prepared_chunks, stale_items
from masktrain.distributed import Shard
from masktrain.models.base import ModelFamily, weights_identity

if TYPE_CHECKING:
    from masktrain.cache import CacheConfig, DatasetSummary

log = logging.getLogger(__name__)

_CLIPS_KEY = "clips"


@dataclass
class PreparedVideo:
    decoded: video.DecodedVideo
    spans: list[tuple[int, int]]
    """(start, length) of each clip."""
    mask: np.ndarray | None
    """The mask file at the bucket size; None: full weight (or masking off)."""
    mask_path: Path | None

    @property
    def mask_source(self) -> fmt.MaskSource:
        return "file" if self.mask_path is not None else "none"


def _clip_list(spans: list[tuple[int, int]]) -> str:
    return ",".join(f"{start}-{count}" for start, count in spans)


def _clip_names(stem: str, arch: str, metadata: fmt.CacheMetadata | None) -> set[str]:
    """The file names of every clip a clip file's metadata lists (empty when it lists none)."""
    if metadata is None:
        return set()
    try:
        width, height = (int(v) for v in metadata.extra["original_size"].split("x"))
        spans = [clip.split("-") for clip in metadata.extra[_CLIPS_KEY].split(",")]
        return {fmt.item_cache_name(stem, (width, height), arch, (int(a), int(b))) for a, b in spans}
    except (KeyError, ValueError):
        return set()


class VideoCacher:
    """Caches one video dataset."""

    def __init__(
        self, config: CacheConfig, family: ModelFamily, vae: torch.nn.Module, dataset: VideoDatasetConfig
    ) -> None:
        self.config, self.family, self.vae, self.dataset = config, family, vae, dataset
        self.buckets = bucket_list(dataset.buckets)
        self.factor = family.spatial_factor(vae)
        self.vae_identity = weights_identity(config.vae, vae)
        self.settings = video.ClipSettings.of(dataset, video.TARGET_FPS[family.name])
        self.masks = _native.MaskIndex(dataset.mask_directory) if dataset.mask_directory else None
        self.existing = fmt.existing_item_files(dataset.cache_directory, family.name, clips=True)
        self.short = 0
        """Videos too short for some (not all) of target_frames."""

    def fingerprint(self, item: MediaItem) -> str:
        mask = self.masks.get(item.stem) if self.masks is not None else None
        return fmt.fingerprint({
            "source": fmt.source_stat(item.path), "mask": fmt.source_stat(mask),
            "masking": self.masks is not None, "buckets": self.buckets,
            "resolution": list(self.dataset.buckets.resolution),
            "bucket_no_upscale": self.dataset.buckets.bucket_no_upscale,
            "clips": self.settings.fingerprint_part(), "rules": fmt.RESIZE_RULES,
            "vae": self.vae_identity, "dtype": str(self.vae.dtype),
            "format": fmt.FORMAT_VERSION,
        })  # fmt: skip

    def status(self, item: MediaItem, fingerprint: str) -> fmt.CacheStatus:
        paths = self.existing.get(item.stem, [])
        if not paths:
            return "missing"
        arch, skip = self.family.name, self.config.skip_existing
        fresh = {
            p.name: p
            for p in paths
            if fmt.reusable(p, arch=arch, fingerprint=fingerprint, skip_existing=skip)
        }
        if not fresh:
            return "stale"
        expected = _clip_names(item.stem, arch, fmt.read_metadata(next(iter(fresh.values()))))
        return "fresh" if expected and expected <= fresh.keys() else "stale"

    def prepare(self, chunk: list[MediaItem]) -> list[PreparedVideo | Exception]:
        results: list[PreparedVideo | Exception] = []
        for item in chunk:
            try:
                results.append(self._prepare(item))
            except (OSError, ValueError) as error:  # every error of ours names the file
                results.append(error)
        return results

    def _prepare(self, item: MediaItem) -> PreparedVideo:
        settings = self.settings
        decoded = video.decode_video(
            item.path, lambda size: choose_bucket(size, self.dataset.buckets, self.buckets),
            limit=settings.decode_limit, source_fps=settings.source_fps, target_fps=settings.target_fps,
        )  # fmt: skip
        width, height = decoded.bucket
        if width % self.factor or height % self.factor:
            raise ValueError(
                f"{item.path}: bucket {width}x{height} is not a multiple of the VAE's "
                f"{self.factor}x compression"
            )
        count = len(decoded.frames)
        spans = settings.spans(count)
        if not spans:
            fps = f" at {settings.target_fps:g} fps" if settings.source_fps else ""
            raise video.VideoDecodeError(
                f"{item.path}: {count} frames{fps} is shorter than every clip length of target_frames "
                f"{list(settings.target_frames)}; lower target_frames or drop the video"
            )
        if settings.extraction != "full" and any(t > count for t in settings.target_frames):
            self.short += 1
        mask_path = self.masks.get(item.stem) if self.masks is not None else None
        mask = video.bucket_mask(mask_path, decoded, item.path) if mask_path is not None else None
        return PreparedVideo(decoded, spans, mask, mask_path)

    def encode(self, frames: np.ndarray, spans: list[tuple[int, int]]) -> torch.Tensor:
        clips = np.stack([frames[start : start + count] for start, count in spans])  # (B, F, H, W, 3)
        pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
        return self.family.encode_pixels(self.vae, pixels).cpu()

    def write(self, item: MediaItem, prepared: PreparedVideo, fingerprint: str) -> np.ndarray | None:
        """Encode and write every clip of `item`, then remove its clips of an old extraction;
        returns the latent-grid mask weights (None when masking is off)."""
        decoded, spans = prepared.decoded, prepared.spans
        arch, masking = self.family.name, self.masks is not None
        extra = {
            "vae": self.config.vae, "original_size": f"{decoded.original_size[0]}x{decoded.original_size[1]}",
            "mask_path": str(prepared.mask_path or ""), _CLIPS_KEY: _clip_list(spans),
        }  # fmt: skip
        weights: np.ndarray | None = None
        written: set[str] = set()
        by_length: dict[int, list[tuple[int, int]]] = {}
        for span in spans:
            by_length.setdefault(span[1], []).append(span)
        for group in by_length.values():
            for first in range(0, len(group), self.config.batch_size):
                batch = group[first : first + self.config.batch_size]
                latents = self.encode(decoded.frames, batch)
                for (start, count), clip in zip(batch, latents, strict=True):
                    _, frames, height, width = clip.shape
                    dtype = str(clip.dtype).removeprefix("torch.")
                    tensors = {f"latents_{frames}x{height}x{width}_{dtype}": clip}
                    if masking:
                        if weights is None:
                            weights = video.latent_weights(prepared.mask, (height, width))
                        mask = torch.from_numpy(weights).expand(1, frames, height, width)
                        tensors[f"mask_weights_{frames}x{height}x{width}_float32"] = mask
                    name = fmt.item_cache_name(item.stem, decoded.original_size, arch, (start, count))
                    metadata = fmt.CacheMetadata(
                        arch=arch, source=str(item.path), mask_source=prepared.mask_source,
                        bucket=decoded.bucket, fingerprint=fingerprint,
                        extra={**extra, "frame_start": str(start), "frame_count": str(count)},
                    )  # fmt: skip
                    fmt.write_cache_file(self.dataset.cache_directory / name, tensors, metadata)
                    written.add(name)
        for old in self.existing.get(item.stem, []):
            if old.name not in written:  # a clip of an old extraction: training would pick it up
                old.unlink(missing_ok=True)
        return weights


def cache_videos(
    cacher: VideoCacher, summary: DatasetSummary, progress: tqdm, shard: Shard
) -> list[MediaItem]:
    """Clips of every stale video of this process's share; returns the share's videos that have
    valid clip files."""
    items, todo = stale_items(cacher, discover_videos(cacher.dataset), shard, summary, progress)

    fingerprints = {item.path: fp for item, fp in todo}
    overlap = cacher.vae.device.type != "cpu"
    for chunk, results in prepared_chunks(cacher, [[item] for item, _ in todo], overlap):
        ((item,), (result,)) = chunk, results
        if isinstance(result, PreparedVideo):
            try:
                weights = cacher.write(item, result, fingerprints[item.path])
            except (OSError, ValueError) as error:
                summary.failed.append((item.path, str(error)))
            else:
                summary.written += 1
                summary.clips = (summary.clips or 0) + len(result.spans)
                summary.sources[result.mask_source] += 1
                if weights is not None:
                    summary.weight_sum += float(weights.mean())
                    summary.weight_count += 1
        else:
            summary.failed.append((item.path, str(result)))
        progress.update(1)
    if cacher.short:
        log.info("%d videos are shorter than some of target_frames %s; those clip lengths were skipped "
                 "for them", cacher.short, list(cacher.settings.target_frames))  # fmt: skip
    failed = {path for path, _ in summary.failed}
    return [item for item in items if item.path not in failed]
