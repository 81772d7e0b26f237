"""``masktrain masks tiers``: tiered masks (face 255, body 128, hair 80, background 0 by default)
from a human-parsing segmentation model (``masks.segmenters``), its classes mapped to regions by a
label table (``masks.label_tables``).

Images are listed and decoded by the native core, as the cache reads them (EXIF orientation
applied, the same pixel limit), so each mask has the size of the image as it is trained on; an
image the core refuses is reported as failed and the others go on. Masks are single-channel PNGs
named by the image's basename, written atomically (a killed run's temporaries are removed by the
next run); ``--skip_existing`` leaves masks that exist alone. Images go through the model in
batches, on the device of ``--device`` (``masktrain.device``: the GPU when there is one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from masktrain.config.masks import TiersConfig
from masktrain.device import resolve_device
from masktrain.errors import DataError, FlagError
from masktrain.masks.files import list_inputs, open_upright, output_folder, write_mask
from masktrain.masks.label_tables import BUILT_IN, LabelTable, load_table
from masktrain.masks.segmenters import load_segmenter

log = logging.getLogger(__name__)


@dataclass
class TiersSummary:
    table: str = ""
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.written} mask(s) written, {self.skipped} skipped (existing), {len(self.failed)} failed "
            f"(label table: {self.table})"
        )


def choose_table(classes: list[str], labels: str | None) -> LabelTable:
    """The table for a model's `classes`: `labels` (a built-in name or a TOML file), else the
    built-in table that names them all. A built-in table given by name for a model whose classes
    are unnamed (``LABEL_0`` ...) maps them by position."""
    if labels is not None and labels not in BUILT_IN:
        table = load_table(Path(labels))
    elif labels is not None:
        table = BUILT_IN[labels]
        if not table.covers(classes):
            if len(classes) != len(table.regions) or not all(c.startswith("LABEL_") for c in classes):
                first = ", ".join(classes[:3])
                raise FlagError(
                    f"--labels {labels}: the model's {len(classes)} classes (first: {first}) are not the "
                    f"{len(table.regions)} classes of {labels}"
                )
            by_position = list(zip(classes, table.regions, strict=True))
            return LabelTable(
                table.name,
                {ours: table.regions[theirs] for ours, theirs in by_position},
                frozenset(ours for ours, theirs in by_position if theirs in table.details),
            )
    else:
        found = [t for t in BUILT_IN.values() if t.covers(classes)]
        if not found:
            raise FlagError(
                f"--model: its classes ({', '.join(classes[:4])}, ...) are none of the built-in label sets "
                f"({', '.join(BUILT_IN)}); pass --labels NAME (by class order) or --labels FILE.toml"
            )
        table = found[0]
    missing = [c for c in classes if table.region(c) is None]
    if missing:
        raise FlagError(f"--labels {labels or table.name}: no region for the model's class(es) {missing[:5]}")
    return table


def lookup(classes: list[str], table: LabelTable, config: TiersConfig) -> np.ndarray:
    """Class id -> grey value."""
    values = {"face": config.face, "hair": config.hair, "body": config.body, "background": config.background}
    grey = []
    for name in classes:
        region = table.region(name)
        assert region is not None
        if config.details is not None and table.is_detail(name):
            region = config.details
        grey.append(values[region])
    return np.array(grey, dtype=np.uint8)


def run(config: TiersConfig) -> TiersSummary:
    images = list_inputs(config.input, "--input")
    device = resolve_device(config.device)
    segmenter = load_segmenter(config.model, device)
    table = choose_table(segmenter.classes, config.labels)
    grey = lookup(segmenter.classes, table, config)
    summary = TiersSummary(table=table.name)
    todo = [p for p in images if not (config.skip_existing and (config.output / f"{p.stem}.png").exists())]
    summary.skipped = len(images) - len(todo)
    log.info("masks tiers: %d image(s) on %s, label table %s", len(todo), device, table.name)
    with output_folder(config.output), tqdm(total=len(todo), desc="tiers", unit="image") as bar:
        for start in range(0, len(todo), config.batch_size):
            batch, opened = [], []
            for path in todo[start : start + config.batch_size]:
                try:
                    opened.append(open_upright(path))
                    batch.append(path)
                except (OSError, DataError) as error:  # unreadable, corrupt, too large: one failed item
                    summary.failed.append((path, str(error)))
            for path, labels in zip(batch, segmenter.label_maps(opened) if opened else [], strict=True):
                write_mask(config.output / f"{path.stem}.png", grey[labels])
                summary.written += 1
            bar.update(len(todo[start : start + config.batch_size]))
    for path, why in summary.failed:
        log.error("%s: %s", path, why)
    return summary
