"""The measured side of the planner's check (issue 22): the bytes that real training steps would
hold on the device, counted on the CPU op by op with ``plan.trace.LiveBytes``.

The run is masktrain's own: a transformer of the given config with random weights, the LoRA from
``denoiser.lora.add_lora``, ``denoiser.experts.place`` (block swap, checkpointing, activation
offload), then per step what ``train.loop._fit`` runs: ``train.step.compute_loss``, backward, the
swap layout restored in a ``finally``, the gradient norm, the run's optimizer
(``train.optim.optimizer_and_schedule``) and its schedule, in bf16 with autocast.

What is counted, and where:

- ``weights``: the frozen tensors on the device, walked after the steps: parameters, buffers and
  tensors the modules keep as plain attributes (Qwen-Image's RoPE tables, which diffusers copies
  to the device on the first forward). With block swap the swapped blocks' host masters count
  only as the ring ``models.block_swap`` holds at most: the two largest blocks' streamed bytes.
- ``lora``: the LoRA's float32 parameters.
- ``step_peak``: the peak of the tensors made during the steps: activations, the teacher's pass,
  autocast's copies, gradients, the optimizer's state (made in step 1; step 2 is the steady
  state). A tensor that only views or updates in place a tensor made before the steps (a
  weight's transpose, a LoRA weight's update) holds nothing new and is not counted.

On the CPU a copy to the device or to the host moves nothing, so two things follow a GPU run by
rule rather than by address:

- activation offload: ``models.checkpointing._moved`` is replaced inside :func:`measure` (and
  only there, by :func:`_offload_as_on_a_gpu`): a checkpointed block's output sent to the host is
  a copy the count leaves out, and a host tensor sent back to the device is a copy it counts;
- the optimizer steps with ``foreach`` (its list-wide temporaries), as torch chooses on CUDA; on
  the CPU it would step tensor by tensor.

The weights' values are a slice of one random pool (memory does not depend on them, and drawing a
normal value for each of 1.3B weights costs as much as the steps); norms are identities and
modulation tables zero so activations stay in range. The model is built on the meta device and
materialised tensor by tensor in bf16 (fp8 layers as ``Fp8Linear`` shells filled by
``models.fp8.quantize``), so no float32 or whole bf16 copy of it ever exists.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masktrain.config import MaskLossSettings, MemorySettings, NetworkSettings, OptimSettings, TrainConfig
from masktrain.data.loader import Batch
from masktrain.denoiser import lora
from masktrain.denoiser.experts import Experts, place
from masktrain.device import precision
from masktrain.models import checkpointing, get_family
from masktrain.models.base import Conditioning, ModelFamily
from masktrain.models.fp8 import Fp8Linear, quantize, replace_module, target_linears
from masktrain.models.placement import is_lora
from masktrain.plan.trace import LiveBytes
from masktrain.train.optim import optimizer_and_schedule
from masktrain.train.step import compute_loss

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Mode:
    """One row's flags."""

    fp8: bool = False
    """--fp8_base --fp8_scaled."""
    swap: int = 0
    """--blocks_to_swap."""
    checkpointing: bool = True
    """--gradient_checkpointing."""
    offload: bool = False
    """--gradient_checkpointing_cpu_offload."""
    prior: bool = True
    """Masked loss with prior preservation (weight 1, --prior_mask_threshold 0.1); False: masked only."""
    rank: int = 16
    """--network_dim (and --network_alpha)."""
    controls: int = 0
    """Qwen-Image-Edit: control images per item, at the target's size."""


