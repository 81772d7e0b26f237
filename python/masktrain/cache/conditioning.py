"""What a conditioned mode caches beside each clip's latents (``cache --task``): WAN
image-to-video's 20 conditioning channels (``latents_image_*``, ``models.wan_image_condition``)
and, for WAN 2.1 I2V / FLF2V, the CLIP image embedding of the given frames (``clip_*``,
``models.clip_vision``).

The mode is part of every item's fingerprint (with the CLIP model's identity), so changing
``--task`` or ``--clip`` rebuilds the cache, and each latent file records it
(``cache_format.KEY_CONDITION``), so ``train`` refuses a cache made for another mode. Without a
conditioned mode nothing here runs and the fingerprints are what they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from masktrain import _native, catalog
from masktrain.config.cache import CacheConfig
from masktrain.data import cache_format as fmt
from masktrain.data.controls import ControlIndex
from masktrain.errors import DataError
from masktrain.models.base import ModelFamily
from masktrain.models.wan_image_condition import given_images, image_condition

if TYPE_CHECKING:
    from masktrain.models.clip_vision import ClipVision

log = logging.getLogger(__name__)


@dataclass
class ClipConditioning:
    """The conditioning of one cache run's clips: its mode and, when the mode takes one, the
    loaded CLIP image encoder."""

    mode: catalog.Mode
    name: str
    """``catalog.condition_name``: recorded in each latent file."""
    clip: ClipVision | None
    clip_identity: str | None

    @classmethod
    def of(cls, config: CacheConfig, device: torch.device, dtype: torch.dtype) -> ClipConditioning | None:
        """The run's conditioning, its CLIP model loaded; None without a conditioned mode."""
        mode = config.mode
        if mode is None or mode.kind != "image_to_video":
            return None
        clip, identity = None, None
        if config.clip is not None:
            from masktrain.models import clip_vision  # transformers' CLIP: only for a mode that takes it

            clip = clip_vision.load_clip(config.clip, "--clip", device, dtype)
            identity = clip_vision.clip_identity(config.clip)
        with_clip = "" if clip is None else f" (CLIP {config.clip})"
        log.info("caching %s conditioning%s", config.condition, with_clip)
        return cls(mode, config.condition, clip, identity)

    def fingerprint_part(self) -> dict[str, object]:
        """What the conditioning adds to an item's fingerprint."""
        return {"condition": self.name, "clip": self.clip_identity}

    def given_controls(
        self, stem: str, controls: ControlIndex | None, bucket: tuple[int, int]
    ) -> np.ndarray | None:
        """The item's control images standing for its given frames (the first; FLF2V's first and
        last), resized to the clip's `bucket` as its frames are: (K, H, W, 3) uint8; None when the
        dataset has no ``control_directory`` (the clip's own frames are given)."""
        if controls is None:
            return None
        paths = controls.get(stem)
        wanted = self.mode.given_frames
        if len(paths) < wanted:
            frames = "the first and the last frame" if wanted == 2 else "the first frame"
            raise DataError(
                f"{controls.directory}: '{stem}' has {len(paths)} control image(s); --task {self.name} "
                f"is given {wanted} ({frames}): add {stem}.png (or {stem}_0.png, {stem}_1.png)"
            )
        return np.stack(
            [_native.resize_image_to_bucket(_native.decode_image(path)[0], bucket) for path in paths[:wanted]]
        )

    def clip_tensors(
        self,
        family: ModelFamily,
        vae: torch.nn.Module,
        pixels: torch.Tensor,
        dtype: torch.dtype,
        controls: np.ndarray | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Each clip's conditioning tensors under the cache's keys, from the clips' (B, 3, N, H, W)
        pixels in [-1, 1] (their given frames replaced by the item's `controls`, when it has
        them); the image latents in `dtype` (the latents')."""
        given = self.mode.given_frames
        if controls is not None:
            pixels = pixels.clone()
            images = torch.from_numpy(controls).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            pixels[:, :, 0] = images[0]
            if given == 2:
                pixels[:, :, -1] = images[1]
        condition = image_condition(family, vae, pixels, given).to(dtype)
        embeds = None
        if self.clip is not None:
            from masktrain.models import clip_vision

            images = given_images(pixels, given)
            hidden = clip_vision.encode_images(self.clip, images).cpu()
            embeds = hidden.view(pixels.shape[0], given, *hidden.shape[1:])
        per_clip = []
        for index, clip_condition in enumerate(condition):
            _, frames, height, width = clip_condition.shape
            tensors = {fmt.tensor_key(fmt.IMAGE_LATENTS, dtype, (frames, height, width)): clip_condition}
            if embeds is not None:
                tensors[fmt.tensor_key(fmt.IMAGE_EMBEDS, embeds.dtype)] = embeds[index].contiguous()
            per_clip.append(tensors)
        return per_clip
