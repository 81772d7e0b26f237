"""``masktrain convert-alpha``: bake mask files into RGBA PNGs."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain.cli.options import directory, flag, option
from masktrain.cli.outcome import run_job


@click.command("convert-alpha")
@option(
    "image_directory", type=directory(True), required=True, help="Images to convert (PNG, JPEG, WebP, BMP)."
)
@option(
    "mask_directory",
    type=directory(True),
    required=True,
    help="Masks, matched to images by basename (extension may differ).",
)
@option(
    "output_directory",
    type=directory(False),
    required=True,
    help="Where {stem}.png RGBA files are written (created if missing).",
)
@option(
    "caption_directory",
    type=directory(True),
    default=None,
    help="Captions to copy beside the outputs [default: the image directory].",
)
@option("caption_extension", default=".txt", show_default=True, help="Extension of caption files.")
@flag("dry_run", "Show what would be merged; write nothing.")
@flag("skip_existing", "Skip images whose output file already exists.")
def convert_alpha(
    image_directory: Path,
    mask_directory: Path,
    output_directory: Path,
    caption_directory: Path | None,
    caption_extension: str,
    dry_run: bool,
    skip_existing: bool,
) -> None:
    """Bake mask files into RGBA PNGs: exact RGB, the mask as alpha."""
    from masktrain.config.convert_alpha import ConvertAlphaConfig
    from masktrain.tools.convert_alpha import run

    def job() -> bool:
        config = ConvertAlphaConfig(
            image_directory=image_directory,
            mask_directory=mask_directory,
            output_directory=output_directory,
            caption_directory=caption_directory,
            caption_extension=caption_extension,
            dry_run=dry_run,
            skip_existing=skip_existing,
        )
        try:
            return bool(run(config).failed)
        except OSError as error:  # the directories themselves cannot be read or written
            raise click.UsageError(str(error)) from error

    raise SystemExit(1 if run_job(job) else 0)
