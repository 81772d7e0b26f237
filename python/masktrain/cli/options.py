"""The one way a flag is declared: in the guide's underscore spelling (``--dataset_config``, as
musubi-tuner and the weighted-mask guide write it) plus its dashed alias (``--dataset-config``);
on/off switches also get their ``--no-`` forms in both spellings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from masktrain import catalog

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


def text_encoder_options(command: F) -> F:
    """One option per text-encoder flag of the catalog (``--t5``, ``--text_encoder``, ...), and one
    switch per fp8 text-encoder flag (``--fp8_t5``, ``--fp8_vl``)."""
    for spec in reversed(list(catalog.ARCHES.values())):
        help = (
            f"Tokenizer folder for a single-file {spec.text_encoder} ({spec.text_flag} FILE.safetensors): "
            f"the tokenizer of {spec.tokenizer_hub_id}."
        )
        command = option(spec.tokenizer_flag.removeprefix("--"), default=None, help=help)(command)
    fp8_flags: dict[str, list[str]] = {}
    for spec in catalog.ARCHES.values():
        fp8_flags.setdefault(spec.fp8_text_flag, []).append(spec.name)
    for fp8_flag, names in reversed(fp8_flags.items()):
        help = f"Text encoder in fp8 (e4m3) to save memory (--arch {' / '.join(names)})."
        command = flag(fp8_flag.removeprefix("--"), help)(command)
    by_flag: dict[str, list[catalog.ArchSpec]] = {}
    for spec in catalog.ARCHES.values():
        by_flag.setdefault(spec.text_flag, []).append(spec)
    for text_flag, specs in reversed(by_flag.items()):
        models = "; ".join(f"{spec.title}: {spec.text_encoder}" for spec in specs)
        help = f"Text encoder ({models}): 'tiny', or a local diffusers folder."
        command = option(text_flag.removeprefix("--"), default=None, help=help)(command)
    return command
