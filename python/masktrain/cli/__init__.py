"""The ``masktrain`` command line: a thin click layer. Each command (one file each) parses its
flags with ``options.option``, builds its config (``masktrain.config``, checked when built),
and runs its job through ``outcome.run_job``, which turns masktrain's errors into exit codes.
Logging is configured once, here: records go to stderr as ``LEVEL: message``, except a library's
announcements for the user's screen (``log.info(..., extra=ANNOUNCEMENT)``, such as the mask-loss
banner), which go to stdout as they are.

Importing this package must stay cheap: no torch, no extension, no heavy imports; each command
imports its job when it runs.
"""

from __future__ import annotations

import logging

import click

from masktrain import ANNOUNCEMENT, __version__
from masktrain.cli import cache, convert_alpha, convert_lora, demo, inspect, masks, plan, sample, train


def _announcement(record: logging.LogRecord) -> bool:
    return any(getattr(record, key, False) for key in ANNOUNCEMENT)


def _not_announcement(record: logging.LogRecord) -> bool:
    return not _announcement(record)


class _Stdout(logging.Handler):
    """Announcements, as they are, on the stdout of the moment (click's, under its test runner)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage())


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s")
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _Stdout):
            root.removeHandler(handler)
        else:
            handler.addFilter(_not_announcement)
    stdout = _Stdout()
    stdout.addFilter(_announcement)
    root.addHandler(stdout)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="masktrain")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Train LoRA adapters for diffusion transformers with a weighted mask loss."""
    _configure_logging(verbose)


for _command in (
    convert_alpha.convert_alpha,
    convert_lora.convert_lora,
    cache.cache,
    train.train,
    plan.plan,
    sample.sample,
    masks.masks,
    inspect.inspect,
    demo.demo,
):
    main.add_command(_command)

__all__ = ["main"]
