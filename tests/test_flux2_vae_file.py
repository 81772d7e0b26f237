"""FLUX.2's VAE from one BFL-layout file (``ae.safetensors``, as ComfyUI also stores it): tiny
``AutoencoderKLFlux2`` models are written with BFL's ldm names by an inverse mapping written here
from the layout (not from the loader's tables), read back through ``Flux2Family.load_vae``, and
must hold the same tensors and give the same normalised latents; a missing, extra or misshapen
key is one error naming it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from masktrain.models import z_image_checkpoint
from masktrain.models.flux2 import Flux2Family
from masktrain.models.flux2_checkpoint import FLUX2_VAE, flux2_vae_config, vae_diffusers_names, vae_shape
from masktrain.models.weights_file import identify

CPU, F32 = torch.device("cpu"), torch.float32
# test_flux2.py's tiny VAE (one block, 1 latent channel) and 8x one, at the released 32 GroupNorm
# groups (no shape in the file shows them) and with the widths that needs; the 8x one also has the
# quant convs and a width change (a resnet conv_shortcut).
TINY: dict[str, Any] = {
    "block_out_channels": (32,),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1,
    "latent_channels": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
EIGHT_X: dict[str, Any] = {
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 2,
}

# diffusers name part -> BFL's (the ldm layout of BFL's flux2 autoencoder)
_BFL_PARTS = [
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
]


def bfl_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`vae`'s tensors under BFL's names: the decoder's blocks counted from the bottom, the
    attention's Linear weights as 1x1 convolutions."""
    blocks = len(vae.config.block_out_channels)
    state = {}
    for name, tensor in vae.state_dict().items():
        bfl = name
        if up := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", name):
            part = "block." if up.group(2) == "resnets" else "upsample."
            bfl = f"decoder.up.{blocks - 1 - int(up.group(1))}.{part}" + name[up.end() :]
        for pattern, replacement in _BFL_PARTS:
            bfl = re.sub(pattern, replacement, bfl)
        if ".mid.attn_1." in bfl and bfl.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        state[bfl] = tensor.contiguous()
    return state


def flux2_vae(config: dict[str, Any], seed: int) -> torch.nn.Module:
    """An ``AutoencoderKLFlux2`` with random weights and BatchNorm statistics (so both show)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        for parameter in vae.parameters():  # groupnorm weights away from 1, biases away from 0
            parameter.add_(torch.randn_like(parameter) * 0.1)
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.3)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


@pytest.mark.parametrize(("config", "prefix", "size"), [(TINY, "", 8), (EIGHT_X, "vae.", 32)])
def test_bfl_vae_file_encodes_as_the_model(
    tmp_path: Path, config: dict[str, Any], prefix: str, size: int
) -> None:
    vae = flux2_vae(config, seed=1)
    state = bfl_state(vae)
    assert "decoder.up.0.upsample.conv.weight" not in state  # the bottom block has no upsampler
    save_file({prefix + k: v for k, v in state.items()}, tmp_path / "ae.safetensors")
    family = Flux2Family()
    loaded = family.load_vae(str(tmp_path / "ae.safetensors"), CPU, F32)

    for key in ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv", "patch_size"):
        assert loaded.config[key] == vae.config[key], key
    reference = vae.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())
    pixels = torch.rand(2, 3, 1, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = family.encode_pixels(vae, pixels)
    cells = size // family.spatial_factor(vae)
    assert expected.shape == (2, 4 * config["latent_channels"], 1, cells, cells)
    torch.testing.assert_close(family.encode_pixels(loaded, pixels), expected, rtol=0, atol=1e-6)


def test_the_released_config_is_read_off_the_released_shapes() -> None:
    """The default ``AutoencoderKLFlux2`` is the released VAE (its diffusers defaults: 128-512 wide, 32
    latent channels, quant convs, mid attention, 2x2 patches); its BFL shapes give it back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2

    with init_empty_weights():
        released = AutoencoderKLFlux2()
    stored = {key: tuple(tensor.shape) for key, tensor in bfl_state(released).items()}
    to_file = vae_diffusers_names({key: key for key in stored})
    config = flux2_vae_config({name: vae_shape(name, stored[key]) for name, key in to_file.items()})
    with init_empty_weights():
        built = AutoencoderKLFlux2(**config).config
    assert {k: v for k, v in built.items() if not k.startswith("_")} == {
        k: v for k, v in released.config.items() if not k.startswith("_")
    }


def test_a_missing_extra_or_misshapen_key_is_named(tmp_path: Path) -> None:
    family = Flux2Family()
    path = tmp_path / "ae.safetensors"
    state = bfl_state(flux2_vae(TINY, seed=1))

    save_file({k: v for k, v in state.items() if k != "decoder.up.0.block.1.conv2.bias"}, path)
    with pytest.raises(
        ValueError,
        match=r"--vae .*ae.safetensors: does not match AutoencoderKLFlux2: missing tensors "
        r"decoder\.up_blocks\.0\.resnets\.1\.conv2\.bias$",
    ):
        family.load_vae(str(path), CPU, F32)

    save_file(state | {"encoder.mid.attn_2.q.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r": unexpected tensors encoder\.mid\.attn_2\.q\.weight$"):
        family.load_vae(str(path), CPU, F32)

    save_file(state | {"encoder.mid.attn_1.k.weight": torch.zeros(32, 32, 3, 3)}, path)
    with pytest.raises(
        ValueError, match=r"tensor 'encoder\.mid\.attn_1\.k\.weight' has shape \[32, 32, 3, 3\]"
    ):
        family.load_vae(str(path), CPU, F32)


def test_a_flux1_vae_is_named_as_such(tmp_path: Path) -> None:
    """FLUX.1's ``ae`` has the same ldm keys but no BatchNorm: it is not taken for FLUX.2's."""
    state = bfl_state(flux2_vae(TINY, seed=1))
    # both kinds are registered (models/registry imports every family); FLUX.2's, a superset of
    # FLUX.1's keys, must be the one a FLUX.2 file is taken for
    assert identify(list(state)) is FLUX2_VAE
    assert identify([k for k in state if not k.startswith("bn.")]) is z_image_checkpoint.Z_IMAGE_VAE
    save_file({k: v for k, v in state.items() if not k.startswith("bn.")}, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"holds a FLUX\.1-style \(ldm\) VAE, expected a FLUX\.2 VAE"):
        Flux2Family().load_vae(str(tmp_path / "ae.safetensors"), CPU, F32)
