"""The "Will it fit?" table of ``docs/memory.md``, made by the planner ``masktrain plan`` runs, for
the released models at the sizes people train, on 24, 16 and 12 GiB cards. ``tests/test_docs.py``
regenerates it and compares; ``python -m masktrain.plan.fit_table docs/memory.md`` rewrites it.

Settings (stated above the table): fp8 scaled, gradient checkpointing, batch 1, LoRA rank 16,
AdamW, prior preservation on, bf16, sdpa; WAN 2.2 A14B with the idle expert in host memory
(``--offload_inactive_dit``). Each cell is the fewest ``--blocks_to_swap`` that fit and the
predicted device peak.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from masktrain import atomic
from masktrain.catalog import released as released_model
from masktrain.models import get_family
from masktrain.plan import largest_bucket
from masktrain.plan.estimate import GIB, Planner, PlanSettings
from masktrain.plan.run import step_shape

CARDS = (24, 16, 12)
"""Card sizes, GiB."""
START, END = "<!-- fit-table:start -->", "<!-- fit-table:end -->"


@dataclass(frozen=True)
class Row:
    model: str
    """A released model's name (``masktrain plan --dit NAME``)."""
    width: int
    height: int
    frames: int = 1
    offload: bool = False
    """With ``--gradient_checkpointing_cpu_offload`` (beyond the table's settings)."""
    musubi: str = ""
    """musubi-tuner's published figure for this row, where it has one."""


ROWS = (
    Row("wan2.1-14b", 1024, 1024),
    Row("wan2.1-14b", 1280, 720, musubi="1280x720 images fit 24 GB with fp8 and block swap"),
    Row("wan2.1-14b", 832, 480, 81),
    Row("wan2.1-14b", 832, 480, 81, offload=True),
    Row("wan2.2-a14b", 1024, 1024),
    Row("wan2.2-a14b", 1280, 720),
    Row("wan2.2-a14b", 832, 480, 81),
    Row("wan2.2-a14b", 832, 480, 81, offload=True),
    Row(
        "qwen-image-20b",
        1024,
        1024,
        musubi="42 GB bf16, 30 GB fp8 scaled, 24 GB with 16 swapped, 12 GB with 45",
    ),
    Row("qwen-image-20b", 1328, 1328),
)


def table() -> str:
    """The markdown table, between its markers."""
    header = (
        "| model | size | " + " | ".join(f"{card} GiB: swap, peak" for card in CARDS) + " | musubi-tuner |"
    )
    lines = [START, header, "|" + "---|" * (len(CARDS) + 3)]
    for row in ROWS:
        cells = [_cell(planner, card) for planner in [_planner(row)] for card in CARDS]
        size = f"{row.width}x{row.height}" + (f", {row.frames} frames" if row.frames > 1 else "")
        size += ", activation offload" if row.offload else ""
        lines.append(f"| {row.model} | {size} | " + " | ".join(cells) + f" | {row.musubi} |")
    lines.append(END)
    return "\n".join(lines)


def _planner(row: Row) -> Planner:
    spec, released = released_model(row.model)
    family = get_family(spec.name)
    config = dict(released.config)
    shape = step_shape(family, config, largest_bucket.from_resolution(row.width, row.height, row.frames))
    settings = PlanSettings(
        fp8="scaled",
        experts=released.experts,
        offload_inactive_dit=released.experts > 1,
        prior=True,
        offload_activations=row.offload,
    )
    return Planner(family, config, shape, settings)


def _cell(planner: Planner, card: int) -> str:
    plan = planner.smallest_swap(card * GIB)
    if plan is None:
        return f"no ({planner.plan(planner.blocks - 1).device_peak / GIB:.1f} at {planner.blocks - 1})"
    return f"{plan.settings.blocks_to_swap}, {plan.device_peak / GIB:.1f}"


def rewrite(path: Path) -> None:
    """Replace the table between the markers in `path` (atomically)."""
    text = path.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    atomic.write_text(path, before + table() + after)


if __name__ == "__main__":
    rewrite(Path(sys.argv[1]))
