"""Timestep-adaptive prior weights (``--prior_decay_schedule``, ``--prior_decay_timestep_start``,
``--prior_decay_warmup_ratio``), the reference's ``compute_prior_weight_per_sample``:

    warm = min(1, step / warmup_steps)  (1 without warm-up; warmup_steps = int(total * ratio))
    f(t) = 1 | t' | 0.5 - 0.5·cos(π·t')   (constant | linear | cosine), t' = clamp(t, 0, pivot) / pivot
    w_b  = --prior_preservation_weight · warm · f(t_b)

Full weight at and above the pivot timestep, decaying to 0 at t = 0: near the clean image the
prior term lets go. Samples with ``w_b = 0`` skip the teacher. Timesteps are ``sigma * 1000``."""

from __future__ import annotations

import math

import torch

from masktrain.config.mask_loss import MaskLossSettings


def schedule_enabled(settings: MaskLossSettings) -> bool:
    return settings.prior_decay_schedule != "constant" or settings.prior_decay_warmup_ratio > 0


def prior_weights(
    settings: MaskLossSettings, timesteps: torch.Tensor, step: int, total_steps: int
) -> torch.Tensor:
    """(B,) prior weights for the samples' `timesteps` at optimizer step `step` of `total_steps`."""
    base = settings.prior_preservation_weight
    if base <= 0:
        return torch.zeros_like(timesteps, dtype=torch.float32)
    warmup_steps = int(total_steps * settings.prior_decay_warmup_ratio)
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    t = (
        timesteps.float().clamp(0.0, settings.prior_decay_timestep_start)
        / settings.prior_decay_timestep_start
    )
    if settings.prior_decay_schedule == "linear":
        shape = t
    elif settings.prior_decay_schedule == "cosine":
        shape = 0.5 - 0.5 * torch.cos(math.pi * t)
    else:
        shape = torch.ones_like(t)
    return base * warm * shape
