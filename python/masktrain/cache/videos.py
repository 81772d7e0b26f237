"""``masktrain cache`` for one video dataset: every clip of every video becomes one safetensors
file ``{stem}_{start:05d}-{count:03d}_{W:04d}x{H:04d}_{arch}.safetensors`` (W x H: the first
frame's own size) holding ``latents_{F}x{h}x{w}_<dtype>`` and, when ``mask_directory`` is set,
``mask_weights_{F}x{h}x{w}_float32``: the video's static mask, prepared by the native core as an
image's mask file is, repeated over the F latent frames (a video without a mask file gets full
weight, counted as mask source ``none``).

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

import numpy as np
import torch

from masktrain import _native
from masktrain.cache.setup import CacheSetup
from masktrain.cache.stages import ProgressBar, prepared_chunks, stale_items
from masktrain.cache.summary import DatasetSummary
from masktrain.config.dataset import VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import video
from masktrain.data.buckets import Bucket
from masktrain.data.discovery import MediaItem, choose_bucket
from masktrain.distributed import Shard
from masktrain.errors import DataError, VideoDecodeError
from masktrain.models.loading import device_of

log = logging.getLogger(__name__)


@dataclass
class PreparedVideo:
    decoded: video.DecodedVideo
    spans: list[tuple[int, int]]
    """(start, length) of each clip."""
    weights: np.ndarray | None
    """(h, w) raw weights on the latent grid of the bucket; None when masking is off."""
    mask_path: Path | None
    controls: np.ndarray | None = None
    """A conditioned mode's given frames from ``control_directory``, (K, H, W, 3) in the bucket."""

    @property
    def mask_source(self) -> fmt.MaskSource:
        return "file" if self.mask_path is not None else "none"


def decode_with_mask(
    path: Path,
    dataset: VideoDatasetConfig,
    buckets: list[Bucket],
    factor: int,
    mask_path: Path | None,
    *,
    limit: int | None,
    source_fps: float | None = None,
    target_fps: float | None = None,
    cache_mask_gamma: float = 1.0,
    cache_mask_min_weight: float = 0.0,
) -> tuple[video.DecodedVideo, np.ndarray | None]:
    """A video's frames decoded into its bucket (``data.video``), and its static mask file prepared
    by the native core onto the bucket's latent grid (None without one): the preparation ``cache``
    gives every video, and ``inspect`` its first frame (``limit=1``)."""
    decoded = video.decode_video(
        path,
        lambda size: choose_bucket(size, dataset.buckets, buckets),
        limit=limit,
        source_fps=source_fps,
        target_fps=target_fps,
    )
    width, height = decoded.bucket
    if width % factor or height % factor:
        raise DataError(
            f"{path}: bucket {width}x{height} is not a multiple of the VAE's {factor}x compression"
        )
    weights = None
    if mask_path is not None:
        _, weights = _native.prepare_mask(
            mask_path,
            decoded.original_size,
            decoded.bucket,
            factor,
            source=path,
            media="video",
            cache_mask_gamma=cache_mask_gamma,
            cache_mask_min_weight=cache_mask_min_weight,
        )
    return decoded, weights


