"""Gradient checkpointing of the transformer blocks, through diffusers' own hook
(``enable_gradient_checkpointing(func)``: the model calls ``func(block, *inputs)`` for each block,
only while grad is enabled, so a ``no_grad`` teacher pass never checkpoints and never offloads).

``func`` is ``torch.utils.checkpoint.checkpoint`` (non-reentrant) around the block, plus:

- ``--gradient_checkpointing_cpu_offload``: the checkpointed function returns its outputs in host
  memory and moves its inputs to the device, so what checkpointing keeps between forward and
  backward (each block's input) lives on the host, as musubi-tuner's
  ``create_cpu_offloading_wrapper`` does. The last block's output stays on the device: the head
  reads it.
- block swap: the recomputation runs inside :meth:`BlockSwap.recompute`, so the swap hooks follow
  the backward order.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from masktrain.models.base import adapter_host
from masktrain.models.block_swap import BlockSwap


def enable(
    transformer: torch.nn.Module,
    blocks: torch.nn.ModuleList,
    device: torch.device,
    *,
    offload_activations: bool,
    swap: BlockSwap | None,
) -> None:
    """Turn on checkpointing of every block of `transformer` with the options above."""
    index = {id(block): i for i, block in enumerate(blocks)}
    last = len(blocks) - 1

    def checkpointed(block: torch.nn.Module, *inputs: Any) -> Any:
        offload = offload_activations and index.get(id(block), last) < last
        calls = 0

        def run(*args: Any) -> Any:
            nonlocal calls
            recomputing = calls > 0
            calls += 1
            context = swap.recompute() if swap is not None and recomputing else contextlib.nullcontext()
            with context:
                if offload_activations:
                    args = tuple(_moved(arg, device) for arg in args)
                out = block(*args)
            return _moved(out, torch.device("cpu")) if offload else out

        return checkpoint(run, *inputs, use_reentrant=False)

    adapter_host(transformer).enable_gradient_checkpointing(checkpointed)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_moved(item, device) for item in value)
    return value
