"""The settings of ``masktrain masks`` (tiered masks from a human-parsing model, the subject's
instance mask, and applying one to the other), checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masktrain.errors import FlagError

MISSING_POLICIES = ("copy", "zero", "skip", "error")
"""What ``apply-instance`` does with a weighted mask that has no instance mask (the reference
tool's ``--missing``)."""


@dataclass(frozen=True)
class ApplyInstanceConfig:
    weighted_masks: Path
    """Tiered masks (PNG / JPEG), named by their image's basename."""
    instance_masks: Path
    """Binary subject masks, ``{stem}.png``."""
    output: Path
    """Where the subject-only tiered masks go (``{stem}.png``)."""
    dilate: int = 0
    """Grow the instance mask by this many pixels (a square of side 2N+1) before applying it."""
    missing: str = "copy"
    """copy, zero, skip or error."""

    def __post_init__(self) -> None:
        if self.dilate < 0:
            raise FlagError(f"--dilate must be >= 0 pixels, got {self.dilate}")
        if self.missing not in MISSING_POLICIES:
            raise FlagError(f"--missing must be one of {', '.join(MISSING_POLICIES)}, not {self.missing!r}")
        output = self.output.resolve()
        for flag, source in (
            ("--weighted-masks", self.weighted_masks),
            ("--instance-masks", self.instance_masks),
        ):
            if output == source.resolve():
                raise FlagError(
                    f"--output is {flag} ({source}): the inputs would be overwritten; pick another folder"
                )