@dataclass(frozen=True)
class Measured:
    """Bytes that would be on the device (see the module docstring)."""

    weights: int
    """Frozen weights: resident ones, the swap ring of two blocks, the parts outside the blocks."""
    lora: int
    """LoRA parameters."""
    step_peak: int
    """Peak of the tensors the steps made (gradients and optimizer state included)."""
    step_peaks: tuple[int, ...]
    """The peak of each step, the first one holding no optimizer state until its end."""
    optimizer_state: int
    """The optimizer's state after the steps (part of `step_peak`)."""
    seconds: float
    """Wall time of the whole measurement, the build included."""

    @property
    def total(self) -> int:
        """What the plan's tensors on the device are compared with."""
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
    """Train `steps` steps of a transformer of diffusers `config` on one batch of `width` x
    `height` pixels and `frames` frames (latents at the family's factors; `text_tokens` tokens of
    text) and count what they hold (see the module docstring). A mode train refuses (swap or
    offload without checkpointing) raises its ``TrainConfigError``."""
    started = time.perf_counter()
    gc.collect()  # an earlier measurement's model may still wait in a reference cycle
    family = get_family(arch)
    run = _train_config(arch, mode, steps)
    with torch.random.fork_rng(devices=[]):  # the LoRA's seed leaves the caller's RNG alone
        model = _random_transformer(family, config, mode.fp8)
        torch.manual_seed(run.seed)
        lora.add_lora(model, family, rank=run.network.network_dim, alpha=run.network.network_alpha)
    experts = Experts(model, None, run.boundary, device=CPU)
    place(experts, family, run.memory, run.gradient_checkpointing)
    named = experts.trainable()
    optimizer, scheduler = optimizer_and_schedule(named, run.optim, None, steps)
    for group in optimizer.param_groups:
        group["foreach"] = True  # torch's choice on CUDA (see the module docstring)
    batch = _batch(family, config, width, height, frames, text_tokens, mode.controls)
    on_device = _MadeOnDevice([*_module_tensors(model), *_swap_masters(experts), *_batch_tensors(batch)])
    counter = LiveBytes(counted=on_device)
    offload = (
        _offload_as_on_a_gpu(on_device, family.blocks(model)) if mode.offload else contextlib.nullcontext()
    )
    peaks = []
    try:
        with offload, counter:
            for step in range(steps):
                counter.reset_peak()
                _train_step(run, family, experts, batch, optimizer, scheduler, (step, steps))
                peaks.append(counter.peak)
    finally:  # a tensor a module caches past the steps keeps the counter alive, but not the weights
        on_device.release()
    state = [t for values in optimizer.state.values() for t in values.values() if isinstance(t, torch.Tensor)]
    return Measured(
        weights=_device_weights(model, experts),
        lora=_storage_bytes(param for _, param in named),
        step_peak=max(peaks),
        step_peaks=tuple(peaks),
        optimizer_state=_storage_bytes(state),
        seconds=time.perf_counter() - started,
    )


