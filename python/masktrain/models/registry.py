"""``--arch`` value -> model family."""

from __future__ import annotations

from masktrain.models.base import ModelFamily
from masktrain.models.qwen_image import QwenImageFamily
from masktrain.models.wan import WanFamily

_FAMILIES: dict[str, ModelFamily] = {"wan": WanFamily(), "qwen_image": QwenImageFamily()}
ARCHES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(arch: str) -> ModelFamily:
    try:
        return _FAMILIES[arch]
    except KeyError:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(ARCHES)}") from None
