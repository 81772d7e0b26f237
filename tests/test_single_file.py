"""Single-file weights (ComfyUI / original layout): tiny diffusers models are written out under
their original key names (``reference.py``'s inverse mappings, written independently of the
loader), loaded back, and must reproduce every tensor and the forward pass exactly. The released models'
configs are checked on the meta device (key names and shapes only, no weights)."""

import re
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from masktrain.errors import ModelLoadError
from masktrain.models import qwen_image_checkpoint, wan_checkpoint
from masktrain.models.qwen_image_checkpoint import qwen_transformer_config
from masktrain.models.wan_checkpoint import (
    WAN22_VAE_LATENTS_MEAN,
    WAN22_VAE_LATENTS_STD,
    wan_transformer_config,
    wan_transformer_names,
    wan_vae_config,
    wan_vae_names,
)
from reference import wan_dit_original, wan_vae_original

# Each family reads its own files.
READERS = {"wan": wan_checkpoint, "qwen_image": qwen_image_checkpoint}


COMFY = "model.diffusion_model."

TINY_WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
TINY_WAN_I2V = TINY_WAN | {"in_channels": 36, "image_dim": 8, "added_kv_proj_dim": 24, "pos_embed_seq_len": 6}
TINY_QWEN = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 4, 4),
}
TINY_WAN_VAE = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_TI2V_VAE = TINY_WAN_VAE | {
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
    "scale_factor_spatial": 16,
}
TINY_QWEN_VAE = {
    "base_dim": 4 * 6,
    "z_dim": 4,
    "dim_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True],
    "latents_mean": [0.0] * 4,
    "latents_std": [1.0] * 4,
}
# The released transformers (diffusers scripts/convert_wan_to_diffusers.py).
WAN_RELEASED = {
    "1.3B": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    "I2V-14B": {
        "num_attention_heads": 40,
        "ffn_dim": 13824,
        "num_layers": 40,
        "in_channels": 36,
        "image_dim": 1280,
        "added_kv_proj_dim": 5120,
    },
    "FLF2V-14B": {
        "num_attention_heads": 40,
        "ffn_dim": 13824,
        "num_layers": 40,
        "in_channels": 36,
        "image_dim": 1280,
        "added_kv_proj_dim": 5120,
        "pos_embed_seq_len": 257 * 2,
    },
    "2.2-I2V-A14B": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 36},
    "TI2V-5B": {
        "num_attention_heads": 24,
        "ffn_dim": 14336,
        "num_layers": 30,
        "in_channels": 48,
        "out_channels": 48,
    },
}
WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": WAN22_VAE_LATENTS_MEAN,
    "latents_std": WAN22_VAE_LATENTS_STD,
}


def seeded(build):
    torch.manual_seed(0)
    model = build()
    # Random values everywhere (diffusers zero-initialises some layers), so a swapped tensor shows.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + 0.02)
    return model.eval()