def _train_step(
    run: TrainConfig,
    family: ModelFamily,
    experts: Experts,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: tuple[int, int],
) -> None:
    """One optimizer step of one batch, in ``train.loop._fit``'s order."""
    weight_dtype, autocast = precision(run.mixed_precision, CPU)
    try:
        result = compute_loss(run, family, experts, batch, 0, CPU, weight_dtype, autocast, progress)
        result.loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    finally:
        experts.mark("after backward")
        experts.restore_layout("after backward")
    float(result.loss.detach())  # the loop logs it: a host sync
    params = [param for group in optimizer.param_groups for param in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, run.optim.max_grad_norm or math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _train_config(arch: str, mode: Mode, steps: int) -> TrainConfig:
    return TrainConfig(
        dataset_config=Path("unused.toml"),
        arch=arch,
        dit="random",
        output_dir=Path("unused"),
        device="cpu",
        mixed_precision="bf16",
        gradient_checkpointing=mode.checkpointing,
        max_train_steps=steps,
        memory=MemorySettings(
            fp8_base=mode.fp8,
            fp8_scaled=mode.fp8,
            blocks_to_swap=mode.swap,
            gradient_checkpointing_cpu_offload=mode.offload,
        ),
        network=NetworkSettings(network_dim=mode.rank, network_alpha=float(mode.rank)),
        optim=OptimSettings(learning_rate=1e-4),
        mask=MaskLossSettings(
            use_mask_loss=True,
            prior_preservation_weight=1.0 if mode.prior else 0.0,
            prior_mask_threshold=0.1 if mode.prior else None,
        ),
    )


# --- the model ------------------------------------------------------------------------------------


def _random_transformer(family: ModelFamily, config: Mapping[str, Any], fp8: bool) -> torch.nn.Module:
    """The transformer of `config` in bf16 (fp8 target layers in fp8 with scales), frozen, filled
    tensor by tensor (see the module docstring)."""
    from accelerate import init_empty_weights

    model_class = type(family.empty_transformer({**config, "num_layers": 1}))  # meta: costs nothing
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) as the constructor makes them
        model: torch.nn.Module = model_class(**config)
    if fp8:
        for name in target_linears(model, family.fp8_targets):
            replace_module(model, name, Fp8Linear.like(model.get_submodule(name), None, torch.bfloat16))
    pool = _pool(max(p.numel() for p in model.parameters()))
    with torch.no_grad():
        for module in model.modules():
            identity = "norm" in type(module).__name__.lower()
            for name, param in list(module.named_parameters(recurse=False)):
                if identity or name == "scale_shift_table":
                    value = torch.full(
                        param.shape, float(identity and name == "weight"), dtype=torch.bfloat16
                    )
                else:
                    value = pool[: param.numel()].view(param.shape).clone()
                if isinstance(module, Fp8Linear) and name == "weight":
                    value, module.scale = quantize(value, "scaled")
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            for name, buffer in list(module.named_buffers(recurse=False)):
                # as loading.to_device casts a bf16 model's buffers; fp8 scales stay float32
                if buffer is not None and buffer.is_floating_point() and name != "scale":
                    module._buffers[name] = buffer.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def _pool(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, generator=generator, dtype=torch.bfloat16) * 0.02


