"""LoRA on the tiny denoisers: default and user-chosen targets, the teacher pass with adapters
off (exactly the base model, also under gradient checkpointing), and the exported LoRA loading
back through diffusers' own ``load_lora_weights`` (and masktrain's loader) to the trained
model's output. The file's layouts and conversions: ``test_lora_file.py``."""

from pathlib import Path

import pytest
import torch

from helpers import (
    DEFAULT_TARGETS,
    LORA_ALPHA,
    LORA_ARCHES,
    LORA_RANK,
    adapted_modules,
    denoiser_inputs,
    denoiser_output,
    pipeline_with_fresh_base,
    randn,
    tiny_denoiser,
    trained_lora,
)
from masktrain.denoiser.lora import (
    adapters_disabled,
    add_lora,
    load_lora_into,
    lora_parameters,
    lora_state_dict,
    save_lora,
)
from masktrain.errors import LoraTargetError
from masktrain.models import get_family

CPU, F32 = torch.device("cpu"), torch.float32

# Qwen-Image's last block also updates the text stream, which nothing reads afterwards. LoRA on
# its text output layers gets no gradient at all (grad None: DDP needs find_unused_parameters),
# and its text query only feeds those, so its gradient is zero. The real 60-layer model alike.
UNUSED = {
    "wan": set(),
    "qwen_image": {
        f"transformer_blocks.1.{m}" for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    },
}
NO_EFFECT = {"wan": set(), "qwen_image": UNUSED["qwen_image"] | {"transformer_blocks.1.attn.add_q_proj"}}


# --- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_default_targets_are_attention_and_mlp_linears(arch: str) -> None:
    transformer = tiny_denoiser(arch)
    names = add_lora(transformer, get_family(arch), rank=LORA_RANK, alpha=LORA_ALPHA)
    assert sorted(names) == sorted(DEFAULT_TARGETS[arch])
    assert sorted(adapted_modules(transformer)) == sorted(names)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    assert all(p.dtype == torch.float32 for p in lora_parameters(transformer))
    config = transformer.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (LORA_RANK, LORA_ALPHA, True)


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_a_fresh_adapter_leaves_the_output_unchanged(arch: str) -> None:
    transformer = tiny_denoiser(arch)
    add_lora(transformer, get_family(arch), rank=LORA_RANK, alpha=LORA_ALPHA)
    assert all(not p.any() for n, p in transformer.named_parameters() if ".lora_B." in n)
    assert all(p.any() for n, p in transformer.named_parameters() if ".lora_A." in n)
    assert torch.equal(denoiser_output(arch, transformer), denoiser_output(arch, tiny_denoiser(arch)))


def test_lora_in_bf16_base_trains_in_float32() -> None:
    family = get_family("wan")
    transformer = family.load_transformer("tiny", "--dit", CPU, torch.bfloat16)
    add_lora(transformer, family, rank=LORA_RANK, alpha=LORA_ALPHA)
    assert {p.dtype for p in lora_parameters(transformer)} == {torch.float32}


@pytest.mark.parametrize(
    ("arch", "include", "exclude", "expected"),
    [
        # User excludes add to the defaults.
        ("wan", None, [r".*ffn.*"], [n for n in DEFAULT_TARGETS["wan"] if "ffn" not in n]),
        # Exclude everything, include back: patterns may use the original (ComfyUI) names ...
        ("wan", [r".*self_attn\..*"], [".*"], [n for n in DEFAULT_TARGETS["wan"] if "attn1" in n]),
        # ... or the diffusers ones.
        ("wan", [r"blocks\.1\.ffn\.net\.2"], [".*"], ["blocks.1.ffn.net.2"]),
        (
            "qwen_image",
            None,
            [r".*txt_mlp.*"],
            [n for n in DEFAULT_TARGETS["qwen_image"] if "txt_mlp" not in n],
        ),
        # An include pattern rescues a default exclude (musubi's rule), within the blocks.
        (
            "qwen_image",
            [r".*img_mod.*", "proj_out"],
            None,
            [
                *DEFAULT_TARGETS["qwen_image"],
                "transformer_blocks.0.img_mod.1",
                "transformer_blocks.1.img_mod.1",
            ],
        ),
    ],
)
def test_include_and_exclude_patterns(arch: str, include, exclude, expected: list[str]) -> None:
    transformer = tiny_denoiser(arch)
    names = add_lora(
        transformer, get_family(arch), rank=LORA_RANK, alpha=LORA_ALPHA, include=include, exclude=exclude
    )
    assert sorted(names) == sorted(expected)
    assert sorted(adapted_modules(transformer)) == sorted(expected)


def test_patterns_that_select_nothing_are_an_error() -> None:
    transformer = tiny_denoiser("wan")
    with pytest.raises(LoraTargetError) as error:
        add_lora(
            transformer,
            get_family("wan"),
            rank=LORA_RANK,
            alpha=LORA_ALPHA,
            include=["nothing"],
            exclude=[".*"],
        )
    message = str(error.value)
    assert "no Linear layer of the wan transformer is selected" in message
    assert "include_patterns=['nothing'], exclude_patterns=['.*']" in message
    assert "blocks.0.attn1.to_q" in message  # shows what names look like
    assert not getattr(transformer, "_hf_peft_config_loaded", False)  # left untouched