def save(path: Path, state: dict[str, torch.Tensor], rename=lambda n: n, prefix: str = "") -> Path:
    save_file({prefix + rename(k): v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path


def assert_same_tensors(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected, got = original.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert not any(p.is_meta for p in loaded.parameters())
    assert not loaded.training


def wan_forward(model: torch.nn.Module, in_channels: int = 16, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, in_channels, 1, 8, 8, generator=g).to(dtype)
    text = torch.randn(1, 12, 32, generator=g).to(dtype)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def qwen_forward(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    with torch.no_grad():
        return model(
            x, text, torch.ones(1, 8, dtype=torch.long), torch.tensor([1.0]), [(1, 4, 4)], return_dict=False
        )[0]


# --- WAN transformer ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [COMFY, "diffusion_model.", ""])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_transformer_round_trip(tmp_path, prefix, dtype) -> None:
    original = seeded(lambda: WanTransformer3DModel(**TINY_WAN))
    for param in original.parameters():  # a bf16 file holds the weights; RoPE tables stay float32
        param.data = param.data.to(dtype)
    path = save(tmp_path / "wan.safetensors", original.state_dict(), wan_dit_original, prefix)
    loaded = wan_checkpoint.load_transformer_file(path, "--dit", overrides={"attention_head_dim": 12})
    assert isinstance(loaded, WanTransformer3DModel)
    # rope_max_seq_len only sizes a buffer of positions: the released 1024 serves as well.
    assert {k: loaded.config[k] for k in TINY_WAN} == TINY_WAN | {"rope_max_seq_len": 1024}
    assert_same_tensors(loaded, original)
    assert torch.equal(wan_forward(loaded, dtype=dtype), wan_forward(original, dtype=dtype))


def test_wan_i2v_transformer_round_trip(tmp_path) -> None:
    original = seeded(lambda: WanTransformer3DModel(**TINY_WAN_I2V))
    path = save(tmp_path / "i2v.safetensors", original.state_dict(), wan_dit_original, COMFY)
    loaded = wan_checkpoint.load_transformer_file(path, "--dit", overrides={"attention_head_dim": 12})
    for key in ("in_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        assert loaded.config[key] == TINY_WAN_I2V[key]
    assert_same_tensors(loaded, original)
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 36, 1, 8, 8, generator=g), torch.randn(1, 12, 32, generator=g)
    image = torch.randn(2, 3, 8, generator=g)  # FLF2V: first and last frame, pos_embed over both
    with torch.no_grad():
        outs = [m(x, torch.tensor([300.0]), text, image, return_dict=False)[0] for m in (loaded, original)]
    assert torch.equal(*outs)


def test_wan_transformer_in_diffusers_names_loads_too(tmp_path) -> None:
    original = seeded(lambda: WanTransformer3DModel(**TINY_WAN))
    path = save(tmp_path / "diffusion_pytorch_model.safetensors", original.state_dict())
    loaded = wan_checkpoint.load_transformer_file(path, "--dit", overrides={"attention_head_dim": 12})
    assert_same_tensors(loaded, original)


def test_dtype_argument_casts_while_loading(tmp_path) -> None:
    original = seeded(lambda: WanTransformer3DModel(**TINY_WAN))
    path = save(tmp_path / "wan.safetensors", original.state_dict(), wan_dit_original, COMFY)
    loaded = wan_checkpoint.load_transformer_file(
        path, "--dit", dtype=torch.bfloat16, overrides={"attention_head_dim": 12}
    )
    assert_same_tensors(loaded, original.to(torch.bfloat16))


@pytest.mark.parametrize("variant", sorted(WAN_RELEASED))
def test_released_wan_transformer_configs_are_inferred(variant) -> None:
    """Key names and shapes of each released model (built on meta) -> the same config, with the
    head count from the 128-dim heads."""
    real = WAN_RELEASED[variant]
    with init_empty_weights():
        model = WanTransformer3DModel(**real)
    original = {wan_dit_original(k): tuple(v.shape) for k, v in model.state_dict().items()}
    to_file = wan_transformer_names({k: k for k in original})
    assert set(to_file) == set(model.state_dict())
    config = wan_transformer_config({new: original[old] for new, old in to_file.items()})
    assert config == {k: model.config[k] for k in config}
    assert config["attention_head_dim"] == 128
    assert config["text_dim"] == 4096 and config["freq_dim"] == 256


# --- Qwen-Image transformer -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [COMFY, ""])
def test_qwen_transformer_round_trip(tmp_path, prefix) -> None:
    original = seeded(lambda: QwenImageTransformer2DModel(**TINY_QWEN))
    path = save(tmp_path / "qwen.safetensors", original.state_dict(), prefix=prefix)
    loaded = qwen_image_checkpoint.load_transformer_file(
        path, "--dit", overrides={"axes_dims_rope": (8, 4, 4)}
    )
    assert isinstance(loaded, QwenImageTransformer2DModel)
    assert {k: loaded.config[k] for k in TINY_QWEN} == TINY_QWEN
    assert_same_tensors(loaded, original)
    assert torch.equal(qwen_forward(loaded), qwen_forward(original))


def test_qwen_edit_marker_sets_zero_cond_t(tmp_path) -> None:
    original = seeded(lambda: QwenImageTransformer2DModel(**TINY_QWEN))
    state = original.state_dict() | {"__index_timestep_zero__": torch.empty(0)}
    path = save(tmp_path / "edit.safetensors", state, prefix=COMFY)
    loaded = qwen_image_checkpoint.load_transformer_file(
        path, "--dit", overrides={"axes_dims_rope": (8, 4, 4)}
    )
    assert loaded.config.zero_cond_t is True
    assert_same_tensors(loaded, original)


def test_released_qwen_transformer_config_is_inferred() -> None:
    with init_empty_weights():
        model = QwenImageTransformer2DModel()
    config = qwen_transformer_config({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert config == {k: model.config[k] for k in config}
    assert (config["num_layers"], config["num_attention_heads"], config["joint_attention_dim"]) == (
        60,
        24,
        3584,
    )


# --- VAEs -------------------------------------------------------------------------------------------


def vae_round_trip(tmp_path, arch, model_class, config, prefix="", overrides=None):
    original = seeded(lambda: model_class(**config))
    rename = lambda n: wan_vae_original(n, config["num_res_blocks"], config.get("is_residual", False))  # noqa: E731
    path = save(tmp_path / "vae.safetensors", original.state_dict(), rename, prefix)
    loaded = READERS[arch].load_vae_file(path, "--vae", overrides=overrides)
    assert isinstance(loaded, model_class)
    assert_same_tensors(loaded, original)
    x = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        outs = [m.encode(x).latent_dist.mode() for m in (loaded, original)]
        decoded = [m.decode(outs[0]).sample for m in (loaded, original)]
    assert torch.equal(*outs) and torch.equal(*decoded)
    return loaded


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_wan21_vae_round_trip(tmp_path, prefix) -> None:
    loaded = vae_round_trip(tmp_path, "wan", AutoencoderKLWan, TINY_WAN_VAE, prefix)
    assert loaded.config.scale_factor_spatial == 8 and loaded.config.scale_factor_temporal == 4
    assert loaded.config.latents_mean == AutoencoderKLWan().config.latents_mean


def test_wan22_vae_round_trip_takes_the_released_latent_statistics(tmp_path) -> None:
    loaded = vae_round_trip(tmp_path, "wan", AutoencoderKLWan, TINY_TI2V_VAE)
    config = loaded.config
    assert (config.z_dim, config.is_residual, config.patch_size, config.scale_factor_spatial) == (
        48,
        True,
        2,
        16,
    )
    assert config.latents_mean == WAN22_VAE_LATENTS_MEAN and config.latents_std == WAN22_VAE_LATENTS_STD
    assert len(WAN22_VAE_LATENTS_MEAN) == len(WAN22_VAE_LATENTS_STD) == 48


def test_qwen_vae_round_trip(tmp_path) -> None:
    stats = {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    loaded = vae_round_trip(tmp_path, "qwen_image", AutoencoderKLQwenImage, TINY_QWEN_VAE, overrides=stats)
    assert loaded.config.temperal_downsample == [False, True]


def test_qwen_vae_has_the_wan21_vae_layout() -> None:
    with init_empty_weights():
        wan, qwen = AutoencoderKLWan(), AutoencoderKLQwenImage()
    assert {k: v.shape for k, v in wan.state_dict().items()} == {
        k: v.shape for k, v in qwen.state_dict().items()
    }


@pytest.mark.parametrize(
    ("model_class", "config"),
    [(AutoencoderKLWan, {}), (AutoencoderKLQwenImage, {}), (AutoencoderKLWan, WAN22_VAE)],
    ids=["wan2.1", "qwen_image", "wan2.2-ti2v"],
)
def test_released_vae_names_and_configs(model_class, config) -> None:
    with init_empty_weights():
        model = model_class(**config)
    residual = config.get("is_residual", False)
    original = {wan_vae_original(k, 2, residual): tuple(v.shape) for k, v in model.state_dict().items()}
    to_file = wan_vae_names(list(original))
    assert set(to_file) == set(model.state_dict())
    if not residual:  # the same mapping as diffusers' own converter, on the layout it was written for
        assert convert_wan_vae_to_diffusers({k: k for k in original}) == to_file
    inferred = wan_vae_config({new: original[old] for new, old in to_file.items()})
    names = {"input_channels": "in_channels"} if model_class is AutoencoderKLQwenImage else {}
    for key, value in model.config.items():
        if not key.startswith("_") and key not in ("attn_scales", "dropout", "clip_output"):
            assert inferred.get(names.get(key, key), value) == value, key


def test_unscaled_fp8_loads_as_bfloat16(tmp_path) -> None:
    original = seeded(lambda: AutoencoderKLWan(**TINY_WAN_VAE))
    state = {k: v.to(torch.float8_e4m3fn) for k, v in original.state_dict().items()}
    rename = lambda n: wan_vae_original(n, 1, False)  # noqa: E731
    loaded = wan_checkpoint.load_vae_file(save(tmp_path / "fp8.safetensors", state, rename), "--vae")
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[name].to(torch.bfloat16))


# --- errors -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("files")
    wan = seeded(lambda: WanTransformer3DModel(**TINY_WAN)).state_dict()
    qwen = seeded(lambda: QwenImageTransformer2DModel(**TINY_QWEN)).state_dict()
    vae = seeded(lambda: AutoencoderKLWan(**TINY_WAN_VAE)).state_dict()
    ti2v = seeded(lambda: AutoencoderKLWan(**TINY_TI2V_VAE)).state_dict()
    incomplete = {k: v for k, v in wan.items() if "ffn" not in k}
    extra = wan | {"blocks.0.extra.weight": torch.zeros(2)}
    t5 = {
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
        "shared.weight": torch.zeros(4, 2),
    }
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "model.pth").write_bytes(b"not loaded")
    return {
        "wan": save(tmp_path / "wan.safetensors", wan, wan_dit_original, COMFY),
        "qwen": save(tmp_path / "qwen.safetensors", qwen, prefix=COMFY),
        "vae": save(tmp_path / "vae.safetensors", vae, lambda n: wan_vae_original(n, 1, False)),
        "ti2v": save(tmp_path / "ti2v.safetensors", ti2v, lambda n: wan_vae_original(n, 1, True)),
        "incomplete": save(tmp_path / "incomplete.safetensors", incomplete, wan_dit_original, COMFY),
        "extra": save(tmp_path / "extra.safetensors", extra, wan_dit_original, COMFY),
        "t5": save(tmp_path / "t5.safetensors", t5),
        "unknown": save(tmp_path / "unknown.safetensors", {"foo.weight": torch.zeros(1)}),
        # a ComfyUI fp8 scale whose weight is not fp8: a broken file
        "scaled": save(
            tmp_path / "scaled.safetensors",
            wan | {"scaled_fp8": torch.zeros(0), "blocks.0.ffn.net.2.scale_weight": torch.ones(())},
            prefix=COMFY,
        ),
        "garbage": garbage,
        "empty": tmp_path / "empty.safetensors",
        "pth": tmp_path / "model.pth",
        "missing": tmp_path / "nope.safetensors",
    }


HEAD = {"attention_head_dim": 12}


@pytest.mark.parametrize(
    ("case", "overrides", "message"),  # case: "loader arch file"
    [
        (
            "dit wan vae",
            HEAD,
            r"holds a WAN 2\.1 / Qwen-Image VAE, expected a WAN transformer; pass it to --vae",
        ),
        ("dit wan qwen", HEAD, r"holds a Qwen-Image transformer, expected a WAN transformer; check --arch"),
        (
            "dit qwen_image wan",
            None,
            r"holds a WAN transformer, expected a Qwen-Image transformer; check --arch",
        ),
        (
            "dit wan t5",
            HEAD,
            r"holds a T5 / UMT5 text encoder, expected a WAN transformer; text encoders need",
        ),
        (
            "dit wan unknown",
            HEAD,
            r"holds an unrecognised checkpoint, expected a WAN transformer \(first keys: foo",
        ),
        (
            "dit wan wan",
            None,
            r"inner dim 24 is not a multiple of the head dim 128 .*pass the attention_head_dim",
        ),
        ("dit qwen_image qwen", None, r"head dim 16 is not the released 128.*pass axes_dims_rope"),
        (
            "dit wan incomplete",
            HEAD,
            r"not a complete checkpoint: tensor 'blocks\.0\.ffn\.net\.0\.proj\.weight'",
        ),
        (
            "dit wan extra",
            HEAD,
            r"does not match WanTransformer3DModel: unexpected tensors "
            r"model\.diffusion_model\.blocks\.0\.extra\.weight",
        ),
        (
            "dit wan scaled",
            HEAD,
            r"holds the fp8 scale '.*blocks\.0\.ffn\.net\.2\.scale_weight' but no fp8 weight",
        ),
        ("dit wan garbage", HEAD, r"cannot read the safetensors header"),
        ("dit wan empty", HEAD, r"cannot read the safetensors header"),
        ("dit wan pth", HEAD, r"expected a \.safetensors file .*pickled checkpoints"),
        ("dit wan missing", HEAD, r"no such file"),
        (
            "vae wan wan",
            None,
            r"holds a WAN transformer, expected a WAN 2\.1 / Qwen-Image VAE "
            r"or a WAN 2\.2 TI2V-5B VAE; pass it to --dit",
        ),
        (
            "vae qwen_image ti2v",
            None,
            r"holds a WAN 2\.2 TI2V-5B VAE, expected a WAN 2\.1 / Qwen-Image VAE; check --arch",
        ),
        ("vae wan t5", None, r"holds a T5 / UMT5 text encoder"),
    ],
)
def test_errors_name_the_flag_the_file_and_what_was_expected(files, case, overrides, message):
    loader, arch, name = case.split()
    flag = "--dit" if loader == "dit" else "--vae"
    load = READERS[arch].load_transformer_file if loader == "dit" else READERS[arch].load_vae_file
    with pytest.raises(ModelLoadError, match=rf"^{flag} {re.escape(str(files[name]))}: .*{message}"):
        load(files[name], flag, overrides=overrides)


def test_a_mismatched_shape_is_an_error_before_any_tensor_is_read(tmp_path) -> None:
    state = seeded(lambda: AutoencoderKLWan(**TINY_WAN_VAE)).state_dict()
    state["decoder.up_blocks.0.resnets.0.conv2.bias"] = torch.zeros(5)
    path = save(tmp_path / "vae.safetensors", state, lambda n: wan_vae_original(n, 1, False))
    with pytest.raises(
        ModelLoadError, match=r"tensor 'decoder\.upsamples\.0\.residual\.6\.bias' has shape \[5\]"
    ):
        wan_checkpoint.load_vae_file(path, "--vae")


def test_a_vae_with_unknown_latent_statistics_is_an_error(tmp_path) -> None:
    state = seeded(lambda: AutoencoderKLQwenImage(**TINY_QWEN_VAE)).state_dict()
    path = save(tmp_path / "vae.safetensors", state, lambda n: wan_vae_original(n, 1, False))
    with pytest.raises(ModelLoadError, match=r"no known latent statistics for a 4-channel VAE"):
        qwen_image_checkpoint.load_vae_file(path, "--vae")
