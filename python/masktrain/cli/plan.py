"""``masktrain plan``: the memory a ``train`` command would need, before anything loads. It takes
``train``'s flags (the same parser, so a command copied from a guide works with ``train``
replaced by ``plan``; ``--output_dir`` and ``--dataset_config`` become optional) and three of its
own: ``--resolution`` and ``--frames``. Flags that do not change memory are accepted and
ignored."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click

from masktrain import catalog
from masktrain.cli.outcome import run_job
from masktrain.cli.train import build_config
from masktrain.cli.train import train as train_command
from masktrain.errors import FlagError

OPTIONAL = ("dataset_config", "output_dir", "dit")


def _released_names() -> str:
    return ", ".join(name for spec in catalog.ARCHES.values() for name in spec.released)


def _plan_params() -> list[click.Parameter]:
    params = []
    for param in train_command.params:
        if param.name in OPTIONAL:
            param = _optional(param)
        params.append(param)
    return params


def _optional(param: click.Parameter) -> click.Parameter:
    """`param` (its help stays lazy: read only for --help) without being required."""
    optional = copy.copy(param)
    optional.required = False
    optional.default = None
    return optional


@click.command("plan", params=_plan_params())
@click.option(
    "--resolution",
    nargs=2,
    type=click.IntRange(min=16),
    default=None,
    help="W H of the largest bucket, without a dataset (or instead of its buckets).",
)
@click.option(
    "--frames",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Frames per clip with --resolution.",
)
def plan(resolution: tuple[int, int] | None, frames: int, **flags: Any) -> None:
    """How much device and host memory a training run needs, component by component, and the
    fewest --blocks_to_swap that fit --vram. Reads no weights: the transformer's config comes from
    its file's header or folder, or a released model's name given to --dit:

    \b
    wan2.1-1.3b, wan2.1-14b, wan2.2-a14b, wan2.2-ti2v-5b,
    wan2.1-i2v-14b, wan2.1-flf2v-14b, wan2.2-i2v-a14b,
    qwen-image-20b, qwen-image-2.1-7b (not traced yet),
    flux2-dev, flux2-klein-4b, flux2-klein-9b, z-image-6b."""

    def job() -> None:
        if flags["dit"] is None:
            raise FlagError(
                f"--dit is required: a model file or folder, or a released model: {_released_names()}"
            )
        if resolution is None and flags["dataset_config"] is None:
            raise FlagError("pass --dataset_config (the run's dataset) or --resolution W H [--frames N]")
        placeholders = {name: flags[name] or Path() for name in ("dataset_config", "output_dir")}
        released = catalog.arch(flags["arch"]).released.get(flags["dit"])
        if released is not None and released.experts > 1 and flags["dit_high_noise"] is None:
            placeholders["dit_high_noise"] = flags["dit"]  # both experts are of the released config
        config = build_config(flags | placeholders)
        from masktrain.plan import largest_bucket  # torch: only once the flags parsed
        from masktrain.plan.run import plan_lines

        if resolution is not None:
            bucket = largest_bucket.from_resolution(*resolution, frames)
        else:
            bucket = largest_bucket.from_dataset(config.dataset_config, config.arch)
        for line in plan_lines(config, bucket):
            click.echo(line)

    run_job(job)
