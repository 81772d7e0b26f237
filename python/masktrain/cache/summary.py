"""What one ``cache`` run did to one dataset: the counts the summary line reports, merged across
torchrun processes, and the report (warnings, failures, the line)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from masktrain.data.cache_format import MaskSource

log = logging.getLogger(__name__)


@dataclass
class DatasetSummary:
    name: str
    items: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rebuilt: int = 0
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    weight_sum: float = 0.0
    weight_count: int = 0
    clips: int | None = None
    """Clip files written (video datasets; None for images)."""
    truncated_captions: int = 0
    """Captions longer than the text encoder takes, truncated as the pipelines truncate them."""

    def add_written(
        self, mask_source: MaskSource, weights: np.ndarray | None, clips: int | None = None
    ) -> None:
        """Count one item (an image, or a video with `clips` clip files) as written."""
        self.written += 1
        self.sources[mask_source] += 1
        if weights is not None:
            self.weight_sum += float(weights.mean())
            self.weight_count += 1
        if clips is not None:
            self.clips = (self.clips or 0) + clips

    @classmethod
    def merged(cls, parts: list[DatasetSummary]) -> DatasetSummary:
        """One summary from the per-process summaries of a torchrun run."""
        total = cls(name=parts[0].name)
        for part in parts:
            total.items += part.items
            total.sources.update(part.sources)
            total.skipped += part.skipped
            total.rebuilt += part.rebuilt
            total.written += part.written
            total.failed.extend(part.failed)
            total.weight_sum += part.weight_sum
            total.weight_count += part.weight_count
            if part.clips is not None:
                total.clips = (total.clips or 0) + part.clips
            total.truncated_captions += part.truncated_captions
        return total

    def line(self) -> str:
        mean = self.weight_sum / self.weight_count if self.weight_count else float("nan")
        unit = "items" if self.clips is None else "videos"
        clips = "" if self.clips is None else f", {self.clips} clips"
        # the dataset's default_mask is a source of its own, named only when it was used
        default = f" default={self.sources['default']}" if self.sources["default"] else ""
        return (
            f"{self.name}: {self.items} {unit}, mask sources alpha={self.sources['alpha']} "
            f"file={self.sources['file']}{default} none={self.sources['none']}, {self.written} written "
            f"({self.rebuilt} rebuilt{clips}), {self.skipped} skipped, {len(self.failed)} failed, "
            f"mean raw mask weight {mean:.4f}"
        )

    def report(self, missing_files_warning: bool) -> None:
        """Log the guide's mask warnings, each failure with its reason, and the summary line."""
        if missing_files_warning and self.sources["none"]:
            kind = "images" if self.clips is None else "videos"
            log.warning("%d %s have no matching mask file", self.sources["none"], kind)
        if self.sources["none"] and self.weight_count:
            log.warning(
                "%d items had no mask (no alpha + no file). Filled with full-weight (255).",
                self.sources["none"],
            )
        if self.truncated_captions:
            log.warning(
                "%d captions are longer than the text encoder takes and were truncated",
                self.truncated_captions,
            )
        for path, reason in self.failed:
            log.error("failed: %s: %s", path, reason.removeprefix(f"{path}: "))
        log.info("%s", self.line())
