"""The optimizer and the learning-rate schedule.

- ``adamw``: ``torch.optim.AdamW``. ``adamw8bit``: bitsandbytes' ``AdamW8bit``, imported only
  when asked for (it is not a dependency).
- Schedules are ``LambdaLR`` with the formulas of transformers' ``get_*_schedule_with_warmup``
  (warm-up from 0 over ``warmup_steps``: the LR at step ``s < warmup`` is ``lr * s / warmup``),
  so nothing needs diffusers. ``min_lr_ratio`` floors the decay of ``linear`` and ``cosine``:
  ``lr * (min + (1 - min) * decay)``; after ``total_steps`` the LR stays at the floor.
- The lambdas are closures, so a scheduler ``state_dict`` holds the step count and the base LRs
  but not the schedule's parameters: resuming with the same flags continues the same curve.
- ``constant`` with ``warmup_steps > 0`` is an error, as in musubi-tuner / sd-scripts ("does not
  require num_warmup_steps"): use ``constant_with_warmup``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from masktrain._native import MaskTrainError

log = logging.getLogger(__name__)

OPTIMIZER_TYPES = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


class OptimConfigError(MaskTrainError):
    """An optimizer or schedule flag that cannot work; the message names the flag."""


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    *,
    optimizer_type: str = "adamw",
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors or param groups); ``optimizer_type`` is case-insensitive."""
    kind = optimizer_type.lower()
    if kind not in OPTIMIZER_TYPES:
        raise OptimConfigError(
            f"--optimizer_type must be one of {', '.join(OPTIMIZER_TYPES)}; got {optimizer_type!r}"
        )
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise OptimConfigError(f"--learning_rate must be > 0, got {learning_rate}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise OptimConfigError(f"--weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise OptimConfigError(f"optimizer betas must be in range [0, 1), got {betas}")
    if not eps > 0:
        raise OptimConfigError(f"optimizer eps must be > 0, got {eps}")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps)
    try:
        import bitsandbytes  # type: ignore[import-not-found]
    except ImportError as error:
        raise OptimConfigError(
            f"--optimizer_type {optimizer_type} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or use --optimizer_type adamw)"
        ) from error
    return bitsandbytes.optim.AdamW8bit(
        params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps
    )


def lr_lambda(
    name: str, *, warmup_steps: int = 0, total_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The LR multiplier of schedule ``name`` as a function of the optimizer step (0-based)."""
    if name not in LR_SCHEDULERS:
        raise OptimConfigError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {name!r}")
    if total_steps < 1:
        raise OptimConfigError(f"the total number of training steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise OptimConfigError(f"--lr_warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        raise OptimConfigError(
            f"--lr_warmup_steps ({warmup_steps}) must not exceed the total training steps ({total_steps})"
        )
    if name == "constant" and warmup_steps > 0:
        raise OptimConfigError(
            "--lr_scheduler constant does not use --lr_warmup_steps; set it to 0 or use constant_with_warmup"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptimConfigError(f"--lr_scheduler_min_lr_ratio must be in range [0, 1], got {min_lr_ratio}")
    if min_lr_ratio > 0 and name in ("constant", "constant_with_warmup"):
        log.warning("--lr_scheduler_min_lr_ratio has no effect with --lr_scheduler %s", name)
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        decay = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str = "constant",
    warmup_steps: int = 0,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` for constant, constant_with_warmup, linear or cosine; step it once per
    optimizer step."""
    multiplier = lr_lambda(
        name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
