"""``masktrain masks``: making the masks the loss reads (the guide's "Weighted Mask Pipeline")."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain.cli.options import directory, option
from masktrain.cli.outcome import run_job
from masktrain.config.masks import MISSING_POLICIES


@click.group("masks")
def masks() -> None:
    """Make masks: the subject of a group photo only (apply-instance)."""


@masks.command("apply-instance")
@option("weighted_masks", type=directory(True), required=True, help="Tiered masks (PNG / JPEG).")
@option("instance_masks", type=directory(True), required=True, help="Binary subject masks, {stem}.png.")
@option("output", type=directory(False), required=True, help="Where the subject-only masks go.")
@option(
    "dilate", type=click.IntRange(min=0), default=0, show_default=True, help="Grow the subject by N pixels."
)
@option(
    "missing",
    type=click.Choice(MISSING_POLICIES),
    default="copy",
    show_default=True,
    help="A weighted mask without an instance mask: copy it, zero it, skip it, or stop.",
)
def apply_instance(
    weighted_masks: Path, instance_masks: Path, output: Path, dilate: int, missing: str
) -> None:
    """Zero every tiered mask outside its subject's instance mask (bystanders get weight 0)."""
    from masktrain.config.masks import ApplyInstanceConfig
    from masktrain.masks.apply_instance import run

    def job() -> None:
        config = ApplyInstanceConfig(weighted_masks, instance_masks, output, dilate=dilate, missing=missing)
        click.echo(run(config).line())

    run_job(job)
