"""The memory a run needs, component by component, on the device and in host memory, and the
smallest ``--blocks_to_swap`` that fits a card.

Each component is counted from what the run would hold, never from a table:

- frozen weights, from the transformer's config built on the meta device (``plan.holdings``):
  the resident blocks, the swapped blocks' ring of two, the parts outside the blocks;
- the LoRA's parameters and gradients (float32, as ``denoiser.lora`` makes them) and the
  optimizer's state, per ``--optimizer_type`` (:data:`OPTIMIZER_STATE`); twice with
  ``--lora_per_expert`` (each WAN 2.2 expert's LoRA, and both have gradients when a step's batch
  spans the boundary), the EMA teacher's copy likewise;
- the step's tensors, from the step run on the meta device (``plan.activations``): activations
  with or without checkpointing and offload, the teacher's pass, the loss;
- the attention kernel's workspace, which no op returns (:data:`ATTENTION_WORKSPACE`);
- the CUDA context and the allocator's margin: stated constants (:data:`CUDA_CONTEXT`,
  :data:`ALLOCATOR_MARGIN`), which the CPU check leaves out.

Host memory: the swapped blocks' masters (page-locked with ``--use_pinned_memory_for_block_swap``),
the idle WAN 2.2 expert with ``--offload_inactive_dit``, the offloaded activations, and the peak
while loading (the model read into host memory first when it is placed afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from masktrain.config.memory import Fp8Mode
from masktrain.models.base import ModelFamily
from masktrain.plan.activations import StepMemory, StepShape, trace_step
from masktrain.plan.holdings import Holdings, holdings, meta_transformer

GIB = 2**30
CUDA_CONTEXT = int(0.6 * GIB)
"""The CUDA context, cuBLAS and cuDNN handles of a torch process: memory the card loses that no
tensor holds (0.4 to 0.8 GiB on current drivers; the plan takes 0.6)."""
ALLOCATOR_MARGIN = 0.07
"""What the caching allocator reserves beyond the peak of live tensors (rounding, fragmentation),
as a fraction of that peak."""
H2D_BANDWIDTH = {True: 20.0, False: 10.0}
"""Host-to-device copy rates assumed for the swap traffic, GB/s: page-locked (PCIe 4.0 x16 in
practice) and pageable memory."""
OPTIMIZER_STATE = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 0.0, "prodigy": 16.0}
"""Bytes of optimizer state per LoRA parameter: AdamW's two float32 moments; bitsandbytes'
8-bit moments; Prodigy's two moments, its copy of the starting weights and its sum. Adafactor's
factored second moment is a row and a column per matrix (:func:`_adafactor_bytes`)."""
ATTENTION_WORKSPACE = {"sdpa": 0, "flash_attn": 0, "sage_attn": 0, "xformers": 0}
"""Workspace an attention kernel allocates and frees within one call, beyond what it returns and
saves: the fused kernels (flash, memory-efficient, sage, xformers) tile the token x token matrix
in on-chip memory; what they keep (output, log-sum-exp) is in the step's count."""


@dataclass(frozen=True)
class PlanSettings:
    """The flags of ``train`` that change memory."""

    dtype: torch.dtype = torch.bfloat16
    fp8: Fp8Mode | None = None
    blocks_to_swap: int = 0
    pinned: bool = False
    checkpointing: bool = True
    offload_activations: bool = False
    offload_inactive_dit: bool = False
    attention: str = "sdpa"
    optimizer: str = "adamw"
    rank: int = 16
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    prior: bool = True
    ema_teacher: bool = False
    experts: int = 1
    """Transformers the run loads (2 for WAN 2.2 A14B); they share one LoRA unless `lora_per_expert`."""
    lora_per_expert: bool = False
    """With two experts: a LoRA each (``--lora_per_expert``), not one shared."""

    @property
    def loras(self) -> int:
        """The LoRAs the run trains."""
        return 2 if self.lora_per_expert and self.experts > 1 else 1


@dataclass(frozen=True)
class Component:
    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """One run's memory at one ``--blocks_to_swap``."""

    settings: PlanSettings
    components: tuple[Component, ...]
    blocks: int
    swap_traffic: int
    """Bytes copied from host to device per optimizer step by block swap."""

    @property
    def tensors(self) -> int:
        """Peak bytes of live tensors on the device (what the CPU check compares)."""
        return sum(c.device for c in self.components if c.name not in _OVERHEAD)

    @property
    def device_peak(self) -> int:
        """What the card must have: tensors, workspace, margin and context."""
        return sum(c.device for c in self.components)

    @property
    def host_peak(self) -> int:
        """Host memory at its most: while loading, or while training (not both: what is loaded
        becomes the swapped blocks' masters)."""
        training = sum(c.host for c in self.components if c.name != "loading")
        loading = sum(c.host for c in self.components if c.name == "loading")
        return max(training, loading)

    def swap_seconds(self) -> float:
        return self.swap_traffic / (H2D_BANDWIDTH[self.settings.pinned] * 1e9)


_OVERHEAD = ("attention workspace", "allocator margin", "CUDA context")


