"""Qwen-Image 2.1 (``--arch qwen_image_2_1``) against diffusers' own ``QwenImage21Pipeline``
(diffusers 0.42.1) on the tiny models: the text encoding, the transformer call and the latents are
the pipeline's; masks land on the unpatched H/16 latent grid; cache -> train (masked + prior) ->
LoRA runs; the LoRA loads back through the pipeline's ``load_lora_weights``; sampling runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers
from PIL import Image

from helpers import cache_tiny, cached, check_lora_round_trip, photo, randn, train_config
from masktrain import catalog
from masktrain.data import cache_format as fmt
from masktrain.denoiser.lora import add_lora
from masktrain.errors import ModelLoadError
from masktrain.models import qwen_image_2_1_text
from masktrain.models.base import SampleRequest, TextBatch
from masktrain.models.fp8 import Fp8Linear
from masktrain.models.qwen_image_2_1 import FP8_TARGETS, QwenImage21Family
from masktrain.models.qwen_image_2_1_checkpoint import load_transformer_file
from masktrain.models.single_file import Fp8Load
from masktrain.train.loop import run as train

CPU, F32 = torch.device("cpu"), torch.float32
FAMILY = QwenImage21Family()


def pipeline(transformer: torch.nn.Module | None = None) -> Any:
    """diffusers' pipeline on the tiny models (`transformer`, or a fresh tiny one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=FAMILY.load_vae("tiny", CPU, F32),
        text_encoder=FAMILY.load_text_encoder("tiny", CPU, F32).model,
        processor=qwen_image_2_1_text.tiny_processor(),
        transformer=transformer or FAMILY.load_transformer("tiny", "--dit", CPU, F32),
    )


def text_batch() -> TextBatch:
    """Two captions of different lengths, encoded and collated (so one is padded)."""
    encoder = FAMILY.load_text_encoder("tiny", CPU, F32)
    return FAMILY.collate_text(FAMILY.encode_text(encoder, ["a red fox in the snow", "cat"]))


def test_encode_text_and_collate_are_the_pipelines_encode_prompt() -> None:
    pipe = pipeline()
    captions = ["a red fox in the snow", "cat", ""]
    encoder = FAMILY.load_text_encoder("tiny", CPU, F32)
    ours = FAMILY.encode_text(encoder, captions)
    expected, expected_mask, image_pad_mask = pipe.encode_prompt(captions, device=CPU)

    # the system message is dropped: each embedding starts at the user's turn
    turns = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    kept = [len(encoder.tokenizer(turns.format(c or " ")).input_ids) for c in captions]
    assert [e.shape[0] for e in ours] == kept
    batch = FAMILY.collate_text(ours)
    assert batch.mask is not None and torch.equal(batch.mask.bool(), expected_mask.bool())
    assert (batch.hidden - expected).abs().max() <= 1e-6
    assert not image_pad_mask.any()
    one = FAMILY.collate_text(ours[:1])
    assert one.mask is None  # nothing padded: no mask, as encode_prompt


