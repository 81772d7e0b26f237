"""``masktrain convert-alpha``: merge images and mask files into RGBA PNGs.

Discovery and reporting live here; the pixel work (decode, luma, aspect check, mask resize,
PNG encode, atomic write) is one native call per chunk of items, run in parallel with the GIL
released. Each output is ``{output_directory}/{stem}.png`` with the image's exact RGB and the
mask as alpha (16-bit when the image or the mask is 16-bit). Outputs and copied captions are
written to a hidden temporary file and renamed, so the output directory never holds a torn file;
temporary files of a killed run are removed by the next run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from masktrain import _native, atomic
from masktrain.config.convert_alpha import ConvertAlphaConfig
from masktrain.errors import DuplicateMaskError

log = logging.getLogger(__name__)

#: How many items one native call converts: enough to keep every core busy between
#: progress-bar updates.
_CHUNK_PER_THREAD = 4


@dataclass
class ConvertAlphaSummary:
    converted: int = 0
    skipped: int = 0
    missing_mask: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"convert-alpha: {self.converted} converted, {self.skipped} skipped, "
            f"{len(self.missing_mask)} missing mask, {len(self.failed)} failed"
        )


@dataclass(frozen=True)
class _Job:
    image: Path
    mask: Path
    output: Path
    caption: tuple[Path, Path] | None

    def as_native(self) -> tuple[Path, Path, Path, Path | None, Path | None]:
        source, target = self.caption if self.caption else (None, None)
        return (self.image, self.mask, self.output, source, target)


def _plan(config: ConvertAlphaConfig, summary: ConvertAlphaSummary) -> list[_Job]:
    """Pair images with masks; record skips, missing masks and ambiguous names in `summary`."""
    images = _native.list_images(config.image_directory)
    masks = _native.MaskIndex(config.mask_directory)
    log.info(
        "found %d images in %s and %d masks in %s",
        len(images),
        config.image_directory,
        len(masks),
        config.mask_directory,
    )

    by_stem: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image)

    caption_dir = config.caption_directory or config.image_directory
    caption_extension = config.caption_extension
    jobs = []
    for image in images:
        stem = image.stem
        if len(by_stem[stem]) > 1:
            others = ", ".join(str(p) for p in by_stem[stem] if p != image)
            summary.failed.append(
                (
                    image,
                    f"another image has the same basename '{stem}' ({others}); "
                    f"both would be written to {stem}.png, rename one",
                )
            )
            continue
        try:
            mask = masks.get(stem)
        except DuplicateMaskError as error:
            summary.failed.append((image, str(error)))
            continue
        except UnicodeEncodeError:
            # A name that is not valid UTF-8 (Linux allows any bytes) cannot be looked up; it is
            # one failed item, not a reason to abort the whole run.
            summary.failed.append((image, "the file name is not valid UTF-8; rename it"))
            continue
        if mask is None:
            summary.missing_mask.append(image)
            continue
        output = config.output_directory / f"{stem}.png"
        if config.skip_existing and output.exists():
            summary.skipped += 1
            continue
        caption = caption_dir / f"{stem}{caption_extension}"
        caption_job = (caption, config.output_directory / caption.name) if caption.is_file() else None
        jobs.append(_Job(image, mask, output, caption_job))
    return jobs


def run(config: ConvertAlphaConfig) -> ConvertAlphaSummary:
    """Convert the dataset; returns the summary (also logged). Raises OSError only for problems
    with the directories themselves, never for one bad item."""
    summary = ConvertAlphaSummary()
    jobs = _plan(config, summary)

    if summary.missing_mask:
        log.warning("%d images have no matching mask file", len(summary.missing_mask))
        for image in summary.missing_mask[:10]:
            log.warning("  no mask for %s", image)
        if len(summary.missing_mask) > 10:
            log.warning("  ... and %d more", len(summary.missing_mask) - 10)

    if config.dry_run:
        for job in jobs[:5]:
            log.info("Would merge: %s + %s -> %s", job.image, job.mask, job.output)
        if len(jobs) > 5:
            log.info("... and %d more", len(jobs) - 5)
        log.info("dry run: %d would be converted, nothing written", len(jobs))
        _report(summary)
        return summary

    with atomic.run_lock(config.output_directory):  # the native writer's temporaries carry our pid
        atomic.remove_stale_temporaries(config.output_directory)
        _convert(config, jobs, summary)
    _report(summary)
    return summary


def _convert(config: ConvertAlphaConfig, jobs: list[_Job], summary: ConvertAlphaSummary) -> None:
    chunk = max(1, _native.thread_count() * _CHUNK_PER_THREAD)
    with tqdm(total=len(jobs), unit="img", desc="convert-alpha", disable=not jobs) as progress:
        for start in range(0, len(jobs), chunk):
            batch = jobs[start : start + chunk]
            results = _native.convert_alpha_batch([job.as_native() for job in batch])
            for job, error in zip(batch, results, strict=True):
                if error is None:
                    summary.converted += 1
                else:
                    summary.failed.append((job.image, str(error)))
            progress.update(len(batch))


def _report(summary: ConvertAlphaSummary) -> None:
    for image, reason in summary.failed:
        # Core errors usually start with the file they are about; do not print it twice.
        reason = reason.removeprefix(f"{image}: ")
        log.error("failed: %s: %s", image, reason)
    log.info("%s", summary.line())
