"""Flow matching's training pair, shared by the training step and the demo's evaluation: the
noisy latents ``(1 - t) x + t noise`` and the velocity target ``noise - x``."""

from __future__ import annotations

import torch


def noised(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents, target) for latents (B, C, F, h, w), noise of the same shape and the noise
    levels `sigmas` (B,) in [0, 1]."""
    expanded = sigmas.view(-1, 1, 1, 1, 1)
    return (1 - expanded) * latents + expanded * noise, noise - latents
