"""``masktrain demo``: a synthetic dataset, ``cache``, three ``train`` runs (no mask loss, mask
loss, mask loss with masked prior preservation) on the built-in tiny models, and a report.
torch is imported only when the command runs (``masktrain.demo`` itself imports none)."""

from __future__ import annotations

from pathlib import Path

import click

from masktrain.demo import DEFAULT_STEPS


@click.command("demo")
@click.option("--output_dir", "--output-dir", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("masktrain-demo"), show_default=True,
              help="Where the dataset, the three runs and the report go.")  # fmt: skip
@click.option("--arch", type=click.Choice(["wan", "qwen_image"]), default="wan", show_default=True,
              help="Model family (its built-in tiny models).")  # fmt: skip
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="Optimizer steps per run.")  # fmt: skip
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds the dataset, the three runs and the evaluation noise.")  # fmt: skip
def demo(output_dir: Path, arch: str, steps: int, seed: int) -> None:
    """Show what the mask loss and masked prior preservation do, on a tiny model in minutes.

    Trains three LoRAs from the same base and seed (unmasked; --use_mask_loss; --use_mask_loss
    with masked prior preservation), scores each on held-out images against the base model
    (subject improvement, background drift) and writes report.json, report.md and report.png.
    """
    from masktrain.demo import DemoConfig, run

    try:
        report = run(DemoConfig(output_dir=output_dir, arch=arch, steps=steps, seed=seed))
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    click.echo("")
    click.echo(report.table())
    click.echo(f"\nreport: {report.output_dir / 'report.md'} (report.json, report.png)")
