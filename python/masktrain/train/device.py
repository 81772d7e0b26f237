"""Where a command computes, and in which dtypes: ``--device`` (default: this process's GPU under
torchrun, else the CPU) and ``--mixed_precision`` (auto: bf16 on a GPU, float32 on the CPU)."""

from __future__ import annotations

import torch

from masktrain.errors import TrainConfigError


def resolve_device(flag: str | None, local_rank: int = 0) -> torch.device:
    """The device of ``--device`` (checked to exist), or ``cuda:LOCAL_RANK`` when there is one."""
    if flag:
        device = torch.device(flag)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError(f"--device {flag}: no CUDA device is available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise TrainConfigError(f"--device {flag}: no MPS device is available on this machine")
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
