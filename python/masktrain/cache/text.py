"""``masktrain cache``'s text embeddings: one ``{stem}_{arch}_te.safetensors`` per cached item
(image or video) holding ``text_embeds_<dtype>``, fingerprinted by its caption and the text
encoder, so an unchanged caption is never encoded twice."""

from __future__ import annotations

import hashlib

import torch

from masktrain.cache.identity import weights_identity
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data.discovery import MediaItem
from masktrain.models.base import ModelFamily, TextEncoder


class TextCacher:
    """Caches the captions of every dataset of one run with one loaded text encoder."""

    def __init__(self, config: CacheConfig, family: ModelFamily, encoder: TextEncoder) -> None:
        self.config, self.family, self.encoder = config, family, encoder
        self.identity = weights_identity(config.text_encoder, encoder.model)
        self.dtype = str(next(encoder.model.parameters()).dtype)

    def fingerprint(self, item: MediaItem) -> str:
        return fmt.fingerprint(
            {
                "caption": hashlib.sha256(item.caption.encode()).hexdigest(),
                "text_encoder": self.identity,
                "dtype": self.dtype,
                "format": fmt.FORMAT_VERSION,
            }
        )

    def run(self, dataset: ImageDatasetConfig | VideoDatasetConfig, items: list[MediaItem]) -> None:
        """Encode the captions of `items` whose embedding file is missing or stale."""
        arch, skip = self.family.name, self.config.skip_existing
        todo = []
        for item in items:
            fingerprint = self.fingerprint(item)
            path = dataset.cache_directory / fmt.text_cache_name(item.stem, arch)
            if not fmt.reusable(path, arch=arch, fingerprint=fingerprint, skip_existing=skip):
                todo.append((item, path, fingerprint))
        batch_size = self.config.batch_size
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            embeddings = self.family.encode_text(self.encoder, [item.caption for item, _, _ in batch])
            for (item, path, fingerprint), embedding in zip(batch, embeddings, strict=True):
                metadata = fmt.CacheMetadata(
                    arch=arch,
                    source=str(item.path),
                    mask_source="none",
                    bucket=None,
                    fingerprint=fingerprint,
                    extra={"text_encoder": self.config.text_encoder},
                )
                tensors: dict[str, torch.Tensor] = {
                    fmt.tensor_key(fmt.TEXT_EMBEDS, embedding.dtype): embedding
                }
                fmt.write_cache_file(path, tensors, metadata)
