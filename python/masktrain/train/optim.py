"""The optimizer and the learning-rate schedule.

- ``adamw``: ``torch.optim.AdamW``. ``adamw8bit``: bitsandbytes' ``AdamW8bit``, imported only
  when asked for (it is not a dependency). ``adafactor``: transformers' ``Adafactor`` with the
  learning rate and schedule masktrain sets (no relative step). ``prodigy``: prodigyopt's
  ``Prodigy`` (``masktrain[prodigy]``); it adapts its step size, so ``--learning_rate 1`` is usual.
- LoRA+ (``--network_args loraplus_lr_ratio=R``, :func:`param_groups`): the LoRA's up matrices
  (``lora_B``) in a second group whose learning rate is R times the others'.
- Schedules are ``LambdaLR`` with the formulas of transformers' ``get_*_schedule_with_warmup``
  (warm-up from 0 over ``warmup_steps``: the LR at step ``s < warmup`` is ``lr * s / warmup``),
  so nothing needs diffusers. ``min_lr_ratio`` floors the decay of ``linear`` and ``cosine``:
  ``lr * (min + (1 - min) * decay)``; after ``total_steps`` the LR stays at the floor.
- The lambdas are closures, so a scheduler ``state_dict`` holds the step count and the base LRs
  but not the schedule's parameters: resuming with the same flags continues the same curve.
- The flag checks (``config.train.check_optimizer`` / ``check_schedule``) run when the settings
  are built; the builders run them again for callers that pass plain values.
- WAN 2.2 with ``--lora_per_expert``: one optimizer holds both experts' LoRAs; a LoRA whose expert
  took no sample in a step does not step (:func:`lora_steps`: its gradients are dropped, which
  every optimizer here skips, state and weight decay included), and each LoRA's gradients are
  clipped on their own (:func:`clip_each`), as two separate runs would. Prodigy's step-size
  estimate is the optimizer's, so the two LoRAs share it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from masktrain.config.train import OptimSettings, check_optimizer, check_schedule, optimizer_name
from masktrain.denoiser.experts import lora_of
from masktrain.errors import OptimConfigError

log = logging.getLogger(__name__)


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    *,
    optimizer_type: str = "adamw",
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adafactor_args: Mapping[str, Any] | None = None,
    prodigy_args: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (tensors or param groups); ``optimizer_type`` is
    case-insensitive, musubi's class paths included (``prodigyopt.Prodigy``)."""
    check_optimizer(optimizer_type, learning_rate, weight_decay, betas, eps)
    name = optimizer_name(optimizer_type)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy  # type: ignore[import-untyped]  # no stubs
        except ImportError as error:
            raise OptimConfigError(
                "--optimizer_type prodigy needs prodigyopt, which is not installed: pip install prodigyopt"
            ) from error
        prodigy: torch.optim.Optimizer = Prodigy(
            params, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, **(prodigy_args or {})
        )
        return prodigy
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # --learning_rate and --lr_scheduler drive the step: no relative step, no parameter scaling
        # unless asked for (what musubi's docs pass: relative_step/scale_parameter/warmup_init False).
        settings = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
        settings.update(adafactor_args or {})
        adafactor: torch.optim.Optimizer = Adafactor(  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
            params, lr=learning_rate, weight_decay=weight_decay, **settings
        )
        return adafactor
    try:
        import bitsandbytes
    except ImportError as error:
        raise OptimConfigError(
            f"--optimizer_type {optimizer_type} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or use --optimizer_type adamw)"
        ) from error
    optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(
        params, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps
    )
    return optimizer


def param_groups(
    named: list[tuple[str, torch.nn.Parameter]], learning_rate: float, loraplus_lr_ratio: float | None
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one, or with LoRA+ the down (A) and the up (B) matrices
    apart, the up ones at ``learning_rate * loraplus_lr_ratio``."""
    if loraplus_lr_ratio is None:
        return [{"params": [param for _, param in named], "lr": learning_rate}]
    up = [param for name, param in named if ".lora_B." in name]
    down = [param for name, param in named if ".lora_B." not in name]
    return [
        {"params": down, "lr": learning_rate},
        {"params": up, "lr": learning_rate * loraplus_lr_ratio},
    ]


def lr_lambda(
    name: str, *, warmup_steps: int = 0, total_steps: int, min_lr_ratio: float = 0.0, power: float = 1.0
) -> Callable[[int], float]:
    """The LR multiplier of schedule ``name`` as a function of the optimizer step (0-based)."""
    check_schedule(name, warmup_steps, total_steps, min_lr_ratio)
    if min_lr_ratio > 0 and name in ("constant", "constant_with_warmup"):
        log.warning("--lr_scheduler_min_lr_ratio has no effect with --lr_scheduler %s", name)
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "linear":
            decay = 1.0 - progress
        elif name == "polynomial":  # transformers' polynomial decay, to the floor
            decay = (1.0 - progress) ** power
        else:  # cosine; cosine_with_min_lr is transformers' name for cosine with a floor
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str = "constant",
    warmup_steps: int = 0,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` for constant, constant_with_warmup, linear, cosine or cosine_with_min_lr;
    step it once per optimizer step."""
    multiplier = lr_lambda(
        name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio, power=power
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def optimizer_and_schedule(
    named: list[tuple[str, torch.nn.Parameter]],
    optim: OptimSettings,
    loraplus_lr_ratio: float | None,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer of a run's LoRA parameters (LoRA+ groups when asked for) and its schedule over
    `total_steps`, as ``--optimizer_type`` and the schedule flags say."""
    optimizer = build_optimizer(
        param_groups(named, optim.learning_rate, loraplus_lr_ratio),
        optimizer_type=optim.optimizer_type,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        eps=optim.eps,
        adafactor_args=optim.adafactor_args,
        prodigy_args=optim.prodigy_args,
    )
    scheduler = build_scheduler(
        optimizer,
        name=optim.lr_scheduler,
        warmup_steps=optim.lr_warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=optim.lr_scheduler_min_lr_ratio,
        power=optim.lr_scheduler_power,
    )
    return optimizer, scheduler


@dataclass(frozen=True)
class LoraSteps:
    """Which of a run's LoRAs one optimizer step moves (:func:`lora_steps`)."""

    moving: list[list[torch.nn.Parameter]]
    """Each stepping LoRA's parameters."""
    idle: frozenset[str]
    """The names of the parameters of the LoRAs that do not step."""


def lora_steps(named: list[tuple[str, torch.nn.Parameter]], samples: Mapping[str, int]) -> LoraSteps:
    """The one LoRA always steps; an expert's own LoRA (``--lora_per_expert``) only when its expert
    took a sample in the step, on any process (`samples`: per expert, summed over processes, so
    every process decides alike). An idle LoRA's gradients are set to None, which the optimizer
    skips: AdamW's momentum and weight decay would move it otherwise."""
    loras: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in named:
        loras.setdefault(lora_of(name), []).append((name, param))
    moving, idle = [], set()
    for lora, members in loras.items():
        if lora and samples.get(lora, 0) == 0:
            for name, param in members:
                param.grad = None
                idle.add(name)
        else:
            moving.append([param for _, param in members])
    return LoraSteps(moving, frozenset(idle))


def clip_each(moving: list[list[torch.nn.Parameter]], max_grad_norm: float) -> float:
    """Clip each LoRA's gradients to `max_grad_norm` on its own (0: not clipped, only measured);
    returns the norm of them all before clipping, which the divergence check reads."""
    norms = [float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)) for params in moving]
    return math.hypot(*norms)
