"""The denoisers of both families on the tiny built-in models: they fit the tiny VAE and text
encoder, `predict` feeds them as the diffusers pipelines do (timestep scale, Qwen-Image packing,
text padding), local folders load, and WAN module names map to ComfyUI's."""

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, WanPipeline

from masktrain.errors import ModelLoadError
from masktrain.models import get_family, qwen_image, wan

CPU, F32 = torch.device("cpu"), torch.float32
CAPTIONS = ["a red fox in the snow", "portrait"]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pipeline(arch: str, transformer: torch.nn.Module | None = None):
    family = get_family(arch)
    encoder = family.load_text_encoder("tiny", CPU, F32)
    components = dict(
        transformer=transformer
        if transformer is not None
        else family.load_transformer("tiny", "--dit", CPU, F32),
        vae=family.load_vae("tiny", CPU, F32),
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return WanPipeline(**components) if arch == "wan" else QwenImagePipeline(**components)


@pytest.mark.parametrize(("arch", "frames"), [("wan", 1), ("wan", 9), ("qwen_image", 1)])
def test_predict_on_latents_and_text_from_the_tiny_encoders(arch: str, frames: int) -> None:
    family = get_family(arch)
    vae = family.load_vae("tiny", CPU, F32)
    encoder = family.load_text_encoder("tiny", CPU, F32)
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    assert not transformer.training and not any(p.requires_grad for p in transformer.parameters())
    pixels = torch.rand(2, 3, frames, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_pixels(vae, pixels)
    if frames == 9:
        assert latents.shape[2] == 3  # a WAN video latent
    text = family.collate_text(family.encode_text(encoder, CAPTIONS))
    with torch.no_grad():
        out = family.predict(transformer, latents, torch.tensor([0.25, 0.8]), text)
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


def test_wan_predict_passes_the_pipeline_timestep_and_text() -> None:
    family = get_family("wan")
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    noisy = randn(2, 16, 3, 4, 6)
    text = family.collate_text([randn(5, 32, seed=1), randn(9, 32, seed=2)])
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = family.predict(transformer, noisy, sigmas, text)
        direct = transformer(
            hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=text.hidden
        ).sample
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)


def test_wan_text_padding_matches_the_pipeline() -> None:
    family = get_family("wan")
    encoder = family.load_text_encoder("tiny", CPU, F32)
    embeds = family.encode_text(encoder, CAPTIONS)
    batch = family.collate_text(embeds)
    assert batch.mask is None
    assert batch.hidden.shape == (2, wan.MAX_LENGTH, 32)
    for row, embed in zip(batch.hidden, embeds, strict=True):
        assert torch.equal(row[: len(embed)], embed)
        assert not row[len(embed) :].any()  # trimmed real tokens, then zeros
    with torch.no_grad():
        expected = pipeline("wan")._get_t5_prompt_embeds(
            CAPTIONS, max_sequence_length=512, device=CPU, dtype=F32
        )
    torch.testing.assert_close(batch.hidden, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="513 tokens; at most 512"):
        family.collate_text([randn(513, 32)])


def test_qwen_text_padding_matches_the_pipeline() -> None:
    family = get_family("qwen_image")
    encoder = family.load_text_encoder("tiny", CPU, F32)
    pipe = pipeline("qwen_image")
    # The pipeline drops 34 template tokens (the real tokenizer's count); ours drops the tiny one's.
    prefix = qwen_image.PROMPT_TEMPLATE.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(encoder.tokenizer(prefix, add_special_tokens=False).input_ids)
    for captions in (CAPTIONS, CAPTIONS[:1]):
        batch = family.collate_text(family.encode_text(encoder, captions))
        with torch.no_grad():
            hidden, mask = pipe.encode_prompt(captions, device=CPU)
        torch.testing.assert_close(batch.hidden, hidden, rtol=1e-5, atol=1e-6)
        # Two captions of different lengths: padding and a 0/1 mask; one caption: no mask at all.
        assert (mask is None) == (len(captions) == 1)
        if mask is None:
            assert batch.mask is None
        else:
            assert batch.mask is not None and batch.mask.dtype == torch.long
            assert torch.equal(batch.mask, mask)


def test_text_batch_to_keeps_the_mask_dtype() -> None:
    batch = get_family("qwen_image").collate_text([randn(2, 16), randn(4, 16)])
    moved = batch.to(CPU, torch.bfloat16)
    assert moved.hidden.dtype == torch.bfloat16
    assert moved.mask is not None and moved.mask.dtype == torch.long
    assert torch.equal(moved.mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_qwen_packing_round_trip_matches_the_pipeline() -> None:
    latents = randn(2, 4, 1, 6, 10)
    tokens = qwen_image.pack_latents(latents)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(latents[:, :, 0], 2, 4, 6, 10))
    unpacked = qwen_image.unpack_latents(tokens, 6, 10)
    assert torch.equal(unpacked, QwenImagePipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8))
    assert torch.equal(unpacked, latents)


