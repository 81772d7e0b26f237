"""Flow-matching timestep sampling and loss weighting, with musubi-tuner's flags and formulas.

Convention: ``t`` (called sigma here) in [0, 1] is the noise level, ``noisy = (1 - t) * latents +
t * noise`` and the target is ``noise - latents``.

Samplers (``--timestep_sampling``):

- ``uniform``: ``t ~ U(0, 1)``.
- ``sigmoid``: ``t = sigmoid(sigmoid_scale * N(0, 1))``.
- ``shift``: the sigmoid sample, then ``t = s t / (1 + (s - 1) t)`` with ``s = --discrete_flow_shift``.
- ``qwen_shift`` (and ``flux2_shift``, musubi's FLUX.2 spelling of the same): the same shift with
  ``s = exp(mu)``, ``mu`` linear in the image's token count, on the family's line
  (``catalog.ResolutionShift``): Qwen-Image's ``(h // 2) * (w // 2)`` tokens of the latent grid,
  0.5 at 256 tokens to 0.9 at 8192; FLUX.2 / Qwen-Image 2.1 ``h * w`` tokens and Z-Image's
  ``(h // 2) * (w // 2)``, 0.5 at 256 to 1.15 at 4096, as their pipelines compute ``mu``.
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

WAN 2.2 A14B's two experts (``--expert_balance``): the high-noise expert takes ``t >=
--timestep_boundary``. ``sampled`` (the default) draws as above, so it gets the sampler's share of
the samples: with ``sigma`` and shift 1, 126 of the 1000 table entries (t = 1.000 to 0.875), about
1 in 8; with ``sigmoid``, ``P(N(0, 1) >= logit(0.875)) = 2.6%``, about 1 in 40. ``alternate``
draws each optimizer step's timesteps inside one expert's range, the high-noise one's on steps 1,
3, 5, ... and the low-noise one's on steps 2, 4, 6, ... (:func:`expert_turn`), so each gets half
the steps: the sampler's own distribution restricted to that range, by rejection (rounds of
:data:`ROUND` candidates from the same generator, the first ``batch_size`` in range kept), so
resumed and multi-process runs still draw what an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from masktrain.catalog import QWEN_IMAGE_SHIFT, ResolutionShift
from masktrain.config.timesteps import NUM_TRAIN_TIMESTEPS, TimestepSettings, validate
from masktrain.config.train import TrainConfig
from masktrain.data.cached_items import CachedItem
from masktrain.errors import TimestepOptionError
from masktrain.models.base import model_timesteps

_MIN_WEIGHTING_SIGMA = 1.0 / NUM_TRAIN_TIMESTEPS
"""``sigma_sqrt`` is evaluated at no less than the smallest sigma of the discrete schedule, so a
``uniform`` draw of exactly 0 cannot give an infinite weight."""


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: moves mass towards high noise for ``s > 1``."""
    return t * shift / (1.0 + (shift - 1.0) * t)


def qwen_shift(latent_hw: tuple[int, int], line: ResolutionShift = QWEN_IMAGE_SHIFT) -> float:
    """``exp(mu)``, ``mu`` on the family's `line` (Qwen-Image's by default: linear in the 2x2-patch
    token count, 0.5 at 256 tokens, 0.9 at 8192)."""
    return math.exp(line.mu(latent_hw))


def sigma_table(shift: float) -> torch.Tensor:
    """The 1000 training sigmas of ``FlowMatchEulerDiscreteScheduler(shift=shift)``, descending
    (index 0 is pure noise)."""
    base = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float64).float().flip(0)
    return shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift)


