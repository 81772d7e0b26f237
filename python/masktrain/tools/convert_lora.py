"""``masktrain convert-lora``: a LoRA file in another layout (``comfyui``, ``diffusers``,
``musubi``; see ``train.lora.lora_file_bytes``), tensors and alpha unchanged. Files musubi-tuner
wrote (and other trainers' files in these layouts) convert too: their arch, rank and alpha are read
off the file (``train.lora.file_header``).

The three layouts name each layer differently: ComfyUI by the original module path, musubi by
that path with dots as underscores, diffusers by diffusers' module name. The mapping comes from
the family's built-in tiny transformer: a block's layer names do not depend on the model's size,
so ``blocks.17.self_attn.q`` maps as ``blocks.0.self_attn.q`` does, with the index put back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from masktrain import atomic
from masktrain.config.train import LoraLayout
from masktrain.errors import LoraFileError
from masktrain.models import get_family
from masktrain.models.base import ModelFamily
from masktrain.models.loading import TINY
from masktrain.train import lora

_RESERVED = {lora.META_ARCH, lora.META_RANK, lora.META_ALPHA, lora.META_VERSION, lora.META_LAYOUT, "format"}
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


def _resolver(family: ModelFamily) -> Callable[[str], str | None]:
    """ComfyUI path or musubi name -> diffusers name, for a model of any size: the tiny
    transformer's names, looked up with the first index as 0 and that index put back."""
    tiny = family.load_transformer(TINY, "--dit", torch.device("cpu"), torch.float32)
    templates = lora.layer_resolver(tiny, family)

    def resolve(base: str) -> str | None:
        template, index = _template(base)
        name = templates(template)
        return None if name is None else _with_index(name, index)

    return resolve


def convert(source: Path, target: Path, layout: LoraLayout, arch: str | None = None) -> str:
    """Write `source` (a masktrain LoRA file, or one musubi-tuner or another trainer wrote; `arch`
    when its layer names do not tell) to `target` in `layout`; returns the source's layout."""
    try:
        tensors = safetensors.torch.load_file(source)
        with safetensors.safe_open(source, "pt") as handle:
            metadata = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as error:
        raise LoraFileError(f"{source}: not a readable safetensors file ({error})") from error
    arch, rank, alpha = lora.file_header(tensors, metadata, source, arch)
    try:
        family = get_family(arch)
    except ValueError as error:
        raise LoraFileError(f"{source}: {error}") from None
    state = lora.peft_state(tensors, _resolver(family), family, source)
    kept = {k: v for k, v in metadata.items() if k not in _RESERVED and k != lora.DIFFUSERS_METADATA_KEY}
    data = lora.state_file_bytes(
        state,
        family,
        rank=rank,
        alpha=alpha,
        layout=layout,
        metadata=kept,
    )
    atomic.write_bytes(target, data)
    return str(metadata.get(lora.META_LAYOUT) or _layout_of(tensors))


def _layout_of(tensors: dict[str, torch.Tensor]) -> str:
    """The layout a file without masktrain's metadata is in, by its keys."""
    if all(key.startswith(lora.MUSUBI_PREFIX) for key in tensors):
        return "musubi"
    if all(key.startswith(lora.DIFFUSERS_PREFIX) for key in tensors):
        return "diffusers"
    return "comfyui"
