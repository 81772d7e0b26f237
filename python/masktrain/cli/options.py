"""The one way a flag is declared: in the guide's underscore spelling (``--dataset_config``, as
musubi-tuner and the weighted-mask guide write it) plus its dashed alias (``--dataset-config``);
on/off switches also get their ``--no-`` forms in both spellings.

A flag that fills a field of a settings dataclass takes its help from that field's docstring
(``documented_by=``), the one place a flag is described, as litgpt's ``attribute_docstrings``
does: the docstrings are read from the dataclass's source with ``ast`` the first time ``--help``
shows them (so start-up reads nothing), with the ``double-backtick`` markup dropped and the
whitespace collapsed. ``help=`` is for flags without a field.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from masktrain import catalog

F = TypeVar("F", bound=Callable[..., Any])


def option(
    name: str,
    *,
    switch: bool = False,
    aliases: Sequence[str] = (),
    documented_by: type | None = None,
    **kwargs: Any,
) -> Callable[[F], F]:
    """``--name`` and, when `name` has an underscore, ``--name-with-dashes``, stored as `name`; each
    of `aliases` is spelt both ways too. ``switch=True`` makes an on/off pair (``--name/--no-name``);
    ``is_flag=True`` an on flag. With `documented_by` (a settings dataclass with a field `name`)
    the help is that field's docstring, and ``help=`` is refused."""
    spellings: list[str] = []
    for each in (name, *aliases):
        dashed = each.replace("_", "-")
        spellings += [each] if dashed == each else [each, dashed]
    if switch:
        declarations = [f"--{s}/--no-{s}" for s in spellings]
    else:
        declarations = [f"--{s}" for s in spellings]
    if documented_by is not None:
        kwargs |= {"cls": FieldOption, "documented_by": documented_by}
    decorator: Callable[[F], F] = click.option(*declarations, name, **kwargs)
    return decorator


class FieldOption(click.Option):
    """An option that fills a settings field, its help that field's docstring (:func:`field_help`),
    read only when help is shown."""

    def __init__(self, *args: Any, documented_by: type, **kwargs: Any) -> None:
        if kwargs.get("help") is not None:
            raise TypeError(f"{args[0]}: the help of a field's flag is the field's docstring")
        self.documented_by = documented_by
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:
        assert self.name is not None
        return field_help(self.documented_by)[self.name]

    @help.setter
    def help(self, value: str | None) -> None:
        """click's constructor sets the help it was given: none (checked above)."""


@functools.cache
def field_help(settings: type) -> Mapping[str, str]:
    """The docstring under each field of the dataclass `settings`, as help text: read from its
    source with ``ast`` once, ``double backticks`` dropped, whitespace collapsed to single spaces.
    A field without a docstring is not in the mapping."""
    tree = ast.parse(Path(inspect.getfile(settings)).read_text(encoding="utf-8"))
    (body,) = [
        node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == settings.__name__
    ]
    docs: dict[str, str] = {}
    for field, after in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = help_text(after.value.value)
    return docs


def help_text(docstring: str) -> str:
    """A docstring as one line of help: without the ``double-backtick`` markup, spaces collapsed."""
    return " ".join(docstring.replace("``", "").split())


def flag(name: str, help: str) -> Callable[[F], F]:
    """An on flag, off by default, without a settings field of its own."""
    return option(name, is_flag=True, default=False, help=help)


def directory(must_exist: bool) -> click.Path:
    return click.Path(exists=must_exist, file_okay=False, dir_okay=True, path_type=Path)


def existing_file() -> click.Path:
    return click.Path(exists=True, dir_okay=False, path_type=Path)


def text_encoder_options(command: F) -> F:
    """One option per text-encoder flag of the catalog (``--t5``, ``--text_encoder``, ...), and one
    switch per fp8 text-encoder flag (``--fp8_t5``, ``--fp8_vl``)."""
    by_tokenizer: dict[str, list[catalog.ArchSpec]] = {}
    for spec in catalog.ARCHES.values():
        by_tokenizer.setdefault(spec.tokenizer_flag, []).append(spec)
    for tokenizer_flag, specs in reversed(by_tokenizer.items()):
        encoders = " / ".join(dict.fromkeys(spec.text_encoder for spec in specs))
        hub = " / ".join(dict.fromkeys(spec.tokenizer_hub_id for spec in specs))
        text_flag = specs[0].text_flag
        help = (
            f"Tokenizer folder for a single-file {encoders} ({text_flag} FILE.safetensors): "
            f"the tokenizer of {hub}."
        )
        command = option(tokenizer_flag.removeprefix("--"), default=None, help=help)(command)
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
