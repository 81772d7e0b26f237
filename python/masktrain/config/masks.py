"""The settings of ``masktrain masks`` (tiered masks from a human-parsing model, the subject's
instance mask, and applying one to the other), checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masktrain import tiers
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


@dataclass(frozen=True)
class TiersConfig:
    input: Path
    """The images (PNG, JPEG, WebP, BMP), not recursive."""
    output: Path
    """Where ``{stem}.png`` tiered masks go."""
    model: Path
    """A transformers segmentation folder (safetensors), or a Sapiens TorchScript file."""
    labels: str | None = None
    """A built-in label table (atr, lip, sapiens) or a TOML table; None: the one that names the
    model's classes."""
    details: str | None = None
    """The region every detail class (glasses, lips, teeth, hands, gloves) gets; None: the table's."""
    face: int = tiers.FACE
    hair: int = tiers.HAIR
    body: int = tiers.BODY
    background: int = tiers.BACKGROUND
    batch_size: int = 4
    device: str | None = None
    skip_existing: bool = False
    trust_torchscript: bool = False
    """Load a TorchScript file (Sapiens); loading one runs code from it, so it must be asked for."""

    def __post_init__(self) -> None:
        for name in ("face", "hair", "body", "background"):
            value = getattr(self, name)
            if not 0 <= value <= 255:
                raise FlagError(f"--{name} must be a grey value in 0..255, got {value}")
        if self.batch_size < 1:
            raise FlagError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.details is not None and self.details not in ("face", "hair", "body", "background"):
            raise FlagError(f"--details must be face, hair, body or background, not {self.details!r}")
        if self.output.resolve() == self.input.resolve():
            raise FlagError(f"--output is --input ({self.input}): masks would land among the images")
        if not self.model.exists():
            raise FlagError(f"--model {self.model}: no such file or folder")
        if self.model.is_file():
            if self.model.suffix.lower() in (".bin", ".ckpt", ".pth", ".pkl", ".pickle"):
                raise FlagError(
                    f"--model {self.model}: a pickle; masktrain never loads pickles (they run code). Pass a "
                    "transformers folder with safetensors weights, or a Sapiens TorchScript file with "
                    "--trust_torchscript"
                )
            if not self.trust_torchscript:
                raise FlagError(
                    f"--model {self.model}: a TorchScript file runs code when it loads; pass "
                    "--trust_torchscript if you trust where it came from (or use a transformers folder)"
                )
