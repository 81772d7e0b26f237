"""``masktrain masks apply-instance``: the guide's group-photo step, as the reference tool
(``tools/apply_instance_mask_to_weighted_mask.py``) does it: every weighted (tiered) mask is set to
0 wherever the subject's binary instance mask is not (``instance <= 127``), so bystanders get no
weight. ``--dilate N`` first grows the instance mask by a (2N+1)-pixel square, as OpenCV's
``dilate`` with a square kernel does; ``--missing`` says what happens to a weighted mask without
an instance mask (``copy`` it, ``zero`` it, ``skip`` it, or stop with an ``error``, checked for
every file before anything is written). A weighted or instance mask that cannot be read (not an
image, truncated, a decompression bomb over the pixel limit) fails that one mask, named with why;
the others go on.

Differences from the reference, on purpose: masks are read as ``cache`` reads them (the native
core: upright, EXIF orientation applied; 16-bit weighted masks keep their 16 bits, and a 16-bit
instance mask is cut at half its scale, above 32767); two weighted masks with one basename are an
error; an instance mask of another aspect ratio than its weighted mask is an error naming both
files instead of a silent stretch, by the rule ``cache`` applies to an image and its mask (more
than 1% of the weighted mask's aspect apart, ``_native.same_aspect``); one of the same aspect and
another size is laid onto the weighted mask as ``convert-alpha`` lays a mask onto its image
(``_native.resize_mask_to_size``: pixel-centre nearest neighbour when enlarging, PIL's
``NEAREST``, where OpenCV's ``INTER_NEAREST`` is shifted by half a pixel; ``INTER_AREA`` when
shrinking); outputs are written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from masktrain import _native
from masktrain.config.masks import ApplyInstanceConfig
from masktrain.errors import AspectMismatchError, DataError
from masktrain.masks.files import UNREADABLE, list_inputs, output_folder, write_mask

log = logging.getLogger(__name__)


@dataclass
class ApplySummary:
    written: int = 0
    copied: list[str] = field(default_factory=list)
    """Weighted masks without an instance mask, copied as they are (--missing copy)."""
    zeroed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """Masks that could not be read, with why; nothing was written for them."""

    def line(self) -> str:
        return (
            f"{self.written} written ({len(self.copied)} copied and {len(self.zeroed)} zeroed without an "
            f"instance mask), {len(self.skipped)} skipped, {len(self.failed)} failed"
        )


def _grow(keep: np.ndarray, pixels: int, axis: int) -> np.ndarray:
    """`keep` (bool) grown by `pixels` both ways along `axis`, the window clipped at the border: a
    pixel is kept when its window holds a kept pixel (a running count, O(1) per pixel)."""
    length = keep.shape[axis]
    counts = np.cumsum(keep, axis=axis, dtype=np.int32)  # a count per row or column: < 2**31
    counts = np.concatenate([np.zeros_like(counts.take([0], axis=axis)), counts], axis=axis)
    index = np.arange(length)
    upper = np.minimum(index + pixels + 1, length)
    lower = np.maximum(index - pixels, 0)
    return np.asarray(counts.take(upper, axis=axis) > counts.take(lower, axis=axis))


def dilate(binary: np.ndarray, pixels: int) -> np.ndarray:
    """`binary` (0 / 255) grown by a (2·pixels+1)-square maximum, as ``cv2.dilate`` with a square
    kernel (the border does not grow the mask): a maximum along the rows, then along the columns,
    each O(1) per pixel whatever `pixels` is."""
    if pixels == 0:
        return binary
    grown = _grow(_grow(binary > 127, pixels, axis=1), pixels, axis=0)
    return np.where(grown, 255, 0).astype(np.uint8)


def subject_only(weighted: np.ndarray, instance: np.ndarray, pixels: int = 0) -> np.ndarray:
    """The weighted mask (uint8 or uint16, kept) with 0 wherever the (dilated) instance mask is not
    the subject: above half its scale (127 of 255, 32767 of 65535)."""
    binary = np.where(instance > np.iinfo(instance.dtype).max // 2, 255, 0).astype(np.uint8)
    keep = dilate(binary, pixels) > 127
    return np.where(keep, weighted, 0).astype(weighted.dtype)


def _fit(instance: np.ndarray, weighted: np.ndarray, instance_path: Path, weighted_path: Path) -> np.ndarray:
    """The instance mask at the weighted mask's size; another aspect ratio is an error."""
    (wh, ww), (ih, iw) = weighted.shape, instance.shape
    if not _native.same_aspect((ww, wh), (iw, ih)):
        raise AspectMismatchError(
            f"{instance_path} ({iw}x{ih}) does not have the aspect ratio of {weighted_path} ({ww}x{wh}); "
            "make the instance mask from the same image"
        )
    return _native.resize_mask_to_size(instance, (ww, wh))


def _apply(
    path: Path, instance_path: Path, config: ApplyInstanceConfig, summary: ApplySummary
) -> np.ndarray | None:
    """The subject-only mask of the weighted mask `path` (None: skipped), its --missing case noted in
    `summary`."""
    mask = _native.load_mask(path)
    if instance_path.is_file():
        instance = _fit(_native.load_mask(instance_path), mask, instance_path, path)
        return subject_only(mask, instance, config.dilate)
    if config.missing == "skip":
        summary.skipped.append(path.name)
        return None
    if config.missing == "zero":
        summary.zeroed.append(path.name)
        return np.zeros_like(mask)
    summary.copied.append(path.name)
    return mask


def run(config: ApplyInstanceConfig) -> ApplySummary:
    """Apply every instance mask; returns what was done."""
    weighted = list_inputs(config.weighted_masks, "--weighted-masks")
    pairs = [(path, config.instance_masks / f"{path.stem}.png") for path in weighted]
    missing = [path.name for path, instance in pairs if not instance.is_file()]
    if missing and config.missing == "error":
        raise DataError(
            f"--instance-masks {config.instance_masks}: no instance mask for {len(missing)} weighted mask(s) "
            f"(first: {missing[0]}); add them or pass --missing copy|zero|skip"
        )
    summary = ApplySummary()
    with output_folder(config.output):
        for path, instance_path in tqdm(pairs, desc="apply-instance", unit="mask"):
            try:
                result = _apply(path, instance_path, config, summary)
            except UNREADABLE as error:  # not an image, truncated, a decompression bomb: this mask fails
                summary.failed.append((path, str(error)))
                continue
            if result is not None:
                write_mask(config.output / f"{path.stem}.png", result)
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
    for _path, why in summary.failed:
        log.error("failed: %s", why)  # why names the file: the weighted mask or its instance mask
    return summary
