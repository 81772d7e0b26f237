"""The plan before the model loads (``masktrain plan`` for this run): its summary is logged,
``--blocks_to_swap auto`` becomes a count, and a run that cannot fit stops before any weight is
read.

The budget is ``--vram``, else the CUDA card's total; with neither (a CPU run) there is no fit
check and ``auto`` is 0. Only ``auto`` stops a run that fits at no swap count (a settings error,
exit 2, naming the largest bucket, the most blocks that can be swapped and the flags that would
make it fit); an explicit ``--blocks_to_swap N`` that does not fit warns with the fewest that
would. A plan that cannot be made warns and never stops a run, unless ``auto`` needs it. On CUDA,
less free memory than the plan needs (another process holds part of the card) is a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from masktrain.config.train import TrainConfig
from masktrain.data.cached_items import CachedItem
from masktrain.errors import MaskTrainError, TrainConfigError
from masktrain.plan import largest_bucket
from masktrain.plan.estimate import GIB, Plan, Planner
from masktrain.plan.run import card_budget, planner_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryFit:
    config: TrainConfig
    """The run's config with ``--blocks_to_swap`` resolved."""
    plan: Plan | None
    """The plan it trains with (None when none could be made)."""
    fitting_swap: int | None
    """The fewest blocks to swap that fit the card (None without a budget or a fit)."""


def fit_to_card(config: TrainConfig, items: Sequence[CachedItem]) -> MemoryFit:
    """The plan of the run before it loads (see the module docstring)."""
    memory = config.memory
    budget = card_budget(memory.vram)
    requested = 0 if memory.swap_auto else memory.blocks_to_swap
    try:
        bucket = largest_bucket.from_cached_items(items, config.arch)
        planner, _ = planner_for(config, bucket)
        plan = planner.plan(requested)
        chosen = None if budget is None else planner.smallest_swap(budget)
    except (MaskTrainError, RuntimeError, ValueError, KeyError, TypeError) as error:
        if memory.swap_auto and budget is not None:
            raise TrainConfigError(
                f"--blocks_to_swap auto needs a memory plan, and none could be made ({error})"
            ) from None
        log.warning("no memory plan for this run (%s); training goes on without a fit check", error)
        return MemoryFit(_with_swap(config, memory.blocks_to_swap), None, None)
    if budget is None:
        if memory.swap_auto:
            log.info("--blocks_to_swap auto: no --vram and no CUDA card, so 0 blocks are swapped")
        _log_summary(plan, bucket, None)
        return MemoryFit(_with_swap(config, plan.settings.blocks_to_swap), plan, None)
    if memory.swap_auto:
        if chosen is None:
            raise TrainConfigError(_does_not_fit(planner, bucket, budget))
        _log_summary(chosen, bucket, budget)
        warn_if_card_busy(chosen)
        swap = chosen.settings.blocks_to_swap
        return MemoryFit(_with_swap(config, swap), chosen, swap)
    _log_summary(plan, bucket, budget)
    if plan.device_peak > budget:
        fewest = (
            "no --blocks_to_swap fits"
            if chosen is None
            else f"--blocks_to_swap {chosen.settings.blocks_to_swap} would"
        )
        log.warning(
            "the plan needs %.2f GiB with --blocks_to_swap %d, more than the %.2f GiB card: %s "
            "(masktrain plan shows the components)",
            plan.device_peak / GIB,
            memory.blocks_to_swap,
            budget / GIB,
            fewest,
        )
    warn_if_card_busy(plan)
    return MemoryFit(config, plan, None if chosen is None else chosen.settings.blocks_to_swap)


def warn_if_card_busy(plan: Plan) -> None:
    """Warn when the CUDA card has less free memory than the plan needs (another process)."""
    if not torch.cuda.is_available():
        return
    free, _ = torch.cuda.mem_get_info()
    if free < plan.device_peak:
        log.warning(
            "the card has %.2f GiB free but the plan needs %.2f GiB: another process holds part of it; "
            "the run may spill into shared memory or run out of memory",
            free / GIB,
            plan.device_peak / GIB,
        )


def _with_swap(config: TrainConfig, blocks_to_swap: int) -> TrainConfig:
    memory = dataclasses.replace(config.memory, blocks_to_swap=blocks_to_swap, swap_auto=False)
    return dataclasses.replace(config, memory=memory)


def _log_summary(plan: Plan, bucket: largest_bucket.Bucket, budget: int | None) -> None:
    card = "" if budget is None else f" of {budget / GIB:g} GiB"
    log.info(
        "memory plan for the largest bucket (%dx%d%s): %.2f GiB on the device%s, %.2f GiB of host memory, "
        "--blocks_to_swap %d",
        bucket.width,
        bucket.height,
        f"x{bucket.frames}" if bucket.frames > 1 else "",
        plan.device_peak / GIB,
        card,
        plan.host_peak / GIB,
        plan.settings.blocks_to_swap,
    )


def _does_not_fit(planner: Planner, bucket: largest_bucket.Bucket, budget: int) -> str:
    most = planner.blocks - 1
    needs = planner.plan(most).device_peak if planner.settings.checkpointing else planner.plan(0).device_peak
    size = f"{bucket.width}x{bucket.height}" + (f"x{bucket.frames}" if bucket.frames > 1 else "")
    fixes = ["a smaller --resolution in the dataset"]
    settings = planner.settings
    if settings.fp8 is None:
        fixes.append("--fp8_base --fp8_scaled")
    if not settings.checkpointing:
        fixes.append("--gradient_checkpointing (block swap needs it)")
    elif not settings.offload_activations:
        fixes.append("--gradient_checkpointing_cpu_offload")
    if settings.experts > 1 and not settings.offload_inactive_dit:
        fixes.append("--offload_inactive_dit")
    swapped = f"--blocks_to_swap {most}" if settings.checkpointing else "no block swap"
    return (
        f"--blocks_to_swap auto: the largest bucket ({size}) needs {needs / GIB:.2f} GiB even with "
        f"{swapped}, more than the {budget / GIB:g} GiB card; try {', '.join(fixes)}"
    )
