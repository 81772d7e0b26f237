"""``masktrain inspect``: what the loss will see, per item, before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from masktrain import catalog
from masktrain.cli.options import existing_file, option
from masktrain.cli.outcome import run_job

if TYPE_CHECKING:
    from masktrain.config.cache import MaskPoolingMode


@click.command("inspect")
@option("dataset_config", type=existing_file(), required=True, help="The dataset TOML.")
@option(
    "arch",
    type=click.Choice(catalog.ARCH_NAMES),
    default="wan",
    show_default=True,
    help="Whose cache files to read (and the latent factor).",
)
@option(
    "vae", default=None, help="Sets the latent factor of uncached items (tiny-ti2v, a folder) [default: 8]."
)
@option(
    "output_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("inspect"),
    show_default=True,
    help="Where index.html, summary.json and the overlays go.",
)
@option("mask_gamma", type=float, default=1.0, show_default=True, help="As train's: the weights shown.")
@option("mask_min_weight", type=float, default=0.0, show_default=True, help="As train's.")
@option("mask_blur_kernel_size", type=click.IntRange(min=0), default=0, show_default=True, help="As train's.")
@option("prior_mask_threshold", type=float, default=None, help="As train's: report the prior region.")
@option(
    "mask_pooling",
    type=click.Choice(["area", "max", "nearest"]),
    default="area",
    show_default=True,
    help="As cache's: how uncached items' masks are pooled.",
)
def inspect(
    dataset_config: Path,
    arch: str,
    vae: str | None,
    output_dir: Path,
    mask_gamma: float,
    mask_min_weight: float,
    mask_blur_kernel_size: int,
    prior_mask_threshold: float | None,
    mask_pooling: MaskPoolingMode,
) -> None:
    """Per item: mask source, coverage per region, the mask on the latent grid over the image."""
    from masktrain.config.inspect import InspectConfig

    def job() -> None:
        config = InspectConfig(
            dataset_config,
            arch,
            vae,
            output_dir,
            mask_gamma,
            mask_min_weight,
            mask_blur_kernel_size,
            prior_mask_threshold,
            mask_pooling,
        )
        from masktrain.inspect.page import run, table  # numpy, the native core: once the flags are good

        reports = run(config)
        click.echo(table(reports))
        click.echo(f"wrote {output_dir / 'index.html'} and {output_dir / 'summary.json'}")

    run_job(job)
