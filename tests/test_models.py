"""Model families on the tiny built-in models, checked against diffusers / transformers called
directly: latent shapes and normalisation, VAE factors, text embeddings, local folder loading."""

import os
from pathlib import Path

import pytest
import torch

from masktrain.errors import ModelLoadError
from masktrain.models import ARCHES, get_family

CPU, F32 = torch.device("cpu"), torch.float32


def pixels(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1


def test_registry() -> None:
    from masktrain import catalog

    assert ARCHES == catalog.ARCH_NAMES and ARCHES[:2] == ("wan", "qwen_image")
    for arch in ARCHES:
        assert get_family(arch).spec is catalog.arch(arch)
    with pytest.raises(ValueError, match=r"--arch 'flux' is not supported; choose one of wan, qwen_image"):
        get_family("flux")


@pytest.mark.parametrize(
    ("arch", "spec", "channels", "factor", "shape_in", "latent_hw"),
    [
        ("wan", "tiny", 16, 8, (1, 64, 48), (8, 6)),
        ("wan", "tiny-ti2v", 48, 16, (1, 64, 64), (4, 4)),
        ("qwen_image", "tiny", 4, 4, (1, 64, 48), (16, 12)),
    ],
)
def test_latents_are_the_normalised_posterior_mean(arch, spec, channels, factor, shape_in, latent_hw) -> None:
    family = get_family(arch)
    vae = family.load_vae(spec, CPU, F32)
    assert family.spatial_factor(vae) == factor
    x = pixels(*shape_in)
    latents = family.encode_pixels(vae, x)
    assert latents.shape == (1, channels, 1, *latent_hw)
    # Independent computation with the diffusers model itself.
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (mean - m) / s, rtol=1e-5, atol=1e-6)


def test_wan_video_latents_compress_time_by_four() -> None:
    family = get_family("wan")
    vae = family.load_vae("tiny", CPU, F32)
    assert family.temporal_factor(vae) == 4
    assert family.encode_pixels(vae, pixels(9, 32, 32)).shape == (1, 16, 3, 4, 4)


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    family = get_family("wan")
    a = family.load_vae("tiny", CPU, F32)
    assert torch.equal(torch.rand(1), expected_next)
    b = family.load_vae("tiny", CPU, F32)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("layout", ["component", "pipeline"])
