"""The timestep flags of ``masktrain train`` (musubi-tuner's names and defaults), checked when
built. What they mean is documented with the samplers in :mod:`masktrain.train.timesteps`."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from masktrain.errors import TimestepOptionError

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "qwen_shift", "flux2_shift", "logsnr")
EXPERT_BALANCES = ("sampled", "alternate")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
NUM_TRAIN_TIMESTEPS = 1000

MODE_SCALE_MAX = 1.75
"""Above 2 / (pi - 2) ~ 1.752 the ``mode`` density is no longer monotonic and leaves [0, 1]."""


@dataclass(frozen=True)
class TimestepSettings:
    """The timestep flags (musubi-tuner's names and defaults)."""

    timestep_sampling: str = "sigma"
    """How the timestep is drawn: sigma, uniform, sigmoid, shift, qwen_shift, flux2_shift (the same
    resolution-dependent shift, on the family's line) or logsnr."""
    discrete_flow_shift: float = 1.0
    """The shift of --timestep_sampling shift and of the sigma table (musubi's WAN examples use
    3.0, its Qwen-Image ones 2.2)."""
    sigmoid_scale: float = 1.0
    """Scale of the normal sample before the sigmoid (sigmoid, shift, qwen_shift, flux2_shift)."""
    weighting_scheme: str = "none"
    """none; logit_normal or mode (how the sigma sampler draws); cosmap or sigma_sqrt (loss
    weights by sigma)."""
    logit_mean: float = 0.0
    """Mean of the normal draw of logit_normal and of logsnr."""
    logit_std: float = 1.0
    """Standard deviation of the normal draw of logit_normal and of logsnr."""
    mode_scale: float = 1.29
    """Scale of the mode density (at most 1.75)."""
    min_timestep: int = 0
    """Lower end of the timestep range (0-999): ``t >= min_timestep / 1000``."""
    max_timestep: int = 1000
    """Upper end of the timestep range (1-1000): ``t <= max_timestep / 1000``."""
    expert_balance: str = "sampled"
    """WAN 2.2 A14B: sampled (timesteps drawn freely, so the high-noise expert gets the share
    --timestep_sampling gives it: about 1 step in 8 by default) or alternate (each step draws its
    timesteps inside the next expert's range, high and low in turn: half the steps each)."""

    def __post_init__(self) -> None:
        validate(self)


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TimestepOptionError(f"{flag} must be one of {', '.join(choices)}; got {value!r}{hint}")


def _positive(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise TimestepOptionError(f"{flag} must be > 0, got {value}")


def validate(settings: TimestepSettings) -> None:
    """Raise :class:`TimestepOptionError` (a ``ValueError``) naming the flag of a bad value."""
    _choice(settings.timestep_sampling, TIMESTEP_SAMPLINGS, "--timestep_sampling")
    _choice(settings.weighting_scheme, WEIGHTING_SCHEMES, "--weighting_scheme")
    _choice(settings.expert_balance, EXPERT_BALANCES, "--expert_balance")
    _positive(settings.discrete_flow_shift, "--discrete_flow_shift")
    _positive(settings.sigmoid_scale, "--sigmoid_scale")
    _positive(settings.logit_std, "--logit_std")
    if not math.isfinite(settings.logit_mean):
        raise TimestepOptionError(f"--logit_mean must be a finite number, got {settings.logit_mean}")
    if not (-1.0 < settings.mode_scale <= MODE_SCALE_MAX):
        raise TimestepOptionError(
            f"--mode_scale must be in range (-1, {MODE_SCALE_MAX}], got {settings.mode_scale} "
            "(outside it the 'mode' density is not monotonic)"
        )
    low, high = settings.min_timestep, settings.max_timestep
    if not 0 <= low <= NUM_TRAIN_TIMESTEPS - 1:
        raise TimestepOptionError(f"--min_timestep must be in range [0, 999], got {low}")
    if not 1 <= high <= NUM_TRAIN_TIMESTEPS:
        raise TimestepOptionError(f"--max_timestep must be in range [1, 1000], got {high}")
    if low >= high:
        raise TimestepOptionError(f"--min_timestep ({low}) must be < --max_timestep ({high})")


def check_expert_balance(settings: TimestepSettings, two_experts: bool, boundary: float) -> tuple[bool, str]:
    """(ok, the message naming the flags): ``--expert_balance alternate`` draws inside each of
    WAN 2.2's two experts' ranges in turn (t >= `boundary`: high noise, below: low noise), so it
    needs both experts and a timestep range that holds some of each."""
    if settings.expert_balance != "alternate":
        return True, ""
    if not two_experts:
        return False, "--expert_balance alternate needs two experts (--dit_high_noise)"
    low, high = settings.min_timestep / NUM_TRAIN_TIMESTEPS, settings.max_timestep / NUM_TRAIN_TIMESTEPS
    expert = "high-noise" if high <= boundary else "low-noise"
    return low < boundary < high, (
        f"--expert_balance alternate: --min_timestep {settings.min_timestep} and --max_timestep "
        f"{settings.max_timestep} leave the {expert} expert no timesteps (the switch is at timestep "
        f"{boundary * NUM_TRAIN_TIMESTEPS:g}, --timestep_boundary {boundary:g}); widen the range or use "
        "--expert_balance sampled"
    )
