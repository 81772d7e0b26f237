"""``masktrain demo``: synthetic datasets, ``cache``, ``train`` runs (no mask loss, mask loss, mask
loss with masked prior preservation; in the bleed scenario also the recipe's best option, over
three seeds) on the built-in tiny models, and a report. torch is imported only when the command
runs."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain import catalog
from masktrain.cli.options import directory, option
from masktrain.cli.outcome import run_job
from masktrain.config.demo import DEFAULT_STEPS, SCENARIOS


@click.command("demo")
@option(
    "output_dir",
    type=directory(False),
    default=Path("masktrain-demo"),
    show_default=True,
    help="Where the datasets, the runs and the report go.",
)
@option(
    "arch",
    type=click.Choice(catalog.ARCH_NAMES),
    default=catalog.WAN.name,
    show_default=True,
    help="Model family (its built-in tiny models).",
)
@option(
    "steps",
    type=click.IntRange(min=1),
    default=DEFAULT_STEPS,
    show_default=True,
    help="Optimizer steps per run.",
)
@option(
    "seed",
    type=int,
    default=42,
    show_default=True,
    help="Seeds the dataset, the runs and the evaluation noise (bleed: the first of three seeds).",
)
@option(
    "scenario",
    type=click.Choice(SCENARIOS),
    default="all",
    show_default=True,
    help="random: a new background per photo; bleed: every training photo in one room; all: both.",
)
def demo(output_dir: Path, arch: str, steps: int, seed: int, scenario: str) -> None:
    """Show what the mask loss and masked prior preservation do, on a tiny model in minutes.

    Random backgrounds: trains three LoRAs from the same base and seed (unmasked; --use_mask_loss;
    --use_mask_loss with masked prior preservation) and scores each on held-out images against
    the base model (subject improvement, background drift). Bleed: every training photo shot in
    one room; the same runs and the recipe's best option over three seeds, also scoring how far
    each LoRA paints that room into other photos (bleed). Writes report.json, report.md,
    report.png and bleed.png.
    """
    from masktrain.config.demo import DemoConfig

    def job() -> str:
        config = DemoConfig(output_dir=output_dir, arch=arch, steps=steps, seed=seed, scenario=scenario)
        from masktrain.cli.train import config_from_args
        from masktrain.demo import run  # torch: only once the flags are known to be good

        report = run(config, config_from_args)
        pictures = ", ".join(
            p.name for p in (report.output_dir / "report.png", report.output_dir / "bleed.png") if p.exists()
        )
        return f"\n{report.table()}\n\nreport: {report.output_dir / 'report.md'} (report.json, {pictures})"

    click.echo(run_job(job))