def _mode_density(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


ROUND = 1024
"""Candidates drawn per round when the timesteps must fall in one expert's range."""
ROUNDS = 1000
"""Rounds before a range the sampler (almost) never reaches is an error."""


@dataclass(frozen=True)
class ExpertRange:
    """The noise levels one of WAN 2.2's experts takes, as ``Experts.predict`` splits them: ``t >=
    boundary`` (the high-noise expert) or ``t < boundary`` (the low-noise one)."""

    boundary: float
    high: bool

    def holds(self, t: torch.Tensor) -> torch.Tensor:
        return t >= self.boundary if self.high else t < self.boundary

    def __str__(self) -> str:
        side = "high-noise expert's range (t >=" if self.high else "low-noise expert's range (t <"
        return f"the {side} {self.boundary:g})"


def expert_turn(settings: TimestepSettings, boundary: float | None, step: int) -> ExpertRange | None:
    """``--expert_balance alternate``: the range the optimizer step after `step` done draws in, the
    high-noise expert's when `step` is even (steps 1, 3, 5, ... as ``metrics.jsonl`` counts them)
    and the low-noise one's when odd; None for free sampling (``sampled``, or one transformer:
    `boundary` None)."""
    if settings.expert_balance != "alternate" or boundary is None:
        return None
    return ExpertRange(boundary, high=step % 2 == 0)


def sample_sigmas(
    settings: TimestepSettings,
    batch_size: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str,
    within: ExpertRange | None = None,
    line: ResolutionShift = QWEN_IMAGE_SHIFT,
) -> torch.Tensor:
    """Draw ``batch_size`` noise levels ``t`` in [min_timestep / 1000, max_timestep / 1000] as a
    float32 ``(B,)`` tensor on ``device``. The draw happens on the generator's device.

    ``latent_hw`` is the latent grid's (height, width), used by ``qwen_shift`` on the family's
    `line` (``ArchSpec.resolution_shift``). `within`: only
    noise levels in that expert's range (by rejection; see the module docstring).
    """
    if within is None:
        return _draw(settings, batch_size, latent_hw, generator, line).to(device)
    kept: list[torch.Tensor] = []
    for _ in range(ROUNDS):
        t = _draw(settings, ROUND, latent_hw, generator, line)
        kept.append(t[within.holds(t)])
        if sum(part.numel() for part in kept) >= batch_size:
            return torch.cat(kept)[:batch_size].to(device)
    raise TimestepOptionError(
        f"--expert_balance alternate: --timestep_sampling {settings.timestep_sampling} put none of "
        f"{ROUND * ROUNDS} draws in {within}; widen the sampler (--min_timestep, --max_timestep, its "
        "shift or scale) or use --expert_balance sampled"
    )


def _draw(
    settings: TimestepSettings,
    batch_size: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator,
    line: ResolutionShift,
) -> torch.Tensor:
    """`batch_size` noise levels from the sampler, on the generator's device."""
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
    elif kind in ("shift", "qwen_shift", "flux2_shift"):
        shift = settings.discrete_flow_shift if kind == "shift" else qwen_shift(latent_hw, line)
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
    return t


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
    boundary: float | None = None,
) -> float:
    """The share of samples whose timestep (``sigma * 1000``) is at or below `threshold`: the
    teacher passes ``--prior_preservation_timestep_threshold`` skips. Monte Carlo through
    :func:`sample_sigmas` itself (so it follows every sampler, ``qwen_shift``'s resolution
    dependence included) over the dataset's latent sizes ``((h, w), count)``, with its own
    generator, never the training one; with ``--expert_balance alternate`` (`boundary`: the
    experts' switch) half the draws in each expert's range."""
    turns: list[ExpertRange | None] = [None]
    if boundary is not None and expert_turn(settings, boundary, 0) is not None:
        turns = [ExpertRange(boundary, high=True), ExpertRange(boundary, high=False)]
    skipped = [
        model_timesteps(_monte_carlo(settings, latent_hws, draws, seed, turn)) <= threshold for turn in turns
    ]
    return sum(float(each.double().mean()) for each in skipped) / len(skipped)


def expert_share(
    settings: TimestepSettings,
    boundary: float,
    latent_hws: list[tuple[tuple[int, int], int]],
    draws: int = 20_000,
    seed: int = 0,
) -> float:
    """The share of freely drawn samples (``--expert_balance sampled``) the high-noise expert takes
    (``t >= boundary``), by Monte Carlo as :func:`estimate_skip_rate`."""
    return float((_monte_carlo(settings, latent_hws, draws, seed) >= boundary).double().mean())


def describe_experts(config: TrainConfig, items: Sequence[CachedItem]) -> str:
    """The line a two-expert run logs at start: how ``--expert_balance`` shares the steps out, with
    the high-noise expert's expected share under free sampling (:func:`expert_share` over the
    dataset's latent sizes). Under ``alternate`` a range that free sampling never reaches is a
    :class:`TimestepOptionError` naming the flags, before the first step."""
    settings, boundary = config.timesteps, config.boundary
    sizes: dict[tuple[int, int], int] = {}
    for item in items:
        hw = (int(item.latent_shape[-2]), int(item.latent_shape[-1]))
        sizes[hw] = sizes.get(hw, 0) + item.num_repeats
    share = expert_share(settings, boundary, sorted(sizes.items()))
    sampled = (
        f"free sampling gives the high-noise expert (t >= {boundary:g}) {100 * share:.1f}% of the samples"
        + (f", about 1 in {1 / share:.0f}" if 0 < share <= 0.5 else "")
        + f" (--timestep_sampling {settings.timestep_sampling}, 20000 draws over the dataset's latent sizes)"
    )
    if settings.expert_balance == "sampled":
        return (
            f"two experts, --expert_balance sampled: {sampled}; high_noise_samples and low_noise_samples "
            "in metrics.jsonl count them per step"
        )
    if not 0 < share < 1:
        raise TimestepOptionError(
            f"--expert_balance alternate: {sampled}, so one expert's range is out of its reach; widen "
            "--timestep_sampling's range or use --expert_balance sampled"
        )
    return (
        "two experts, --expert_balance alternate: steps 1, 3, 5, ... draw in the high-noise expert's range, "
        f"steps 2, 4, 6, ... in the low-noise one's, half the steps each ({sampled})"
    )


def _monte_carlo(
    settings: TimestepSettings,
    latent_hws: list[tuple[tuple[int, int], int]],
    draws: int,
    seed: int,
    within: ExpertRange | None = None,
) -> torch.Tensor:
    """About `draws` noise levels over the latent sizes ``((h, w), count)`` in proportion, from a
    generator of its own."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(count for _, count in latent_hws)
    return torch.cat(
        [
            sample_sigmas(settings, max(1, round(draws * count / total)), hw, generator, "cpu", within)
            for hw, count in latent_hws
        ]
    )
