"""FLUX.2 LoRA files: the diffusers layout loads through ``Flux2KleinPipeline.load_lora_weights``;
the ComfyUI and musubi layouts use the original (BFL) layer names, whose double blocks fuse q, k
and v into one ``qkv`` Linear, so their LoRAs are written fused (A stacked, B block-diagonal,
alpha x 3) and read back split, exactly; a fused LoRA another trainer wrote (one A shared by q, k
and v) reads as the same update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import LORA_ALPHA, LORA_RANK, check_lora_round_trip, nonzero_lora, read_safetensors
from masktrain.denoiser.lora import load_lora_into, save_lora
from masktrain.denoiser.lora_convert import convert
from masktrain.models import get_family
from masktrain.models.flux2 import Flux2Family

CPU, F32 = torch.device("cpu"), torch.float32
HIDDEN = 32  # the tiny transformer's 2 heads x 16

# ComfyUI's comfy/utils.py flux_to_diffusers (Comfy-Org/ComfyUI @ 09708eae), the FLUX.2 block
# layers: diffusers name -> (BFL name, first output row, rows) for the sliced qkv, BFL name otherwise.
COMFY_FLUX_TO_DIFFUSERS: dict[str, str | tuple[str, int, int]] = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0, HIDDEN),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", HIDDEN, HIDDEN),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * HIDDEN, HIDDEN),
    "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", 0, HIDDEN),
    "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", HIDDEN, HIDDEN),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", 2 * HIDDEN, HIDDEN),
    "transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
    "transformer_blocks.0.attn.to_add_out": "double_blocks.0.txt_attn.proj",
    "transformer_blocks.0.ff.linear_in": "double_blocks.0.img_mlp.0",  # "LyCoris LoKr"
    "transformer_blocks.0.ff.linear_out": "double_blocks.0.img_mlp.2",
    "transformer_blocks.0.ff_context.linear_in": "double_blocks.0.txt_mlp.0",
    "transformer_blocks.0.ff_context.linear_out": "double_blocks.0.txt_mlp.2",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks.0.linear1",  # "Flux 2"
    "single_transformer_blocks.0.attn.to_out": "single_blocks.0.linear2",  # "Flux 2"
}


def fresh() -> torch.nn.Module:
    return Flux2Family().load_transformer("tiny", "--dit", CPU, F32)


def output(transformer: torch.nn.Module) -> torch.Tensor:
    """The prediction on fixed inputs: two samples of 3x5 tokens, 7 text tokens."""
    family = Flux2Family()
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 1, 3, 5, generator=generator)
    text = family.collate_text(list(torch.randn(2, 7, 16, generator=generator)))
    with torch.no_grad():
        return family.predict(transformer, noisy, torch.tensor([0.3, 0.85]), text)


def klein_pipeline(transformer: torch.nn.Module) -> object:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    family = Flux2Family()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=family.load_vae("tiny", CPU, F32),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


def test_original_names_are_comfyuis() -> None:
    family = Flux2Family()
    transformer = fresh()
    names = nonzero_lora(transformer, family)
    assert sorted(names) == sorted(COMFY_FLUX_TO_DIFFUSERS)
    for name in names:
        expected = COMFY_FLUX_TO_DIFFUSERS[name]
        fused = isinstance(expected, tuple)
        assert family.comfy_key(name) == (expected[0] if fused else expected)
        if fused:  # ComfyUI's slice of the fused layer is this part's place in comfy_parts
            original, start, rows = expected
            parts = family.comfy_parts(original)
            assert parts.index(name) * HIDDEN == start and rows == HIDDEN
        else:
            assert family.comfy_parts(family.comfy_key(name)) == ()


def test_comfyui_layout_writes_fused_qkv_and_reads_it_back_exactly(tmp_path: Path) -> None:
    family = Flux2Family()
    check_lora_round_trip(tmp_path, "comfyui", family, fresh, output, None)
    tensors, _ = read_safetensors(tmp_path / "comfyui.safetensors")
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    a, b = tensors[f"{qkv}.lora_A.weight"], tensors[f"{qkv}.lora_B.weight"]
    assert a.shape == (3 * LORA_RANK, HIDDEN) and b.shape == (3 * HIDDEN, 3 * LORA_RANK)
    block = torch.ones(HIDDEN, LORA_RANK, dtype=torch.bool)
    assert not b[~torch.block_diag(block, block, block)].any()  # block-diagonal
    assert tensors[f"{qkv}.alpha"].item() == 3 * LORA_ALPHA  # alpha / rank kept
    assert tensors["diffusion_model.double_blocks.0.txt_attn.proj.alpha"].item() == LORA_ALPHA
    assert tensors["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape == (LORA_RANK, HIDDEN)
    assert not any("to_q" in key or "add_k_proj" in key for key in tensors)
    assert len(tensors) == 3 * (len(COMFY_FLUX_TO_DIFFUSERS) - 4)  # 6 q/k/v layers -> 2 fused ones


def test_musubi_layout_uses_the_bfl_names(tmp_path: Path) -> None:
    check_lora_round_trip(tmp_path, "musubi", Flux2Family(), fresh, output, None)
    tensors, _ = read_safetensors(tmp_path / "musubi.safetensors")
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (3 * LORA_RANK, HIDDEN)
    assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in tensors
    assert "lora_unet_double_blocks_0_img_mlp_0.alpha" in tensors


def test_diffusers_layout_loads_through_the_klein_pipeline(tmp_path: Path) -> None:
    check_lora_round_trip(tmp_path, "diffusers", Flux2Family(), fresh, output, klein_pipeline)


def test_convert_goes_through_every_layout_and_back_unchanged(tmp_path: Path) -> None:
    transformer = fresh()
    nonzero_lora(transformer, Flux2Family())
    source = tmp_path / "comfyui.safetensors"
    save_lora(source, transformer, Flux2Family(), layout="comfyui", metadata={})
    previous = source
    for layout in ("musubi", "diffusers", "comfyui"):
        target = tmp_path / f"to_{layout}.safetensors"
        convert(previous, target, layout)
        previous = target
    original, _ = read_safetensors(source)
    back, _ = read_safetensors(previous)
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_a_fused_lora_with_one_shared_a_reads_as_the_same_update(tmp_path: Path) -> None:
    # what a trainer on the BFL model writes: one rank-4 LoRA on the whole qkv Linear
    generator = torch.Generator().manual_seed(5)
    a, b = (
        torch.randn(LORA_RANK, HIDDEN, generator=generator),
        torch.randn(3 * HIDDEN, LORA_RANK, generator=generator),
    )
    proj_a, proj_b = (
        torch.randn(LORA_RANK, HIDDEN, generator=generator),
        torch.randn(HIDDEN, LORA_RANK, generator=generator),
    )
    import safetensors.torch

    path = tmp_path / "bfl.safetensors"
    safetensors.torch.save_file(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": a,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": b,
            "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(LORA_ALPHA),
            "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": proj_a,
            "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": proj_b,
            "diffusion_model.double_blocks.0.img_attn.proj.alpha": torch.tensor(LORA_ALPHA),
        },
        path,
    )
    loaded = fresh()
    load_lora_into(loaded, path, get_family("flux2"))  # the family read off "double_blocks"
    merged = fresh()  # the reference: the update added to the weights, q, k, v rows in order
    scale = LORA_ALPHA / LORA_RANK
    attn = merged.transformer_blocks[0].attn
    with torch.no_grad():
        for index, layer in enumerate((attn.to_q, attn.to_k, attn.to_v)):
            layer.weight += scale * b[index * HIDDEN : (index + 1) * HIDDEN] @ a
        attn.to_out[0].weight += scale * proj_b @ proj_a
    torch.testing.assert_close(output(loaded), output(merged), rtol=0, atol=1e-5)


def test_a_lora_on_part_of_a_fused_layer_cannot_be_written_fused(tmp_path: Path) -> None:
    from masktrain.denoiser.lora import add_lora

    transformer = fresh()
    add_lora(transformer, Flux2Family(), rank=4, alpha=4.0, exclude=[r".*attn\.to_[kv]"])
    with pytest.raises(
        ValueError, match=r"double_blocks\.0\.img_attn\.qkv fuses .* no .*to_k, .*to_v: train all"
    ):
        save_lora(tmp_path / "x.safetensors", transformer, Flux2Family(), layout="comfyui")
    save_lora(tmp_path / "x.safetensors", transformer, Flux2Family(), layout="diffusers")
