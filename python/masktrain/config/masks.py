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
    """Tiered masks (PNG, JPEG, WebP, BMP), named by their image's basename."""
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
        if self.instance_masks.resolve() == self.weighted_masks.resolve():
            raise FlagError(
                f"--instance-masks is --weighted-masks ({self.weighted_masks}): every mask would be cut by "
                "itself; point it at the subject masks (the --output of masktrain masks instance)"
            )
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
    """A transformers segmentation folder (safetensors), a Sapiens TorchScript file, or ``tiny``
    (the built-in tiny SegFormer, ``masks.tiny``)."""
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
        if str(self.model) == "tiny":  # the built-in tiny SegFormer (masks.tiny)
            return
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


#: The reference tool's --backend values, and why masktrain does not take them.
REFUSED_BACKENDS = {
    "yolo": "ultralytics' YOLO is AGPL-3.0, a licence that would bind masktrain",
    "sam3": "SAM 3 needs its own environment and checkpoints",
}


@dataclass(frozen=True)
class InstanceConfig:
    input: Path
    """The (group) photos."""
    output: Path
    """Where ``{stem}.png`` binary subject masks (0 / 255) go."""
    reference: Path
    """A photo of the subject's face (its largest face is the reference)."""
    model: Path
    """A transformers universal-segmentation folder (Mask2Former, MaskFormer or OneFormer, COCO
    classes: a ``person`` class) for the person instances, or ``tiny`` (``masks.tiny``)."""
    id_threshold: float = 0.6
    """dlib's face distance (Euclidean, 128-d) at or below which a face is the subject's; dlib's
    own 0.6. The reference tool's 0.45 is an InsightFace cosine similarity, another scale."""
    person_threshold: float = 0.5
    """Minimum score of a person instance."""
    fallback_largest: bool = False
    """No matching face: take the largest person (the reference tool's --fallback-largest)."""
    write_empty_on_fail: bool = False
    """A photo without a result gets an all-zero mask instead of none."""
    skip_existing: bool = False
    device: str | None = None
    backend: str | None = None
    """The reference tool's --backend: refused with what to use instead."""
    files: tuple[str, ...] | None = None
    """Only the photos with these basenames (the reference tool's --files)."""

    def __post_init__(self) -> None:
        if self.backend is not None:
            why = REFUSED_BACKENDS.get(self.backend, f"{self.backend!r} is not a backend masktrain knows")
            raise FlagError(
                f"--backend {self.backend}: {why}; masktrain segments people with a transformers folder "
                "(--model: Mask2Former, MaskFormer or OneFormer) and matches faces with dlib"
            )
        if not self.id_threshold > 0:
            raise FlagError(f"--id-threshold must be > 0 (a face distance), got {self.id_threshold}")
        if not 0 <= self.person_threshold < 1:
            raise FlagError(f"--person_threshold must be in [0, 1), got {self.person_threshold}")
        if self.output.resolve() == self.input.resolve():
            raise FlagError(f"--output is --input ({self.input}): masks would land among the images")
        if str(self.model) != "tiny" and not self.model.is_dir():
            raise FlagError(f"--model {self.model}: not a folder (a transformers segmentation model)")
