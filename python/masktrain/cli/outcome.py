"""How a command's job ends for the shell: masktrain's errors become exit codes through the one
table in ``masktrain.errors`` (2 flags and config, with click's usage line; 1 item or run
failures; 130 interruption), each with its one-line message, never a traceback. An OSError that
reaches here (a disk that filled up mid-run) is a run failure: exit 1, its message naming the
path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from masktrain.errors import Interrupted, MaskTrainError, exit_code

T = TypeVar("T")


def run_job(job: Callable[[], T]) -> T:
    """Run `job`; a masktrain error or an interruption exits with its code."""
    try:
        return job()
    except (MaskTrainError, Interrupted) as error:
        code = exit_code(error)
        if code == 2:
            raise click.UsageError(str(error)) from error
        click.echo(str(error) if isinstance(error, Interrupted) else f"Error: {error}", err=True)
        raise SystemExit(code) from None
    except OSError as error:
        click.echo(f"Error: {error}", err=True)
        raise SystemExit(1) from None
