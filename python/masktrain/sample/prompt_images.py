"""The images a conditioned mode samples from (``--i`` / ``--ei`` in the prompt file): read once
when the sampler is built, each embedded by the CLIP image encoder (WAN 2.1 I2V / FLF2V) resized
to its prompt's size as the cache embeds a clip's frames; the encoder is freed right after, as the
text encoder is. The pipeline gets each image itself (it resizes and VAE-encodes it) and the
embedding in place of its own image encoder.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from masktrain import catalog
from masktrain.config.sample_prompts import SamplePrompt
from masktrain.errors import DataError


@dataclass
class PromptImages:
    """Each prompt's start and end image (PIL, RGB) and their CLIP embedding."""

    images: dict[int, tuple[Image.Image, Image.Image | None]] = field(default_factory=dict)
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    """(K, T, D) on the device, by prompt index; empty without CLIP."""
    image_dim: int | None = None
    """The CLIP embedding's width (None without CLIP)."""

    @classmethod
    def of(
        cls,
        prompts: list[SamplePrompt],
        mode: catalog.Mode | None,
        clip_spec: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> PromptImages:
        found = cls()
        if mode is None or mode.kind != "image_to_video":
            return found
        for prompt in prompts:
            assert prompt.image_path is not None  # SampleSettings.check
            end = None if prompt.end_image_path is None else _read(prompt.end_image_path, prompt.where)
            found.images[prompt.index] = (_read(prompt.image_path, prompt.where), end)
        if mode.clip and clip_spec:
            found._embed(prompts, clip_spec, device, dtype)
        return found

    def _embed(
        self, prompts: list[SamplePrompt], clip_spec: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        from masktrain.models import clip_vision

        encoder = clip_vision.load_clip(clip_spec, "--clip", device, dtype)
        for prompt in prompts:
            start, end = self.images[prompt.index]
            pixels = [
                _pixels(image, prompt.width, prompt.height) for image in (start, end) if image is not None
            ]
            hidden = clip_vision.encode_images(encoder, torch.stack(pixels).to(device))
            self.embeds[prompt.index] = hidden
            self.image_dim = int(hidden.shape[-1])
        del encoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def request_fields(self, prompt: SamplePrompt, width: int, height: int) -> dict[str, Any]:
        """The ``SampleRequest`` fields of `prompt`'s images (none without a conditioned mode)."""
        if prompt.index not in self.images:
            return {}
        start, end = self.images[prompt.index]
        return {"start_image": start, "end_image": end, "image_embeds": self.embeds.get(prompt.index)}


def _read(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError as error:
        raise DataError(f"{where}: {path}: cannot read the image ({error})") from None


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: `image` resized to the sample's size, as the cache's frames are."""
    resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(resized).permute(2, 0, 1).div(127.5).sub(1.0)
