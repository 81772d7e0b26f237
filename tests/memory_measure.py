"""The measured side of the planner's check (issue 22): the peak bytes of live tensors during real
training steps on the CPU, counted op by op with ``plan.trace.LiveBytes``, with what would be on
the device told apart from what would be in host memory.

The run is masktrain's own: a transformer of the given config with random weights (made tensor by
tensor in bf16; fp8 by ``models.fp8.quantize_model`` as a bf16 file is quantised when it loads),
the LoRA from ``denoiser.lora.add_lora``, ``denoiser.experts.place`` (block swap, checkpointing,
offload), then per step ``train.step.compute_loss``, backward, the layout restored, and the run's
optimizer (``train.optim``), as ``train.loop`` runs them, in bf16 with autocast.

On the CPU a copy "to the device" or "to the host" moves nothing, so two things are counted by
rule instead: the frozen weights on the device are the resident tensors plus a ring of the two
largest swapped blocks' streamed bytes (what ``models.block_swap`` holds at most), and with
activation offload each block's output is a host copy (left out of the count) and each block's
input a device copy (counted), as ``models.checkpointing`` makes them on a GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from masktrain.config import MaskLossSettings, MemorySettings, NetworkSettings, OptimSettings, TrainConfig
from masktrain.data.loader import Batch
from masktrain.denoiser import lora
from masktrain.denoiser.experts import Experts, place
from masktrain.models import checkpointing, get_family
from masktrain.models.fp8 import quantize_model
from masktrain.models.placement import is_lora
from masktrain.plan.trace import LiveBytes
from masktrain.train.optim import optimizer_and_schedule
from masktrain.train.step import compute_loss

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Mode:
    """One row's flags."""

    fp8: bool = False
    swap: int = 0
    checkpointing: bool = True
    offload: bool = False
    prior: bool = True
    rank: int = 16


@dataclass(frozen=True)
class Measured:
    weights: int
    """Frozen bytes that would be on the device."""
    lora: int
    """LoRA parameter bytes."""
    step_peak: int
    """Peak bytes of the tensors the steps made that would be on the device."""
    seconds: float

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.step_peak


def measure(
    arch: str,
    config: Mapping[str, Any],
    width: int,
    height: int,
    frames: int,
    mode: Mode,
    *,
    steps: int = 2,
    text_tokens: int = 64,
) -> Measured:
    """Train `steps` steps of a transformer of `config` on one batch of `width` x `height` x
    `frames` pixels (latents at the family's factors) and count them (see the module docstring)."""
    started = time.perf_counter()
    family = get_family(arch)
    model = _random_transformer(family, config, mode.fp8)
    torch.manual_seed(0)
    lora.add_lora(model, family, rank=mode.rank, alpha=float(mode.rank))
    memory = MemorySettings(
        fp8_base=mode.fp8,
        fp8_scaled=mode.fp8,
        blocks_to_swap=mode.swap,
        gradient_checkpointing_cpu_offload=mode.offload,
    )
    experts = Experts(model, None, 0.875, device=CPU)
    place(experts, family, memory, mode.checkpointing)
    run = _config(arch, memory, mode)
    named = experts.trainable()
    optimizer, scheduler = optimizer_and_schedule(named, run.optim, None, steps)
    batch = _batch(family, config, width, height, frames, text_tokens)
    counter = LiveBytes()
    offload = _offload_copies(counter, family.blocks(model)) if mode.offload else contextlib.nullcontext()
    with offload, counter:
        for step in range(steps):
            try:
                result = compute_loss(
                    run, family, experts, batch, 0, CPU, torch.bfloat16, torch.bfloat16, (step, steps)
                )
                result.loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            finally:
                experts.restore_layout("after backward")
            del result
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    lora_bytes = sum(p.numel() * p.element_size() for _, p in named)
    return Measured(_device_weights(model, experts), lora_bytes, counter.peak, time.perf_counter() - started)


