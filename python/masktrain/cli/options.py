"""The one way a flag is declared: in the guide's underscore spelling (``--dataset_config``, as
musubi-tuner and the weighted-mask guide write it) plus its dashed alias (``--dataset-config``);
on/off switches also get their ``--no-`` forms in both spellings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def option(name: str, *, switch: bool = False, **kwargs: Any) -> Callable[[F], F]:
    """``--name`` and, when `name` has an underscore, ``--name-with-dashes``, stored as `name`.
    ``switch=True`` makes an on/off pair (``--name/--no-name``); ``is_flag=True`` an on flag."""
    dashed = name.replace("_", "-")
    spellings = [name] if dashed == name else [name, dashed]
    if switch:
        declarations = [f"--{s}/--no-{s}" for s in spellings]
    else:
        declarations = [f"--{s}" for s in spellings]
    decorator: Callable[[F], F] = click.option(*declarations, name, **kwargs)
    return decorator


def flag(name: str, help: str) -> Callable[[F], F]:
    """An on flag, off by default."""
    return option(name, is_flag=True, default=False, help=help)


def directory(must_exist: bool) -> click.Path:
    return click.Path(exists=must_exist, file_okay=False, dir_okay=True, path_type=Path)


def existing_file() -> click.Path:
    return click.Path(exists=True, dir_okay=False, path_type=Path)