def test_predict_is_the_pipelines_transformer_call() -> None:
    transformer = FAMILY.load_transformer("tiny", "--dit", CPU, F32)
    pipe = pipeline(transformer)
    text = text_batch()
    height, width = 64, 96  # h, w = 4, 6 latent cells
    noisy = randn(2, 8, 1, height // 16, width // 16)
    sigmas = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        ours = FAMILY.predict(transformer, noisy, sigmas, text)

        # QwenImage21Pipeline.__call__'s lines, batch of 2 text-to-image prompts:
        latents = pipe._pack_latents(noisy[:, :, 0], 2, 8, height // 16, width // 16)
        img_shapes = [[(1, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)]] * 2
        image_pad_mask = text.hidden.new_zeros(text.hidden.shape[:2], dtype=torch.bool)
        image_pad_mask = torch.cat([image_pad_mask, image_pad_mask.new_ones(2, latents.shape[1] // 4)], dim=1)
        noise_pred = transformer(
            hidden_states=latents,
            timestep=(sigmas * 1000) / 1000,
            encoder_hidden_states=text.hidden,
            encoder_hidden_states_mask=text.mask,
            img_shapes=img_shapes,
            img_mask=image_pad_mask,
            return_dict=False,
        )[0]
        noise_pred = noise_pred[:, -latents.size(1) :]
        expected = pipe._unpack_latents(noise_pred, height, width, pipe.vae_scale_factor)

    assert ours.shape == noisy.shape
    assert (ours - expected).abs().max() == 0


def test_encode_pixels_is_the_pipelines_latent_preparation() -> None:
    pipe = pipeline()
    rgb = photo(64, 96, 3)
    alpha = np.tile(np.linspace(40, 255, 96, dtype=np.uint8), (64, 1))
    for image, channels in (
        (Image.fromarray(rgb).convert("RGBA"), 3),
        (Image.fromarray(np.dstack([rgb, alpha])), 4),
    ):
        # QwenImage21Pipeline.__call__ step 1 and prepare_latents: the RGBA image through the VAE
        pixels = pipe.image_processor.preprocess(image, width=96, height=64).unsqueeze(2)
        expected = pipe._encode_vae_image(pixels, generator=None)
        ours = FAMILY.encode_pixels(pipe.vae, pixels[:, :channels])  # RGB: an opaque alpha added
        assert ours.shape == (1, 8, 1, 4, 6)
        assert (ours - expected).abs().max() <= 1e-6
    assert FAMILY.spatial_factor(pipe.vae) == catalog.QWEN_IMAGE_2_1.spatial_factor == 16


def test_the_tiny_latents_are_normalised() -> None:
    vae = FAMILY.load_vae("tiny", CPU, F32)
    pixels = torch.stack([torch.from_numpy(photo(128, 160, s)).permute(2, 0, 1) for s in range(8)])
    latents = FAMILY.encode_pixels(vae, (pixels.float() / 127.5 - 1)[:, :, None])
    assert latents.mean(dim=(0, 2, 3, 4)).abs().max() < 0.01
    assert (latents.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 0.01


def test_generate_runs_the_pipeline_on_encoded_prompts() -> None:
    pipe = pipeline()
    text = text_batch()
    request = SampleRequest(
        width=96,
        height=64,
        frames=1,
        steps=2,
        cfg_scale=1.0,
        flow_shift=None,
        text=TextBatch(text.hidden[:1], None),
        negative=None,
        generator=torch.Generator().manual_seed(0),
    )
    frames = FAMILY.generate(pipe.transformer, None, 0.0, pipe.vae, request)
    assert frames.shape == (1, 64, 96, 3) and frames.dtype == torch.uint8


def test_lora_targets_and_comfy_keys() -> None:
    transformer = FAMILY.load_transformer("tiny", "--dit", CPU, F32)
    names = add_lora(transformer, FAMILY, rank=4, alpha=4.0)
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.out"]
    assert sorted(names) == sorted(f"transformer_blocks.{b}.{m}" for b in range(2) for m in per_block)
    # ComfyUI's names are diffusers' (S convert_qwen_image21_transformer_checkpoint_to_diffusers)
    assert FAMILY.comfy_key("transformer_blocks.0.attn.to_q") == "transformer_blocks.0.attn.to_q"
    with pytest.raises(ValueError, match="gate_up"):
        FAMILY.comfy_key("transformer_blocks.0.img_mlp.gate_layer")
    assert len(FAMILY.blocks(transformer)) == 2


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_lora_round_trip_through_the_pipelines_load_lora_weights(layout: str, tmp_path: Path) -> None:
    text = text_batch()
    noisy, sigmas = randn(2, 8, 1, 4, 6), torch.tensor([0.3, 0.85])

    def fresh() -> torch.nn.Module:
        return FAMILY.load_transformer("tiny", "--dit", CPU, F32)

    def output(transformer: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return FAMILY.predict(transformer, noisy, sigmas, text)

    names = check_lora_round_trip(tmp_path, layout, FAMILY, fresh, output, pipeline)
    assert len(names) == 2 * 5


def test_an_off_centre_mask_lands_on_its_h16_latent_cells(tmp_path: Path) -> None:
    # a 96x64 image; the mask covers pixel rows 16..31 and columns 48..79: cell row 1, columns 3 and 4
    # of the 4x6 latent grid, with a half-covered cell at row 3, column 0 (rows 48..63, columns 0..7)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(photo(64, 96, 0)).save(tmp_path / "images" / "item.png")
    (tmp_path / "images" / "item.txt").write_text("a photo")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:32, 48:80] = 255
    mask[48:64, 0:8] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "item.png")
    (tmp_path / "dataset.toml").write_text(
        "[general]\nresolution = [96, 64]\nbatch_size = 1\nenable_bucket = false\n\n[[datasets]]\n"
        'image_directory = "images"\ncache_directory = "cache"\nmask_directory = "masks"\n'
    )
    cache_tiny(tmp_path, "qwen_image_2_1")

    tensors, metadata = fmt.load_cache_file(tmp_path / "cache" / "item_0096x0064_qwen_image_2_1.safetensors")
    latents = next(t for k, t in tensors.items() if k.startswith(fmt.LATENTS))
    weights = next(t for k, t in tensors.items() if k.startswith(fmt.MASK_WEIGHTS))
    assert metadata.bucket == (96, 64)
    assert latents.shape == (8, 1, 4, 6) and weights.shape == (1, 1, 4, 6)
    expected = torch.zeros(4, 6)
    expected[1, 3:5] = 1.0
    expected[3, 0] = 0.5
    assert (weights[0, 0] - expected).abs().max() <= 1e-6


def test_cache_train_masked_prior_and_lora(tmp_path: Path) -> None:
    toml = cached(tmp_path / "data", "qwen_image_2_1")
    out = tmp_path / "out"
    lora_path = train(train_config(toml, out, "qwen_image_2_1", max_train_steps=2))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and "prior_loss" in r for r in records)
    with safetensors.safe_open(lora_path, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["masktrain.arch"] == "qwen_image_2_1"
    assert "diffusion_model.transformer_blocks.1.img_mlp.out.lora_A.weight" in keys
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight" in keys


def comfyui_file(tmp_path: Path, transformer: torch.nn.Module) -> Path:
    """`transformer` saved as ComfyUI's file: ``model.diffusion_model.`` names, each block's
    gate_layer and proj fused into gate_up, gate rows first."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in transformer.state_dict().items():
        if name.endswith("img_mlp.proj.weight"):
            continue
        if name.endswith("img_mlp.gate_layer.weight"):
            proj = transformer.state_dict()[name.replace("gate_layer", "proj")]
            name, tensor = name.replace("gate_layer", "gate_up"), torch.cat([tensor, proj])
        tensors[f"model.diffusion_model.{name}"] = tensor.contiguous()
    path = tmp_path / "qwen_image_2_1.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path


def test_a_comfyui_file_reads_as_the_diffusers_transformer(tmp_path: Path) -> None:
    reference = FAMILY.load_transformer("tiny", "--dit", CPU, F32)
    path = comfyui_file(tmp_path, reference)
    # the file is what diffusers' own converter reads back to the diffusers names
    converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(safetensors.torch.load_file(path))
    assert converted.keys() == reference.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())

    tiny_axes = {"axes_dims_rope": (4, 6, 6)}  # the tiny model's 16-dim heads: not the released axes
    loaded = load_transformer_file(path, "--dit", F32, overrides=tiny_axes)
    text, noisy, sigmas = text_batch(), randn(2, 8, 1, 4, 6), torch.tensor([0.3, 0.85])
    with torch.no_grad():
        expected = FAMILY.predict(reference, noisy, sigmas, text)
        assert (FAMILY.predict(loaded.eval(), noisy, sigmas, text) - expected).abs().max() == 0
        quantized = load_transformer_file(
            path, "--dit", F32, Fp8Load("scaled", FP8_TARGETS, F32), overrides=tiny_axes
        )
        assert isinstance(quantized.get_submodule("transformer_blocks.1.img_mlp.proj"), Fp8Linear)
        error = (FAMILY.predict(quantized.eval(), noisy, sigmas, text) - expected).abs().max()
        assert error <= 0.01 * expected.abs().max()  # measured 0.12%
    with pytest.raises(ModelLoadError, match="axes_dims_rope"):
        FAMILY.load_transformer(str(path), "--dit", CPU, F32)


def test_fp8_text_encoder_keeps_the_embedding_within_e4m3s_error() -> None:
    plain = FAMILY.load_text_encoder("tiny", CPU, F32)
    fp8 = FAMILY.load_text_encoder("tiny", CPU, F32, fp8=True)
    quantized = [name for name, module in fp8.model.named_modules() if isinstance(module, Fp8Linear)]
    assert len(quantized) == 2 * 7 and all(
        name.startswith("model.language_model.layers.") for name in quantized
    )
    expected, got = FAMILY.encode_text(plain, ["a cat"])[0], FAMILY.encode_text(fp8, ["a cat"])[0]
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()  # measured 0.8%


def test_alpha_is_content_so_alpha_mask_is_refused_and_rgba_is_encoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its VAE reads RGBA: ``alpha_mask = true`` is a settings error naming mask_directory before any
    image is read; an RGBA image is encoded with its alpha (as the VAE itself encodes it), and images
    with transparent pixels while masks are set get one warning."""
    import logging

    from masktrain.errors import ConfigError

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rgba = np.dstack([photo(64, 96, 1), np.tile(np.linspace(40, 255, 96, dtype=np.uint8), (64, 1))])
    Image.fromarray(rgba).save(tmp_path / "images" / "item.png")
    (tmp_path / "images" / "item.txt").write_text("a photo")
    Image.fromarray(np.full((64, 96), 255, np.uint8)).save(tmp_path / "masks" / "item.png")
    base = (
        "[general]\nresolution = [96, 64]\nenable_bucket = false\n\n[[datasets]]\n"
        'image_directory = "images"\ncache_directory = "cache"\nmask_directory = "masks"\n'
    )
    (tmp_path / "dataset.toml").write_text(base + "alpha_mask = true\n")
    with pytest.raises(
        ConfigError, match=r"'alpha_mask = true' cannot be used with --arch qwen_image_2_1: .*mask_directory"
    ):
        cache_tiny(tmp_path, "qwen_image_2_1")
    assert not (tmp_path / "cache").exists()

    (tmp_path / "dataset.toml").write_text(base)
    with caplog.at_level(logging.WARNING):
        (summary,) = cache_tiny(tmp_path, "qwen_image_2_1")
    assert summary.failed == [] and summary.sources["file"] == 1
    assert "1 images carry transparent pixels" in caplog.text
    tensors, _ = fmt.load_cache_file(tmp_path / "cache" / "item_0096x0064_qwen_image_2_1.safetensors")
    cached = next(t for k, t in tensors.items() if k.startswith(fmt.LATENTS))
    vae = FAMILY.load_vae("tiny", torch.device("cpu"), torch.float32)
    pixels = torch.from_numpy(rgba).permute(2, 0, 1).float().div(127.5).sub(1.0)[None, :, None]
    with torch.no_grad():
        want = FAMILY.encode_pixels(vae, pixels)[0]
        opaque = FAMILY.encode_pixels(vae, pixels[:, :3])[0]
    assert (cached - want).abs().max() <= 1e-5
    assert (cached - opaque).abs().max() > 1e-3  # the alpha changed the latents
