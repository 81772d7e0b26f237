"""``masktrain cache --model_version edit | edit-2509 | edit-2511`` (Qwen-Image-Edit) for one image
dataset: beside each image's latents, the latents of each of its control images
(``control_directory``, musubi-tuner's naming), and a text embedding that read the caption with
those images, as ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` read a prompt.

Control sizes (docs/conditioning.md says why): each control image is VAE-encoded alone at its own
size, by default at the ~1024² area the pipelines (and ComfyUI) encode it at when sampling, its
aspect kept, sides in multiples of 32 (``qwen_vl.area_size``). musubi-tuner's dataset keys change
that: ``control_resolution = [W, H]`` sets another area (musubi's recommended ``[1024, 1024]`` is
the default), ``no_resize_control = true`` keeps each image's own size (sides rounded down to 16;
with ``control_resolution``, larger images are brought down to its area). musubi's default, the
target's size, is not one: a model trained on controls the size of the target would be sampled
with 1024² controls.

The text encoder reads each control image as the pipeline does (from the original image: 384²
for Edit-2509 / 2511, ~1024² for Edit; ``qwen_vl.edit_prompt``), so the embedding is per item and
its file records the control images' stats (``freshness.CONTROLS_KEY``): touching one makes the
item stale for ``train`` and the next ``cache`` rebuilds it. An item without control images is
cached as the pipeline reads a prompt without images, and trains text-to-image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from masktrain import _native
from masktrain.cache.setup import CacheSetup
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import BUCKET_STEP, ImageDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import freshness
from masktrain.data.controls import ControlIndex
from masktrain.data.discovery import MediaItem
from masktrain.errors import DataError
from masktrain.models import qwen_vl
from masktrain.models.base import ModelFamily, TextEncoder

log = logging.getLogger(__name__)

#: The pipelines' multiple for a resized image's sides (``calculate_dimensions``).
PIPELINE_STEP = 32


def is_edit(config: CacheConfig) -> bool:
    """Whether the run caches a Qwen-Image-Edit mode."""
    return config.mode is not None and config.mode.kind == "edit"


def control_size(dataset: ImageDatasetConfig, width: int, height: int) -> tuple[int, int]:
    """(width, height) a `width` x `height` control image is encoded at (the module docstring)."""
    limit = dataset.control_resolution
    area = qwen_vl.VAE_IMAGE_SIZE if limit is None else limit[0] * limit[1]
    if dataset.no_resize_control and (limit is None or width * height <= area):
        return max(BUCKET_STEP, width // BUCKET_STEP * BUCKET_STEP), max(
            BUCKET_STEP, height // BUCKET_STEP * BUCKET_STEP
        )
    new_width, new_height = qwen_vl.area_size(width, height, area)
    return max(PIPELINE_STEP, new_width), max(PIPELINE_STEP, new_height)


def control_paths(stem: str, controls: ControlIndex | None, version: str, where: str) -> list[Path]:
    """The item's control images; Edit (not 2509 / 2511) reads one, so more is an error naming
    the item."""
    paths = [] if controls is None else controls.get(stem)
    if version == qwen_vl.EDIT and len(paths) > 1:
        raise DataError(
            f"{where}: {len(paths)} control images, but --model_version edit reads one; use edit-2509 "
            "or edit-2511 for several"
        )
    return paths


class EditItems:
    """The control latents of one image dataset's items."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, ImageDatasetConfig) and setup.config.task is not None
        self.setup, self.dataset, self.version = setup, setup.dataset, setup.config.task
        if setup.controls is None:
            log.warning(
                "%s: no control_directory: --model_version %s trains every item of this dataset "
                "text-to-image (set control_directory to give items their control images)",
                setup.dataset.image_directory or setup.dataset.image_jsonl_file,
                self.version,
            )

    @classmethod
    def of(cls, setup: CacheSetup) -> EditItems | None:
        """The dataset's edit cacher; None when the run is not an edit mode."""
        return cls(setup) if is_edit(setup.config) else None

    def tensors(self, item: MediaItem, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``latents_control_{i}_1xHxW`` of each control image of `item` (none without), in `dtype`."""
        setup = self.setup
        tensors: dict[str, torch.Tensor] = {}
        for index, path in enumerate(control_paths(item.stem, setup.controls, self.version, str(item.path))):
            rgb = _native.decode_image(path)[0]
            size = control_size(self.dataset, rgb.shape[1], rgb.shape[0])
            pixels = torch.from_numpy(_native.resize_image_to_bucket(rgb, size))
            pixels = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)[None, :, None]
            latents = setup.family.encode_pixels(setup.vae, pixels)[0].to("cpu", dtype)
            _, frames, height, width = latents.shape
            tensors[fmt.control_key(index, dtype, (frames, height, width))] = latents
        return tensors


@dataclass(frozen=True)
class EditPrompts:
    """How an edit run encodes its captions: each with its item's control images."""

    version: str

    @classmethod
    def of(cls, config: CacheConfig) -> EditPrompts | None:
        return cls(str(config.task)) if is_edit(config) else None

    def load_encoder(
        self, config: CacheConfig, family: ModelFamily, device: torch.device, dtype: torch.dtype
    ) -> TextEncoder:
        """Qwen2.5-VL with its vision tower (``QwenImageFamily.load_text_encoder(vision=True)``)."""
        from masktrain.models.qwen_image import QwenImageFamily

        assert isinstance(family, QwenImageFamily)
        return family.load_text_encoder(
            config.text_encoder,
            device,
            dtype,
            fp8=config.fp8_text_encoder,
            tokenizer=config.text_tokenizer,
            vision=True,
        )

    def fingerprint_part(self, item: MediaItem, controls: ControlIndex | None) -> dict[str, str]:
        """What the prompt of `item` read beside its caption."""
        return {"edit": self.version, "controls": freshness.control_inputs(item, controls)}

    def metadata(self, item: MediaItem, controls: ControlIndex | None) -> dict[str, str]:
        """The text file's record of the control images its prompt read (``train`` checks it)."""
        return {freshness.CONTROLS_KEY: freshness.control_inputs(item, controls)}

    def encode(
        self, encoder: TextEncoder, items: Sequence[MediaItem], controls: ControlIndex | None
    ) -> list[torch.Tensor]:
        """One embedding per item: its caption read with its control images."""
        images = [
            [
                Image.fromarray(_native.decode_image(path)[0])
                for path in control_paths(item.stem, controls, self.version, str(item.path))
            ]
            for item in items
        ]
        return qwen_vl.encode_edit_text(encoder, [item.caption for item in items], images, self.version)
