"""``masktrain cache``: latents, mask weights and text embeddings for every item of a dataset
TOML, one self-describing safetensors file each (see ``data/cache_format.py``).

Per image: the native core decodes it, picks its mask (alpha -> mask file -> full weight, or an
error under ``require_mask``), resizes both onto the bucket and pools the mask onto the latent
grid; the VAE encodes the pixels; the file holds ``latents_1xHxW_<dtype>`` and, when masking is
on, ``mask_weights_1xHxW_float32`` (raw weights in [0, 1]; gamma and floor are applied at
training time). Native preparation of the next chunk runs on a worker thread (the core releases
the GIL) while the current chunk is encoded. Video datasets (WAN only) are cached clip by clip
by ``data/video_cache.py``; each video gets one text-embedding file, as an image does.

With ``bucket_no_upscale`` an image whose area is at most the resolution's keeps its own size
rounded down to the bucket step: the native core prepares it a second time with that one bucket
(it learns the size, EXIF orientation applied, from the first pass; such images are small).

An item whose file has the fingerprint this run would write is skipped; any change to the image,
its mask file, the mask or bucket settings or the VAE rebuilds exactly that item.
Under ``torchrun`` each process caches every ``WORLD_SIZE``-th item (disjoint files) and rank 0
reports the merged summary.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from masktrain import _native, distributed
from masktrain.config.dataset import ConfigError, ImageDatasetConfig, VideoDatasetConfig, load_dataset_config
from masktrain.data import cache_format as fmt
from masktrain.data.buckets import Bucket
from masktrain.data.discovery import ImageItem, MediaItem, bucket_list, discover_images, own_size_bucket
from masktrain.data.pipeline import prepared_chunks, stale_items
from masktrain.data.video import TARGET_FPS
from masktrain.data.video_cache import VideoCacher, cache_videos
from masktrain.distributed import Shard
from masktrain.models import get_family
from masktrain.models.base import ModelFamily, TextEncoder, weights_identity

__all__ = ["CacheConfig", "DatasetSummary", "chunk_size", "prepared_chunks", "run"]

log = logging.getLogger(__name__)

#: What the native core gives per image: the prepared item or the error it failed with.
Prepared = _native.PreparedItem | _native.MaskTrainError | OSError


@dataclass(frozen=True)
class CacheConfig:
    dataset_config: Path
    """The dataset TOML."""
    arch: str
    """Model family: wan or qwen_image."""
    vae: str
    """VAE weights: 'tiny', a diffusers folder or a .safetensors file."""
    text_encoder: str
    """Text encoder weights (--t5 for wan, --text_encoder for qwen_image)."""
    device: str | None = None
    """Encoding device; default cuda when available."""
    batch_size: int = 4
    """Images (or clips of one video) per VAE call."""
    skip_existing: bool = True
    """Skip items whose cache file is up to date (--no-skip_existing rebuilds everything)."""


@dataclass
class DatasetSummary:
    name: str
    items: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rebuilt: int = 0
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    weight_sum: float = 0.0
    weight_count: int = 0
    clips: int | None = None
    """Clip files written (video datasets; None for images)."""

    @classmethod
    def merged(cls, parts: list[DatasetSummary]) -> DatasetSummary:
        """One summary from the per-process summaries of a torchrun run."""
        total = cls(name=parts[0].name)
        for part in parts:
            total.items += part.items
            total.sources.update(part.sources)
            total.skipped += part.skipped
            total.rebuilt += part.rebuilt
            total.written += part.written
            total.failed.extend(part.failed)
            total.weight_sum += part.weight_sum
            total.weight_count += part.weight_count
            if part.clips is not None:
                total.clips = (total.clips or 0) + part.clips
        return total

    def line(self) -> str:
        mean = self.weight_sum / self.weight_count if self.weight_count else float("nan")
        unit = "items" if self.clips is None else "videos"
        clips = "" if self.clips is None else f", {self.clips} clips"
        return (
            f"{self.name}: {self.items} {unit}, mask sources alpha={self.sources['alpha']} "
            f"file={self.sources['file']} none={self.sources['none']}, {self.written} written "
            f"({self.rebuilt} rebuilt{clips}), {self.skipped} skipped, {len(self.failed)} failed, "
            f"mean raw mask weight {mean:.4f}"
        )


def chunk_size(batch_size: int) -> int:
    """Items prepared per native call. Several batches' worth, so each bucket's batches come out
    full (one tensor shape, not a ragged tail per chunk) and the cores stay busy; small enough
    that the prepared images of two chunks stay a few hundred MB at most."""
    return max(8 * batch_size, 4 * _native.thread_count())


def _chunks(items: list[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _ImageCacher:
    """Caches one image dataset."""

    def __init__(
        self, config: CacheConfig, family: ModelFamily, vae: torch.nn.Module, dataset: ImageDatasetConfig
    ):
        self.config, self.family, self.vae, self.dataset = config, family, vae, dataset
        self.buckets = bucket_list(dataset.buckets)
        self.factor = family.spatial_factor(vae)
        self.vae_identity = weights_identity(config.vae, vae)
        self.masks = _native.MaskIndex(dataset.mask_directory) if dataset.mask_directory else None
        self.masking = dataset.alpha_mask or self.masks is not None
        self.existing = fmt.existing_item_files(dataset.cache_directory, family.name)

    def fingerprint(self, item: ImageItem) -> str:
        mask = self.masks.get(item.stem) if self.masks is not None else None
        return fmt.fingerprint({
            "source": fmt.source_stat(item.path), "mask": fmt.source_stat(mask),
            "alpha_mask": self.dataset.alpha_mask, "require_mask": self.dataset.require_mask,
            "masking": self.masking, "buckets": self.buckets,
            "resolution": list(self.dataset.buckets.resolution),
            "bucket_no_upscale": self.dataset.buckets.bucket_no_upscale, "rules": fmt.RESIZE_RULES,
            "vae": self.vae_identity, "dtype": str(self.vae.dtype),
            "format": fmt.FORMAT_VERSION,
        })  # fmt: skip

    def status(self, item: ImageItem, fingerprint: str) -> str:
        paths = self.existing.get(item.stem, [])
        arch, skip = self.family.name, self.config.skip_existing
        if any(fmt.reusable(p, arch=arch, fingerprint=fingerprint, skip_existing=skip) for p in paths):
            return "fresh"
        return "stale" if paths else "missing"

    def _prepare(self, paths: list[Path], buckets: list[Bucket]) -> list[Prepared]:
        return _native.prepare_batch(
            paths,
            buckets,
            mask_index=self.masks,
            alpha_mask=self.dataset.alpha_mask,
            require_mask=self.dataset.require_mask,
            latent_factor=self.factor,
        )

    def prepare(self, chunk: list[ImageItem]) -> list[Prepared]:
        results = self._prepare([item.path for item in chunk], self.buckets)
        if not self.dataset.buckets.bucket_no_upscale:
            return results
        # Images no larger than the resolution keep their own size: prepared again, with that
        # one bucket (grouped, so each distinct size is one parallel native call).
        again: dict[Bucket, list[int]] = {}
        for index, result in enumerate(results):
            if isinstance(result, _native.PreparedItem):
                own = own_size_bucket(result.original_size, self.dataset.buckets)
                if own is not None and own != result.bucket:
                    again.setdefault(own, []).append(index)
        for bucket, indices in again.items():
            redone = self._prepare([chunk[i].path for i in indices], [bucket])
            for index, result in zip(indices, redone, strict=True):
                results[index] = result
        return results

    def write(
        self, item: ImageItem, prepared: _native.PreparedItem, latents: torch.Tensor, fingerprint: str
    ) -> None:
        _, frames, height, width = latents.shape
        dtype = str(latents.dtype).removeprefix("torch.")
        tensors = {f"latents_{frames}x{height}x{width}_{dtype}": latents}
        if prepared.latent_mask is not None:
            mask = torch.from_numpy(prepared.latent_mask)
            if tuple(mask.shape) != (height, width):
                raise ValueError(
                    f"{item.path}: latent grid {width}x{height} but mask grid "
                    f"{mask.shape[1]}x{mask.shape[0]}; "
                    f"bucket {prepared.bucket} is not a multiple of the VAE's {self.factor}x compression"
                )
            tensors[f"mask_weights_{frames}x{height}x{width}_float32"] = mask.expand(1, frames, height, width)
        original = prepared.original_size
        target = self.dataset.cache_directory / fmt.item_cache_name(item.stem, original, self.family.name)
        metadata = fmt.CacheMetadata(
            arch=self.family.name, source=str(item.path), mask_source=prepared.mask_source,
            bucket=prepared.bucket, fingerprint=fingerprint,
            extra={"vae": self.config.vae, "original_size": f"{original[0]}x{original[1]}",
                   "mask_path": str(prepared.mask_path or "")},
        )  # fmt: skip
        fmt.write_cache_file(target, tensors, metadata)
        for old in self.existing.get(item.stem, []):
            if old != target:  # the source changed size: its old file would be picked up too
                old.unlink(missing_ok=True)

    def encode(self, batch: list[tuple[ImageItem, _native.PreparedItem, str]]) -> torch.Tensor:
        pixels = np.stack([prepared.image for _, prepared, _ in batch])  # (B, H, W, 3) uint8
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).unsqueeze(2)
        return self.family.encode_pixels(self.vae, tensor).cpu()


def _cache_images(
    cacher: _ImageCacher, summary: DatasetSummary, progress: tqdm, shard: Shard
) -> list[ImageItem]:
    """Latents for every stale item of this process's share; returns the share's items that
    have a valid latent file."""
    items, todo = stale_items(cacher, discover_images(cacher.dataset), shard, summary, progress)

    chunks = list(_chunks([item for item, _ in todo], chunk_size(cacher.config.batch_size)))
    fingerprints = dict((item.path, fp) for item, fp in todo)
    overlap = cacher.vae.device.type != "cpu"
    for chunk, results in prepared_chunks(cacher, chunks, overlap):
        by_bucket: dict[tuple[int, int], list[tuple[ImageItem, _native.PreparedItem, str]]] = {}
        for item, result in zip(chunk, results, strict=True):
            if isinstance(result, _native.PreparedItem):
                by_bucket.setdefault(result.bucket, []).append((item, result, fingerprints[item.path]))
            else:
                summary.failed.append((item.path, str(result)))
                progress.update(1)
        for group in by_bucket.values():
            for start in range(0, len(group), cacher.config.batch_size):
                batch = group[start : start + cacher.config.batch_size]
                latents = cacher.encode(batch)
                for (item, prepared, fingerprint), item_latents in zip(batch, latents, strict=True):
                    try:
                        cacher.write(item, prepared, item_latents, fingerprint)
                    except (OSError, ValueError) as error:
                        summary.failed.append((item.path, str(error)))
                        continue
                    summary.written += 1
                    summary.sources[prepared.mask_source] += 1
                    if prepared.latent_mask is not None:
                        summary.weight_sum += float(prepared.latent_mask.mean())
                        summary.weight_count += 1
                progress.update(len(batch))
    failed = {path for path, _ in summary.failed}
    return [item for item in items if item.path not in failed]


def _cache_text(
    family: ModelFamily, encoder: TextEncoder, config: CacheConfig,
    dataset: ImageDatasetConfig | VideoDatasetConfig, items: list[MediaItem],
) -> None:  # fmt: skip
    spec, batch_size = config.text_encoder, config.batch_size
    identity = weights_identity(spec, encoder.model)
    todo = []
    for item in items:
        fingerprint = fmt.fingerprint({
            "caption": hashlib.sha256(item.caption.encode()).hexdigest(), "text_encoder": identity,
            "dtype": str(next(encoder.model.parameters()).dtype), "format": fmt.FORMAT_VERSION,
        })  # fmt: skip
        path = dataset.cache_directory / fmt.text_cache_name(item.stem, family.name)
        if not fmt.reusable(
            path, arch=family.name, fingerprint=fingerprint, skip_existing=config.skip_existing
        ):
            todo.append((item, path, fingerprint))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        embeddings = family.encode_text(encoder, [item.caption for item, _, _ in batch])
        for (item, path, fingerprint), embedding in zip(batch, embeddings, strict=True):
            dtype = str(embedding.dtype).removeprefix("torch.")
            metadata = fmt.CacheMetadata(
                arch=family.name, source=str(item.path), mask_source="none", bucket=None,
                fingerprint=fingerprint, extra={"text_encoder": spec},
            )  # fmt: skip
            fmt.write_cache_file(path, {f"text_embeds_{dtype}": embedding}, metadata)


def run(config: CacheConfig) -> list[DatasetSummary]:
    """Cache every dataset of the TOML; returns one summary per dataset (also logged)."""
    datasets = load_dataset_config(config.dataset_config).datasets
    family = get_family(config.arch)
    for number, dataset in enumerate(datasets, start=1):
        if isinstance(dataset, VideoDatasetConfig) and family.name not in TARGET_FPS:
            raise ConfigError(
                f"{config.dataset_config}: [[datasets]] #{number}: --arch {config.arch} is an image model "
                f"and cannot take a video dataset (video_directory / video_jsonl_file); video datasets "
                f"need --arch {' or '.join(sorted(TARGET_FPS))}"
            )
    shard = distributed.start()
    try:
        return _run(config, datasets, family, shard)
    finally:
        distributed.stop(shard)


def _run(config: CacheConfig, datasets: tuple, family: ModelFamily, shard: Shard) -> list[DatasetSummary]:
    default = f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(config.device or default)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = family.load_vae(config.vae, device, dtype)
    encoder = family.load_text_encoder(config.text_encoder, device, dtype)
    if shard.is_main:
        log.info("caching %d dataset(s) for %s on %s (%s), %d process(es)",
                 len(datasets), family.name, device, dtype, shard.world)  # fmt: skip

    summaries = []
    with tqdm(total=0, unit="item", desc="cache", disable=not shard.is_main) as progress:
        for number, dataset in enumerate(datasets, start=1):
            if shard.is_main:  # before any process writes: a live temporary is never removed
                dataset.cache_directory.mkdir(parents=True, exist_ok=True)
                fmt.remove_stale_temporaries(dataset.cache_directory)
            shard.barrier()
            cacher: _ImageCacher | VideoCacher
            if isinstance(dataset, ImageDatasetConfig):
                summary = DatasetSummary(
                    name=f"dataset #{number} ({dataset.image_directory or dataset.image_jsonl_file})"
                )
                cacher = _ImageCacher(config, family, vae, dataset)
                cached = _cache_images(cacher, summary, progress, shard)
                missing_files_warning = cacher.masks is not None and not dataset.alpha_mask
            else:
                summary = DatasetSummary(
                    name=f"dataset #{number} ({dataset.video_directory or dataset.video_jsonl_file})", clips=0
                )
                cacher = VideoCacher(config, family, vae, dataset)
                cached = cache_videos(cacher, summary, progress, shard)
                missing_files_warning = cacher.masks is not None
            _cache_text(family, encoder, config, dataset, cached)
            summary = DatasetSummary.merged(shard.gather(summary))
            if shard.is_main:
                _report(summary, missing_files_warning)
            summaries.append(summary)
    return summaries


def _report(summary: DatasetSummary, missing_files_warning: bool) -> None:
    if missing_files_warning and summary.sources["none"]:
        kind = "images" if summary.clips is None else "videos"
        log.warning("%d %s have no matching mask file", summary.sources["none"], kind)
    if summary.sources["none"] and summary.weight_count:
        log.warning(
            "%d items had no mask (no alpha + no file). Filled with full-weight (255).",
            summary.sources["none"],
        )
    for path, reason in summary.failed:
        log.error("failed: %s: %s", path, reason.removeprefix(f"{path}: "))
    log.info("%s", summary.line())
