"""WAN image-to-video's conditioning input: the 20 channels I2V, FLF2V and WAN 2.2 I2V A14B
concatenate to the noisy latents, built from a clip's pixels as diffusers'
``WanImageToVideoPipeline.prepare_latents`` builds it at inference:

1. the given frames (I2V: the first; FLF2V: the first and the last) kept, every other pixel frame
   zero (mid-grey in [-1, 1]), the whole clip VAE-encoded and normalised: 16 channels;
2. a mask of "pixel frame given", one value per pixel frame, frame 0 repeated 4 times so the
   N + 3 values fold into 4 channels per latent frame (the VAE's 1 + 4k grouping): 4 channels.

The cache stores the result per clip (``latents_image_*``), so training feeds the denoiser exactly
what sampling will. Every latent frame the model predicts stays in the loss, frame 0 included,
weighted by the mask as for text-to-video: musubi-tuner trains I2V that way.
"""

from __future__ import annotations

import torch

from masktrain.models.base import ModelFamily

#: The mask channels of the conditioning: pixel frames per latent frame after the first.
MASK_CHANNELS = 4


def given_frame_mask(batch: int, frames: int, height: int, width: int, given_frames: int) -> torch.Tensor:
    """(B, 4, F', h, w): channel k of latent frame i is 1 when pixel frame 4i + k - 3 is given
    (latent frame 0: pixel frame 0 in all four); `frames` is the clip's pixel frame count."""
    if (frames - 1) % MASK_CHANNELS:
        raise ValueError(f"a WAN clip has 4k + 1 frames, got {frames}")
    given = torch.zeros(batch, 1, frames, height, width)
    given[:, :, 0] = 1.0
    if given_frames == 2:
        given[:, :, -1] = 1.0
    first = given[:, :, :1].repeat_interleave(MASK_CHANNELS, dim=2)
    folded = torch.cat([first, given[:, :, 1:]], dim=2)
    latent_frames = folded.shape[2] // MASK_CHANNELS
    return folded.view(batch, latent_frames, MASK_CHANNELS, height, width).transpose(1, 2)


@torch.no_grad()
def image_condition(
    family: ModelFamily, vae: torch.nn.Module, pixels: torch.Tensor, given_frames: int
) -> torch.Tensor:
    """(B, 3, N, H, W) clip pixels in [-1, 1] -> (B, 4 + C, F', H/s, W/s) float32 on the CPU: the
    given-frame mask, then the normalised latents of the clip with every other frame zeroed."""
    if given_frames not in (1, 2):
        raise ValueError(f"given_frames is 1 (I2V) or 2 (FLF2V), got {given_frames}")
    kept = torch.zeros_like(pixels)
    kept[:, :, 0] = pixels[:, :, 0]
    if given_frames == 2:
        kept[:, :, -1] = pixels[:, :, -1]
    latents = family.encode_pixels(vae, kept).float().cpu()
    batch, _, _, height, width = latents.shape
    mask = given_frame_mask(batch, pixels.shape[2], height, width, given_frames)
    return torch.cat([mask, latents], dim=1)


def given_images(pixels: torch.Tensor, given_frames: int) -> torch.Tensor:
    """The given frames of (B, 3, N, H, W) clips as images (B x K, 3, H, W), each clip's in order
    (first, then last): what the CLIP image encoder sees."""
    frames = [pixels[:, :, 0]] if given_frames == 1 else [pixels[:, :, 0], pixels[:, :, -1]]
    return torch.stack(frames, dim=1).flatten(0, 1)