@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_local_diffusers_folders_load_the_same_weights(tmp_path: Path, arch: str, layout: str) -> None:
    family = get_family(arch)
    tiny = family.load_vae("tiny", CPU, F32)
    folder = tmp_path / "model"
    tiny.save_pretrained(folder / "vae" if layout == "pipeline" else folder)
    loaded = family.load_vae(str(folder), CPU, F32)
    x = pixels(1, 32, 32, seed=3)
    torch.testing.assert_close(family.encode_pixels(loaded, x), family.encode_pixels(tiny, x), rtol=0, atol=0)

    encoder = family.load_text_encoder("tiny", CPU, F32)
    te_dir = tmp_path / "te"
    if layout == "pipeline":
        encoder.model.save_pretrained(te_dir / "text_encoder")
        encoder.tokenizer.save_pretrained(te_dir / "tokenizer")
    else:
        encoder.model.save_pretrained(te_dir)
        encoder.tokenizer.save_pretrained(te_dir)
    if arch == "qwen_image":
        # The real encoder is the full Qwen2.5-VL model; the tiny one is its text model only.
        return
    reloaded = family.load_text_encoder(str(te_dir), CPU, F32)
    for a, b in zip(
        family.encode_text(reloaded, ["a cat"]), family.encode_text(encoder, ["a cat"]), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wan_text_embeddings_are_trimmed_to_the_real_tokens() -> None:
    family = get_family("wan")
    encoder = family.load_text_encoder("tiny", CPU, F32)
    captions = ["a photo of sks person", "x"]
    embeddings = family.encode_text(encoder, captions)
    for caption, embedding in zip(captions, embeddings, strict=True):
        ids = encoder.tokenizer(caption).input_ids
        assert embedding.shape == (len(ids), 32)
        with torch.no_grad():
            alone = encoder.model(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(embedding, alone, rtol=1e-5, atol=1e-6)


def test_qwen_text_embeddings_drop_the_template_prefix() -> None:
    from masktrain.models.qwen_image import PROMPT_TEMPLATE

    family = get_family("qwen_image")
    encoder = family.load_text_encoder("tiny", CPU, F32)
    (embedding,) = family.encode_text(encoder, ["a cat"])
    prefix = len(encoder.tokenizer(PROMPT_TEMPLATE.split("{}")[0], add_special_tokens=False).input_ids)
    full = encoder.tokenizer(PROMPT_TEMPLATE.format("a cat")).input_ids
    assert embedding.shape == (len(full) - prefix, 16)
    with torch.no_grad():
        hidden = encoder.model(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(embedding, hidden[prefix:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["wan", "qwen_image"])
def test_bad_weight_paths_name_the_flag(tmp_path: Path, arch: str) -> None:
    family = get_family(arch)
    with pytest.raises(ModelLoadError, match=r"--vae .*nope: no such file or directory"):
        family.load_vae(str(tmp_path / "nope"), CPU, F32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        family.load_vae(str(tmp_path / "empty"), CPU, F32)
    (tmp_path / "vae.safetensors").write_bytes(b"")  # an empty file: no safetensors header
    with pytest.raises(ModelLoadError, match=r"--vae .*vae\.safetensors"):
        family.load_vae(str(tmp_path / "vae.safetensors"), CPU, F32)
    # single-file text encoders are read given their tokenizer folder, which is asked for first
    with pytest.raises(ModelLoadError, match=rf"{family.text_flag} .*vae\.safetensors: .*no tokenizer"):
        family.load_text_encoder(str(tmp_path / "vae.safetensors"), CPU, F32)
    with pytest.raises(ModelLoadError, match=rf"{family.text_flag} .*nope"):
        family.load_text_encoder(str(tmp_path / "nope"), CPU, F32)


def test_weights_identity_follows_the_config_and_the_files_on_disk(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLWan

    from masktrain.cache.identity import weights_identity
    from masktrain.models.wan import TINY_VAE

    family = get_family("wan")
    vae = family.load_vae("tiny", CPU, F32)
    other = AutoencoderKLWan(**{**TINY_VAE, "latents_mean": [0.0] * 16})
    assert weights_identity("tiny", vae) == weights_identity("tiny", family.load_vae("tiny", CPU, F32))
    assert weights_identity("tiny", vae) != weights_identity("tiny", other)

    vae.save_pretrained(tmp_path / "vae")
    before = weights_identity(str(tmp_path / "vae"), vae)
    weights = next((tmp_path / "vae").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert weights_identity(str(tmp_path / "vae"), vae) != before


#: Each family's released VAE: its diffusers class and the config its repository gives where the
#: class's defaults are another model's (Z-Image's is FLUX.1's 4-level AutoencoderKL, families.md §2.1).
RELEASED_VAES = {
    "wan": ("AutoencoderKLWan", {}),
    "qwen_image": ("AutoencoderKLQwenImage", {}),
    "qwen_image_2_1": ("AutoencoderKLQwenImage21", {}),
    "flux2": ("AutoencoderKLFlux2", {}),
    "z_image": (
        "AutoencoderKL",
        {
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 16,
        },
    ),
}


@pytest.mark.parametrize("arch", ARCHES)
def test_the_catalog_states_each_familys_latent_factors(arch: str) -> None:
    """The catalog's torch-free facts agree with the models: the tiny VAEs it lists, and the
    released VAE (diffusers' default config, built on the meta device)."""
    from accelerate import init_empty_weights

    from masktrain import catalog

    spec, family = catalog.arch(arch), get_family(arch)
    assert family.spec is spec and family.name == spec.name and family.text_flag == spec.text_flag
    for name, factor in spec.tiny_vaes.items():
        vae = family.load_vae(name, CPU, F32)
        assert family.spatial_factor(vae) == factor
        assert family.temporal_factor(vae) == spec.temporal_factor
    released_class, config = RELEASED_VAES[arch]
    import diffusers

    with init_empty_weights():
        released = getattr(diffusers, released_class)(**config)
    assert family.spatial_factor(released) == spec.spatial_factor
    assert family.temporal_factor(released) == spec.temporal_factor
