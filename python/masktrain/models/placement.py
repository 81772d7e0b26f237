"""Where a frozen transformer's weights live: on the training device, or in host memory with a
copy brought in when needed (block swap, ``--offload_inactive_dit``).

A :class:`Slot` is one frozen tensor (a base weight, an fp8 scale, a norm, a buffer) and its
master copy in host memory. Base weights never change during LoRA training, so sending a tensor
back to the host costs nothing: its slot points at the master again and the device copy is freed.
Only host-to-device copies ever move bytes (musubi-tuner's H2D-only scheme, which halves the
traffic of exchanging blocks).

LoRA weights are never slots: they require grad (the optimizer holds them) and WAN 2.2's two
experts share them, so they stay on the device whatever happens to the base.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Slot:
    """One frozen tensor of a module (parameter or buffer) and its master copy in host memory."""

    module: torch.nn.Module
    name: str
    is_param: bool
    host: torch.Tensor

    def current(self) -> torch.Tensor:
        tensor: torch.Tensor = getattr(self.module, self.name)
        return tensor

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor  # type: ignore[union-attr]  # a slot's parameter exists
        else:
            self.module._buffers[self.name] = tensor

    def to_host(self) -> None:
        self.point_at(self.host)

    def to_device(self, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        tensor = self.host.to(device, non_blocking=non_blocking)
        self.point_at(tensor)
        return tensor


def is_lora(name: str) -> bool:
    """Whether a parameter or module name belongs to a peft adapter."""
    return any(part.startswith("lora_") for part in name.split("."))


def frozen_slots(
    module: torch.nn.Module, *, linear_weights_only: bool, pin: bool, skip: Iterable[Slot] = ()
) -> list[Slot]:
    """The frozen tensors of `module` (adapters and `skip` excluded): every parameter and buffer,
    or only the Linear layers' weights and fp8 scales (what block swap streams; norms and biases
    are small and stay). The slots' current tensors become their host masters (pinned when `pin`)."""
    skipped = {(id(slot.module), slot.name) for slot in skip}
    slots = []
    for module_name, sub in module.named_modules():
        if is_lora(module_name):
            continue
        if linear_weights_only and not isinstance(sub, torch.nn.Linear):
            continue
        for name, param in sub.named_parameters(recurse=False):
            if (
                param.requires_grad
                or (linear_weights_only and name != "weight")
                or (id(sub), name) in skipped
            ):
                continue
            slots.append(Slot(sub, name, True, _master(param.data, pin)))
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is None or (linear_weights_only and name != "scale") or (id(sub), name) in skipped:
                continue
            slots.append(Slot(sub, name, False, _master(buffer, pin)))
    for slot in slots:
        slot.to_host()
    return slots


def _master(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor if tensor.device.type == "cpu" else tensor.cpu()
    if pin and torch.cuda.is_available() and not host.is_pinned():
        host = host.pin_memory()
    return host


def move_module(module: torch.nn.Module, device: torch.device, skip: Iterable[Slot] = ()) -> None:
    """Every parameter and buffer of `module` to `device` in place (parameters keep their
    identity, so an optimizer built on them stays valid), except the tensors of `skip`."""
    skipped = {(id(slot.module), slot.name) for slot in skip}
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if (id(sub), name) not in skipped and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and (id(sub), name) not in skipped and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