@dataclass
class Planner:
    """The parts of a plan that do not depend on ``--blocks_to_swap``, computed once (the meta
    step is the slow part: seconds), and :meth:`plan` for any swap count."""

    family: ModelFamily
    config: Mapping[str, Any]
    shape: StepShape
    settings: PlanSettings
    holdings: Holdings = field(init=False)
    step: StepMemory = field(init=False)
    _lora_shapes: list[tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        model = meta_transformer(
            self.family,
            self.config,
            s.dtype,
            s.fp8,
            rank=s.rank,
            include=list(s.include) if s.include else None,
            exclude=list(s.exclude) if s.exclude else None,
        )
        self.holdings = holdings(self.family, model)
        self._lora_shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        self.step = trace_step(
            self.family,
            model,
            self.shape,
            dtype=s.dtype,
            prior=s.prior,
            checkpointing=s.checkpointing,
            offload=s.offload_activations and s.checkpointing,
        )

    @property
    def blocks(self) -> int:
        return len(self.holdings.blocks)

    def plan(self, blocks_to_swap: int | None = None) -> Plan:
        s = self.settings
        swap = s.blocks_to_swap if blocks_to_swap is None else blocks_to_swap
        h = self.holdings
        parameters = h.lora_parameters * s.loras
        lora = parameters * 4
        resident = h.on_device(swap)
        idle_experts = s.experts - 1
        expert_note = ""
        if idle_experts and s.offload_inactive_dit:
            expert_host, expert_device = h.frozen * idle_experts, 0
            expert_note = "the idle expert waits in host memory (--offload_inactive_dit)"
        else:
            expert_host, expert_device = 0, h.on_device(swap) * idle_experts
            expert_note = "both experts on the device" if idle_experts else ""
        optimizer = _optimizer_bytes(s.optimizer, parameters, self._lora_shapes * s.loras)
        tensors = (
            resident + expert_device + lora * 2 + optimizer + (lora if s.ema_teacher else 0) + self.step.peak
        )
        workspace = ATTENTION_WORKSPACE.get(s.attention, 0)
        streamed = h.streamed(swap) * (1 + idle_experts if not s.offload_inactive_dit else 1)
        passes = (2 if s.prior else 1) + (1 if s.checkpointing else 0)  # forward(s), then recomputation
        components = [
            Component(
                "frozen weights",
                resident,
                streamed,
                _weights_note(h, swap),
            ),
            Component("second expert", expert_device, expert_host, expert_note),
            Component(
                "LoRA parameters + gradients",
                lora * 2,
                0,
                f"{parameters:,} float32 parameters" + (", a LoRA per expert" if s.loras > 1 else ""),
            ),
            Component("optimizer state", optimizer, 0, s.optimizer),
            Component("EMA teacher", lora if s.ema_teacher else 0, 0, "a float32 copy of the LoRA"),
            Component(
                "activations, loss, teacher",
                self.step.peak,
                self.step.offloaded,
                _activation_note(s, self.step),
            ),
            Component("attention workspace", workspace, 0, s.attention),
            Component(
                "allocator margin",
                int(tensors * ALLOCATOR_MARGIN),
                0,
                f"{ALLOCATOR_MARGIN:.0%} of the tensors",
            ),
            Component("CUDA context", CUDA_CONTEXT, 0, "stated constant"),
            Component(
                "loading", 0, _loading_host(h, swap > 0 or s.offload_inactive_dit), "peak while reading"
            ),
        ]
        rows = tuple(c for c in components if c.device or c.host)
        return Plan(replace(s, blocks_to_swap=swap), rows, self.blocks, h.streamed(swap) * passes)

    def smallest_swap(self, budget: int) -> Plan | None:
        """The plan with the fewest swapped blocks whose device peak fits `budget` bytes (None when
        none does; without checkpointing only 0 is possible, as swap needs it)."""
        most = self.blocks - 1 if self.settings.checkpointing else 0
        for swap in range(most + 1):
            plan = self.plan(swap)
            if plan.device_peak <= budget:
                return plan
        return None


def _optimizer_bytes(optimizer: str, parameters: int, shapes: list[tuple[int, ...]]) -> int:
    if optimizer == "adafactor":
        return sum(_adafactor_bytes(shape) for shape in shapes)
    return int(parameters * OPTIMIZER_STATE[optimizer])


def _adafactor_bytes(shape: tuple[int, ...]) -> int:
    """transformers' Adafactor (no first moment by default): a row and a column of float32 per
    matrix, the whole second moment for a vector."""
    if len(shape) >= 2:
        return 4 * (shape[-1] + shape[-2])
    return 4 * (shape[0] if shape else 1)


def _weights_note(h: Holdings, swap: int) -> str:
    dtypes = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in sorted(h.by_dtype.items()))
    if swap == 0:
        return dtypes
    return f"{dtypes}; {swap} of {len(h.blocks)} blocks swapped, a ring of two on the device"


def _activation_note(s: PlanSettings, step: StepMemory) -> str:
    words = "checkpointed" if s.checkpointing else "no checkpointing: every block's activations kept"
    if s.checkpointing and s.offload_activations:
        words += ", block inputs in host memory"
    if s.prior:
        words += f"; the teacher's no-grad pass peaks at {step.teacher / GIB:.2f} GiB"
    return words


def _loading_host(h: Holdings, on_host: bool) -> int:
    """Host memory while loading: the whole model when it is read into host memory and placed
    after (block swap, the idle expert), else one tensor at a time (the largest block's)."""
    largest = max((block.total for block in h.blocks), default=0)
    return h.frozen + largest if on_host else largest
