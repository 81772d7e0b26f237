"""What every family in the catalog shares: a LoRA file of its tiny transformer's default targets,
without masktrain's metadata or musubi's module name, is read as that family from its layer names
alone in each layout (``ArchSpec.lora_layer_hints``), and as no other; a step-distilled version
trains with one warning naming its base."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from helpers import cached, train_config
from masktrain import catalog
from masktrain.denoiser.lora_file import COMFY_PREFIX, DIFFUSERS_PREFIX, MUSUBI_PREFIX, file_arch
from masktrain.models import ARCHES, get_family


def target_names(arch: str) -> list[str]:
    """The module names of the tiny transformer's Linear layers the family's LoRA targets."""
    family = get_family(arch)
    model = family.load_transformer("tiny", "--dit", torch.device("cpu"), torch.float32)
    targets = family.lora_targets()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(re.fullmatch(pattern, name) for pattern in targets.include)
        and not any(re.fullmatch(pattern, name) for pattern in targets.exclude)
    ]


def musubi(original: str) -> str:
    return original.replace(".", "_")


@pytest.mark.parametrize("arch", ARCHES)
def test_a_loras_layer_names_tell_its_family_in_every_layout(arch: str) -> None:
    family = get_family(arch)
    names = target_names(arch)
    assert names, arch
    one = torch.zeros(1)
    layouts = {
        "diffusers": {f"{DIFFUSERS_PREFIX}{name}.lora_A.weight": one for name in names},
        "comfyui": {f"{COMFY_PREFIX}{family.comfy_key(name)}.lora_A.weight": one for name in names},
        "musubi": {
            f"{MUSUBI_PREFIX}{family.comfy_key(name).replace('.', '_')}.lora_down.weight": one
            for name in names
        },
    }
    for layout, tensors in layouts.items():
        assert file_arch(tensors, {}) == arch, (arch, layout, sorted(tensors)[:3])
    assert catalog.arch(arch).lora_layer_hints


@pytest.mark.parametrize(
    ("arch", "version", "base"), [("z_image", "turbo", "base"), ("flux2", "klein-4b", "klein-base-4b")]
)
def test_a_distilled_version_trains_with_a_warning_that_names_its_base(
    arch: str, version: str, base: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from masktrain.train.loop import run as train

    toml = cached(tmp_path / "data", arch)
    with caplog.at_level(logging.WARNING):
        train(train_config(toml, tmp_path / "out", arch, max_train_steps=1, model_version=version))
    said = [r.getMessage() for r in caplog.records if "step-distilled" in r.getMessage()]
    assert len(said) == 1 and f"--model_version {base}" in said[0] and "teacher" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(train_config(toml, tmp_path / "base", arch, max_train_steps=1, model_version=base))
    assert "step-distilled" not in caplog.text
