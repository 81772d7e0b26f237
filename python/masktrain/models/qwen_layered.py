"""Qwen-Image-Layered (``--model_version layered``): a Qwen-Image transformer that decomposes an
image into RGBA layers, and its RGBA VAE.

What differs from Qwen-Image, as diffusers' ``QwenImageLayeredPipeline`` and musubi-tuner's
``call_dit`` run it:

- The VAE reads and writes 4 channels (``AutoencoderKLQwenImage(input_channels=4)``): alpha is
  content. Each image (the base and every layer) is encoded alone, one latent frame each, so an
  item's latents are (C, L, h, w) with L = 1 + layers, the base first.
- The transformer has ``use_layer3d_rope`` (image ``i`` of the sequence is RoPE frame ``i``; the
  last, the condition image, frame -1) and ``use_additional_t_cond`` (a 2-entry embedding added
  to the timestep's, "is RGB", always 0 here as in the pipeline and musubi).
- The targets are packed layer-major (2x2 patches of layer 0, then layer 1, ...), the clean
  latents of the image to decompose are packed after them as one more image, ``img_shapes`` holds
  one ``(1, h/2, w/2)`` per target and the condition image's last, and the prediction of the
  target tokens is kept. Training's condition is the base image (latent frame 0 of the cache,
  stored as the item's control latents by ``cache.layered``); sampling's is the ``--ci`` image.

The layer count is free (``img_shapes`` says it): training predicts every cached image, or without
the base (``--remove_first_image_from_target``, musubi's flag), sampling makes ``--f`` layers plus
the base, as musubi's sampler does. ``QwenImageLayeredPipeline`` itself does not run for sampling:
it needs the text encoder's dtype, accepts only 640 or 1024 pixel sizes, and with the tiny VAE
(4 latent channels) takes the RGBA image for latents; :func:`generate` is its loop.

This module is a leaf of ``qwen_image`` (which calls it when a transformer's config says it is a
layered one): it imports nothing of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from masktrain.errors import DataError, ModelLoadError
from masktrain.models.base import SampleRequest, TextBatch
from masktrain.models.loading import diffusers_config, encode_posterior_mean

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

#: ``--dit tiny`` under ``--model_version layered`` (``catalog.Mode.tiny``) and the tiny RGBA VAE
#: (``--vae tiny-layered``): the layered models differ from Qwen-Image's in these flags only.
TINY_LAYERED = "tiny-layered"
LAYERED_FLAGS: Mapping[str, bool] = {"use_additional_t_cond": True, "use_layer3d_rope": True}
RGBA = 4
"""The layered VAE's image channels (musubi's ``input_channels = 4``)."""
# The tiny VAE's normalisation for RGBA: per-channel mean and std of the seeded 4-channel tiny VAE's
# posterior mean over 64 smooth random RGBA fields (4x4 noise upsampled to 32x32), measured as
# qwen_image.TINY_VAE's 3-channel constants were, so its latents are about N(0, 1) per channel.
TINY_VAE_CHANGES: Mapping[str, Any] = {
    "input_channels": RGBA,
    "latents_mean": [-0.205, 0.182, -0.304, 0.344],
    "latents_std": [0.0851, 0.0893, 0.0851, 0.0791],
}
#: ``QwenImageLayeredPipeline``'s base sequence length for its shift (256x256 pixels in 16x16 tokens).
BASE_SEQ_LEN = 256 * 256 / 16 / 16


def is_layered(config: Mapping[str, Any]) -> bool:
    """Whether a transformer of diffusers config `config` is a Qwen-Image-Layered one."""
    return bool(config.get("use_layer3d_rope", False))


def version_mismatch(config: Mapping[str, Any], version: str | None) -> str | None:
    """What is wrong with a transformer of `config` for ``--model_version version`` as far as
    layering goes (None: nothing)."""
    if version == "layered" and not is_layered(config):
        return (
            "is not a Qwen-Image-Layered transformer (no layer RoPE): pass the Layered DiT "
            "(qwen_image_layered_bf16.safetensors, or --dit tiny)"
        )
    if version != "layered" and is_layered(config):
        return "is a Qwen-Image-Layered transformer: pass --model_version layered"
    return None


def check_vae(vae: torch.nn.Module, flag_value: str, layered: bool) -> None:
    """The layered mode needs the RGBA VAE and the others the RGB one (a VAE without
    ``input_channels``, as WAN's, reads RGB); a one-line error naming ``--vae`` otherwise."""
    channels = int(getattr(diffusers_config(vae), "input_channels", 3))
    if layered and channels != RGBA:
        raise ModelLoadError(
            f"--vae {flag_value}: Qwen-Image-Layered encodes RGBA images and this VAE reads {channels} "
            f"channels; pass the Layered VAE (qwen_image_layered_vae.safetensors, or --vae {TINY_LAYERED})"
        )
    if not layered and channels == RGBA:
        raise ModelLoadError(
            f"--vae {flag_value}: this is Qwen-Image-Layered's RGBA VAE; pass --model_version layered, or "
            "the Qwen-Image VAE"
        )


def pack_layers(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, L, h, w) -> (B, L * h/2 * w/2, 4C) tokens, layer-major, as
    ``QwenImageLayeredPipeline._pack_latents`` packs (B, L, C, h, w) and musubi's ``pack_latents``."""
    b, c, layers, h, w = latents.shape
    if h % 2 or w % 2:
        raise DataError(f"Qwen-Image latents need an even height and width (2x2 patches), got {h}x{w}")
    x = latents.permute(0, 2, 1, 3, 4).reshape(b, layers, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, layers * (h // 2) * (w // 2), c * 4)


def unpack_layers(tokens: torch.Tensor, layers: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_layers`: (B, L * h/2 * w/2, 4C) -> (B, C, L, h, w)."""
    b, _, features = tokens.shape
    c = features // 4
    x = tokens.view(b, layers, h // 2, w // 2, c, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, layers, c, h, w).permute(0, 2, 1, 3, 4)


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    text: TextBatch,
    condition: torch.Tensor,
) -> torch.Tensor:
    """The velocity of the noisy images (B, C, L, h, w) given the clean latents of the image to
    decompose, `condition` (B, C, 1, h', w'); the same shape as `noisy`."""
    b, _, layers, h, w = noisy.shape
    targets = pack_layers(noisy)
    tokens = torch.cat([targets, pack_layers(condition.to(noisy.dtype))], dim=1)
    shapes = [(1, h // 2, w // 2)] * layers + [(1, condition.shape[-2] // 2, condition.shape[-1] // 2)]
    prediction = transformer(
        hidden_states=tokens,
        encoder_hidden_states=text.hidden,
        encoder_hidden_states_mask=text.mask,
        timestep=sigmas,  # the pipeline passes t / 1000
        img_shapes=[shapes] * b,
        additional_t_cond=torch.zeros(b, dtype=torch.long, device=noisy.device),  # "is_rgb" = 0
        return_dict=False,
    )[0]
    return unpack_layers(prediction[:, : targets.shape[1]], layers, h, w)


def control_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 4, 1, H, W) in [-1, 1]: `image` as RGBA (opaque without alpha) at the sample's size, read
    as the pipeline's image processor reads it (LANCZOS, x / 255 * 2 - 1)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    if rgba.size != (width, height):
        rgba = rgba.resize((width, height), Image.Resampling.LANCZOS)
    values = torch.from_numpy(np.asarray(rgba, dtype=np.float32) / 255.0)
    return (2.0 * values - 1.0).permute(2, 0, 1)[None, :, None]


def generate(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    request: SampleRequest,
    scheduler: FlowMatchEulerDiscreteScheduler,
) -> torch.Tensor:
    """One decomposition of the request's image (its one control image) into ``request.frames``
    layers plus the base, with `transformer` as it is: (L, H, W, 4) uint8 RGBA images on the CPU,
    the model's first image (the base, for a model trained on it) first. The pipeline leaves that
    one out; here it is kept, since a model trained with ``--remove_first_image_from_target`` makes
    a layer there."""
    return decode(vae, denoise(transformer, vae, request, scheduler))


@torch.no_grad()
def denoise(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    request: SampleRequest,
    scheduler: FlowMatchEulerDiscreteScheduler,
) -> torch.Tensor:
    """``QwenImageLayeredPipeline``'s loop at the request's size: the clean latents (1, C, L, h, w)
    of the request's image decomposed."""
    (image,) = request.control_images
    device, dtype = request.text.hidden.device, request.text.hidden.dtype  # the sampler's
    pixels = control_pixels(image, request.width, request.height).to(device)
    condition = encode_posterior_mean(vae, pixels).to(dtype)
    scale = 2 ** len(diffusers_config(vae).temperal_downsample)
    h, w = request.height // scale, request.width // scale
    channels = int(diffusers_config(vae).z_dim)
    # the pipeline draws (B, L, C, h, w) noise first (randn_tensor on the CPU generator)
    noise = torch.randn((1, request.frames + 1, channels, h, w), generator=request.generator, dtype=dtype)
    latents = noise.permute(0, 2, 1, 3, 4).to(device)
    sigmas = np.linspace(1.0, 0, request.steps + 1)[:-1]
    mu = ((condition.shape[-2] // 2) * (condition.shape[-1] // 2) / BASE_SEQ_LEN) ** 0.5
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        timestep = t.expand(1).to(latents.dtype) / 1000
        velocity = predict(transformer, latents, timestep, request.text, condition)
        if request.negative is not None and request.cfg_scale > 1:
            unguided = predict(transformer, latents, timestep, request.negative, condition)
            velocity = unguided + request.cfg_scale * (velocity - unguided)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (1, C, L, h, w) -> (L, H, W, 4) uint8 RGBA, each image decoded alone (the
    pipeline's un-normalisation and post-processing)."""
    autoencoder: Any = vae  # diffusers' AutoencoderKLQwenImage: its dtype and decode
    config = diffusers_config(vae)
    _, channels, layers, h, w = latents.shape
    latents = latents.to(autoencoder.dtype)
    shape = (1, channels, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    latents = latents / inverse_std + mean
    one_by_one = latents.permute(0, 2, 1, 3, 4).reshape(layers, channels, 1, h, w)
    images: torch.Tensor = autoencoder.decode(one_by_one, return_dict=False)[0]
    values = (images.squeeze(2) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()
    return (values * 255).round().to(torch.uint8)
