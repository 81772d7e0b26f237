"""The EMA teacher (``--prior_teacher_mode ema``, ``--prior_teacher_ema_decay``), the reference's
``lora_ema_teacher``: an fp32 exponential moving average of the LoRA weights that, swapped in place
into the adapter parameters (adapters stay on; no Parameter object is replaced, so optimizer state
and hooks are untouched), is the teacher of the prior term instead of the base model.

- It starts at optimizer step ``max(100, int(total_steps * --prior_decay_warmup_ratio))`` as a copy
  of the live weights; before that the teacher is the base model (adapters off).
- It is updated after every optimizer step: ``ema = d·ema + (1 - d)·param``, in fp32. Every process
  holds the same parameters after the all-reduce, so every process's EMA is the same.
- With ``--lora_per_expert`` each expert's LoRA has its own EMA (the parameter names tell them
  apart), updated only after the steps that moved that LoRA: an idle step leaves both the LoRA
  and its average as they were.
- It is saved in each checkpoint (``ema.safetensors``) and restored on ``--resume``, so a resumed run
  equals an uninterrupted one.
- The LoRA weights never leave the device (block swap moves base weights only), so the swap reaches
  the adapters of swapped blocks too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch

START_STEP = 100
"""The earliest optimizer step the EMA starts at (the reference's)."""


class EmaTeacher:
    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, start_step: int) -> None:
        self.named, self.decay, self.start_step = named, decay, start_step
        self.shadow: dict[str, torch.Tensor] | None = None

    @property
    def started(self) -> bool:
        return self.shadow is not None

    @torch.no_grad()
    def after_step(self, step: int, idle: Collection[str] = ()) -> None:
        """Start (a copy of the weights) at the start step, or update, after optimizer step `step`;
        the parameters named in `idle` (a LoRA that did not step) keep their average."""
        if self.shadow is None:
            if step >= self.start_step:
                self.shadow = {name: param.detach().float().clone() for name, param in self.named}
            return
        for name, param in self.named:
            if name not in idle:
                self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the adapter parameters, in place; the live ones back after (also on
        an error)."""
        assert self.shadow is not None
        with torch.no_grad():
            backup = {name: param.detach().clone() for name, param in self.named}
            for name, param in self.named:
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.named:
                    param.copy_(backup[name])

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.shadow is None else {name: t.cpu().contiguous() for name, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            devices = {name: param.device for name, param in self.named}
            self.shadow = {name: tensor.float().to(devices[name]) for name, tensor in state.items()}
