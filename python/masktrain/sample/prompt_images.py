"""The images a conditioned mode samples from (``--i`` / ``--ei`` in the prompt file): read once
when the sampler is built, each embedded by the CLIP image encoder (WAN 2.1 I2V / FLF2V) resized
to its prompt's size as the cache embeds a clip's frames; the encoder is freed right after, as the
text encoder is. The pipeline gets each image itself (it resizes and VAE-encodes it) and the
embedding in place of its own image encoder. Qwen-Image-Edit's ``--ci`` control images go to its
pipeline the same way; its text encoder reads them with the prompt (``sample.sampler``).
Qwen-Image-Layered's ``--ci`` is the image to decompose, read as RGBA.
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
from masktrain.config.sample_prompts import SamplePrompt, one_frame_positions
from masktrain.errors import DataError


@dataclass
class PromptImages:
    """Each prompt's given images (PIL, RGB): the start and end image, or with one-frame
    sampling its control images; and their CLIP embedding."""

    images: dict[int, tuple[Image.Image, ...]] = field(default_factory=dict)
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    """(K, T, D) on the device, by prompt index; empty without CLIP."""
    image_dim: int | None = None
    """The CLIP embedding's width (None without CLIP)."""
    one_frame: bool = False
    """One-frame sampling: the images are the prompt's ``--ci`` controls, at its ``--of`` positions."""
    edit: bool = False
    """Qwen-Image-Edit: the images are the prompt's ``--ci`` control images (none: text-to-image),
    which its text embedding reads too (``sample.sampler``)."""
    layered: bool = False
    """Qwen-Image-Layered: the image is the prompt's ``--ci``, RGBA (opaque without alpha), given
    as its one control image; the text embedding does not read it."""

    @classmethod
    def of(
        cls,
        prompts: list[SamplePrompt],
        mode: catalog.Mode | None,
        clip_spec: str | None,
        device: torch.device,
        dtype: torch.dtype,
        one_frame: bool = False,
    ) -> PromptImages:
        found = cls(one_frame=one_frame)
        if mode is not None and mode.kind == "layered":  # the image to decompose, alpha kept
            for prompt in prompts:
                found.images[prompt.index] = tuple(
                    _read(path, prompt.where, "RGBA") for path in prompt.control_image_paths
                )
            found.layered = True
            return found
        if mode is not None and mode.kind == "edit":
            found.edit = True
            for prompt in prompts:
                found.images[prompt.index] = tuple(
                    _read(path, prompt.where) for path in prompt.control_image_paths
                )
            return found
        if mode is None or mode.kind != "image_to_video":
            return found
        for prompt in prompts:
            if one_frame:  # the controls, whose CLIP embedding training used
                paths = list(prompt.control_image_paths)
            else:
                assert prompt.image_path is not None  # SampleSettings.check
                paths = [
                    prompt.image_path,
                    *([] if prompt.end_image_path is None else [prompt.end_image_path]),
                ]
            found.images[prompt.index] = tuple(_read(path, prompt.where) for path in paths)
        if mode.clip and clip_spec:
            found._embed(prompts, clip_spec, device, dtype)
        return found

    def _embed(
        self, prompts: list[SamplePrompt], clip_spec: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        from masktrain.models import clip_vision

        encoder = clip_vision.load_clip(clip_spec, "--clip", device, dtype)
        for prompt in prompts:
            pixels = [_pixels(image, prompt.width, prompt.height) for image in self.images[prompt.index]]
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
        images, embeds = self.images[prompt.index], self.embeds.get(prompt.index)
        if self.edit or self.layered:  # the pipeline (Layered: its loop) resizes and VAE-encodes each
            return {"control_images": images}
        if self.one_frame:
            clean, target = one_frame_positions(prompt)
            controls = torch.stack([_pixels(image, width, height) for image in images])
            return {"one_frame": (controls, clean, target), "image_embeds": embeds}
        end = images[1] if len(images) > 1 else None
        return {"start_image": images[0], "end_image": end, "image_embeds": embeds}


def _read(path: Path, where: str, mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except OSError as error:
        raise DataError(f"{where}: {path}: cannot read the image ({error})") from None


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: `image` resized to the sample's size, as the cache's frames are."""
    resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(resized).permute(2, 0, 1).div(127.5).sub(1.0)
