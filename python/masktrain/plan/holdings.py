"""What a transformer holds, from its config alone: it is built on the meta device (no memory),
given the run's fp8 layers and LoRA by the same code a run uses (``models.fp8``,
``denoiser.lora.add_lora``), and its tensors are counted by shape and dtype.

Per block, the bytes block swap streams (the Linear weights and their fp8 scales: what
``models.block_swap`` moves) are told apart from those that always stay on the device (norms,
biases, modulation tables), and the parts outside the blocks (embeddings, the head) are counted
apart, since they are never swapped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from masktrain.config.memory import Fp8Mode
from masktrain.denoiser import lora
from masktrain.models.base import ModelFamily
from masktrain.models.fp8 import Fp8Linear, quantize, replace_module, target_linears
from masktrain.models.placement import is_lora


@dataclass(frozen=True)
class BlockHoldings:
    """One transformer block's frozen bytes."""

    streamed: int
    """What block swap streams: the Linear weights and their fp8 scales."""
    kept: int
    """What stays on the device even when the block is swapped: norms, biases, tables."""

    @property
    def total(self) -> int:
        return self.streamed + self.kept


@dataclass(frozen=True)
class Holdings:
    """The frozen weights and the LoRA of one transformer."""

    blocks: tuple[BlockHoldings, ...]
    outside: int
    """Frozen bytes outside the blocks (embeddings, the head)."""
    by_dtype: Mapping[str, int]
    """Frozen bytes per dtype name (``bfloat16``, ``float8_e4m3fn``, ``float32``)."""
    lora_parameters: int
    """The number of LoRA parameters (float32 each)."""

    @property
    def frozen(self) -> int:
        return self.outside + sum(block.total for block in self.blocks)

    def on_device(self, swapped: int) -> int:
        """Frozen bytes on the device with the last `swapped` blocks streamed: everything but their
        streamed bytes, plus a ring of two of them (the one computing and the one arriving)."""
        if swapped == 0:
            return self.frozen
        streamed = [block.streamed for block in self.blocks[len(self.blocks) - swapped :]]
        ring = sum(sorted(streamed, reverse=True)[:2])
        return self.frozen - sum(streamed) + ring

    def streamed(self, swapped: int) -> int:
        """Bytes the last `swapped` blocks keep in host memory."""
        return sum(block.streamed for block in self.blocks[len(self.blocks) - swapped :])


def meta_transformer(
    family: ModelFamily,
    config: Mapping[str, Any],
    dtype: torch.dtype,
    fp8: Fp8Mode | None,
    *,
    rank: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> torch.nn.Module:
    """The transformer of `config` on the meta device as a run holds it: weights in `dtype`, the
    family's fp8 layers in fp8 when `fp8`, and the LoRA of `rank` (float32) on its targets."""
    model = family.empty_transformer(config)
    for module in model.modules():  # as loading.to_device casts a loaded model
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(parameter.to(dtype), requires_grad=False)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    if fp8 is not None:
        for name in target_linears(model, family.fp8_targets):
            linear = model.get_submodule(name)
            assert isinstance(linear, torch.nn.Linear)
            weight = torch.empty(linear.weight.shape, dtype=dtype, device="meta")
            _, scale = quantize(weight, fp8)
            shape = None if scale is None else tuple(scale.shape)
            replace_module(model, name, Fp8Linear.like(linear, shape, dtype))
    lora.add_lora(model, family, rank=rank, alpha=float(rank), include=include, exclude=exclude)
    return model


def holdings(family: ModelFamily, model: torch.nn.Module) -> Holdings:
    """Count `model`'s tensors (see the module docstring)."""
    blocks = family.blocks(model)
    in_blocks = {id(tensor) for tensor in _frozen(blocks)}
    outside = sum(_bytes(tensor) for tensor in _frozen(model) if id(tensor) not in in_blocks)
    by_dtype: Counter[str] = Counter()
    for tensor in _frozen(model):
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += _bytes(tensor)
    lora_parameters = sum(p.numel() for name, p in model.named_parameters() if is_lora(name))
    return Holdings(
        blocks=tuple(_block(block) for block in blocks),
        outside=outside,
        by_dtype=dict(by_dtype),
        lora_parameters=lora_parameters,
    )


def _block(block: torch.nn.Module) -> BlockHoldings:
    streamed = 0
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_lora(name):
            streamed += _bytes(module.weight)
            scale = getattr(module, "scale", None)
            if isinstance(scale, torch.Tensor):
                streamed += _bytes(scale)
    total = sum(_bytes(tensor) for tensor in _frozen(block))
    return BlockHoldings(streamed=streamed, kept=total - streamed)


def _frozen(module: torch.nn.Module) -> list[torch.Tensor]:
    """The frozen parameters and the buffers of `module`, each once (LoRA weights left out)."""
    seen: dict[int, torch.Tensor] = {}
    for name, parameter in module.named_parameters():
        if not is_lora(name):
            seen.setdefault(id(parameter), parameter)
    for name, buffer in module.named_buffers():
        if not is_lora(name):
            seen.setdefault(id(buffer), buffer)
    return list(seen.values())


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