class VideoCacher:
    """Caches one video dataset."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, VideoDatasetConfig)
        self.setup, self.dataset = setup, setup.dataset
        fps = setup.family.spec.video_fps
        if fps is None:
            raise DataError(f"--arch {setup.arch} is an image model and cannot take a video dataset")
        self.settings = video.ClipSettings.of(self.dataset, fps, setup.family.temporal_factor(setup.vae))
        self.masking = setup.masks is not None
        self.existing = fmt.existing_item_files(self.dataset.cache_directory, setup.arch, clips=True)
        self.short = 0
        """Videos too short for some (not all) of target_frames."""

    @property
    def missing_files_warning(self) -> bool:
        """The guide's "N videos have no matching mask file" applies (mask files are set)."""
        return self.masking

    def fingerprint(self, item: MediaItem) -> str:
        return self.setup.fingerprint(item)

    def status(self, item: MediaItem, fingerprint: str) -> fmt.CacheStatus:
        paths = self.existing.get(item.stem, [])
        if not paths:
            return "missing"
        fresh = {p.name: p for p in self.setup.fresh_files(item, paths, fingerprint)}
        if not fresh:
            return "stale"
        metadata = fmt.read_metadata(next(iter(fresh.values())))
        expected = fmt.clip_file_names(item.stem, metadata) if metadata is not None else set()
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
        settings, setup = self.settings, self.setup
        decoded, weights = decode_with_mask(
            item.path,
            self.dataset,
            setup.buckets,
            setup.factor,
            setup.mask_path(item),
            limit=settings.decode_limit,
            source_fps=settings.source_fps,
            target_fps=settings.target_fps,
            cache_mask_gamma=setup.config.cache_mask_gamma,
            cache_mask_min_weight=setup.config.cache_mask_min_weight,
        )
        count = len(decoded.frames)
        spans = settings.spans(count)
        if not spans:
            fps = f" at {settings.target_fps:g} fps" if settings.source_fps else ""
            raise VideoDecodeError(
                f"{item.path}: {count} frames{fps} is shorter than every clip length of target_frames "
                f"{list(settings.target_frames)}; lower target_frames or drop the video"
            )
        if settings.extraction != "full" and any(t > count for t in settings.target_frames):
            self.short += 1
        mask_path = setup.mask_path(item)
        if weights is None and self.masking:
            width, height = decoded.bucket
            weights = np.ones((height // setup.factor, width // setup.factor), np.float32)
        controls = None
        if setup.conditioning is not None:
            controls = setup.conditioning.given_controls(item.stem, setup.controls, decoded.bucket)
        return PreparedVideo(decoded, spans, weights, mask_path, controls)

    def encode(
        self, frames: np.ndarray, spans: list[tuple[int, int]], controls: np.ndarray | None = None
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The clips' latents (B, C, F, h, w), and each clip's conditioning tensors (empty without
        a conditioned mode; its given frames from `controls` when the item has them)."""
        clips = np.stack([frames[start : start + count] for start, count in spans])  # (B, F, H, W, 3)
        pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
        setup = self.setup
        latents = setup.family.encode_pixels(setup.vae, pixels).cpu()
        if setup.conditioning is None:
            return latents, [{} for _ in spans]
        return latents, setup.conditioning.clip_tensors(
            setup.family, setup.vae, pixels, latents.dtype, controls
        )

    def write(self, item: MediaItem, prepared: PreparedVideo, fingerprint: str) -> None:
        """Encode and write every clip of `item`, then remove its clips of an old extraction."""
        setup, decoded, spans = self.setup, prepared.decoded, prepared.spans
        weights = None if prepared.weights is None else torch.from_numpy(prepared.weights)
        written: set[str] = set()
        by_length: dict[int, list[tuple[int, int]]] = {}
        for span in spans:
            by_length.setdefault(span[1], []).append(span)
        batch_size = setup.config.batch_size
        for group in by_length.values():
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                latents, conditions = self.encode(decoded.frames, batch, prepared.controls)
                for (start, count), clip, condition in zip(batch, latents, conditions, strict=True):
                    if prepared.weights is not None:
                        setup.check_grid(item, decoded.bucket, prepared.weights.shape, tuple(clip.shape[-2:]))
                    name = fmt.item_cache_name(item.stem, decoded.original_size, setup.arch, (start, count))
                    metadata = setup.metadata(
                        item,
                        prepared.mask_source,
                        decoded.bucket,
                        fingerprint,
                        decoded.original_size,
                        prepared.mask_path,
                        **{
                            fmt.CLIPS_KEY: fmt.clip_list(spans),
                            "frame_start": str(start),
                            "frame_count": str(count),
                        },
                    )
                    tensors = setup.latent_tensors(clip, weights) | condition
                    fmt.write_cache_file(self.dataset.cache_directory / name, tensors, metadata)
                    written.add(name)
        setup.remove_replaced(self.existing.get(item.stem, []), written)

    def run(self, summary: DatasetSummary, progress: ProgressBar, shard: Shard) -> list[MediaItem]:
        """Clips of every stale video of this process's share; returns the share's videos that
        have valid clip files."""
        summary.clips = summary.clips or 0
        items, todo = stale_items(self, self.setup.discovery, shard, summary, progress)
        fingerprints = {item.path: fp for item, fp in todo}
        overlap = device_of(self.setup.vae).type != "cpu"
        for chunk, results in prepared_chunks(self, [[item] for item, _ in todo], overlap):
            ((item,), (result,)) = chunk, results
            if isinstance(result, PreparedVideo):
                try:
                    self.write(item, result, fingerprints[item.path])
                except (OSError, ValueError) as error:
                    summary.failed.append((item.path, str(error)))
                else:
                    summary.add_written(result.mask_source, result.weights, clips=len(result.spans))
            else:
                summary.failed.append((item.path, str(result)))
            progress.update(1)
        if self.short:
            log.info(
                "%d videos are shorter than some of target_frames %s; "
                "those clip lengths were skipped for them",
                self.short,
                list(self.settings.target_frames),
            )
        self.setup.remove_failed(summary.failed, self.existing)
        failed = {path for path, _ in summary.failed}
        return [item for item in items if item.path not in failed]
