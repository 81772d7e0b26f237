"""Flow-matching timestep sampling and loss weighting, with musubi-tuner's flags and formulas.

Convention: ``t`` (called sigma here) in [0, 1] is the noise level, ``noisy = (1 - t) * latents +
t * noise`` and the target is ``noise - latents``.

Samplers (``--timestep_sampling``):

- ``uniform``: ``t ~ U(0, 1)``.
- ``sigmoid``: ``t = sigmoid(sigmoid_scale * N(0, 1))``.
- ``shift``: the sigmoid sample, then ``t = s t / (1 + (s - 1) t)`` with ``s = --discrete_flow_shift``.
- ``qwen_shift``: the same shift with ``s = exp(mu)``, ``mu`` linear in the token count
  ``(h // 2) * (w // 2)`` of the latent grid, from 0.5 at 256 tokens to 0.9 at 8192.
- ``logsnr``: ``logsnr ~ N(logit_mean, logit_std)``, ``t = sigmoid(-logsnr / 2)``. musubi has no
  separate logsnr flags; it reads ``--logit_mean`` / ``--logit_std`` (defaults 0 and 1), and so
  does masktrain.
- ``sigma`` (the default): diffusers' ``compute_density_for_timestep_sampling`` draws ``u``
  (``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``; ``mode``:
  ``1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u)``; otherwise uniform), which indexes the
  1000 sigmas of ``FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift)``:
  ``sigma_i = shift(1 - i / 1000)``. The table is computed here, without importing diffusers.

``--min_timestep`` / ``--max_timestep`` (0-1000) rescale the sample linearly from [0, 1] to
[min / 1000, max / 1000], as musubi does for every sampler but ``sigma``. For ``sigma`` musubi
uses them as bounds of the index into the descending sigma table, which inverts their meaning
(``--min_timestep 875`` would select the *lowest* noise levels); masktrain rescales there too, so
the flags mean the same for every sampler.

Loss weighting (``--weighting_scheme``, diffusers' ``compute_loss_weighting_for_sd3``):
``sigma_sqrt`` = ``sigma ** -2``, ``cosmap`` = ``2 / (pi (1 - 2 sigma + 2 sigma^2))``; the others
(``none``, and ``logit_normal`` / ``mode``, which only shape the ``sigma`` sampler) weight nothing.

Every draw comes from the caller's ``torch.Generator`` (exactly one call of ``batch_size``
numbers per sample), so a resumed run repeats the same timesteps.
"""

from __future__ import annotations

import math

import torch

from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS, TimestepSettings, validate
from masktrain.models.base import model_timesteps

_MIN_WEIGHTING_SIGMA = 1.0 / NUM_TRAIN_TIMESTEPS
"""``sigma_sqrt`` is evaluated at no less than the smallest sigma of the discrete schedule, so a
``uniform`` draw of exactly 0 cannot give an infinite weight."""


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: moves mass towards high noise for ``s > 1``."""
    return t * shift / (1.0 + (shift - 1.0) * t)


def qwen_shift(latent_hw: tuple[int, int]) -> float:
    """``exp(mu)``, ``mu`` linear in the 2x2-patch token count: 0.5 at 256 tokens, 0.9 at 8192."""
    height, width = latent_hw
    tokens = (height // 2) * (width // 2)
    slope = (0.9 - 0.5) / (8192 - 256)
    mu = 0.5 + slope * (tokens - 256)
    return math.exp(mu)


def sigma_table(shift: float) -> torch.Tensor:
    """The 1000 training sigmas of ``FlowMatchEulerDiscreteScheduler(shift=shift)``, descending
    (index 0 is pure noise)."""
    base = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float64).float().flip(0)
    return shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift)


def _mode_density(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


def sample_sigmas(
    settings: TimestepSettings,
    batch_size: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """Draw ``batch_size`` noise levels ``t`` in [min_timestep / 1000, max_timestep / 1000] as a
    float32 ``(B,)`` tensor on ``device``. The draw happens on the generator's device.

    ``latent_hw`` is the latent grid's (height, width), used by ``qwen_shift``.
    """
    kind = settings.timestep_sampling
    on = generator.device

    def normal() -> torch.Tensor:
        return torch.randn(batch_size, generator=generator, device=on, dtype=torch.float32)

    def uniform() -> torch.Tensor:
        return torch.rand(batch_size, generator=generator, device=on, dtype=torch.float32)

    if kind == "uniform":
        t = uniform()
    elif kind == "sigmoid":
        t = torch.sigmoid(settings.sigmoid_scale * normal())
    elif kind in ("shift", "qwen_shift"):
        shift = settings.discrete_flow_shift if kind == "shift" else qwen_shift(latent_hw)
        t = shift_sigmas(torch.sigmoid(settings.sigmoid_scale * normal()), shift)
    elif kind == "logsnr":
        logsnr = settings.logit_mean + settings.logit_std * normal()
        t = torch.sigmoid(-logsnr / 2.0)
    elif kind == "sigma":
        scheme = settings.weighting_scheme
        if scheme == "logit_normal":
            u = torch.sigmoid(settings.logit_mean + settings.logit_std * normal())
        elif scheme == "mode":
            u = _mode_density(uniform(), settings.mode_scale)
        else:
            u = uniform()
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        t = sigma_table(settings.discrete_flow_shift).to(on)[indices]
    else:
        validate(settings)  # raises the flag's message
        raise AssertionError(kind)
    low = settings.min_timestep / NUM_TRAIN_TIMESTEPS
    high = settings.max_timestep / NUM_TRAIN_TIMESTEPS
    if low != 0.0 or high != 1.0:
        t = t * (high - low) + low
    return t.to(device)


def loss_weighting(settings: TimestepSettings, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights ``(B,)`` float32 for ``sigma_sqrt`` and ``cosmap``; None otherwise
    (multiply the unreduced loss by ``weights.view(-1, 1, 1, 1, 1)``)."""
    scheme = settings.weighting_scheme
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas.clamp_min(_MIN_WEIGHTING_SIGMA) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return None


def estimate_skip_rate(
    settings: TimestepSettings,
    threshold: float,
    latent_hws: list[tuple[tuple[int, int], int]],
    draws: int = 20_000,
    seed: int = 0,
) -> float:
    """The share of samples whose timestep (``sigma * 1000``) is at or below `threshold`: the
    teacher passes ``--prior_preservation_timestep_threshold`` skips. Monte Carlo through
    :func:`sample_sigmas` itself (so it follows every sampler, ``qwen_shift``'s resolution
    dependence included) over the dataset's latent sizes ``((h, w), count)``, with its own
    generator, never the training one."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(count for _, count in latent_hws)
    skipped, drawn = 0, 0
    for hw, count in latent_hws:
        n = max(1, round(draws * count / total))
        timesteps = model_timesteps(sample_sigmas(settings, n, hw, generator, "cpu"))
        skipped += int((timesteps <= threshold).sum())
        drawn += n
    return skipped / drawn
