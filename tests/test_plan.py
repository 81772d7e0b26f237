"""The planner's arithmetic (issue 22): the components of a small WAN transformer against bytes
counted by hand from its config, and the smallest block swap that fits a budget."""

from __future__ import annotations

import pytest
import torch

from masktrain.models import get_family, wan
from masktrain.plan.activations import StepShape
from masktrain.plan.estimate import ALLOCATOR_MARGIN, CUDA_CONTEXT, Planner, PlanSettings
from masktrain.plan.holdings import holdings, meta_transformer

WAN = get_family("wan")
DIM, FFN, RANK = 24, 32, 4  # the tiny WAN transformer: 2 heads x 12, ffn 32
# Per block, by hand: 8 attention Linears (dim x dim) and the two FFN Linears stream; their biases,
# the q/k RMSNorms of both attentions, norm2's weight and bias and the (1, 6, dim) table stay.
STREAMED = 8 * DIM * DIM + 2 * DIM * FFN
KEPT = 8 * DIM + (FFN + DIM) + 4 * DIM + 2 * DIM + 6 * DIM
LORA = 8 * (RANK * DIM + DIM * RANK) + (RANK * DIM + FFN * RANK) + (RANK * FFN + DIM * RANK)


def tiny(layers: int) -> dict[str, object]:
    return wan.TINY_TRANSFORMER | {"num_layers": layers}


@pytest.mark.parametrize(("fp8", "weight_bytes"), [(None, 2), ("e4m3", 1)])
def test_a_blocks_bytes_are_its_linear_weights_and_the_rest(fp8: str | None, weight_bytes: int) -> None:
    model = meta_transformer(WAN, tiny(2), torch.bfloat16, fp8, rank=RANK)  # type: ignore[arg-type]
    held = holdings(WAN, model)
    assert [(b.streamed, b.kept) for b in held.blocks] == [(STREAMED * weight_bytes, KEPT * 2)] * 2
    assert held.lora_parameters == 2 * LORA
    assert held.frozen == sum(held.by_dtype.values())


def test_block_swap_keeps_a_ring_of_two_on_the_device() -> None:
    held = holdings(WAN, meta_transformer(WAN, tiny(4), torch.bfloat16, None, rank=RANK))
    block = 2 * STREAMED
    assert held.on_device(0) == held.frozen
    assert held.on_device(3) == held.frozen - 3 * block + 2 * block
    assert held.streamed(3) == 3 * block


def test_the_plan_adds_lora_gradients_optimizer_and_overheads() -> None:
    planner = Planner(WAN, tiny(2), StepShape(16, 1, 4, 4, 8, 32), PlanSettings(rank=RANK))
    plan = planner.plan()
    rows = {c.name: c for c in plan.components}
    lora_bytes = 4 * 2 * LORA
    assert rows["LoRA parameters + gradients"].device == 2 * lora_bytes
    assert rows["optimizer state"].device == 2 * lora_bytes  # AdamW: two float32 moments
    assert rows["CUDA context"].device == CUDA_CONTEXT
    tensors = plan.tensors
    assert tensors == planner.holdings.frozen + 4 * lora_bytes + planner.step.peak
    assert rows["allocator margin"].device == int(tensors * ALLOCATOR_MARGIN)
    adafactor = Planner(
        WAN, tiny(2), StepShape(16, 1, 4, 4, 8, 32), PlanSettings(rank=RANK, optimizer="adafactor")
    )
    factored = {c.name: c for c in adafactor.plan().components}["optimizer state"].device
    assert 0 < factored < lora_bytes / 2  # a row and a column per matrix


def test_the_smallest_swap_that_fits_a_budget() -> None:
    planner = Planner(WAN, tiny(6), StepShape(16, 1, 4, 4, 8, 32), PlanSettings(rank=RANK))
    peaks = [planner.plan(swap).device_peak for swap in range(6)]
    block = 2 * STREAMED
    # a ring of two swapped blocks is on the device: swapping 1 or 2 saves nothing, each more one block
    assert [peaks[0] - peak for peak in peaks] == pytest.approx(
        [0, 0, 0, block, 2 * block, 3 * block], rel=0.08
    )
    for budget in (peaks[0], peaks[3], peaks[4] + 1, peaks[5]):
        chosen = planner.smallest_swap(budget)
        assert chosen is not None
        assert chosen.settings.blocks_to_swap == min(
            swap for swap, peak in enumerate(peaks) if peak <= budget
        )
    assert planner.smallest_swap(peaks[5] - 1) is None


def test_without_checkpointing_only_no_swap_is_possible() -> None:
    planner = Planner(
        WAN, tiny(4), StepShape(16, 1, 4, 4, 8, 32), PlanSettings(rank=RANK, checkpointing=False)
    )
    assert planner.smallest_swap(planner.plan(3).device_peak) is None


def test_live_bytes_counts_new_storage_once_and_not_views_of_older_tensors() -> None:
    from masktrain.plan.trace import LiveBytes

    weight = torch.zeros(256, 256)  # 256 KiB, made before the mode
    counter = LiveBytes()
    with counter:
        view = weight.t()  # autograd keeps such views of the weights: no new memory
        weight.add_(1.0)  # an in-place update (the optimizer's): none either
        made = torch.ones(256, 256)
        same = made.view(-1)  # a view of counted memory: the same storage, once
    assert counter.now == counter.peak == 256 * 256 * 4
    del view, made, same
    assert counter.now == 0


def test_a_freed_forgotten_storage_does_not_hide_the_next_one_at_its_address() -> None:
    from masktrain.plan.trace import LiveBytes

    counter = LiveBytes()
    with counter:
        for _ in range(20):  # the allocator hands the freed address back
            gone = torch.ones(1024)
            counter.forget(gone)
            del gone
            kept = torch.ones(1024)
            assert counter.now == 4096
            del kept
    assert counter.now == 0
