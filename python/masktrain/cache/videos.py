"""``masktrain cache`` for one video dataset: every clip of every video becomes one safetensors
file ``{stem}_{start:05d}-{count:03d}_{W:04d}x{H:04d}_{arch}.safetensors`` (W x H: the first
frame's own size) holding ``latents_{F}x{h}x{w}_<dtype>`` and, when masking is on,
``mask_weights_{F}x{h}x{w}_float32``: the video's mask (``data.mask_sources``: its JSONL
``mask_path``, its match in ``mask_directory``, the dataset's ``default_mask``) on the clip's frames,
pooled per latent frame as the VAE groups frames (``cache.video_masks``). A video without a mask
gets full weight, counted as mask source ``none`` (or fails under ``require_mask``).

Every clip file of a video carries the video's fingerprint (its file, its mask (each frame of a
mask-frame folder), the bucket and frame-extraction settings, the pooling mode, the VAE) and the
list of all its clips. A video is skipped when
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

from masktrain.cache.setup import CacheSetup
from masktrain.cache.stages import ProgressBar, prepared_chunks, stale_items
from masktrain.cache.summary import DatasetSummary
from masktrain.cache.video_masks import ClipMasks, MaskPooling, clip_masks, full_weight, is_still
from masktrain.config.dataset import VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import video
from masktrain.data.buckets import Bucket
from masktrain.data.discovery import MediaItem, choose_bucket
from masktrain.distributed import Shard
from masktrain.errors import DataError, MissingMaskError, VideoDecodeError
from masktrain.models.loading import device_of

log = logging.getLogger(__name__)


@dataclass
class PreparedVideo:
    decoded: video.DecodedVideo
    spans: list[tuple[int, int]]
    """(start, length) of each clip."""
    masks: ClipMasks | None
    """The mask of every clip; None when masking is off."""
    mask_path: Path | None
    mask_source: fmt.MaskSource
    controls: np.ndarray | None = None
    """A conditioned mode's given frames from ``control_directory``, (K, H, W, 3) in the bucket."""


def decode_with_mask(
    path: Path,
    dataset: VideoDatasetConfig,
    buckets: list[Bucket],
    pooling: MaskPooling,
    mask_path: Path | None,
    *,
    masking: bool,
    limit: int | None,
    source_fps: float | None = None,
    target_fps: float | None = None,
) -> tuple[video.DecodedVideo, ClipMasks | None]:
    """A video's frames decoded into its bucket (``data.video``), and its mask on them
    (``cache.video_masks``; full weight without a mask file while `masking`, None with masking
    off): the preparation ``cache`` gives every video, and ``inspect`` its first clip. A mask video
    or frame folder needs the whole source (its length is compared with the mask's), so `limit`
    applies to still masks only."""
    per_frame = mask_path is not None and not is_still(mask_path)
    decoded = video.decode_video(
        path,
        lambda size: choose_bucket(size, dataset.buckets, buckets),
        limit=None if per_frame else limit,
        source_fps=source_fps,
        target_fps=target_fps,
    )
    width, height = decoded.bucket
    factor = pooling.spatial_factor
    if width % factor or height % factor:
        raise DataError(
            f"{path}: bucket {width}x{height} is not a multiple of the VAE's {factor}x compression"
        )
    if mask_path is not None:
        return decoded, clip_masks(mask_path, path, decoded, pooling)
    return decoded, full_weight(decoded, pooling) if masking else None


class VideoCacher:
    """Caches one video dataset."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, VideoDatasetConfig)
        self.setup, self.dataset = setup, setup.dataset
        fps = setup.family.spec.video_fps
        if fps is None:
            raise DataError(f"--arch {setup.arch} is an image model and cannot take a video dataset")
        temporal = setup.family.temporal_factor(setup.vae)
        self.settings = video.ClipSettings.of(self.dataset, fps, temporal)
        self.masking = setup.masks.masking
        config = setup.config
        self.pooling = MaskPooling(
            setup.factor, temporal, config.mask_pooling, config.cache_mask_gamma, config.cache_mask_min_weight
        )
        self.existing = fmt.existing_item_files(self.dataset.cache_directory, setup.arch, clips=True)
        self.short = 0
        """Videos too short for some (not all) of target_frames."""

    @property
    def missing_files_warning(self) -> bool:
        """The guide's "N videos have no matching mask file" applies (a mask directory is set)."""
        return self.dataset.mask_directory is not None

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
        mask_path, mask_source = setup.mask(item)
        if mask_path is None and self.dataset.require_mask:
            raise MissingMaskError(
                f"{item.path}: require_mask=true but no mask found (no mask_path, no matching file in "
                "mask_directory, no default_mask)"
            )
        decoded, masks = decode_with_mask(
            item.path,
            self.dataset,
            setup.buckets,
            self.pooling,
            mask_path,
            masking=self.masking,
            limit=settings.decode_limit,
            source_fps=settings.source_fps,
            target_fps=settings.target_fps,
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
        controls = None
        if setup.conditioning is not None:
            controls = setup.conditioning.given_controls(item.stem, setup.controls, decoded.bucket)
        return PreparedVideo(decoded, spans, masks, mask_path, mask_source, controls)

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

    def write(self, item: MediaItem, prepared: PreparedVideo, fingerprint: str) -> float | None:
        """Encode and write every clip of `item`, then remove its clips of an old extraction;
        returns the mean raw mask weight of its clips (None with masking off)."""
        setup, decoded, spans = self.setup, prepared.decoded, prepared.spans
        written: set[str] = set()
        means: list[float] = []
        by_length: dict[int, list[tuple[int, int]]] = {}
        for span in spans:
            by_length.setdefault(span[1], []).append(span)
        batch_size = setup.config.batch_size
        for group in by_length.values():
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                latents, conditions = self.encode(decoded.frames, batch, prepared.controls)
                for (start, count), clip, condition in zip(batch, latents, conditions, strict=True):
                    weights = None
                    if prepared.masks is not None:
                        clip_weights = prepared.masks.weights(start, count)
                        setup.check_grid(
                            item, decoded.bucket, clip_weights.shape[-2:], tuple(clip.shape[-2:])
                        )
                        weights = torch.from_numpy(clip_weights)
                        means.append(float(clip_weights.mean()))
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
        return float(np.mean(means)) if means else None

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
                    mean = self.write(item, result, fingerprints[item.path])
                except (OSError, ValueError) as error:
                    summary.failed.append((item.path, str(error)))
                else:
                    weights = None if mean is None else np.array([mean], np.float32)
                    summary.add_written(result.mask_source, weights, clips=len(result.spans))
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
