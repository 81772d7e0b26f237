"""The LoRA file: the ComfyUI, diffusers and musubi layouts (keys, alpha, metadata), conversion
between them and back unchanged, files musubi-tuner wrote, atomic saves, and foreign files
refused with a line that names what is wrong (a LoRA of another family names that family)."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import QwenImagePipeline

from helpers import (
    DEFAULT_TARGETS,
    LORA_ALPHA,
    LORA_ARCHES,
    LORA_RANK,
    denoiser_output,
    pipeline_with_fresh_base,
    read_safetensors,
    tiny_denoiser,
    trained_lora,
)
from masktrain import __version__, atomic
from masktrain.denoiser.lora import load_lora_into, lora_state_dict, save_lora
from masktrain.errors import LoraFileError
from masktrain.models import get_family


def test_comfyui_layout_keys_alpha_and_metadata(tmp_path: Path) -> None:
    transformer = trained_lora("wan")
    path = tmp_path / "out" / "wan.safetensors"
    save_lora(
        path, transformer, get_family("wan"), layout="comfyui", metadata={"masktrain.mask_gamma": "1.0"}
    )
    tensors, metadata = read_safetensors(path)
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
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == LORA_ALPHA
    assert tensors["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].shape == (LORA_RANK, 24)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    peft = lora_state_dict(transformer)
    assert torch.equal(
        tensors["diffusion_model.blocks.1.ffn.0.lora_B.weight"], peft["blocks.1.ffn.net.0.proj.lora_B.weight"]
    )
    assert metadata == {
        "format": "pt",
        "masktrain.arch": "wan",
        "masktrain.rank": str(LORA_RANK),
        "masktrain.alpha": "2.0",
        "masktrain.version": __version__,
        "masktrain.layout": "comfyui",
        "masktrain.mask_gamma": "1.0",
    }
    assert [p.name for p in path.parent.iterdir()] == ["wan.safetensors"]  # no temp file left


def test_musubi_layout_keys_are_musubi_tunerss_lora_unet_names(tmp_path: Path) -> None:
    # musubi-tuner's networks/lora.py names a module lora_unet_ + its original path, dots as "_",
    # with lora_down (A), lora_up (B) and alpha.
    transformer = trained_lora("wan")
    path = tmp_path / "wan.safetensors"
    save_lora(path, transformer, get_family("wan"), layout="musubi", metadata={})
    tensors, metadata = read_safetensors(path)
    assert len(tensors) == 3 * len(DEFAULT_TARGETS["wan"]) and metadata["masktrain.layout"] == "musubi"
    peft = lora_state_dict(transformer)
    assert torch.equal(
        tensors["lora_unet_blocks_0_self_attn_q.lora_down.weight"], peft["blocks.0.attn1.to_q.lora_A.weight"]
    )
    assert torch.equal(
        tensors["lora_unet_blocks_1_ffn_0.lora_up.weight"], peft["blocks.1.ffn.net.0.proj.lora_B.weight"]
    )
    assert tensors["lora_unet_blocks_1_cross_attn_o.alpha"].item() == LORA_ALPHA


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_convert_lora_goes_through_every_layout_and_back_unchanged(tmp_path: Path, arch: str) -> None:
    from click.testing import CliRunner

    from masktrain.cli import main

    transformer = trained_lora(arch)
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
        fresh = tiny_denoiser(arch)
        metadata = load_lora_into(fresh, converted, get_family(arch))
        assert metadata["masktrain.layout"] == layout and metadata["masktrain.mask_gamma"] == "0.7"
        assert torch.equal(denoiser_output(arch, fresh), denoiser_output(arch, transformer))
        previous = converted
    # back in the ComfyUI layout: the very same tensors and metadata
    original, original_meta = read_safetensors(start)
    final, final_meta = read_safetensors(previous)
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
    save_lora(path, trained_lora("qwen_image"), get_family("qwen_image"), layout="comfyui", metadata={})
    tensors, _ = read_safetensors(path)
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert "diffusion_model.transformer_blocks.1.img_mlp.net.0.proj.alpha" in tensors


def test_diffusers_layout_matches_save_lora_weights(tmp_path: Path) -> None:
    transformer = trained_lora("qwen_image")
    ours = tmp_path / "ours.safetensors"
    save_lora(ours, transformer, get_family("qwen_image"), layout="diffusers", metadata={"x": "y"})
    QwenImagePipeline.save_lora_weights(
        tmp_path / "theirs",
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    tensors, metadata = read_safetensors(ours)
    theirs, their_metadata = read_safetensors(tmp_path / "theirs" / "pytorch_lora_weights.safetensors")
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
    assert (adapter["transformer.r"], adapter["transformer.lora_alpha"]) == (LORA_RANK, LORA_ALPHA)
    assert metadata["masktrain.arch"] == "qwen_image" and metadata["x"] == "y"


def test_save_precision_and_metadata_checks(tmp_path: Path) -> None:
    transformer = trained_lora("wan")
    family = get_family("wan")
    path = tmp_path / "bf16.safetensors"
    save_lora(path, transformer, family, layout="comfyui", metadata={}, dtype=torch.bfloat16)
    tensors, _ = read_safetensors(path)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    with pytest.raises(ValueError, match=r"keys \['masktrain.rank'\] are reserved"):
        save_lora(path, transformer, family, layout="comfyui", metadata={"masktrain.rank": "8"})
    with pytest.raises(TypeError, match=r"must map str to str; not so for \['steps'\]"):
        save_lora(path, transformer, family, layout="comfyui", metadata={"steps": 10})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="layout 'kohya' is not one of comfyui, diffusers"):
        save_lora(path, transformer, family, layout="kohya", metadata={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        save_lora(path, tiny_denoiser("wan"), family, layout="comfyui", metadata={})


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformer = trained_lora("wan")
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
        load_lora_into(tiny_denoiser("wan"), foreign, get_family("wan"))
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"junk")
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        load_lora_into(tiny_denoiser("wan"), not_safetensors, get_family("wan"))
    wan_file = tmp_path / "wan.safetensors"
    save_lora(wan_file, trained_lora("wan"), get_family("wan"), layout="comfyui", metadata={})
    with pytest.raises(LoraFileError, match="already has a LoRA adapter"):
        load_lora_into(trained_lora("wan"), wan_file, get_family("wan"))
    # a LoRA trained for another family is named as such, not as layers that do not fit
    with pytest.raises(LoraFileError, match="this LoRA was trained for wan; --arch is qwen_image"):
        load_lora_into(tiny_denoiser("qwen_image"), wan_file, get_family("qwen_image"))
    musubi_wan = musubi_written(tmp_path / "musubi-wan.safetensors", save_musubi(tmp_path, "wan"), "wan")
    with pytest.raises(LoraFileError, match="this LoRA was trained for wan; --arch is qwen_image"):
        load_lora_into(tiny_denoiser("qwen_image"), musubi_wan, get_family("qwen_image"))
    bare = tmp_path / "bare-qwen.safetensors"
    tensors, _ = read_safetensors(save_musubi(tmp_path, "qwen_image"))
    safetensors.torch.save_file(tensors, str(bare))  # no metadata: the layer names tell
    with pytest.raises(LoraFileError, match="this LoRA was trained for qwen_image; --arch is wan"):
        load_lora_into(tiny_denoiser("wan"), bare, get_family("wan"))


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
    save_lora(path, trained_lora(arch), get_family(arch), layout="musubi", metadata={})
    return path


def musubi_written(path: Path, source: Path, arch: str) -> Path:
    """`source` (masktrain's musubi layout) as musubi-tuner writes it: the same keys
    (``lora_unet_<path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, its
    networks/lora.py), bf16 matrices, and musubi's ``ss_*`` metadata instead of masktrain's."""
    tensors, _ = read_safetensors(source)
    tensors = {k: v if k.endswith(".alpha") else v.to(torch.bfloat16) for k, v in tensors.items()}
    module = {"wan": "networks.lora_wan", "qwen_image": "networks.lora_qwen_image"}[arch]
    metadata = {
        "ss_network_module": module,
        "ss_network_dim": str(LORA_RANK),
        "ss_network_alpha": str(LORA_ALPHA),
    }
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("arch", LORA_ARCHES)
def test_a_musubi_written_lora_converts_and_loads_through_diffusers(tmp_path: Path, arch: str) -> None:
    """A LoRA musubi-tuner wrote (no masktrain metadata) converts to the ComfyUI and diffusers
    layouts with its rank and alpha read off the file, and diffusers' loader gives the trained
    output (to bf16's rounding of the matrices)."""
    from masktrain.denoiser.lora_convert import convert

    transformer = trained_lora(arch)
    expected = denoiser_output(arch, transformer)
    source = tmp_path / "masktrain-musubi.safetensors"
    save_lora(source, transformer, get_family(arch), layout="musubi", metadata={})
    theirs = musubi_written(tmp_path / "musubi.safetensors", source, arch)
    for layout in ("comfyui", "diffusers"):
        target = tmp_path / f"{layout}.safetensors"
        assert convert(theirs, target, layout) == "musubi"
        _, metadata = read_safetensors(target)
        assert (metadata["masktrain.arch"], metadata["masktrain.rank"]) == (arch, str(LORA_RANK))
        assert float(metadata["masktrain.alpha"]) == LORA_ALPHA and metadata["ss_network_module"].endswith(
            arch
        )
        pipe = pipeline_with_fresh_base(arch)
        pipe.load_lora_weights(str(target))
        assert (denoiser_output(arch, pipe.transformer) - expected).abs().max() <= 2e-3
    fresh = tiny_denoiser(arch)
    load_lora_into(fresh, theirs, get_family(arch))  # masktrain sample --lora reads it as it is
    assert (denoiser_output(arch, fresh) - expected).abs().max() <= 2e-3


def test_a_lora_with_per_layer_alphas_that_differ_is_refused(tmp_path: Path) -> None:
    from masktrain.denoiser.lora_convert import convert

    source = tmp_path / "m.safetensors"
    save_lora(source, trained_lora("wan"), get_family("wan"), layout="musubi", metadata={})
    tensors, _ = read_safetensors(source)
    first = next(k for k in tensors if k.endswith(".alpha"))
    tensors[first] = torch.tensor(1.0)
    safetensors.torch.save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(
        LoraFileError, match=r"layers with different alphas \[1.0, 2.0\]; masktrain reads one"
    ):
        convert(tmp_path / "mixed.safetensors", tmp_path / "o.safetensors", "comfyui")
    assert not (tmp_path / "o.safetensors").exists()
