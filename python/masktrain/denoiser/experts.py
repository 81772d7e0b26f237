"""The transformer(s) being trained or sampled, with the LoRA on them: one denoiser, or WAN 2.2
A14B's two experts (high-noise and low-noise) sharing one LoRA, or each with its own
(``--lora_per_expert``: :meth:`Experts.loras`); and where their weights live (:func:`place`, for
training and sampling alike; ``train.build`` builds them for a run, :func:`load_for_sampling` with
saved LoRAs for ``masktrain sample``).

With block swap or ``--offload_inactive_dit`` each transformer is read into host memory, the LoRA
is added there, and then everything but the swapped blocks' Linear weights (block swap) or the
idle expert's frozen weights (``--offload_inactive_dit``) moves to the device. The expert a pass
needs is brought in before it runs; the LoRA (trained) never moves.

Transformers load through :func:`load_transformers`: checked against what the run feeds them
(``models.fit``: the cache, the sampling VAE and text encoder) from their headers before any
loads and from their configs after, and logged when a depth is none of the released models' of its
width.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from masktrain.config.memory import ATTENTION_BACKENDS, MemorySettings
from masktrain.denoiser import lora
from masktrain.denoiser.lora_file import EXPERT_LORAS
from masktrain.device import indexed
from masktrain.errors import FlagError
from masktrain.models import checkpointing, fit
from masktrain.models.base import Conditioning, ModelFamily, TextBatch
from masktrain.models.block_swap import BlockSwap
from masktrain.models.placement import Slot, frozen_slots, is_lora, move_module

log = logging.getLogger(__name__)


@dataclass
class Experts:
    """The transformer(s) being trained. WAN 2.2 A14B has two experts that share one LoRA, or each
    have their own (`lora_per_expert`): the high-noise one takes sigmas at or above the boundary."""

    low: torch.nn.Module
    high: torch.nn.Module | None
    boundary: float
    lora_per_expert: bool = False
    """Each expert has a LoRA of its own (``--lora_per_expert``), not one shared by both."""
    swaps: dict[int, BlockSwap] = field(default_factory=dict)
    """Block swap schedule per transformer (by id)."""
    idle_slots: dict[int, list[Slot]] | None = None
    """--offload_inactive_dit: each expert's frozen tensors that leave the device when it is idle."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def modules(self) -> list[torch.nn.Module]:
        return [self.low] if self.high is None else [self.low, self.high]

    def _run(
        self,
        family: ModelFamily,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None,
    ) -> torch.Tensor:
        self._activate(model)
        return family.predict(model, noisy, sigmas, text, condition)

    def _activate(self, model: torch.nn.Module) -> None:
        """--offload_inactive_dit: `model`'s frozen weights on the device, the other expert's on the host."""
        if self.idle_slots is None:
            return
        for other in self.modules():
            if other is not model:
                for slot in self.idle_slots[id(other)]:
                    slot.to_host()
        for slot in self.idle_slots[id(model)]:
            if slot.current().device != self.device:
                slot.to_device(self.device)

    def restore_layout(self, event: str) -> None:
        """Block swap: every transformer back to its between-steps layout (see ``block_swap``)."""
        for swap in self.swaps.values():
            swap.restore(event)

    def mark(self, event: str) -> None:
        for swap in self.swaps.values():
            swap.mark(event)

    def predict(
        self,
        family: ModelFamily,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        text: TextBatch,
        condition: Conditioning | None = None,
    ) -> torch.Tensor:
        if self.high is None:
            return self._run(family, self.low, noisy, sigmas, text, condition)
        high = sigmas >= self.boundary
        if bool(high.all()) or not bool(high.any()):
            model = self.high if bool(high.all()) else self.low
            return self._run(family, model, noisy, sigmas, text, condition)
        out = torch.empty_like(noisy)
        for model, rows in ((self.high, high), (self.low, ~high)):
            out[rows] = self._run(
                family,
                model,
                noisy[rows],
                sigmas[rows],
                TextBatch(text.hidden[rows], None if text.mask is None else text.mask[rows]),
                None if condition is None else condition.rows(rows),
            ).to(out.dtype)
        return out

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for model in self.modules():
                stack.enter_context(lora.adapters_disabled(model))
            yield

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """For a diffusers pipeline that calls the transformers itself: eval mode (no LoRA dropout),
        each expert's frozen weights brought in before its forward (``--offload_inactive_dit``),
        and block swap's layout restored after. Under no_grad block swap's hooks run forward-only:
        every swapped block goes back to the host right after it runs."""
        handles = [
            model.register_forward_pre_hook(lambda module, args: self._activate(module))
            for model in self.modules()
        ]
        training = [model.training for model in self.modules()]
        try:
            for model in self.modules():
                model.eval()
            yield
        finally:
            for handle in handles:
                handle.remove()
            for model, was_training in zip(self.modules(), training, strict=True):
                model.train(was_training)
            self.restore_layout("after sampling")

    def loras(self) -> list[tuple[str, torch.nn.Module]]:
        """Each LoRA, by its name and the transformer that holds it: ``""`` and `low` for the one
        LoRA (shared by both experts), or with `lora_per_expert` each expert's (``high_noise``,
        ``low_noise``: :data:`~masktrain.denoiser.lora_file.EXPERT_LORAS`)."""
        if self.lora_per_expert and self.high is not None:
            return list(zip(EXPERT_LORAS, (self.high, self.low), strict=True))
        return [("", self.low)]

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA parameters, once each, under their module names; each expert's own LoRA's under
        ``high_noise.`` / ``low_noise.`` (:func:`lora_of` reads it back)."""
        params = []
        for expert, model in self.loras():
            prefix = f"{expert}." if expert else ""
            params += [(prefix + name, p) for name, p in model.named_parameters() if p.requires_grad]
        return params

    def samples(self, sigmas: torch.Tensor) -> dict[str, int]:
        """How many of `sigmas` each expert takes, by name (``high_noise``, ``low_noise``, as its
        own LoRA is named), as :meth:`predict` splits them; {} with one transformer."""
        if self.high is None:
            return {}
        high = int((sigmas >= self.boundary).sum())
        return dict(zip(EXPERT_LORAS, (high, sigmas.numel() - high), strict=True))


def lora_of(name: str) -> str:
    """The LoRA a parameter of :meth:`Experts.trainable` belongs to: its expert's name, or ``""``
    (the one LoRA)."""
    head = name.partition(".")[0]
    return head if head in EXPERT_LORAS else ""


def place(
    experts: Experts, family: ModelFamily, memory: MemorySettings, gradient_checkpointing: bool
) -> None:
    """Put the weights where ``memory`` says (block swap, the idle expert on the host, the rest and
    the LoRA on ``experts.device``); gradient checkpointing and the attention backend."""
    device = experts.device
    backend = ATTENTION_BACKENDS[memory.attention][0]
    pin = memory.use_pinned_memory_for_block_swap
    for label, model in zip(("--dit", "--dit_high_noise"), experts.modules(), strict=False):
        blocks = family.blocks(model)
        swap = None
        if memory.blocks_to_swap:
            swap = BlockSwap(blocks, memory.blocks_to_swap, device, pin, label)
            experts.swaps[id(model)] = swap
        streamed = swap.swappable_slots() if swap is not None else []
        if memory.offload_inactive_dit:
            if experts.idle_slots is None:
                experts.idle_slots = {}
            experts.idle_slots[id(model)] = frozen_slots(
                model, linear_weights_only=False, pin=pin, skip=streamed
            )
        if memory.on_host:  # the LoRA and (without --offload_inactive_dit) the resident weights
            move_module(model, device, skip=streamed + (experts.idle_slots or {}).get(id(model), []))
        if gradient_checkpointing:
            checkpointing.enable(
                model,
                blocks,
                device,
                offload_activations=memory.gradient_checkpointing_cpu_offload,
                swap=swap,
            )
        if backend != "native":
            set_backend: Callable[[str], None] = getattr(model, "set_attention_backend")  # noqa: B009  # diffusers ModelMixin
            set_backend(backend)
        model.train()
        log.info("%s: %s", label, _describe(model, memory.fp8_mode, swap))
    if experts.swaps:
        experts.mark("placed")


def load_transformers(
    family: ModelFamily,
    named: Sequence[tuple[str, str]],
    device: torch.device,
    dtype: torch.dtype,
    memory: MemorySettings,
    feeds: Sequence[fit.Feed] = (),
) -> list[torch.nn.Module]:
    """The transformers of `named` (flag, value), fp8 as `memory` says, on `device`; each checked
    against `feeds` from its headers before any loads, and from its config once it has."""
    for flag, spec in named:
        fit.check_before_loading(family, spec, flag, feeds)
    models = []
    for flag, spec in named:
        model = family.load_transformer(spec, flag, device, dtype, fp8=memory.fp8_mode)
        fit.check_loaded(family, model, flag, spec, feeds)
        depth = fit.unreleased_depth(family.spec, model)
        if depth is not None:
            log.warning("%s %s %s", flag, spec, depth)
        models.append(model)
    return models


def transformer_flags(dit: str, dit_high_noise: str | None) -> list[tuple[str, str]]:
    """(flag, value) of the transformer(s) to load."""
    return [("--dit", dit)] + ([] if dit_high_noise is None else [("--dit_high_noise", dit_high_noise)])


def load_for_sampling(
    family: ModelFamily,
    dit: str,
    dit_high_noise: str | None,
    boundary: float,
    lora_file: Path | None,
    memory: MemorySettings,
    device: torch.device,
    dtype: torch.dtype,
    feeds: Sequence[fit.Feed] = (),
    lora_high_noise: Path | None = None,
) -> Experts:
    """The transformer(s) with a saved LoRA (``masktrain sample``; none: the base model), placed as
    for training (fp8, block swap), for no-grad sampling; each must fit `feeds` (the sampling VAE
    and text encoder: ``models.fit.sampling_feed``). `lora_file` goes on every expert, unless the
    high-noise one has its own, `lora_high_noise` (``--lora_per_expert``'s pair)."""
    device = indexed(device)
    check_backend(memory, device)
    load_device = torch.device("cpu") if memory.on_host else device
    low, *high = load_transformers(
        family, transformer_flags(dit, dit_high_noise), load_device, dtype, memory, feeds
    )
    experts = Experts(
        low, high[0] if high else None, boundary, lora_per_expert=lora_high_noise is not None, device=device
    )
    for model in experts.modules():
        path = lora_high_noise if model is experts.high and lora_high_noise is not None else lora_file
        if path is not None:
            lora.load_lora_into(model, path, family)
    place(experts, family, memory, gradient_checkpointing=False)
    return experts


def check_backend(memory: MemorySettings, device: torch.device) -> None:
    if ATTENTION_BACKENDS[memory.attention][0] != "native" and device.type != "cuda":  # before loading
        raise FlagError(f"--{memory.attention} needs a CUDA device; on {device.type} use --sdpa")


def _describe(model: torch.nn.Module, fp8: str | None, swap: BlockSwap | None) -> str:
    """What the user asked for, in numbers: the frozen weights' size and where they live."""
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not is_lora(n))
    words = f"{_size(total)} of frozen weights"
    if fp8 is not None:
        words += f", block Linear weights in fp8 ({'block-wise scales' if fp8 == 'scaled' else 'plain e4m3'})"
    if swap is not None:
        streamed = sum(s.host.numel() * s.host.element_size() for s in swap.swappable_slots())
        words += (
            f"; {swap.count - swap.first_swapped} of {swap.count} blocks swapped "
            f"({_size(streamed)} streamed from host memory)"
        )
    return words


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"
