"""``--arch`` value -> model family: each catalog record names its family's class, imported here.
Importing this module imports every family, so their checkpoint kinds are all registered before
any single file is read."""

from __future__ import annotations

import importlib

from masktrain import catalog
from masktrain.models.base import ModelFamily


def _load(spec: catalog.ArchSpec) -> ModelFamily:
    module, _, name = spec.family.partition(":")
    family: ModelFamily = getattr(importlib.import_module(module), name)()
    if family.spec is not spec:
        raise RuntimeError(f"{spec.family} implements --arch {family.spec.name}, not {spec.name}")
    return family


_FAMILIES: dict[str, ModelFamily] = {name: _load(spec) for name, spec in catalog.ARCHES.items()}
ARCHES: tuple[str, ...] = catalog.ARCH_NAMES


def get_family(arch: str) -> ModelFamily:
    """The family of ``--arch arch``; a ``SettingError`` naming the choices for an unknown one."""
    return _FAMILIES[catalog.arch(arch).name]
