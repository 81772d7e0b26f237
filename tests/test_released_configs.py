"""The released transformers' configs on the catalog (``masktrain plan --dit NAME``, the memory
benches): each builds on the meta device and has the published model's parameter count, names the
musubi-tuner task of the same transformer, and an unknown name is one line listing them all."""

from __future__ import annotations

import pytest

from masktrain import catalog
from masktrain.errors import SettingError
from masktrain.models import get_family

# name -> (exact count of the config built by diffusers, published size, where that figure is from).
# WAN 2.1 1.3B is named for 1.3B but holds 9% more: its fp32 transformer file is 5.68 GB, 1.42e9
# parameters. WAN 2.2 A14B is two transformers of the 14B config (its card's "27B total" rounds
# 2 x 14.29e9 down by 6%); the count is one expert's.
SIZES = {
    "wan2.1-1.3b": (1_418_996_800, 1.42e9, "Wan2.1-T2V-1.3B's fp32 diffusion_pytorch_model, 5.68 GB"),
    "wan2.1-14b": (14_288_491_584, 14e9, "the name Wan2.1-T2V-14B"),
    "wan2.2-a14b": (14_288_491_584, 14e9, "the name Wan2.2-T2V-A14B: 14B active"),
    "wan2.2-ti2v-5b": (4_999_787_712, 5e9, "the name Wan2.2-TI2V-5B"),
    "wan2.1-i2v-14b": (16_394_878_784, 16.4e9, "the T2V 14B plus its image path, counted below"),
    "wan2.1-flf2v-14b": (16_395_536_704, 16.4e9, "the I2V 14B plus two images' position table"),
    "wan2.2-i2v-a14b": (14_288_901_184, 14e9, "the name Wan2.2-I2V-A14B: 14B active"),
    "qwen-image-20b": (20_430_401_088, 20e9, "Qwen-Image's card: a 20B MMDiT"),
    "qwen-image-2.1-7b": (7_115_124_736, 7e9, "issue 25: Qwen-Image 2.1, 7B"),
    "flux2-dev": (32_223_281_152, 32e9, "FLUX.2 [dev]'s card: a 32B flow transformer"),
    "flux2-klein-4b": (3_875_544_576, 3.876e9, "families.md 3.1, counted: klein 4B"),
    "flux2-klein-9b": (9_078_581_248, 9.079e9, "families.md 3.1, counted: klein 9B"),
    "z-image-6b": (6_154_908_736, 6.155e9, "families.md 2.8, counted: Z-Image 6B"),
}
TOLERANCE = 0.03


def test_the_released_names_are_the_ones_plan_takes() -> None:
    assert catalog.released_names() == tuple(SIZES)
    assert {name: catalog.released(name)[0].name for name in SIZES} == {
        "wan2.1-1.3b": "wan",
        "wan2.1-14b": "wan",
        "wan2.2-a14b": "wan",
        "wan2.2-ti2v-5b": "wan",
        "wan2.1-i2v-14b": "wan",
        "wan2.1-flf2v-14b": "wan",
        "wan2.2-i2v-a14b": "wan",
        "qwen-image-20b": "qwen_image",
        "qwen-image-2.1-7b": "qwen_image_2_1",
        "flux2-dev": "flux2",
        "flux2-klein-4b": "flux2",
        "flux2-klein-9b": "flux2",
        "z-image-6b": "z_image",
    }


@pytest.mark.parametrize("name", list(SIZES))
def test_a_released_config_has_the_published_parameter_count(name: str) -> None:
    spec, released = catalog.released(name)
    model = get_family(spec.name).empty_transformer(released.config)  # accelerate's init_empty_weights
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    count = sum(parameter.numel() for parameter in model.parameters())
    exact, published, _ = SIZES[name]
    assert count == exact
    assert abs(count / published - 1) < TOLERANCE, f"{count:,} vs {published:.3g}"


def test_only_wan_2_2_a14b_runs_two_experts() -> None:
    experts = {name: catalog.released(name)[1].experts for name in SIZES}
    assert experts == {name: 2 if name in ("wan2.2-a14b", "wan2.2-i2v-a14b") else 1 for name in SIZES}
    assert catalog.released("wan2.2-a14b")[1].config == catalog.released("wan2.1-14b")[1].config


def test_the_image_to_video_configs_hold_the_image_path_counted_by_hand() -> None:
    """The I2V 14B is the T2V 14B plus: 20 more input channels of the 1x2x2 patch embedding; per
    block the image key and value projections (5120 x 5120 + bias) and the image key's RMS norm;
    the CLIP embedding's projection (LayerNorm 1280, Linear 1280->1280, Linear 1280->5120,
    LayerNorm 5120). FLF2V adds a (514, 1280) position table; WAN 2.2 I2V only the channels."""
    t2v = SIZES["wan2.1-14b"][0]
    patch = 20 * 5120 * 2 * 2
    per_block = 2 * (5120 * 5120 + 5120) + 5120
    projection = 2 * 1280 + (1280 * 1280 + 1280) + (1280 * 5120 + 5120) + 2 * 5120
    assert SIZES["wan2.1-i2v-14b"][0] == t2v + patch + 40 * per_block + projection
    assert SIZES["wan2.1-flf2v-14b"][0] == SIZES["wan2.1-i2v-14b"][0] + 514 * 1280
    assert SIZES["wan2.2-i2v-a14b"][0] == t2v + patch
    inputs = get_family("wan").denoiser_inputs(catalog.released("wan2.1-i2v-14b")[1].config)
    assert (inputs.latent_channels, inputs.conditioning_channels, inputs.image_dim) == (16, 20, 1280)


@pytest.mark.parametrize("name", list(SIZES))
def test_a_released_config_is_the_transformer_of_its_musubi_task(name: str) -> None:
    """The catalog's musubi tasks check a file's width and depth: a released config must pass."""
    spec, released = catalog.released(name)
    if released.task is None:  # TI2V-5B: not among the musubi tasks; Qwen-Image 2.1: no versions
        assert name in ("wan2.2-ti2v-5b", "qwen-image-2.1-7b")
        return
    task = spec.tasks[released.task]
    assert task.refused is None
    config = released.config
    if task.width is not None:
        assert task.width == config["num_attention_heads"] * config["attention_head_dim"]
        assert task.blocks == config["num_layers"]


def test_the_ti2v_5b_config_takes_its_vaes_48_channels() -> None:
    config = catalog.released("wan2.2-ti2v-5b")[1].config
    inputs = get_family("wan").denoiser_inputs(config)
    assert (inputs.latent_channels, config["out_channels"], inputs.text_dim) == (48, 48, 4096)


def test_an_unknown_name_is_one_line_naming_every_released_model() -> None:
    with pytest.raises(SettingError) as error:
        catalog.released("wan-1.3b")
    assert str(error.value) == (
        "'wan-1.3b' is not a released model; choose one of wan2.1-1.3b, wan2.1-14b, wan2.2-a14b, "
        "wan2.2-ti2v-5b, wan2.1-i2v-14b, wan2.1-flf2v-14b, wan2.2-i2v-a14b, qwen-image-20b, "
        "qwen-image-2.1-7b, flux2-dev, flux2-klein-4b, flux2-klein-9b, z-image-6b "
        "(did you mean 'wan2.1-1.3b'?)"
    )
