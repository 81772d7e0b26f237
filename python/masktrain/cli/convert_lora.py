"""``masktrain convert-lora``: a masktrain LoRA file in another layout."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain import catalog
from masktrain.cli.options import existing_file, option
from masktrain.cli.outcome import run_job
from masktrain.config.train import LORA_FORMATS


@click.command("convert-lora")
@option("input", type=existing_file(), required=True, help="A LoRA file (masktrain's, musubi's, any layout).")
@option("output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The file to write.")
@option("to", type=click.Choice(LORA_FORMATS), required=True, help="The layout to write.")
@option(
    "arch",
    type=click.Choice(catalog.ARCH_NAMES),
    default=None,
    help="Model family of a file whose metadata and layer names do not tell.",
)
def convert_lora(input: Path, output: Path, to: str, arch: str | None) -> None:
    """Rewrite a LoRA file in the comfyui, diffusers or musubi layout (tensors and alpha unchanged)."""

    def job() -> None:
        from masktrain.denoiser.lora_convert import convert

        source_layout = convert(input, output, to, arch)  # type: ignore[arg-type]  # click checked the choice
        click.echo(f"{input} ({source_layout}) -> {output} ({to})")

    run_job(job)