def test_invalid_patterns_and_rank_and_a_second_adapter_are_errors() -> None:
    family = get_family("qwen_image")
    transformer = tiny_denoiser("qwen_image")
    with pytest.raises(LoraTargetError, match=r"exclude_patterns: '\(' is not a valid regular expression"):
        add_lora(transformer, family, rank=LORA_RANK, alpha=LORA_ALPHA, exclude=["("])
    with pytest.raises(LoraTargetError, match="--network_dim must be >= 1, got 0"):
        add_lora(transformer, family, rank=0, alpha=LORA_ALPHA)
    add_lora(transformer, family, rank=LORA_RANK, alpha=LORA_ALPHA)
    with pytest.raises(LoraTargetError, match="already has a LoRA adapter"):
        add_lora(transformer, family, rank=LORA_RANK, alpha=LORA_ALPHA)


# --- teacher pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_adapters_disabled_is_exactly_the_base_model(arch: str) -> None:
    family = get_family(arch)
    reference = denoiser_output(arch, tiny_denoiser(arch))
    transformer = trained_lora(arch)
    assert (denoiser_output(arch, transformer) - reference).abs().max() > 1e-3
    with adapters_disabled(transformer):
        assert torch.equal(denoiser_output(arch, transformer), reference)
    assert (denoiser_output(arch, transformer) - reference).abs().max() > 1e-3

    # One optimiser step moves A and B; disabled is still the base, enabled is the new adapter.
    transformer.train()
    optimizer = torch.optim.SGD(lora_parameters(transformer), lr=0.1)
    noisy, sigmas, text = denoiser_inputs(arch)
    before = {k: v.clone() for k, v in lora_state_dict(transformer).items()}
    family.predict(transformer, noisy, sigmas, text).square().mean().backward()
    optimizer.step()
    unchanged = {
        k.rpartition(".lora_")[0]
        for k, v in lora_state_dict(transformer).items()
        if torch.equal(before[k], v)
    }
    assert unchanged == NO_EFFECT[arch]
    with adapters_disabled(transformer):
        assert torch.equal(denoiser_output(arch, transformer), reference)
    assert all(p.requires_grad for p in lora_parameters(transformer))


def test_adapters_come_back_after_an_error_and_frozen_ones_stay_frozen() -> None:
    transformer = trained_lora("wan")
    expected = denoiser_output("wan", transformer)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(transformer):
        raise RuntimeError("boom")
    assert torch.equal(denoiser_output("wan", transformer), expected)
    assert all(p.requires_grad for p in lora_parameters(transformer))
    for param in lora_parameters(transformer):
        param.requires_grad_(False)
    with adapters_disabled(transformer):
        pass
    assert not any(p.requires_grad for p in lora_parameters(transformer))


def prior_step(arch: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Teacher first (no_grad, adapters off), then the student, a loss using both, backward."""
    family = get_family(arch)
    transformer = trained_lora(arch)
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    noisy, sigmas, text = denoiser_inputs(arch)
    target = randn(*noisy.shape, seed=7)
    with torch.no_grad(), adapters_disabled(transformer):
        teacher = family.predict(transformer, noisy, sigmas, text)
    student = family.predict(transformer, noisy, sigmas, text)
    loss = (student - target).square().mean() + 0.5 * (student - teacher).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    assert {n.rpartition(".lora_")[0] for n, g in grads.items() if g is None} == UNUSED[arch]
    return {n: g.clone() for n, g in grads.items() if g is not None}


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_teacher_pass_works_with_gradient_checkpointing(arch: str) -> None:
    plain = prior_step(arch, checkpointing=False)
    checkpointed = prior_step(arch, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and plain
    assert any(g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_exported_lora_loads_through_diffusers_to_the_same_output(
    tmp_path: Path, arch: str, layout: str
) -> None:
    transformer = trained_lora(arch)
    expected = denoiser_output(arch, transformer)
    assert (expected - denoiser_output(arch, tiny_denoiser(arch))).abs().max() > 1e-3
    path = tmp_path / f"{arch}-{layout}.safetensors"
    save_lora(path, transformer, get_family(arch), layout=layout, metadata={"ss_note": "hi"})

    pipe = pipeline_with_fresh_base(arch)
    pipe.load_lora_weights(str(path))
    assert len(adapted_modules(pipe.transformer)) == len(DEFAULT_TARGETS[arch])
    assert (denoiser_output(arch, pipe.transformer) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "musubi"])
@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_load_lora_into_round_trip(tmp_path: Path, arch: str, layout: str) -> None:
    transformer = trained_lora(arch)
    path = tmp_path / "lora.safetensors"
    save_lora(path, transformer, get_family(arch), layout=layout, metadata={})
    fresh = tiny_denoiser(arch)
    metadata = load_lora_into(fresh, path, get_family(arch))
    assert metadata["masktrain.layout"] == layout
    assert sorted(adapted_modules(fresh)) == sorted(DEFAULT_TARGETS[arch])
    assert torch.equal(denoiser_output(arch, fresh), denoiser_output(arch, transformer))
    assert lora_state_dict(fresh).keys() == lora_state_dict(transformer).keys()