def _batch(
    family: ModelFamily,
    config: Mapping[str, Any],
    width: int,
    height: int,
    frames: int,
    tokens: int,
    controls: int = 0,
) -> Batch:
    """One item as the cache stores it: float32 latents, mask weights in [0, 1] (a subject at 1
    inside a body at 0.5 on a background at 0), a bf16 text embedding."""
    inputs = family.denoiser_inputs(config)
    spatial, temporal = family.spec.spatial_factor, family.spec.temporal_factor
    grid = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, inputs.latent_channels, *grid, generator=generator)
    mask = torch.zeros(1, 1, *grid)
    h, w = grid[1], grid[2]
    mask[..., h // 4 : h * 3 // 4, w // 4 : w * 3 // 4] = 0.5
    mask[..., h // 3 : h // 2, w // 3 : w * 2 // 3] = 1.0
    text = torch.randn(tokens, inputs.text_dim, generator=generator).to(torch.bfloat16)
    condition = None
    if inputs.conditioning_channels:  # WAN image-to-video: what its cache holds (plan.run.CLIP_TOKENS)
        image_latents = torch.randn(1, inputs.conditioning_channels, *grid, generator=generator)
        embeds = None
        if inputs.image_dim is not None:
            pairs = config.get("pos_embed_seq_len")
            images, tokens_each = (1, 257) if pairs is None else (2, int(pairs) // 2)
            embeds = torch.randn(1, images, tokens_each, inputs.image_dim, generator=generator)
        condition = Conditioning(image_latents=image_latents, image_embeds=embeds)
    if controls:  # Qwen-Image-Edit: clean control latents at the target's size
        shape = (1, inputs.latent_channels, 1, *grid[1:])
        condition = Conditioning(
            control_latents=tuple(torch.randn(shape, generator=generator) for _ in range(controls))
        )
    return Batch(index=0, latents=latents, mask_weights=mask, text=[text], items=[], condition=condition)


# --- what is counted ------------------------------------------------------------------------------


class _MadeOnDevice:
    """``LiveBytes``'s `counted`: a tensor counts unless its storage existed before the steps (a
    view or in-place update of a weight, a LoRA weight, the batch) or is a copy on the host."""

    def __init__(self, before: Iterable[torch.Tensor]) -> None:
        self._before = list(before)  # kept alive, so no new storage can take one's address
        self._keys = {_key(t) for t in self._before}
        self._host: set[int] = set()  # storages of the host copies alive now
        self._copying = False

    def __call__(self, tensor: torch.Tensor) -> bool:
        key = _key(tensor)
        return not self._copying and key not in self._keys and key not in self._host

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` that counts as host memory while its storage lives."""
        self._copying = True
        try:
            copy = tensor.clone()
        finally:
            self._copying = False
        key = _key(copy)
        self._host.add(key)
        weakref.finalize(copy, self._host.discard, key)  # a later storage may take its address
        return copy

    def on_host(self, tensor: torch.Tensor) -> bool:
        return _key(tensor) in self._host

    def release(self) -> None:
        self._before, self._keys = [], set()


def _key(tensor: torch.Tensor) -> int:
    key: int = tensor.untyped_storage()._cdata
    return key


def _module_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `model`, and the tensors its modules keep as attributes."""
    return [*model.parameters(), *model.buffers(), *_attribute_tensors(model)]


def _attribute_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


def _swap_masters(experts: Experts) -> list[torch.Tensor]:
    return [slot.host for swap in experts.swaps.values() for slot in swap.swappable_slots()]


def _batch_tensors(batch: Batch) -> list[torch.Tensor]:
    condition = [] if batch.condition is None else batch.condition.tensors()
    masks = [] if batch.mask_weights is None else [batch.mask_weights]
    return [batch.latents, *batch.text, *condition, *masks]


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of `tensors`."""
    return sum({_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def _device_weights(model: torch.nn.Module, experts: Experts) -> int:
    """The frozen tensors' bytes, the swapped blocks' beyond the ring of two left out."""
    frozen = [t for n, t in model.named_parameters() if not is_lora(n)]
    total = _storage_bytes([*frozen, *model.buffers(), *_attribute_tensors(model)])
    for swap in experts.swaps.values():
        streamed = sorted(
            (_storage_bytes(s.host for s in slots) for slots in swap.slots.values()), reverse=True
        )
        total -= sum(streamed[2:])  # on the host; the two largest are the ring on the device
    return total


@contextlib.contextmanager
def _offload_as_on_a_gpu(on_device: _MadeOnDevice, blocks: torch.nn.ModuleList) -> Iterator[None]:
    """``checkpointing._moved`` as a GPU run does it (see the module docstring). The blocks' outputs
    are recorded by forward hooks while grad is on (the teacher's no-grad pass is never
    checkpointed, so its outputs never move); those of every block but the last go to the host."""
    outputs: dict[int, torch.Tensor] = {}  # held until moved, so an id is never reused meanwhile
    last = blocks[len(blocks) - 1]

    def record(module: torch.nn.Module, args: Any, out: Any) -> None:
        if module is not last and torch.is_grad_enabled():
            for tensor in out if isinstance(out, tuple) else (out,):
                if isinstance(tensor, torch.Tensor):
                    outputs[id(tensor)] = tensor

    def moved(value: Any, device: torch.device) -> Any:
        if isinstance(value, tuple):
            return tuple(moved(item, device) for item in value)
        if not isinstance(value, torch.Tensor):
            return value
        if outputs.pop(id(value), None) is value:  # a block's output to the host
            return on_device.to_host(value)
        if on_device.on_host(value):  # a host tensor back to the device
            return value.clone()
        return value

    hooks = [block.register_forward_hook(record) for block in blocks]
    original = checkpointing._moved
    checkpointing._moved = moved
    try:
        yield
    finally:
        checkpointing._moved = original
        for hook in hooks:
            hook.remove()
        outputs.clear()