def _random_transformer(family: Any, config: Mapping[str, Any], fp8: bool) -> torch.nn.Module:
    """The transformer with random bf16 weights, made one tensor at a time (never a float32 copy);
    what its constructor makes besides parameters (RoPE tables) is made as it makes it."""
    from accelerate import init_empty_weights

    model_class = type(family.empty_transformer({**config, "num_layers": 1}))
    with init_empty_weights(include_buffers=False):
        model = model_class(**config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                value = torch.randn(param.shape, generator=generator, dtype=torch.bfloat16) * 0.02
                if "norm" in type(module).__name__.lower() or name == "scale_shift_table":
                    value = torch.full(param.shape, float(name == "weight"), dtype=torch.bfloat16)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_floating_point():  # as loading.to_device casts them
                    module._buffers[name] = buffer.to(torch.bfloat16)
    if fp8:
        quantize_model(model, family.fp8_targets, "scaled")
    return model.eval().requires_grad_(False)


def _config(arch: str, memory: MemorySettings, mode: Mode) -> TrainConfig:
    from pathlib import Path

    return TrainConfig(
        dataset_config=Path("-"),
        arch=arch,
        dit="random",
        output_dir=Path("-"),
        device="cpu",
        mixed_precision="bf16",
        gradient_checkpointing=mode.checkpointing,
        memory=memory,
        network=NetworkSettings(network_dim=mode.rank, network_alpha=float(mode.rank)),
        optim=OptimSettings(learning_rate=1e-4),
        mask=MaskLossSettings(
            use_mask_loss=True,
            prior_preservation_weight=1.0 if mode.prior else 0.0,
            prior_mask_threshold=0.1 if mode.prior else None,
        ),
    )


def _batch(
    family: Any, config: Mapping[str, Any], width: int, height: int, frames: int, tokens: int
) -> Batch:
    inputs = family.denoiser_inputs(config)
    spatial, temporal = family.spec.spatial_factor, family.spec.temporal_factor
    shape = (1, inputs.latent_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(shape, generator=generator)
    mask = torch.zeros(1, 1, *shape[2:])
    mask[..., shape[3] // 4 : shape[3] * 3 // 4, shape[4] // 4 : shape[4] * 3 // 4] = 0.5
    mask[..., shape[3] // 3 : shape[3] // 2, shape[4] // 3 : shape[4] * 2 // 3] = 1.0
    text = [torch.randn(tokens, inputs.text_dim, generator=generator)]
    return Batch(index=0, latents=latents, mask_weights=mask, text=text, items=[])


def _device_weights(model: torch.nn.Module, experts: Experts) -> int:
    frozen = {id(t): t for n, t in model.named_parameters() if not is_lora(n)}
    frozen |= {id(t): t for _, t in model.named_buffers()}
    total = sum(t.numel() * t.element_size() for t in frozen.values())
    for swap in experts.swaps.values():
        streamed = [
            sum(slot.host.numel() * slot.host.element_size() for slot in slots)
            for slots in swap.slots.values()
        ]
        total -= sum(streamed) - sum(sorted(streamed, reverse=True)[:2])
    return total


@contextlib.contextmanager
def _offload_copies(counter: LiveBytes, blocks: torch.nn.ModuleList) -> Iterator[None]:
    """``checkpointing._moved`` as a GPU run does it: a block's output sent to the host is a copy
    the count leaves out; a host tensor sent to the device is a copy it counts."""
    outputs: set[int] = set()
    last = blocks[len(blocks) - 1]

    def record(module: torch.nn.Module, args: Any, out: Any) -> None:
        if module is not last:
            for tensor in out if isinstance(out, tuple) else (out,):
                if isinstance(tensor, torch.Tensor):
                    outputs.add(id(tensor))

    hooks = [block.register_forward_hook(record) for block in blocks]
    original = checkpointing._moved

    def moved(value: Any, device: torch.device) -> Any:
        if isinstance(value, tuple):
            return tuple(moved(item, device) for item in value)
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in outputs:  # to the host
            outputs.discard(id(value))
            copy = value.clone()
            counter.forget(copy)
            return copy
        if counter.left_out(value):  # back to the device
            return value.clone()
        return value

    checkpointing._moved = moved
    try:
        yield
    finally:
        checkpointing._moved = original
        for hook in hooks:
            hook.remove()
