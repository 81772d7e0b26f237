"""``masktrain cache`` for one image dataset.

Per image the native core decodes it, picks its mask (``data.mask_sources``: alpha -> its JSONL
``mask_path`` -> its file in ``mask_directory`` -> the dataset's ``default_mask`` -> full weight, or
an error under ``require_mask``), resizes both onto the bucket and pools the mask onto the latent
grid (``--mask_pooling``: area, max or nearest per cell); the VAE encodes the pixels; the file
holds ``latents_1xHxW_<dtype>`` and, when masking is on, ``mask_weights_1xHxW_float32``: weights
in [0, 1], raw unless ``--cache_mask_gamma`` / ``--cache_mask_min_weight`` are given, in which
case the core bakes ``clamp(m ** G * (1 - W) + W)`` into them at pixel resolution, before
pooling (the file's metadata records both values). ``train``'s ``--mask_gamma`` /
``--mask_min_weight`` apply on top at training time (it warns when a value is applied twice).

With ``bucket_no_upscale`` an image whose area is at most the resolution's keeps its own size
rounded down to the bucket step: the native core prepares it a second time with that one bucket
(it learns the size, EXIF orientation applied, from the first pass; such images are small).

Conditioned modes add their tensors through one object each: WAN one-frame (``cache.one_frame``),
Qwen-Image-Edit's control images (``cache.edit``) and Qwen-Image-Layered's RGBA layers, encoded
image by image, with their mask frames (``cache.layered``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from masktrain import _native
from masktrain.cache.edit import EditItems
from masktrain.cache.layered import LayeredItems
from masktrain.cache.one_frame import OneFrameItems
from masktrain.cache.rgba import is_transparent, rgba_at_bucket
from masktrain.cache.setup import CacheSetup
from masktrain.cache.stages import ProgressBar, chunk_size, prepared_chunks, stale_items
from masktrain.cache.summary import DatasetSummary
from masktrain.config.dataset import ImageDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data.buckets import Bucket
from masktrain.data.discovery import MediaItem, own_size_bucket
from masktrain.distributed import Shard
from masktrain.errors import MaskTrainError
from masktrain.models.loading import device_of

log = logging.getLogger(__name__)

#: What the native core gives per image: the prepared item or the error it failed with.
Prepared = _native.PreparedItem | MaskTrainError | OSError


def _chunks(items: list[MediaItem], size: int) -> Iterator[list[MediaItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ImageCacher:
    """Caches one image dataset."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, ImageDatasetConfig)
        self.setup, self.dataset = setup, setup.dataset
        self.existing = fmt.existing_item_files(self.dataset.cache_directory, setup.arch)
        # WAN one-frame: each item with its control images, laid out in frame slots
        self.one_frame = OneFrameItems(setup) if setup.config.one_frame else None
        # Qwen-Image-Edit: each item's control images, encoded beside it
        self.edit = EditItems.of(setup)
        # Qwen-Image-Layered: each item's RGBA images (the base and its layers) and mask frames
        self.layered = LayeredItems.of(setup)
        self.transparent = 0
        """Images with transparent pixels a family that reads RGBA encoded while masks are set."""

    @property
    def missing_files_warning(self) -> bool:
        """The guide's "N images have no matching mask file" applies (mask files, no alpha)."""
        return self.dataset.mask_directory is not None and not self.dataset.alpha_mask

    def fingerprint(self, item: MediaItem) -> str:
        return self.setup.fingerprint(item)

    def status(self, item: MediaItem, fingerprint: str) -> fmt.CacheStatus:
        paths = self.existing.get(item.stem, [])
        if self.setup.fresh_files(item, paths, fingerprint):
            return "fresh"
        return "stale" if paths else "missing"

    def _prepare(self, items: list[MediaItem], buckets: list[Bucket]) -> list[Prepared]:
        masks = self.setup.masks
        return _native.prepare_batch(
            [item.path for item in items],
            buckets,
            mask_index=masks.index,
            mask_paths=[item.mask_path for item in items] if masks.any_own_path else None,
            default_mask=masks.default,
            mask_pooling=self.setup.config.mask_pooling,
            alpha_mask=self.dataset.alpha_mask,
            # layered: a mask folder (mask_directory/NAME/) the core does not see counts too
            require_mask=self.dataset.require_mask and self.layered is None,
            latent_factor=self.setup.factor,
            cache_mask_gamma=self.setup.config.cache_mask_gamma,
            cache_mask_min_weight=self.setup.config.cache_mask_min_weight,
        )

    def prepare(self, chunk: list[MediaItem]) -> list[Prepared]:
        results = self._prepare_images(chunk)
        return results if self.layered is None else self.layered.load(chunk, results)

    def _prepare_images(self, chunk: list[MediaItem]) -> list[Prepared]:
        results = self._prepare(chunk, self.setup.buckets)
        if not self.dataset.buckets.bucket_no_upscale:
            return results
        # Images no larger than the resolution keep their own size: prepared again, with that
        # one bucket (grouped, so each distinct size is one parallel native call).
        again: dict[Bucket, list[int]] = {}
        step = self.setup.family.spec.bucket_step
        for index, result in enumerate(results):
            if isinstance(result, _native.PreparedItem):
                own = own_size_bucket(result.original_size, self.dataset.buckets, step)
                if own is not None and own != result.bucket:
                    again.setdefault(own, []).append(index)
        for bucket, indices in again.items():
            redone = self._prepare([chunk[i] for i in indices], [bucket])
            for index, result in zip(indices, redone, strict=True):
                results[index] = result
        return results

    def encode(self, batch: list[tuple[MediaItem, _native.PreparedItem, str]]) -> torch.Tensor:
        if self.layered is not None:  # every image of each item alone, RGBA
            return self.layered.encode(batch)
        if self.setup.family.spec.alpha_is_content:  # the VAE reads RGBA: alpha is content
            pixels = np.stack([self._rgba(item, prepared) for item, prepared, _ in batch])
        else:
            pixels = np.stack([prepared.image for _, prepared, _ in batch])  # (B, H, W, 3) uint8
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).unsqueeze(2)
        return self.setup.family.encode_pixels(self.setup.vae, tensor).cpu()

    def _rgba(self, item: MediaItem, prepared: _native.PreparedItem) -> np.ndarray:
        """(H, W, 4): the image with its alpha at the bucket, for a VAE that reads RGBA; a
        transparent one is counted while masks are set (its alpha may be a mask ``convert-alpha``
        wrote, which this family reads as content)."""
        rgb, alpha = _native.decode_image(item.path)
        if self.setup.masks.masking and is_transparent(alpha):
            self.transparent += 1
        return rgba_at_bucket(rgb, alpha, prepared.bucket)

    def write(
        self, item: MediaItem, prepared: _native.PreparedItem, latents: torch.Tensor, fingerprint: str
    ) -> tuple[fmt.MaskSource, torch.Tensor | None]:
        """Write the item's file; returns the mask source and weights it holds (for the summary)."""
        setup = self.setup
        weights = None
        if prepared.latent_mask is not None:
            setup.check_grid(item, prepared.bucket, prepared.latent_mask.shape, tuple(latents.shape[-2:]))
            weights = torch.from_numpy(prepared.latent_mask)
        mask_source, mask_path = prepared.mask_source, prepared.mask_path
        if self.layered is not None:  # a mask folder gives each image its own frame
            mask_source, mask_path, weights = self.layered.weights(item, prepared, weights)
        name = fmt.item_cache_name(item.stem, prepared.original_size, setup.arch)
        metadata = setup.metadata(
            item, mask_source, prepared.bucket, fingerprint, prepared.original_size, mask_path
        )
        if self.one_frame is not None:
            tensors = self.one_frame.tensors(item, prepared.bucket, latents, weights)
        else:
            tensors = setup.latent_tensors(latents, weights)
        if self.edit is not None:
            tensors |= self.edit.tensors(item, latents.dtype)
        if self.layered is not None:  # the base's latents are the control
            tensors |= self.layered.tensors(latents)
        fmt.write_cache_file(self.dataset.cache_directory / name, tensors, metadata)
        setup.remove_replaced(self.existing.get(item.stem, []), {name})
        return mask_source, weights

    def run(self, summary: DatasetSummary, progress: ProgressBar, shard: Shard) -> list[MediaItem]:
        """Latents for every stale item of this process's share; returns the share's items that
        have a valid latent file."""
        items, todo = stale_items(self, self.setup.discovery, shard, summary, progress)
        batch_size = self.setup.config.batch_size
        chunks = list(_chunks([item for item, _ in todo], chunk_size(batch_size)))
        fingerprints = dict((item.path, fp) for item, fp in todo)
        overlap = device_of(self.setup.vae).type != "cpu"
        for chunk, results in prepared_chunks(self, chunks, overlap):
            by_bucket: dict[Bucket, list[tuple[MediaItem, _native.PreparedItem, str]]] = {}
            for item, result in zip(chunk, results, strict=True):
                if isinstance(result, _native.PreparedItem):
                    by_bucket.setdefault(result.bucket, []).append((item, result, fingerprints[item.path]))
                else:
                    summary.failed.append((item.path, str(result)))
                    progress.update(1)
            for group in by_bucket.values():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    latents = self.encode(batch)
                    for (item, prepared, fingerprint), item_latents in zip(batch, latents, strict=True):
                        try:
                            mask_source, weights = self.write(item, prepared, item_latents, fingerprint)
                        except (OSError, ValueError) as error:
                            summary.failed.append((item.path, str(error)))
                            continue
                        summary.add_written(mask_source, None if weights is None else weights.numpy())
                    progress.update(len(batch))
        if self.transparent:
            spec = self.setup.family.spec
            log.warning(
                "%d images carry transparent pixels, and --arch %s reads alpha as content (its VAE takes "
                "RGBA), not as the mask; the mask comes from mask_directory / mask_path / default_mask. "
                "Images made by convert-alpha carry their mask in the alpha: give %s the original images",
                self.transparent,
                spec.name,
                spec.title,
            )
        self.setup.remove_failed(summary.failed, self.existing)
        failed = {path for path, _ in summary.failed}
        return [item for item in items if item.path not in failed]
