"""A LoRA file in another layout (``comfyui``, ``diffusers``, ``musubi``; see ``lora_file``),
tensors and alpha unchanged: what ``masktrain convert-lora`` does. Files musubi-tuner wrote (and
other trainers' files in these layouts) convert too: their arch, rank and alpha are read off the
file (``lora_file.file_header``), which also refuses, before anything is written, a file with a
NaN or an infinity or whose metadata disagrees with its matrices.

The three layouts name each layer differently: ComfyUI by the original module path, musubi by
that path with dots as underscores, diffusers by diffusers' module name. The mapping comes from
the family's built-in tiny transformer: a block's layer names do not depend on the model's size,
so ``blocks.17.self_attn.q`` maps as ``blocks.0.self_attn.q`` does, with the index put back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from masktrain import atomic
from masktrain.config.train import LoraLayout
from masktrain.denoiser import lora_file
from masktrain.denoiser.lora import layer_resolver
from masktrain.errors import LoraFileError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily
from masktrain.models.loading import TINY

_FIRST_INDEX = re.compile(r"([._])(\d+)([._])")


def _template(name: str) -> tuple[str, str | None]:
    """`name` with its first index replaced by 0, and that index (None when it has none)."""
    match = _FIRST_INDEX.search(name)
    if match is None:
        return name, None
    return name[: match.start(2)] + "0" + name[match.end(2) :], match.group(2)


def _with_index(name: str, index: str | None) -> str:
    if index is None:
        return name
    match = _FIRST_INDEX.search(name)
    assert match is not None
    return name[: match.start(2)] + index + name[match.end(2) :]


def resolver(family: ModelFamily) -> Callable[[str], str | None]:
    """ComfyUI path or musubi name -> diffusers name, for a model of any size: the tiny
    transformer's names, looked up with the first index as 0 and that index put back."""
    tiny = family.load_transformer(TINY, "--dit", torch.device("cpu"), torch.float32)
    templates = layer_resolver(tiny, family)

    def resolve(base: str) -> str | None:
        template, index = _template(base)
        name = templates(template)
        return None if name is None else _with_index(name, index)

    return resolve


def convert(source: Path, target: Path, layout: LoraLayout, arch: str | None = None) -> str:
    """Write `source` (a masktrain LoRA file, or one musubi-tuner or another trainer wrote; `arch`
    when its layer names do not tell) to `target` in `layout`; returns the source's layout."""
    tensors, metadata = lora_file.read_lora_file(source)
    arch, rank, alpha = lora_file.file_header(tensors, metadata, source, arch)
    try:
        family = get_family(arch)
    except ValueError as error:
        raise LoraFileError(f"{source}: {error}") from None
    state = lora_file.peft_state(tensors, resolver(family), family, source)
    kept = {
        k: v
        for k, v in metadata.items()
        if k not in lora_file.RESERVED and k != lora_file.DIFFUSERS_METADATA_KEY
    }
    data = lora_file.state_file_bytes(state, family, rank=rank, alpha=alpha, layout=layout, metadata=kept)
    atomic.write_bytes(target, data)
    return lora_file.layout_of(tensors, metadata)
