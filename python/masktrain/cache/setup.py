"""The set-up every cacher of one dataset shares, computed once: the bucket list, the VAE's
latent factor and identity, the mask index, the digest of the dataset settings, and an item's
fingerprint, metadata and cleanup, which do not depend on whether the item is an image or a
video."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from masktrain.cache.conditioning import ClipConditioning
from masktrain.cache.identity import weights_identity
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import freshness
from masktrain.data.buckets import Bucket
from masktrain.data.controls import ControlIndex
from masktrain.data.discovery import Discovery, MediaItem, bucket_list
from masktrain.data.freshness import BAKED_GAMMA, BAKED_MIN_WEIGHT
from masktrain.data.mask_sources import MaskSources
from masktrain.errors import CacheFileError, DataError
from masktrain.models.base import ModelFamily


@dataclass
class CacheSetup:
    config: CacheConfig
    family: ModelFamily
    vae: torch.nn.Module
    dataset: ImageDatasetConfig | VideoDatasetConfig
    discovery: Discovery
    """The dataset's items, listed (captions read) before any model loaded."""
    conditioning: ClipConditioning | None = None
    """A conditioned mode's (``cache --task``); None without one."""
    buckets: list[Bucket] = field(init=False)
    """The buckets this dataset's items choose from."""
    factor: int = field(init=False)
    """Pixels per latent cell of the VAE (8, or 16 for the WAN 2.2 TI2V-5B VAE)."""
    vae_identity: str = field(init=False)
    masks: MaskSources = field(init=False)
    """Where each item's mask comes from (``data.mask_sources``)."""
    controls: ControlIndex | None = field(init=False)
    """Control images by item; None without ``control_directory``."""
    settings: str = field(init=False)
    """Digest of the dataset settings that shape every item (``freshness.settings_digest``)."""
    _inputs: dict[Path, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.buckets = bucket_list(self.dataset.buckets, self.family.spec.bucket_step)
        self.factor = self.family.spatial_factor(self.vae)
        self.vae_identity = weights_identity(self.config.vae, self.vae)
        self.masks = MaskSources(self.dataset, self.discovery.items)
        self.controls = freshness.control_index(self.dataset, self.discovery.items)
        self.settings = freshness.settings_digest(self.dataset, self.family.spec, self.masks)

    @property
    def arch(self) -> str:
        return self.family.name

    def mask(self, item: MediaItem) -> tuple[Path | None, fmt.MaskSource]:
        """The item's mask file or folder and its source (a ``DuplicateMaskError`` when two share
        its basename)."""
        return self.masks.resolve(item)

    def inputs(self, item: MediaItem) -> str:
        """The item's input files as they were stat'ed for its fingerprint: the metadata records
        the same stats the fingerprint hashed (one stat per file per run)."""
        if item.path not in self._inputs:
            self._inputs[item.path] = freshness.item_inputs(item, self.masks, self.controls)
        return self._inputs[item.path]

    def fingerprint(self, item: MediaItem) -> str:
        """Everything that shapes an item's tensors: the dataset settings, its source and mask
        files, the VAE."""
        parts: dict[str, object] = {
            "settings": self.settings,
            "inputs": self.inputs(item),
            "vae": self.vae_identity,
            "dtype": str(self.vae.dtype),
        }
        if self.config.baked:  # only then, so caches made before the flags stay fresh
            parts["cache_mask"] = self.baked_metadata()
        if self.config.mask_pooling != "area":  # likewise
            parts[fmt.KEY_MASK_POOLING] = self.config.mask_pooling
        if self.conditioning is not None:  # likewise
            parts["conditioning"] = self.conditioning.fingerprint_part()
        elif self.config.mode is not None:  # a mode that loads nothing more (Qwen-Image-Edit)
            parts["conditioning"] = {"condition": self.config.condition}
        return fmt.fingerprint(parts)

    def baked_metadata(self) -> dict[str, str]:
        """The cache-time mask transform, as every latent file records it (the reference's keys)."""
        return {
            BAKED_GAMMA: format(self.config.cache_mask_gamma, ".6g"),
            BAKED_MIN_WEIGHT: format(self.config.cache_mask_min_weight, ".6g"),
        }

    def fresh_files(self, item: MediaItem, paths: list[Path], fingerprint: str) -> list[Path]:
        """Those of the item's `paths` that this run can keep as they are (a file of another item
        that still exists is a ``CacheSourceCollision``)."""
        arch, skip, source = self.arch, self.config.skip_existing, str(item.path)
        return [
            p
            for p in paths
            if fmt.reusable(p, arch=arch, fingerprint=fingerprint, skip_existing=skip, source=source)
        ]

    def metadata(
        self,
        item: MediaItem,
        mask_source: fmt.MaskSource,
        bucket: Bucket,
        fingerprint: str,
        original_size: tuple[int, int],
        mask_path: Path | None,
        **extra: str,
    ) -> fmt.CacheMetadata:
        """The metadata of one latent file of `item`."""
        return fmt.CacheMetadata(
            arch=self.arch,
            source=str(item.path),
            mask_source=mask_source,
            bucket=bucket,
            fingerprint=fingerprint,
            extra={
                "vae": self.config.vae,
                "original_size": f"{original_size[0]}x{original_size[1]}",
                "mask_path": str(mask_path or ""),
                freshness.SETTINGS_KEY: self.settings,
                freshness.INPUTS_KEY: self.inputs(item),
                **self.baked_metadata(),
                fmt.KEY_MASK_POOLING: self.config.mask_pooling,
                fmt.KEY_CONDITION: self.config.condition,
                **extra,
            },
        )

    def latent_tensors(self, latents: torch.Tensor, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One item's tensors under the cache's keys: latents (C, F, h, w) and, when masking is
        on, the raw weights as (1, F, h, w) float32: (F, h, w) per latent frame, or (h, w)
        repeated over the F frames."""
        _, frames, height, width = latents.shape
        grid = (frames, height, width)
        tensors = {fmt.tensor_key(fmt.LATENTS, latents.dtype, grid): latents}
        if weights is not None:
            expanded = weights.expand(1, frames, height, width)
            tensors[fmt.tensor_key(fmt.MASK_WEIGHTS, torch.float32, grid)] = expanded
        return tensors

    def check_grid(
        self, item: MediaItem, bucket: Bucket, weights_shape: tuple[int, ...], latent_hw: tuple[int, ...]
    ) -> None:
        """The mask grid must be the latent grid: a bucket that is not a multiple of the VAE's
        factor would misalign them."""
        height, width = latent_hw
        if tuple(weights_shape) != (height, width):
            raise DataError(
                f"{item.path}: latent grid {width}x{height} but mask grid "
                f"{weights_shape[1]}x{weights_shape[0]}; "
                f"bucket {bucket} is not a multiple of the VAE's {self.factor}x compression"
            )

    def remove_replaced(self, old: list[Path], written: set[str]) -> None:
        """Delete the item's older files that this run did not rewrite (another size, another
        clip list): training would pick them up too."""
        for path in old:
            if path.name not in written:
                path.unlink(missing_ok=True)

    def remove_failed(self, failed: list[tuple[Path, str]], existing: dict[str, list[Path]]) -> None:
        """Delete the cache files of items that failed in this run, so no older file of theirs is
        trained on; files that belong to another item that still exists are left alone."""
        text_names = {stem: fmt.text_cache_name(stem, self.arch) for stem in {p.stem for p, _ in failed}}
        for path, _ in failed:
            files = [*existing.get(path.stem, []), self.dataset.cache_directory / text_names[path.stem]]
            for file in files:
                try:
                    metadata = fmt.read_metadata(file)
                except CacheFileError:
                    metadata = None  # damaged: nothing to keep
                if metadata is None or metadata.source == str(path) or not Path(metadata.source).exists():
                    file.unlink(missing_ok=True)
