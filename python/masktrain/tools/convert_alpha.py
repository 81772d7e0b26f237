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

from masktrain import _native
from masktrain.captions import normalize_caption_extension

log = logging.getLogger(__name__)

#: How many items one native call converts: enough to keep every core busy between
#: progress-bar updates.
_CHUNK_PER_THREAD = 4


@dataclass(frozen=True)
class ConvertAlphaConfig:
    image_directory: Path
    """Images to convert."""
    mask_directory: Path
    """Mask files, matched to images by basename without extension."""
    output_directory: Path
    """Destination of the ``{stem}.png`` RGBA files; created when missing (not in a dry run)."""
    caption_directory: Path | None = None
    """Where captions are read from; ``None`` means the image directory."""
    caption_extension: str = ".txt"
    """Extension of caption files, with its dot."""
    dry_run: bool = False
    """Report what would be merged and write nothing."""
    skip_existing: bool = False
    """Leave images whose output already exists alone."""


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
    caption_extension = normalize_caption_extension(config.caption_extension)
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
        except _native.DuplicateMaskError as error:
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


def _remove_stale_temporaries(directory: Path) -> None:
    for stale in directory.glob(f".*{_native.TEMP_SUFFIX}"):
        log.debug("removing %s left by an interrupted run", stale)
        stale.unlink(missing_ok=True)


def _check_directories(config: ConvertAlphaConfig) -> None:
    output = config.output_directory.resolve()
    for flag, source in (
        ("--image_directory", config.image_directory),
        ("--mask_directory", config.mask_directory),
    ):
        if output == source.resolve():
            raise ValueError(
                f"--output_directory {config.output_directory} is the same as {flag}: the RGBA files "
                "would overwrite the originals; choose another output directory"
            )


def run(config: ConvertAlphaConfig) -> ConvertAlphaSummary:
    """Convert the dataset; returns the summary (also logged). Raises ValueError / OSError only
    for problems with the directories themselves, never for one bad item."""
    _check_directories(config)
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

    config.output_directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(config.output_directory)
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
    _report(summary)
    return summary


def _report(summary: ConvertAlphaSummary) -> None:
    for image, reason in summary.failed:
        # Core errors usually start with the file they are about; do not print it twice.
        reason = reason.removeprefix(f"{image}: ")
        log.error("failed: %s: %s", image, reason)
    log.info("%s", summary.line())
