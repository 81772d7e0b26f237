"""``masktrain cache``'s text embeddings: one ``{stem}_{arch}_te.safetensors`` per cached item
(image or video) holding ``text_embeds_<dtype>``, fingerprinted by its caption and the text
encoder, so an unchanged caption is never encoded twice. The caption's digest is in the file's
metadata (``train`` checks it). Captions longer than the encoder takes are truncated, as the
pipelines do, and counted. Qwen-Image-Edit's prompts also read the item's control images
(``cache/edit.py``)."""

from __future__ import annotations

import torch

from masktrain.cache.edit import EditPrompts
from masktrain.cache.identity import weights_identity
from masktrain.cache.summary import DatasetSummary
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import freshness
from masktrain.data.controls import ControlIndex
from masktrain.data.discovery import MediaItem
from masktrain.models.base import ModelFamily, TextEncoder


class TextCacher:
    """Caches the captions of every dataset of one run with one loaded text encoder."""

    def __init__(self, config: CacheConfig, family: ModelFamily, encoder: TextEncoder) -> None:
        self.config, self.family, self.encoder = config, family, encoder
        self.identity = weights_identity(config.text_encoder, encoder.model)
        self.dtype = str(next(encoder.model.parameters()).dtype)
        self.edit = EditPrompts.of(config)

    def fingerprint(self, item: MediaItem, controls: ControlIndex | None = None) -> str:
        parts = {
            "caption": freshness.caption_digest(item.caption),
            "text_encoder": self.identity,
            "dtype": self.dtype,
            "format": fmt.FORMAT_VERSION,
        }
        if self.config.fp8_text_encoder:  # only then, so caches made before the flag stay fresh
            parts["fp8"] = "e4m3"
        if self.edit is not None:
            parts |= self.edit.fingerprint_part(item, controls)
        return fmt.fingerprint(parts)

    def run(
        self,
        dataset: ImageDatasetConfig | VideoDatasetConfig,
        items: list[MediaItem],
        summary: DatasetSummary,
        controls: ControlIndex | None = None,
    ) -> None:
        """Encode the captions of `items` whose embedding file is missing or stale (an edit mode's
        with their `controls`); a file that cannot be written is a failed item, and captions longer
        than the encoder takes (so truncated) are counted, both in `summary`."""
        arch, skip = self.family.name, self.config.skip_existing
        todo = []
        for item in items:
            fingerprint = self.fingerprint(item, controls)
            path = dataset.cache_directory / fmt.text_cache_name(item.stem, arch)
            if not fmt.reusable(
                path, arch=arch, fingerprint=fingerprint, skip_existing=skip, source=str(item.path)
            ):
                todo.append((item, path, fingerprint))

        batch_size = self.config.batch_size
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            captions = [item.caption for item, _, _ in batch]
            summary.truncated_captions += self._too_long(captions)
            if self.edit is None:
                embeddings = self.family.encode_text(self.encoder, captions)
            else:
                embeddings = self.edit.encode(self.encoder, [item for item, _, _ in batch], controls)
            for (item, path, fingerprint), embedding in zip(batch, embeddings, strict=True):
                metadata = fmt.CacheMetadata(
                    arch=arch,
                    source=str(item.path),
                    mask_source="none",
                    bucket=None,
                    fingerprint=fingerprint,
                    extra={
                        "text_encoder": self.config.text_encoder,
                        freshness.CAPTION_KEY: freshness.caption_digest(item.caption),
                        **({} if self.edit is None else self.edit.metadata(item, controls)),
                    },
                )
                tensors: dict[str, torch.Tensor] = {
                    fmt.tensor_key(fmt.TEXT_EMBEDS, embedding.dtype): embedding
                }
                try:
                    fmt.write_cache_file(path, tensors, metadata)
                except (OSError, ValueError) as error:
                    summary.failed.append((item.path, str(error)))

    def _too_long(self, captions: list[str]) -> int:
        lengths = self.encoder.tokenizer(captions, truncation=False)["input_ids"]
        return sum(len(ids) > self.encoder.max_length for ids in lengths)
