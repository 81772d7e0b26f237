"""LoRA on the tiny denoisers: default and user-chosen targets, the teacher pass with adapters
off (exactly the base model, also under gradient checkpointing), and the LoRA file: both layouts
load back through diffusers' own ``load_lora_weights`` (and masktrain's loader) to the trained
model's output."""

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, WanPipeline

from masktrain import __version__, atomic
from masktrain.denoiser.lora import (
    adapters_disabled,
    add_lora,
    load_lora_into,
    lora_parameters,
    lora_state_dict,
    save_lora,
)
from masktrain.errors import LoraFileError, LoraTargetError
from masktrain.models import get_family
from masktrain.models.base import TextBatch

CPU, F32 = torch.device("cpu"), torch.float32
ARCHES = ["wan", "qwen_image"]
RANK, ALPHA = 4, 2.0  # alpha != rank, so a lost alpha shows; alpha / rank is exact in binary

WAN_BLOCK = [
    *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ffn.net.0.proj",
    "ffn.net.2",
]
QWEN_BLOCK = [
    *(f"attn.{p}" for p in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0")),
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
DEFAULT_TARGETS = {
    "wan": [f"blocks.{b}.{m}" for b in range(2) for m in WAN_BLOCK],
    "qwen_image": [f"transformer_blocks.{b}.{m}" for b in range(2) for m in QWEN_BLOCK],
}


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


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def base(arch: str) -> torch.nn.Module:
    return get_family(arch).load_transformer("tiny", "--dit", CPU, F32)


def inputs(arch: str) -> tuple[torch.Tensor, torch.Tensor, TextBatch]:
    family = get_family(arch)
    if arch == "wan":
        noisy, text = randn(2, 16, 3, 4, 4), [randn(5, 32, seed=1), randn(9, 32, seed=2)]
    else:
        noisy, text = randn(2, 4, 1, 4, 6), [randn(3, 16, seed=1), randn(6, 16, seed=2)]
    return noisy, torch.tensor([0.3, 0.85]), family.collate_text(text)


def predict(arch: str, transformer: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return get_family(arch).predict(transformer, *inputs(arch))


def trained(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny denoiser with an adapter whose weights are all nonzero (seeded, reproducible)."""
    transformer = base(arch)
    torch.manual_seed(seed)  # peft's Kaiming init of lora_A draws from the global generator
    add_lora(transformer, get_family(arch), rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return transformer


def adapted_modules(transformer: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]


# --- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_default_targets_are_attention_and_mlp_linears(arch: str) -> None:
    transformer = base(arch)
    names = add_lora(transformer, get_family(arch), rank=RANK, alpha=ALPHA)
    assert sorted(names) == sorted(DEFAULT_TARGETS[arch])
    assert sorted(adapted_modules(transformer)) == sorted(names)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    assert all(p.dtype == torch.float32 for p in lora_parameters(transformer))
    config = transformer.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (RANK, ALPHA, True)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_fresh_adapter_leaves_the_output_unchanged(arch: str) -> None:
    transformer = base(arch)
    add_lora(transformer, get_family(arch), rank=RANK, alpha=ALPHA)
    assert all(not p.any() for n, p in transformer.named_parameters() if ".lora_B." in n)
    assert all(p.any() for n, p in transformer.named_parameters() if ".lora_A." in n)
    assert torch.equal(predict(arch, transformer), predict(arch, base(arch)))


def test_lora_in_bf16_base_trains_in_float32() -> None:
    family = get_family("wan")
    transformer = family.load_transformer("tiny", "--dit", CPU, torch.bfloat16)
    add_lora(transformer, family, rank=RANK, alpha=ALPHA)
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
    transformer = base(arch)
    names = add_lora(transformer, get_family(arch), rank=RANK, alpha=ALPHA, include=include, exclude=exclude)
    assert sorted(names) == sorted(expected)
    assert sorted(adapted_modules(transformer)) == sorted(expected)


def test_patterns_that_select_nothing_are_an_error() -> None:
    transformer = base("wan")
    with pytest.raises(LoraTargetError) as error:
        add_lora(transformer, get_family("wan"), rank=RANK, alpha=ALPHA, include=["nothing"], exclude=[".*"])
    message = str(error.value)
    assert "no Linear layer of the wan transformer is selected" in message
    assert "include_patterns=['nothing'], exclude_patterns=['.*']" in message
    assert "blocks.0.attn1.to_q" in message  # shows what names look like
    assert not getattr(transformer, "_hf_peft_config_loaded", False)  # left untouched


def test_invalid_patterns_and_rank_and_a_second_adapter_are_errors() -> None:
    family = get_family("qwen_image")
    transformer = base("qwen_image")
    with pytest.raises(LoraTargetError, match=r"exclude_patterns: '\(' is not a valid regular expression"):
        add_lora(transformer, family, rank=RANK, alpha=ALPHA, exclude=["("])
    with pytest.raises(LoraTargetError, match="--network_dim must be >= 1, got 0"):
        add_lora(transformer, family, rank=0, alpha=ALPHA)
    add_lora(transformer, family, rank=RANK, alpha=ALPHA)
    with pytest.raises(LoraTargetError, match="already has a LoRA adapter"):
        add_lora(transformer, family, rank=RANK, alpha=ALPHA)


# --- teacher pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_adapters_disabled_is_exactly_the_base_model(arch: str) -> None:
    family = get_family(arch)
    reference = predict(arch, base(arch))
    transformer = trained(arch)
    assert (predict(arch, transformer) - reference).abs().max() > 1e-3
    with adapters_disabled(transformer):
        assert torch.equal(predict(arch, transformer), reference)
    assert (predict(arch, transformer) - reference).abs().max() > 1e-3

    # One optimiser step moves A and B; disabled is still the base, enabled is the new adapter.
    transformer.train()
    optimizer = torch.optim.SGD(lora_parameters(transformer), lr=0.1)
    noisy, sigmas, text = inputs(arch)
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
        assert torch.equal(predict(arch, transformer), reference)
    assert all(p.requires_grad for p in lora_parameters(transformer))


def test_adapters_come_back_after_an_error_and_frozen_ones_stay_frozen() -> None:
    transformer = trained("wan")
    expected = predict("wan", transformer)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(transformer):
        raise RuntimeError("boom")
    assert torch.equal(predict("wan", transformer), expected)
    assert all(p.requires_grad for p in lora_parameters(transformer))
    for param in lora_parameters(transformer):
        param.requires_grad_(False)
    with adapters_disabled(transformer):
        pass
    assert not any(p.requires_grad for p in lora_parameters(transformer))


def prior_step(arch: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Teacher first (no_grad, adapters off), then the student, a loss using both, backward."""
    family = get_family(arch)
    transformer = trained(arch)
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    noisy, sigmas, text = inputs(arch)
    target = randn(*noisy.shape, seed=7)
    with torch.no_grad(), adapters_disabled(transformer):
        teacher = family.predict(transformer, noisy, sigmas, text)
    student = family.predict(transformer, noisy, sigmas, text)
    loss = (student - target).square().mean() + 0.5 * (student - teacher).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    assert {n.rpartition(".lora_")[0] for n, g in grads.items() if g is None} == UNUSED[arch]
    return {n: g.clone() for n, g in grads.items() if g is not None}


@pytest.mark.parametrize("arch", ARCHES)
def test_teacher_pass_works_with_gradient_checkpointing(arch: str) -> None:
    plain = prior_step(arch, checkpointing=False)
    checkpointed = prior_step(arch, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and plain
    assert any(g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


# --- export ----------------------------------------------------------------------------------


def pipeline_with_fresh_base(arch: str):
    family = get_family(arch)
    encoder = family.load_text_encoder("tiny", CPU, F32)
    components = dict(
        transformer=base(arch),
        vae=family.load_vae("tiny", CPU, F32),
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return WanPipeline(**components) if arch == "wan" else QwenImagePipeline(**components)


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
@pytest.mark.parametrize("arch", ARCHES)
def test_exported_lora_loads_through_diffusers_to_the_same_output(
    tmp_path: Path, arch: str, layout: str
) -> None:
    transformer = trained(arch)
    expected = predict(arch, transformer)
    assert (expected - predict(arch, base(arch))).abs().max() > 1e-3
    path = tmp_path / f"{arch}-{layout}.safetensors"
    save_lora(path, transformer, get_family(arch), layout=layout, metadata={"ss_note": "hi"})

    pipe = pipeline_with_fresh_base(arch)
    pipe.load_lora_weights(str(path))
    assert len(adapted_modules(pipe.transformer)) == len(DEFAULT_TARGETS[arch])
    assert (predict(arch, pipe.transformer) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "musubi"])
@pytest.mark.parametrize("arch", ARCHES)
def test_load_lora_into_round_trip(tmp_path: Path, arch: str, layout: str) -> None:
    transformer = trained(arch)
    path = tmp_path / "lora.safetensors"
    save_lora(path, transformer, get_family(arch), layout=layout, metadata={})
    fresh = base(arch)
    metadata = load_lora_into(fresh, path, get_family(arch))
    assert metadata["masktrain.layout"] == layout
    assert sorted(adapted_modules(fresh)) == sorted(DEFAULT_TARGETS[arch])
    assert torch.equal(predict(arch, fresh), predict(arch, transformer))
    assert lora_state_dict(fresh).keys() == lora_state_dict(transformer).keys()


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    return safetensors.torch.load_file(path), metadata


def test_comfyui_layout_keys_alpha_and_metadata(tmp_path: Path) -> None:
    transformer = trained("wan")
    path = tmp_path / "out" / "wan.safetensors"
    save_lora(
        path, transformer, get_family("wan"), layout="comfyui", metadata={"masktrain.mask_gamma": "1.0"}
    )
    tensors, metadata = read(path)
    assert len(tensors) == 3 * len(DEFAULT_TARGETS["wan"])
    for key in (
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
        "diffusion_model.blocks.1.cross_attn.o.lora_A.weight",
        "diffusion_model.blocks.1.ffn.0.lora_B.weight",
        "diffusion_model.blocks.1.ffn.2.lora_A.weight",
    ):
        assert key in tensors
    alpha = tensors["diffusion_model.blocks.0.self_attn.q.alpha"]
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    assert tensors["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].shape == (RANK, 24)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    peft = lora_state_dict(transformer)
    assert torch.equal(
        tensors["diffusion_model.blocks.1.ffn.0.lora_B.weight"], peft["blocks.1.ffn.net.0.proj.lora_B.weight"]
    )
    assert metadata == {
        "format": "pt",
        "masktrain.arch": "wan",
        "masktrain.rank": str(RANK),
        "masktrain.alpha": "2.0",
        "masktrain.version": __version__,
        "masktrain.layout": "comfyui",
        "masktrain.mask_gamma": "1.0",
    }
    assert [p.name for p in path.parent.iterdir()] == ["wan.safetensors"]  # no temp file left


def test_musubi_layout_keys_are_musubi_tunerss_lora_unet_names(tmp_path: Path) -> None:
    # musubi-tuner's networks/lora.py names a module lora_unet_ + its original path, dots as "_",
    # with lora_down (A), lora_up (B) and alpha.
    transformer = trained("wan")
    path = tmp_path / "wan.safetensors"
    save_lora(path, transformer, get_family("wan"), layout="musubi", metadata={})
    tensors, metadata = read(path)
    assert len(tensors) == 3 * len(DEFAULT_TARGETS["wan"]) and metadata["masktrain.layout"] == "musubi"
    peft = lora_state_dict(transformer)
    assert torch.equal(
        tensors["lora_unet_blocks_0_self_attn_q.lora_down.weight"], peft["blocks.0.attn1.to_q.lora_A.weight"]
    )
    assert torch.equal(
        tensors["lora_unet_blocks_1_ffn_0.lora_up.weight"], peft["blocks.1.ffn.net.0.proj.lora_B.weight"]
    )
    assert tensors["lora_unet_blocks_1_cross_attn_o.alpha"].item() == ALPHA


@pytest.mark.parametrize("arch", ARCHES)
def test_convert_lora_goes_through_every_layout_and_back_unchanged(tmp_path: Path, arch: str) -> None:
    from click.testing import CliRunner

    from masktrain.cli import main

    transformer = trained(arch)
    start = tmp_path / "comfyui.safetensors"
    save_lora(
        start, transformer, get_family(arch), layout="comfyui", metadata={"masktrain.mask_gamma": "0.7"}
    )
    previous = start
    for layout in ("musubi", "diffusers", "comfyui"):
        converted = tmp_path / f"{layout}-{previous.stem}.safetensors"
        result = CliRunner().invoke(
            main, ["convert-lora", "--input", str(previous), "--output", str(converted), "--to", layout]
        )
        assert result.exit_code == 0, result.output
        fresh = base(arch)
        metadata = load_lora_into(fresh, converted, get_family(arch))
        assert metadata["masktrain.layout"] == layout and metadata["masktrain.mask_gamma"] == "0.7"
        assert torch.equal(predict(arch, fresh), predict(arch, transformer))
        previous = converted
    # back in the ComfyUI layout: the very same tensors and metadata
    original, original_meta = read(start)
    final, final_meta = read(previous)
    assert original.keys() == final.keys() and all(torch.equal(original[k], final[k]) for k in original)
    assert original_meta == final_meta


def test_convert_lora_rejects_a_file_of_unknown_layers(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from masktrain.cli import main

    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(foreign))
    result = CliRunner().invoke(
        main,
        [
            "convert-lora",
            "--input",
            str(foreign),
            "--output",
            str(tmp_path / "o.safetensors"),
            "--to",
            "comfyui",
        ],
    )
    assert (
        result.exit_code == 2
        and "no masktrain metadata and no known layer names; pass --arch" in result.output
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_qwen_comfyui_keys_are_the_diffusers_names(tmp_path: Path) -> None:
    path = tmp_path / "qwen.safetensors"
    save_lora(path, trained("qwen_image"), get_family("qwen_image"), layout="comfyui", metadata={})
    tensors, _ = read(path)
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert "diffusion_model.transformer_blocks.1.img_mlp.net.0.proj.alpha" in tensors


def test_diffusers_layout_matches_save_lora_weights(tmp_path: Path) -> None:
    transformer = trained("qwen_image")
    ours = tmp_path / "ours.safetensors"
    save_lora(ours, transformer, get_family("qwen_image"), layout="diffusers", metadata={"x": "y"})
    QwenImagePipeline.save_lora_weights(
        tmp_path / "theirs",
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    tensors, metadata = read(ours)
    theirs, their_metadata = read(tmp_path / "theirs" / "pytorch_lora_weights.safetensors")
    assert tensors.keys() == theirs.keys()
    assert all(torch.equal(tensors[k], theirs[k]) for k in tensors)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    adapter = json.loads(metadata["lora_adapter_metadata"])
    their_adapter = json.loads(their_metadata["lora_adapter_metadata"])
    # The same peft config, except that we list the exact module names (peft compresses the
    # list it was given to suffixes such as "2" and "proj").
    assert adapter.pop("transformer.target_modules") == sorted(DEFAULT_TARGETS["qwen_image"])
    their_adapter.pop("transformer.target_modules")
    assert adapter == their_adapter
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert (adapter["transformer.r"], adapter["transformer.lora_alpha"]) == (RANK, ALPHA)
    assert metadata["masktrain.arch"] == "qwen_image" and metadata["x"] == "y"


def test_save_precision_and_metadata_checks(tmp_path: Path) -> None:
    transformer = trained("wan")
    family = get_family("wan")
    path = tmp_path / "bf16.safetensors"
    save_lora(path, transformer, family, layout="comfyui", metadata={}, dtype=torch.bfloat16)
    tensors, _ = read(path)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    with pytest.raises(ValueError, match=r"keys \['masktrain.rank'\] are reserved"):
        save_lora(path, transformer, family, layout="comfyui", metadata={"masktrain.rank": "8"})
    with pytest.raises(TypeError, match=r"must map str to str; not so for \['steps'\]"):
        save_lora(path, transformer, family, layout="comfyui", metadata={"steps": 10})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="layout 'kohya' is not one of comfyui, diffusers"):
        save_lora(path, transformer, family, layout="kohya", metadata={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        save_lora(path, base("wan"), family, layout="comfyui", metadata={})


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformer = trained("wan")
    path = tmp_path / "lora.safetensors"
    save_lora(path, transformer, get_family("wan"), layout="comfyui", metadata={})
    before = path.read_bytes()

    def torn_write(descriptor: int) -> None:  # the new bytes sit in the temporary, not yet on disk
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, transformer, get_family("wan"), layout="diffusers", metadata={})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_load_lora_into_rejects_foreign_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"diffusion_model.x.lora_A.weight": torch.zeros(1, 1)}, foreign)
    with pytest.raises(LoraFileError, match=r"diffusion_model\.x\.lora_A\.weight names no Linear layer"):
        load_lora_into(base("wan"), foreign, get_family("wan"))
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"junk")
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        load_lora_into(base("wan"), not_safetensors, get_family("wan"))
    wan_file = tmp_path / "wan.safetensors"
    save_lora(wan_file, trained("wan"), get_family("wan"), layout="comfyui", metadata={})
    with pytest.raises(LoraFileError, match="already has a LoRA adapter"):
        load_lora_into(trained("wan"), wan_file, get_family("wan"))
    # a LoRA trained for another family is named as such, not as layers that do not fit
    with pytest.raises(LoraFileError, match="this LoRA was trained for wan; --arch is qwen_image"):
        load_lora_into(base("qwen_image"), wan_file, get_family("qwen_image"))
    musubi_wan = musubi_written(tmp_path / "musubi-wan.safetensors", save_musubi(tmp_path, "wan"), "wan")
    with pytest.raises(LoraFileError, match="this LoRA was trained for wan; --arch is qwen_image"):
        load_lora_into(base("qwen_image"), musubi_wan, get_family("qwen_image"))
    bare = tmp_path / "bare-qwen.safetensors"
    tensors, _ = read(save_musubi(tmp_path, "qwen_image"))
    safetensors.torch.save_file(tensors, str(bare))  # no metadata: the layer names tell
    with pytest.raises(LoraFileError, match="this LoRA was trained for qwen_image; --arch is wan"):
        load_lora_into(base("wan"), bare, get_family("wan"))


def test_convert_lora_names_layers_of_a_model_larger_than_the_tiny_one() -> None:
    from masktrain.denoiser.lora_convert import resolver

    wan, qwen = resolver(get_family("wan")), resolver(get_family("qwen_image"))
    assert wan("blocks.17.self_attn.q") == "blocks.17.attn1.to_q"
    assert wan("blocks_39_ffn_0") == "blocks.39.ffn.net.0.proj"
    assert wan("blocks.39.cross_attn.o") == "blocks.39.attn2.to_out.0"
    assert qwen("transformer_blocks.59.attn.to_add_out") == "transformer_blocks.59.attn.to_add_out"
    assert qwen("transformer_blocks_59_img_mlp_net_2") == "transformer_blocks.59.img_mlp.net.2"
    assert wan("blocks.3.no_such_layer") is None


def save_musubi(folder: Path, arch: str) -> Path:
    """A trained LoRA in masktrain's musubi layout (with masktrain's metadata)."""
    path = folder / f"masktrain-musubi-{arch}.safetensors"
    save_lora(path, trained(arch), get_family(arch), layout="musubi", metadata={})
    return path


def musubi_written(path: Path, source: Path, arch: str) -> Path:
    """`source` (masktrain's musubi layout) as musubi-tuner writes it: the same keys
    (``lora_unet_<path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, its
    networks/lora.py), bf16 matrices, and musubi's ``ss_*`` metadata instead of masktrain's."""
    tensors, _ = read(source)
    tensors = {k: v if k.endswith(".alpha") else v.to(torch.bfloat16) for k, v in tensors.items()}
    module = {"wan": "networks.lora_wan", "qwen_image": "networks.lora_qwen_image"}[arch]
    metadata = {"ss_network_module": module, "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("arch", ARCHES)
def test_a_musubi_written_lora_converts_and_loads_through_diffusers(tmp_path: Path, arch: str) -> None:
    """A LoRA musubi-tuner wrote (no masktrain metadata) converts to the ComfyUI and diffusers
    layouts with its rank and alpha read off the file, and diffusers' loader gives the trained
    output (to bf16's rounding of the matrices)."""
    from masktrain.denoiser.lora_convert import convert

    transformer = trained(arch)
    expected = predict(arch, transformer)
    source = tmp_path / "masktrain-musubi.safetensors"
    save_lora(source, transformer, get_family(arch), layout="musubi", metadata={})
    theirs = musubi_written(tmp_path / "musubi.safetensors", source, arch)
    for layout in ("comfyui", "diffusers"):
        target = tmp_path / f"{layout}.safetensors"
        assert convert(theirs, target, layout) == "musubi"
        _, metadata = read(target)
        assert (metadata["masktrain.arch"], metadata["masktrain.rank"]) == (arch, str(RANK))
        assert float(metadata["masktrain.alpha"]) == ALPHA and metadata["ss_network_module"].endswith(arch)
        pipe = pipeline_with_fresh_base(arch)
        pipe.load_lora_weights(str(target))
        assert (predict(arch, pipe.transformer) - expected).abs().max() <= 2e-3
    fresh = base(arch)
    load_lora_into(fresh, theirs, get_family(arch))  # masktrain sample --lora reads it as it is
    assert (predict(arch, fresh) - expected).abs().max() <= 2e-3


def test_a_lora_with_per_layer_alphas_that_differ_is_refused(tmp_path: Path) -> None:
    from masktrain.denoiser.lora_convert import convert

    source = tmp_path / "m.safetensors"
    save_lora(source, trained("wan"), get_family("wan"), layout="musubi", metadata={})
    tensors, _ = read(source)
    first = next(k for k in tensors if k.endswith(".alpha"))
    tensors[first] = torch.tensor(1.0)
    safetensors.torch.save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(
        LoraFileError, match=r"layers with different alphas \[1.0, 2.0\]; masktrain reads one"
    ):
        convert(tmp_path / "mixed.safetensors", tmp_path / "o.safetensors", "comfyui")
    assert not (tmp_path / "o.safetensors").exists()
