"""Z-Image on the tiny built-in models, checked against diffusers' own code: the denoiser call
(``ZImagePipeline.__call__``'s few lines, copied below), the latents (diffusers' training script's
``(mode - shift_factor) * scaling_factor``), the text (``ZImagePipeline._encode_prompt``), the mask
on the H/8 grid, LoRA targets and ComfyUI's names, the catalog record and a cache -> train run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from masktrain import _native, catalog
from masktrain.models.fp8 import Fp8Linear
from masktrain.models.single_file import Fp8Load
from masktrain.models.z_image import FP8_TARGETS, TINY_VAE, ZImageFamily

CPU, F32 = torch.device("cpu"), torch.float32


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pipeline_call(
    transformer: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, embeds: list[torch.Tensor]
) -> torch.Tensor:
    """``ZImagePipeline.__call__``'s denoiser call (diffusers 0.42.1, no guidance): the scheduler's
    timesteps are sigma * 1000; returns noise_pred, the velocity its scheduler steps with."""
    t = sigmas * 1000
    timestep = (1000 - t) / 1000
    latent_model_input = latents.to(transformer.dtype).unsqueeze(2)
    latent_model_input_list = list(latent_model_input.unbind(dim=0))
    model_out_list = transformer(latent_model_input_list, timestep, embeds, return_dict=False)[0]
    noise_pred = torch.stack([t.float() for t in model_out_list], dim=0)
    noise_pred = noise_pred.squeeze(2)
    return -noise_pred


def test_predict_is_the_pipelines_transformer_call() -> None:
    family = ZImageFamily()
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    latents, sigmas = randn(2, 16, 6, 10, seed=1), torch.tensor([0.3, 0.85])
    embeds = [randn(7, 16, seed=2), randn(19, 16, seed=3)]  # captions of their own lengths
    with torch.no_grad():
        predicted = family.predict(transformer, latents.unsqueeze(2), sigmas, family.collate_text(embeds))
        expected = pipeline_call(transformer, latents, sigmas, embeds)
    assert predicted.shape == (2, 16, 1, 6, 10)
    torch.testing.assert_close(predicted[:, :, 0], expected, rtol=0, atol=1e-6)


def test_latents_are_the_training_scripts_normalised_mode() -> None:
    family = ZImageFamily()
    vae = family.load_vae("tiny", CPU, F32)
    pixels = randn(2, 3, 2, 16, 24, seed=4).clamp(-1, 1)  # two frames each: folded into the batch
    latents = family.encode_pixels(vae, pixels)
    assert family.spatial_factor(vae) == catalog.Z_IMAGE.tiny_vaes["tiny"] == 2
    assert latents.shape == (2, 16, 2, 8, 12)
    for frame in range(2):
        with torch.no_grad():  # train_dreambooth_lora_z_image.py
            mode = vae.encode(pixels[:, :, frame]).latent_dist.mode()
        expected = (mode - TINY_VAE["shift_factor"]) * TINY_VAE["scaling_factor"]
        torch.testing.assert_close(latents[:, :, frame], expected, rtol=0, atol=1e-5)


def test_text_is_the_pipelines_trimmed_hidden_states() -> None:
    from diffusers import ZImagePipeline

    family = ZImageFamily()
    encoder = family.load_text_encoder("tiny", CPU, F32)
    captions = ["a red fox in the snow", "x"]
    embeds = family.encode_text(encoder, captions)
    pipeline = ZImagePipeline(
        scheduler=None, vae=None, text_encoder=encoder.model, tokenizer=encoder.tokenizer, transformer=None
    )
    expected = pipeline._encode_prompt(list(captions), device=CPU)
    assert [e.shape[0] for e in embeds] == [e.shape[0] for e in expected] == [40, 20]
    for got, want in zip(embeds, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    batch = family.collate_text(embeds)
    assert batch.mask is not None and batch.mask.sum(dim=1).tolist() == [40, 20]


def test_an_off_centre_mask_weights_its_own_latent_cells(tmp_path: Path) -> None:
    # a 96x64 (w x h) image, mask on rows 16..39 and columns 40..79: latent rows 2-4, columns 5-9
    mask = np.zeros((64, 96), np.uint8)
    mask[16:40, 40:80] = 255
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), mask)
    _, latent = _native.prepare_mask(path, (96, 64), (96, 64), catalog.Z_IMAGE.spatial_factor)
    expected = np.zeros((8, 12), np.float32)
    expected[2:5, 5:10] = 1
    np.testing.assert_array_equal(latent, expected)
    # the transformer's 2x2 tokens of those cells have their rows // 2 and columns // 2 as position
    # ids, and its unpatchify puts every token back on the same cells (the loss's grid)
    transformer = ZImageFamily().load_transformer("tiny", "--dit", CPU, F32)
    grid = torch.from_numpy(latent).view(1, 1, 8, 12).repeat(16, 1, 1, 1)  # as the 16 latent channels
    _, _, sizes, positions, _, _, _ = transformer.patchify_and_embed([grid], [torch.zeros(3, 16)], 2, 1)
    tokens, _, _ = transformer._patchify_image(grid, 2, 1)
    weighted = {
        tuple(int(v) for v in positions[0][k, 1:]) for k in torch.nonzero(tokens.sum(dim=1)).flatten()
    }
    assert weighted == {(r // 2, c // 2) for r in range(2, 5) for c in range(5, 10)}
    back = transformer.unpatchify([tokens], sizes, 2, 1)[0]
    assert torch.equal(back, grid)


def test_lora_goes_on_the_main_layers_only() -> None:
    from masktrain.denoiser.lora import select_targets

    family = ZImageFamily()
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    names = set(select_targets(transformer, family))
    per_block = {"attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"}
    per_block |= {"feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    assert names == {f"layers.{i}.{p}" for i in range(2) for p in per_block}  # no refiner, no adaLN
    assert list(family.blocks(transformer)) == list(transformer.layers)  # the refiners stay resident


# ComfyUI's comfy/utils.py z_image_to_diffusers (Comfy-Org/ComfyUI @ 09708eae): the diffusers names
# of a block's Linear layers it maps (add_block_keys' q/k/v slices of attention.qkv and block_map),
# which its LoRA loader reads under diffusion_model.
COMFY_Z_IMAGE_BLOCK_KEYS = {
    "attention.to_q.weight": ("attention.qkv.weight", 0),
    "attention.to_k.weight": ("attention.qkv.weight", 1),
    "attention.to_v.weight": ("attention.qkv.weight", 2),
    "attention.to_out.0.weight": "attention.out.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight",
}


def test_comfy_names_are_the_ones_comfyui_maps() -> None:
    from masktrain.denoiser.lora import select_targets

    family = ZImageFamily()
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    for module in select_targets(transformer, family):
        key = family.comfy_key(module)  # written as diffusion_model.<key>
        stack, index, local = key.split(".", 2)
        assert (stack, f"{local}.weight") == ("layers", f"{local}.weight") and index.isdigit(), module
        assert f"{local}.weight" in COMFY_Z_IMAGE_BLOCK_KEYS, module


def test_catalog_record() -> None:
    spec = catalog.Z_IMAGE
    assert catalog.ARCHES["z_image"] is spec and spec.default_task == "base"
    assert {v: t.distilled_base for v, t in spec.tasks.items()} == {"turbo": "base", "base": None}
    assert spec.released["z-image-6b"].task == "base"
    others = [s for s in catalog.ARCHES.values() if s is not spec]
    assert not any(
        hint in other for s in others for other in s.lora_layer_hints for hint in spec.lora_layer_hints
    )


def test_generate_runs_the_pipeline_with_real_cfg() -> None:
    from helpers import tiny_sampler

    sample = tiny_sampler(ZImageFamily(), 16, 24)
    plain, guided = sample(1.0), sample(4.0)
    assert plain.shape == (1, 24, 16, 3) and plain.dtype == torch.uint8
    assert torch.equal(plain, sample(1.0))
    assert not torch.equal(plain, guided)


def test_cache_train_and_lora_on_the_tiny_models(tmp_path: Path) -> None:
    import json

    from helpers import cached, read_safetensors, train_config
    from masktrain.config import MemorySettings
    from masktrain.config.sample import SampleSettings
    from masktrain.train.loop import run as run_train

    toml = cached(tmp_path / "data", "z_image")
    assert len(list((tmp_path / "data" / "cache").glob("*_z_image.safetensors"))) >= 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 16 --h 24 --s 2 --l 4.0\n")
    config = train_config(
        toml,
        tmp_path / "out",
        "z_image",
        max_train_steps=2,
        gradient_checkpointing=True,  # through the refiners too (diffusers checkpoints every block)
        memory=MemorySettings(blocks_to_swap=1),  # the second of the two main layers
        sample=SampleSettings(
            vae="tiny", text_encoder="tiny", sample_prompts=prompts, sample_every_n_steps=2
        ),
    )
    lora_path = run_train(config)
    tensors, metadata = read_safetensors(lora_path)
    assert metadata["masktrain.arch"] == "z_image" and metadata["masktrain.use_mask_loss"] == "true"
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in tensors
    assert "diffusion_model.layers.1.feed_forward.w2.lora_B.weight" in tensors
    assert not any("refiner" in key or "adaLN" in key for key in tensors)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert records[0]["prior_loss"] == 0 and records[1]["prior_loss"] > 0  # the prior is live
    (sample,) = (tmp_path / "out" / "sample").glob("*.png")
    assert cv2.imread(str(sample)).shape == (24, 16, 3)


# --- LoRA files -----------------------------------------------------------------------------------


def fresh() -> torch.nn.Module:
    return ZImageFamily().load_transformer("tiny", "--dit", CPU, F32)


def output(transformer: torch.nn.Module) -> torch.Tensor:
    """The prediction on fixed inputs: two 6x10 latents, captions of 7 and 12 tokens."""
    family = ZImageFamily()
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 1, 6, 10, generator=generator)
    text = family.collate_text(
        [torch.randn(7, 16, generator=generator), torch.randn(12, 16, generator=generator)]
    )
    with torch.no_grad():
        return family.predict(transformer, noisy, torch.tensor([0.3, 0.85]), text)


def z_image_pipeline(transformer: torch.nn.Module) -> object:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=ZImageFamily().load_vae("tiny", CPU, F32),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


def test_diffusers_layout_loads_through_the_z_image_pipeline(tmp_path: Path) -> None:
    from helpers import check_lora_round_trip

    names = check_lora_round_trip(tmp_path, "diffusers", ZImageFamily(), fresh, output, z_image_pipeline)
    assert len(names) == 2 * 7


def test_comfyui_and_musubi_layouts_use_the_diffusers_names(tmp_path: Path) -> None:
    from helpers import check_lora_round_trip, read_safetensors

    for layout in ("comfyui", "musubi"):
        check_lora_round_trip(tmp_path, layout, ZImageFamily(), fresh, output, None)
    comfy, _ = read_safetensors(tmp_path / "comfyui.safetensors")
    # what ComfyUI's loader maps (z_image_to_diffusers under diffusion_model.), never the fused qkv
    assert "diffusion_model.layers.0.attention.to_k.lora_A.weight" in comfy
    assert "diffusion_model.layers.1.attention.to_out.0.lora_B.weight" in comfy
    assert not any("qkv" in key for key in comfy)
    musubi, metadata = read_safetensors(tmp_path / "musubi.safetensors")
    # musubi-tuner's lora_zimage names (its convert_z_image_lora_to_comfy.py renames attention_to_out_0)
    assert "lora_unet_layers_0_attention_to_out_0.lora_down.weight" in musubi
    assert "lora_unet_layers_1_feed_forward_w3.alpha" in musubi
    assert metadata.get("ss_network_module") in (None, "networks.lora_zimage")


# --- one file, a folder ---------------------------------------------------------------------------

TINY_ROPE = {"axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]}  # the shapes cannot tell them


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny model's weights in the original / ComfyUI layout (ComfyUI's z_image_to_diffusers
    read backwards: q, k, v rows concatenated into attention.qkv), under model.diffusion_model."""
    renames = {
        "all_final_layer.2-1.": "final_layer.",
        "all_x_embedder.2-1.": "x_embedder.",
        ".attention.to_out.0.": ".attention.out.",
        ".attention.norm_q.": ".attention.q_norm.",
        ".attention.norm_k.": ".attention.k_norm.",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q." in name:
            block = name.split(".attention.")[0]
            parts = [state[f"{block}.attention.{p}.weight"] for p in ("to_q", "to_k", "to_v")]
            out[f"model.diffusion_model.{block}.attention.qkv.weight"] = torch.cat(parts).contiguous()
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out[f"model.diffusion_model.{name}"] = tensor.contiguous()
    out["model.diffusion_model.norm_final.weight"] = torch.ones(32)  # in the file, unused
    return out


def test_an_original_layout_file_loads_to_the_same_model(tmp_path: Path) -> None:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    from masktrain.models import z_image_checkpoint

    model = fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original = original_layout(state)
    # the file is what diffusers' own converter reads back to the same weights
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    path = tmp_path / "z_image_tiny.safetensors"
    save_file(original, str(path))
    config = z_image_checkpoint.transformer_file_config(path, "--dit")
    assert {k: config[k] for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads")} == {
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
    }
    loaded = z_image_checkpoint.load_transformer_file(path, "--dit", F32, overrides=TINY_ROPE)
    assert torch.equal(output(loaded), output(model))
    fp8 = Fp8Load("e4m3", FP8_TARGETS, F32)  # --fp8_base: quantised once read
    in_fp8 = z_image_checkpoint.load_transformer_file(path, "--dit", F32, fp8, overrides=TINY_ROPE)
    quantised = {n for n, m in in_fp8.named_modules() if isinstance(m, Fp8Linear)}
    assert len(quantised) == 2 * 8 + 8 + 7  # layers, noise_refiner, context_refiner (no adaLN)
    assert 0 < (output(in_fp8) - output(model)).abs().max() < 0.1
    # a file in diffusers' names goes through the generic reader, to the same model
    diffusers_named = tmp_path / "z_image_diffusers_names.safetensors"
    save_file({f"diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(diffusers_named))
    again = z_image_checkpoint.load_transformer_file(diffusers_named, "--dit", F32, overrides=TINY_ROPE)
    assert torch.equal(output(again), output(model))


def test_a_file_missing_a_tensor_is_refused_before_reading(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from masktrain.errors import ModelLoadError
    from masktrain.models import z_image_checkpoint

    original = original_layout(dict(fresh().state_dict()))
    del original["model.diffusion_model.layers.1.feed_forward.w2.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(original, str(path))
    with pytest.raises(
        ModelLoadError, match=r"broken.safetensors.*missing tensors layers.1.feed_forward.w2.weight"
    ):
        z_image_checkpoint.load_transformer_file(path, "--dit", F32, overrides=TINY_ROPE)


def test_a_diffusers_folder_loads(tmp_path: Path) -> None:
    model = fresh()
    model.save_pretrained(tmp_path / "pipeline" / "transformer")
    loaded = ZImageFamily().load_transformer(str(tmp_path / "pipeline"), "--dit", CPU, F32)
    assert torch.equal(output(loaded), output(model))
    config = ZImageFamily().transformer_config(str(tmp_path / "pipeline"), "--dit")
    assert config is not None and config["dim"] == 32


def ldm_layout(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights in the ldm layout of FLUX.1's ae.safetensors (diffusers'
    convert_ldm_vae_checkpoint read backwards: decoder up blocks numbered from the bottom, attention
    as 1x1 convolutions)."""
    import re

    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
        (r"conv_shortcut\.", "nin_shortcut."),
        (r"conv_norm_out\.", "norm_out."),
    ]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = name
        for old, replacement in renames:
            new = re.sub(old, replacement, new)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new)
        if up:
            part = "block" if up.group(2) == "resnets" else "upsample"
            new = f"decoder.up.{blocks - 1 - int(up.group(1))}.{part}.{up.group(3)}"
        if ".attn_1." in new and new.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor.contiguous()
    return out


def test_a_flux_vae_file_loads_to_the_same_vae(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    family = ZImageFamily()
    vae = family.load_vae("tiny", CPU, F32)
    path = tmp_path / "ae.safetensors"
    save_file(ldm_layout(dict(vae.state_dict()), blocks=2), str(path))
    loaded = family.load_vae(str(path), CPU, F32)
    assert family.spatial_factor(loaded) == 2 and family.latent_channels(loaded) == 16
    pixels = randn(1, 3, 1, 16, 24, seed=6).clamp(-1, 1)
    assert torch.equal(family.encode_pixels(loaded, pixels), family.encode_pixels(vae, pixels))


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_a_lora_in_the_original_names_reads_as_the_same_update(tmp_path: Path, layout: str) -> None:
    from safetensors.torch import save_file

    from helpers import LORA_ALPHA, nonzero_lora
    from masktrain.denoiser.lora import load_lora_into, lora_state_dict

    family = ZImageFamily()
    trained = fresh()
    nonzero_lora(trained, family)
    state = {k.removeprefix("transformer."): v for k, v in lora_state_dict(trained).items()}
    # what musubi-tuner's convert_z_image_lora_to_comfy.py writes: q/k/v fused into attention.qkv
    # (A stacked, B block-diagonal, alpha x 3), to_out.0 renamed attention.out
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for block in ("layers.0", "layers.1"):
        parts = [f"{block}.attention.{p}" for p in ("to_q", "to_k", "to_v")]
        a = torch.cat([state[f"{p}.lora_A.weight"] for p in parts])
        b = torch.block_diag(*(state[f"{p}.lora_B.weight"] for p in parts))
        layers[f"{block}.attention.qkv"] = (a, b, 3 * LORA_ALPHA)
        out = f"{block}.attention.to_out.0"
        layers[f"{block}.attention.out"] = (
            state[f"{out}.lora_A.weight"],
            state[f"{out}.lora_B.weight"],
            LORA_ALPHA,
        )
        for ff in ("w1", "w2", "w3"):
            name = f"{block}.feed_forward.{ff}"
            layers[name] = (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], LORA_ALPHA)
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b, alpha) in layers.items():
        if layout == "comfyui":
            base, down, up = f"diffusion_model.{name}", "lora_A.weight", "lora_B.weight"
        else:
            base, down, up = f"lora_unet_{name.replace('.', '_')}", "lora_down.weight", "lora_up.weight"
        tensors |= {f"{base}.{down}": a.contiguous(), f"{base}.{up}": b.contiguous()}
        tensors[f"{base}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"fused_{layout}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_zimage"})
    loaded = fresh()
    load_lora_into(loaded, path, family)
    torch.testing.assert_close(output(loaded), output(trained), rtol=0, atol=1e-6)
