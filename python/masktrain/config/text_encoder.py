"""Which text encoder a command loads: each family names its weights with its own flag
(``catalog``: ``--t5`` for WAN, ``--text_encoder`` for Qwen-Image), its tokenizer folder for a
single file with another (``--t5_tokenizer`` / ``--text_encoder_tokenizer``) and fp8 weights with a
switch (``--fp8_t5`` / ``--fp8_vl``). ``cache`` encodes the captions with it, ``train`` and
``sample`` the sample prompts. Another family's flag is an error naming the right one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from masktrain import catalog
from masktrain.errors import FlagError


@dataclass(frozen=True)
class TextEncoderChoice:
    weights: str | None
    """The value of the family's text flag ('tiny', a folder or a single file); None: not given."""
    tokenizer: str | None = None
    """A tokenizer folder for a single-file encoder."""
    fp8: bool = False
    """Block Linear weights as float8 e4m3."""


def choose(
    arch: str,
    text_encoders: Mapping[str, str | None],
    tokenizers: Mapping[str, str | None] | None = None,
    fp8_text: Mapping[str, bool] | None = None,
    error: type[FlagError] = FlagError,
) -> TextEncoderChoice:
    """The text encoder of `arch` from every text flag's value (``{"--t5": ..., ...}``); a flag of
    another family that was given is an `error`."""
    spec = catalog.arch(arch)
    for flag, value in text_encoders.items():
        if flag != spec.text_flag and value is not None:
            raise error(f"{flag} is not used with --arch {arch}; pass {spec.text_flag}")
    for flag, on in (fp8_text or {}).items():
        if flag != spec.fp8_text_flag and on:
            raise error(f"{flag} is not used with --arch {arch}; use {spec.fp8_text_flag}")
    for flag, folder in (tokenizers or {}).items():
        if flag != spec.tokenizer_flag and folder is not None:
            raise error(f"{flag} is not used with --arch {arch}; use {spec.tokenizer_flag}")
    return TextEncoderChoice(
        weights=text_encoders.get(spec.text_flag),
        tokenizer=(tokenizers or {}).get(spec.tokenizer_flag),
        fp8=bool((fp8_text or {}).get(spec.fp8_text_flag)),
    )


def split_flags(
    values: Mapping[str, str | bool | None],
) -> tuple[dict[str, str | None], dict[str, str | None], dict[str, bool]]:
    """click's values of ``cli.options.text_encoder_options`` (``t5``, ``t5_tokenizer``,
    ``fp8_t5``, ...) as (text flags, tokenizer flags, fp8 switches), keyed ``--name``."""
    text: dict[str, str | None] = {}
    tokenizers: dict[str, str | None] = {}
    fp8: dict[str, bool] = {}
    for name, value in values.items():
        if isinstance(value, bool):
            fp8[f"--{name}"] = value
        elif name.endswith("tokenizer"):
            tokenizers[f"--{name}"] = value
        else:
            text[f"--{name}"] = value
    return text, tokenizers, fp8


def option_names() -> set[str]:
    """The click parameter names of every text-encoder flag (``t5``, ``fp8_vl``, ...)."""
    names = set()
    for spec in catalog.ARCHES.values():
        for flag in (spec.text_flag, spec.tokenizer_flag, spec.fp8_text_flag):
            names.add(flag.removeprefix("--"))
    return names
