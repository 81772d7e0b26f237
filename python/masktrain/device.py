"""Where a command computes, and in which dtypes: the one choice every command makes the same way
(``cache``, ``train``, ``sample``, ``masks tiers``, ``masks instance``, the demo's evaluation).

- ``--device`` (checked torch-free by ``config.device.check_device``) wins; whether it exists on
  this machine is checked here, before any model loads. The default is this process's GPU
  (``cuda:LOCAL_RANK`` under torchrun), else the CPU.
- ``--mixed_precision`` (``train``, ``sample``): ``auto`` is bf16 on a GPU and float32 on the CPU;
  commands without the flag (``cache``, ``masks``) use ``auto``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from masktrain.errors import FlagError


def resolve_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """The device of ``--device`` (checked to exist), or ``cuda:LOCAL_RANK`` when there is one."""
    if flag:
        try:  # the ``masks`` commands hand --device here unchecked
            device: torch.device | None = torch.device(flag)
        except RuntimeError:  # a name torch does not know (tpu)
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise FlagError(f"--device must be cpu, cuda, cuda:N or mps, not {flag!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FlagError(f"--device {flag}: no CUDA device is available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise FlagError(f"--device {flag}: no MPS device is available on this machine")
        return device
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def precision(choice: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(base weight dtype, autocast dtype) of ``--mixed_precision``: float32 everywhere on the CPU
    unless asked otherwise."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "no"
    if choice == "no":
        return torch.float32, None
    return torch.bfloat16, torch.bfloat16


def indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (tensors report an index, and placement compares devices)."""
    if device == torch.device("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to `dtype` on `device`, or nothing when `dtype` is None (float32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
