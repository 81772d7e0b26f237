"""``masktrain masks apply-instance``: the guide's group-photo step, as the reference tool
(``tools/apply_instance_mask_to_weighted_mask.py``) does it: every weighted (tiered) mask is set to
0 wherever the subject's binary instance mask is not (``instance <= 127``), so bystanders get no
weight. ``--dilate N`` first grows the instance mask by a (2N+1)-pixel square, as OpenCV's
``dilate`` with a square kernel does; ``--missing`` says what happens to a weighted mask without
an instance mask (``copy`` it, ``zero`` it, ``skip`` it, or stop with an ``error``, checked for
every file before anything is written).

Differences from the reference, on purpose: an instance mask of another aspect ratio than its
weighted mask (more than 1% apart) is an error naming both files instead of a silent stretch; one
of the same aspect and another size is resized with pixel-centre nearest neighbour (PIL's
``NEAREST``; OpenCV's ``INTER_NEAREST`` is shifted by half a pixel); outputs are written
atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from masktrain.config.masks import ApplyInstanceConfig
from masktrain.errors import AspectMismatchError, DataError
from masktrain.masks.files import write_mask

log = logging.getLogger(__name__)

WEIGHTED_SUFFIXES = (".png", ".jpg", ".jpeg")
ASPECT_TOLERANCE = 0.01


@dataclass
class ApplySummary:
    written: int = 0
    copied: list[str] = field(default_factory=list)
    """Weighted masks without an instance mask, copied as they are (--missing copy)."""
    zeroed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.written} written ({len(self.copied)} copied and {len(self.zeroed)} zeroed without an "
            f"instance mask), {len(self.skipped)} skipped"
        )


def _grey(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except OSError as error:
        raise DataError(f"{path}: cannot read it as an image ({error})") from None


def dilate(binary: np.ndarray, pixels: int) -> np.ndarray:
    """`binary` (0 / 255) grown by a (2·pixels+1)-square maximum, as ``cv2.dilate`` with a square
    kernel (PIL's ``MaxFilter``; the border does not grow the mask)."""
    if pixels == 0:
        return binary
    from PIL import Image, ImageFilter

    grown = Image.fromarray(binary).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(grown)


def subject_only(weighted: np.ndarray, instance: np.ndarray, pixels: int = 0) -> np.ndarray:
    """The weighted mask with 0 wherever the (dilated) instance mask is not the subject."""
    binary = np.where(instance > 127, 255, 0).astype(np.uint8)
    keep = dilate(binary, pixels) > 127
    return np.where(keep, weighted, 0).astype(np.uint8)


def _fit(instance: np.ndarray, weighted: np.ndarray, instance_path: Path, weighted_path: Path) -> np.ndarray:
    """The instance mask at the weighted mask's size; another aspect ratio is an error."""
    if instance.shape == weighted.shape:
        return instance
    (wh, ww), (ih, iw) = weighted.shape, instance.shape
    if abs(ww / wh - iw / ih) > ASPECT_TOLERANCE:
        raise AspectMismatchError(
            f"{instance_path} ({iw}x{ih}) does not have the aspect ratio of {weighted_path} ({ww}x{wh}); "
            "make the instance mask from the same image"
        )
    from PIL import Image

    return np.asarray(Image.fromarray(instance).resize((ww, wh), Image.Resampling.NEAREST))


def run(config: ApplyInstanceConfig) -> ApplySummary:
    """Apply every instance mask; returns what was done."""
    weighted = sorted(
        p for p in config.weighted_masks.iterdir() if p.is_file() and p.suffix.lower() in WEIGHTED_SUFFIXES
    )
    if not weighted:
        raise DataError(f"--weighted-masks {config.weighted_masks}: no .png / .jpg masks there")
    pairs = [(path, config.instance_masks / f"{path.stem}.png") for path in weighted]
    missing = [path.name for path, instance in pairs if not instance.is_file()]
    if missing and config.missing == "error":
        raise DataError(
            f"--instance-masks {config.instance_masks}: no instance mask for {len(missing)} weighted mask(s) "
            f"(first: {missing[0]}); add them or pass --missing copy|zero|skip"
        )
    summary = ApplySummary()
    for path, instance_path in tqdm(pairs, desc="apply-instance", unit="mask"):
        target = config.output / f"{path.stem}.png"
        mask = _grey(path)
        if instance_path.is_file():
            instance = _fit(_grey(instance_path), mask, instance_path, path)
            result = subject_only(mask, instance, config.dilate)
        elif config.missing == "skip":
            summary.skipped.append(path.name)
            continue
        elif config.missing == "zero":
            summary.zeroed.append(path.name)
            result = np.zeros_like(mask)
        else:
            summary.copied.append(path.name)
            result = mask
        write_mask(target, result)
        summary.written += 1
    for kind, names in (
        ("copied unchanged", summary.copied),
        ("zeroed", summary.zeroed),
        ("skipped", summary.skipped),
    ):
        if names:
            log.warning(
                "no instance mask for %d weighted mask(s), %s (first: %s)", len(names), kind, names[0]
            )
    return summary