def test_qwen_predict_passes_the_pipeline_inputs() -> None:
    family = get_family("qwen_image")
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    noisy = randn(2, 4, 1, 4, 6)
    text = family.collate_text([randn(3, 16, seed=1), randn(5, 16, seed=2)])
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = family.predict(transformer, noisy, sigmas, text)
        tokens = transformer(
            hidden_states=QwenImagePipeline._pack_latents(noisy[:, :, 0], 2, 4, 4, 6),
            encoder_hidden_states=text.hidden,
            encoder_hidden_states_mask=text.mask,
            timestep=sigmas,
            img_shapes=[[(1, 2, 3)]] * 2,
        ).sample
    torch.testing.assert_close(ours, QwenImagePipeline._unpack_latents(tokens, 32, 48, 8), rtol=0, atol=0)


def test_qwen_rejects_video_latents_and_odd_sizes() -> None:
    family = get_family("qwen_image")
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    text = family.collate_text([randn(3, 16)])
    with pytest.raises(
        ValueError, match=r"single images: got latents of shape \(1, 4, 3, 4, 4\) \(3 frames\)"
    ):
        family.predict(transformer, randn(1, 4, 3, 4, 4), torch.tensor([0.5]), text)
    with pytest.raises(ValueError, match="even height and width"):
        family.predict(transformer, randn(1, 4, 1, 4, 5), torch.tensor([0.5]), text)


@pytest.mark.parametrize("module", [wan, qwen_image])
def test_tiny_transformer_is_deterministic_and_scales(module) -> None:
    a, b = module.tiny_transformer(), module.tiny_transformer()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    big = module.tiny_transformer(width_mult=4, layers=3)
    assert big.config.num_layers == 3
    assert big.config.num_attention_heads == 4 * a.config.num_attention_heads
    assert sum(p.numel() for p in big.parameters()) > 4 * sum(p.numel() for p in a.parameters())
    with pytest.raises(ValueError, match="width_mult and layers must be >= 1"):
        module.tiny_transformer(width_mult=0)


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_wider_tiny_transformer_still_fits_the_tiny_latents_and_text(arch: str) -> None:
    family = get_family(arch)
    module = wan if arch == "wan" else qwen_image
    transformer = module.tiny_transformer(width_mult=2, layers=3)
    channels, width = (16, 32) if arch == "wan" else (4, 16)
    text = family.collate_text([randn(3, width)])
    with torch.no_grad():
        out = family.predict(transformer, randn(1, channels, 1, 4, 4), torch.tensor([0.5]), text)
    assert out.shape == (1, channels, 1, 4, 4)


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
@pytest.mark.parametrize("as_pipeline", [False, True])
def test_load_transformer_from_a_local_folder(tmp_path: Path, arch: str, as_pipeline: bool) -> None:
    family = get_family(arch)
    tiny = family.load_transformer("tiny", "--dit", CPU, F32)
    tiny.save_pretrained(tmp_path / "transformer" if as_pipeline else tmp_path)
    loaded = family.load_transformer(str(tmp_path), "--dit", CPU, F32)
    assert type(loaded) is type(tiny)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    expected = tiny.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_load_transformer_errors_name_the_flag(tmp_path: Path, arch: str) -> None:
    family = get_family(arch)
    with pytest.raises(ModelLoadError, match=r"--dit .*nope: no such file or directory"):
        family.load_transformer(str(tmp_path / "nope"), "--dit", CPU, F32)
    with pytest.raises(
        ModelLoadError, match=r"--dit .*: not a diffusers folder \(no config.json, nor transformer/"
    ):
        family.load_transformer(str(tmp_path), "--dit", CPU, F32)


@pytest.mark.parametrize(
    ("name", "original"),
    [
        ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
        ("blocks.3.attn1.to_k", "blocks.3.self_attn.k"),
        ("blocks.3.attn1.to_v", "blocks.3.self_attn.v"),
        ("blocks.12.attn1.to_out.0", "blocks.12.self_attn.o"),
        ("blocks.1.attn2.to_q", "blocks.1.cross_attn.q"),
        ("blocks.1.attn2.to_out.0", "blocks.1.cross_attn.o"),
        ("blocks.1.attn2.add_k_proj", "blocks.1.cross_attn.k_img"),
        ("blocks.1.attn2.add_v_proj", "blocks.1.cross_attn.v_img"),
        ("blocks.39.ffn.net.0.proj", "blocks.39.ffn.0"),
        ("blocks.39.ffn.net.2", "blocks.39.ffn.2"),
        ("proj_out", "head.head"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ],
)
def test_wan_comfy_keys_are_the_original_module_paths(name: str, original: str) -> None:
    assert get_family("wan").comfy_key(name) == original


def test_comfy_key_of_unknown_wan_modules_and_qwen_identity() -> None:
    with pytest.raises(ValueError, match=r"no ComfyUI .* for the module 'blocks.0.norm2'"):
        get_family("wan").comfy_key("blocks.0.norm2")
    name = "transformer_blocks.4.img_mlp.net.0.proj"
    assert get_family("qwen_image").comfy_key(name) == name


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_every_lora_target_has_a_comfy_key(arch: str) -> None:
    family = get_family(arch)
    transformer = family.load_transformer("tiny", "--dit", CPU, F32)
    from masktrain.denoiser.lora import select_targets

    keys = [family.comfy_key(name) for name in select_targets(transformer, family)]
    assert len(set(keys)) == len(keys)
