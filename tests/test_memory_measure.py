"""The measuring side of the planner's check (``tests/memory_measure.py``) on its own: each memory
flag moves the count the way it moves a GPU's, swap and fp8 by exactly the bytes they keep off
the device, and the same row counts the same bytes twice.

The tiny models' rows show a flag's effect only at sizes where it reaches the peak: with
checkpointing the peak of a small step is the optimizer's (gradients, moments and a list-wide
temporary), so the teacher's float32 prediction (prior preservation) only shows without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from masktrain import catalog
from masktrain.denoiser import lora
from masktrain.models import get_family, qwen_image, wan
from memory_measure import Measured, Mode, measure

MIB = 2**20
TINY = {"wan": wan.TINY_TRANSFORMER, "qwen_image": qwen_image.TINY_TRANSFORMER}
ARCHES = list(TINY)
TOKENS = 8


def tiny(arch: str, size: int, mode: Mode, layers: int = 2) -> Measured:
    config = {**TINY[arch], "num_layers": layers}
    return measure(arch, config, size, size, 1, replace(mode, rank=4), text_tokens=TOKENS)


def block_linear_bytes(arch: str, layers: int) -> int:
    """The bf16 bytes of one block's Linear weights (what block swap streams), from a meta build."""
    family = get_family(arch)
    block = family.blocks(family.empty_transformer({**TINY[arch], "num_layers": layers}))[0]
    return sum(m.weight.numel() * 2 for m in block.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("arch", ARCHES)
def test_prior_preservation_holds_more_than_masked_only(arch: str) -> None:
    prior = tiny(arch, 128, Mode(checkpointing=False))
    masked = tiny(arch, 128, Mode(checkpointing=False, prior=False))
    assert masked.step_peak < prior.step_peak
    assert (masked.weights, masked.lora, masked.optimizer_state) == (
        prior.weights,
        prior.lora,
        prior.optimizer_state,
    )


@pytest.mark.parametrize("arch", ARCHES)
def test_checkpointing_holds_less_than_keeping_every_activation(arch: str) -> None:
    kept = tiny(arch, 128, Mode(checkpointing=False))
    checkpointed = tiny(arch, 128, Mode())
    assert checkpointed.step_peak < kept.step_peak
    assert checkpointed.weights == kept.weights


@pytest.mark.parametrize("arch", ARCHES)
def test_block_swap_keeps_only_a_ring_of_two_blocks_on_the_device(arch: str) -> None:
    resident = tiny(arch, 64, Mode(), layers=4)
    two = tiny(arch, 64, Mode(swap=2), layers=4)  # both swapped blocks fit the ring
    three = tiny(arch, 64, Mode(swap=3), layers=4)
    assert two.weights == resident.weights
    assert three.weights == resident.weights - block_linear_bytes(arch, 4)
    # the swapped blocks' host masters never enter the step's count
    assert resident.step_peak == two.step_peak == three.step_peak


@pytest.mark.parametrize("arch", ARCHES)
def test_activation_offload_leaves_the_block_inputs_out(arch: str) -> None:
    on_device = tiny(arch, 256, Mode(), layers=4)
    offloaded = tiny(arch, 256, Mode(offload=True), layers=4)
    assert offloaded.step_peak < on_device.step_peak
    assert offloaded.weights == on_device.weights


@pytest.mark.parametrize("arch", ARCHES)
def test_fp8_weights_hold_less(arch: str) -> None:
    bf16 = tiny(arch, 64, Mode())
    fp8 = tiny(arch, 64, Mode(fp8=True))
    assert fp8.weights < bf16.weights
    assert fp8.lora == bf16.lora


def test_the_optimizer_state_is_adamws_two_float32_moments() -> None:
    """WAN: every LoRA weight gets a gradient. (Qwen-Image's last block's text branch feeds
    nothing, so its LoRA gets no gradient and AdamW makes no state for it.)"""
    measured = tiny("wan", 64, Mode())
    family = get_family("wan")
    lora_tensors = 2 * len(lora.add_lora(family.empty_transformer(TINY["wan"]), family, rank=4, alpha=4.0))
    # two moments per weight, a float32 step counter per tensor
    assert measured.optimizer_state == 2 * measured.lora + 4 * lora_tensors
    # at the optimizer step: the gradients and the moments at least
    assert measured.step_peak >= measured.lora + measured.optimizer_state
    assert measured.step_peaks[0] <= measured.step_peaks[1] == measured.step_peak


@pytest.mark.parametrize("arch", ARCHES)
def test_the_same_row_counts_the_same_bytes(arch: str) -> None:
    mode = Mode(offload=True)  # the most bookkeeping: host copies and their way back
    first, second = tiny(arch, 128, mode, layers=4), tiny(arch, 128, mode, layers=4)
    assert replace(first, seconds=0.0) == replace(second, seconds=0.0)


def test_a_mode_train_refuses_is_refused() -> None:
    from masktrain.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match="--gradient_checkpointing_cpu_offload needs"):
        tiny("wan", 64, Mode(checkpointing=False, offload=True))


@pytest.mark.slow
def test_wan_1_3b_at_256_squared() -> None:
    """One real-config row (the planner's check runs every mode): its weights are the model's
    bf16 bytes, nothing less and nothing more."""
    config: dict[str, Any] = dict(catalog.WAN.released["wan2.1-1.3b"].config)
    measured = measure("wan", config, 256, 256, 1, Mode())
    empty = get_family("wan").empty_transformer(config)
    bf16_bytes = sum(t.numel() * 2 for t in [*empty.parameters(), *empty.buffers()])
    steps = ", ".join(f"{p / MIB:.1f}" for p in measured.step_peaks)
    print(
        f"\nwan 1.3B 256x256 prior, checkpointing: weights {measured.weights / MIB:.1f} MiB, LoRA "
        f"{measured.lora / MIB:.1f}, step peak {measured.step_peak / MIB:.1f} (per step {steps}; "
        f"optimizer state {measured.optimizer_state / MIB:.1f}), total {measured.total / MIB:.1f} MiB, "
        f"{measured.seconds:.0f} s"
    )
    assert measured.weights == bf16_bytes
    assert measured.step_peak >= measured.lora + measured.optimizer_state
