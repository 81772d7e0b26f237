"""The ``masktrain`` command line. A thin click layer: parse flags (each in the guide's
underscore spelling and a dashed alias), configure logging once, call the job, map its outcome
to an exit code (0 ok, 1 per-item failures, 2 usage errors).

Importing this module must stay cheap: no torch, no heavy imports at module level.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from masktrain import __version__


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
    )


def _directory(must_exist: bool) -> click.Path:
    return click.Path(exists=must_exist, file_okay=False, dir_okay=True, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="masktrain")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Train LoRA adapters for diffusion transformers with a weighted mask loss."""
    _configure_logging(verbose)


@main.command("convert-alpha")
@click.option(
    "--image_directory",
    "--image-directory",
    "image_directory",
    type=_directory(True),
    required=True,
    help="Images to convert (PNG, JPEG, WebP, BMP).",
)
@click.option(
    "--mask_directory",
    "--mask-directory",
    "mask_directory",
    type=_directory(True),
    required=True,
    help="Masks, matched to images by basename (extension may differ).",
)
@click.option(
    "--output_directory",
    "--output-directory",
    "output_directory",
    type=_directory(False),
    required=True,
    help="Where {stem}.png RGBA files are written (created if missing).",
)
@click.option(
    "--caption_directory",
    "--caption-directory",
    "caption_directory",
    type=_directory(True),
    default=None,
    help="Captions to copy beside the outputs [default: the image directory].",
)
@click.option(
    "--caption_extension",
    "--caption-extension",
    "caption_extension",
    default=".txt",
    show_default=True,
    help="Extension of caption files.",
)
@click.option(
    "--dry_run", "--dry-run", "dry_run", is_flag=True, help="Show what would be merged; write nothing."
)
@click.option(
    "--skip_existing",
    "--skip-existing",
    "skip_existing",
    is_flag=True,
    help="Skip images whose output file already exists.",
)
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
    from masktrain.tools.convert_alpha import ConvertAlphaConfig, run

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
        summary = run(config)
    except (OSError, ValueError) as error:
        raise click.UsageError(str(error)) from error
    raise SystemExit(1 if summary.failed else 0)


@main.command("cache")
@click.option(
    "--dataset_config",
    "--dataset-config",
    "dataset_config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The dataset TOML.",
)
@click.option("--arch", type=click.Choice(["wan", "qwen_image"]), required=True, help="Model family.")
@click.option("--vae", required=True, help="VAE: 'tiny', or a local diffusers folder.")
@click.option("--t5", default=None, help="WAN text encoder (UMT5): 'tiny', or a local diffusers folder.")
@click.option(
    "--text_encoder",
    "--text-encoder",
    "text_encoder",
    default=None,
    help="Qwen-Image text encoder (Qwen2.5-VL): 'tiny', or a local diffusers folder.",
)
@click.option("--device", default=None, help="Encoding device [default: cuda when available, else cpu].")
@click.option(
    "--batch_size", "--batch-size", "batch_size", type=click.IntRange(min=1), default=4, show_default=True
)
@click.option(
    "--num_workers",
    "--num-workers",
    "num_workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for image preparation [default: one per core].",
)
@click.option(
    "--skip_existing/--no-skip_existing",
    "--skip-existing/--no-skip-existing",
    "skip_existing",
    default=True,
    show_default=True,
    help="Skip items whose cache file is up to date.",
)
def cache(
    dataset_config: Path,
    arch: str,
    vae: str,
    t5: str | None,
    text_encoder: str | None,
    device: str | None,
    batch_size: int,
    num_workers: int | None,
    skip_existing: bool,
) -> None:
    """Cache latents, mask weights and text embeddings for a dataset TOML."""
    wanted, other = ("--t5", "--text_encoder") if arch == "wan" else ("--text_encoder", "--t5")
    given = t5 if arch == "wan" else text_encoder
    if (text_encoder if arch == "wan" else t5) is not None:
        raise click.UsageError(f"{other} is not used with --arch {arch}; pass {wanted}")
    if given is None:
        raise click.UsageError(f"--arch {arch} needs {wanted} ('tiny' or a local folder)")
    if num_workers is not None:
        import os

        os.environ["MASKTRAIN_NUM_THREADS"] = str(num_workers)

    from masktrain.cache import CacheConfig, run

    config = CacheConfig(
        dataset_config=dataset_config,
        arch=arch,
        vae=vae,
        text_encoder=given,
        device=device,
        batch_size=batch_size,
        skip_existing=skip_existing,
    )
    try:
        summaries = run(config)
    except ValueError as error:  # config and model-loading errors name the file, key or flag
        raise click.UsageError(str(error)) from error
    raise SystemExit(1 if any(s.failed for s in summaries) else 0)


def _register_train() -> None:
    from masktrain.cli_train import train

    main.add_command(train)


def _register_demo() -> None:
    from masktrain.cli_demo import demo

    main.add_command(demo)


_register_train()
_register_demo()

if __name__ == "__main__":
    main()
