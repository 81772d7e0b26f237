"""The plan as the user reads it: one table, component by component, with the device and host
memory of each, the peaks, and (with a budget) the smallest ``--blocks_to_swap`` that fits and
what its traffic costs."""

from __future__ import annotations

from masktrain.plan.estimate import GIB, H2D_BANDWIDTH, Plan, PlanSettings


def table(plan: Plan) -> str:
    """The components of `plan`, then its peaks."""
    lines = [f"{'component':<32}{'device GiB':>11}{'host GiB':>10}  note"]
    for component in plan.components:
        sizes = f"{_gib(component.device):>11}{_gib(component.host):>10}"
        lines.append(f"{component.name:<32}{sizes}  {component.note}".rstrip())
    lines.append(f"{'device peak':<32}{_gib(plan.device_peak):>11}")
    lines.append(f"{'host peak':<32}{'':>11}{_gib(plan.host_peak):>10}  the larger of loading and training")
    return "\n".join(lines)


def settings_line(settings: PlanSettings, blocks: int) -> str:
    """The flags the plan assumed, in words."""
    parts = [str(settings.dtype).removeprefix("torch.")]
    if settings.fp8 is not None:
        parts.append("fp8 scaled" if settings.fp8 == "scaled" else "fp8 e4m3")
    parts.append(
        "checkpointing" + (" with offload" if settings.offload_activations else "")
        if settings.checkpointing
        else "no checkpointing"
    )
    parts.append(f"rank {settings.rank}")
    parts.append(settings.optimizer)
    parts.append(
        "prior preservation" + (" (EMA teacher)" if settings.ema_teacher else "")
        if settings.prior
        else "masked loss only"
    )
    parts.append(
        f"--blocks_to_swap {settings.blocks_to_swap} of {blocks}" + (" (pinned)" if settings.pinned else "")
    )
    if settings.experts > 1:
        parts.append(
            "two experts, "
            + ("the idle one on the host" if settings.offload_inactive_dit else "both on the device")
            + (", a LoRA each" if settings.loras > 1 else "")
        )
    return ", ".join(parts)


def fit_line(budget: int, chosen: Plan | None, most: int, checkpointing: bool) -> str:
    """What fits in `budget` bytes: the smallest swap and its traffic, or that nothing does."""
    card = f"{budget / GIB:g} GiB"
    if chosen is None:
        if not checkpointing:
            return f"{card}: does not fit without block swap, and block swap needs --gradient_checkpointing"
        return f"{card}: does not fit even with --blocks_to_swap {most}"
    swap = chosen.settings.blocks_to_swap
    words = f"{card}: fits with --blocks_to_swap {swap} (device peak {_gib(chosen.device_peak)} GiB)"
    if swap:
        rate = H2D_BANDWIDTH[chosen.settings.pinned]
        memory = "page-locked" if chosen.settings.pinned else "pageable"
        words += (
            f"; block swap copies {_gib(chosen.swap_traffic)} GiB per step to the device, about "
            f"{chosen.swap_seconds():.1f} s at {rate:g} GB/s ({memory})"
        )
    return words


def _gib(size: int) -> str:
    if not size:
        return "-"
    return f"{size / GIB:.2f}" if size >= 0.01 * GIB else "<0.01"
