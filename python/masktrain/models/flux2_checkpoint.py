"""FLUX.2 transformers in one ``.safetensors`` file: the BFL layout of ``flux2-dev.safetensors``,
``flux2-klein-4b.safetensors`` and the ComfyUI repackagings (optionally under
``model.diffusion_model.``), read as ``Flux2Transformer2DModel`` with the renaming of diffusers'
``convert_flux2_transformer_checkpoint_to_diffusers`` (``loaders/single_file_utils.py``, 0.42.1):

- each double block's fused ``img_attn.qkv`` / ``txt_attn.qkv`` is three blocks of rows, read as
  ``attn.to_q/k/v`` / ``attn.add_q/k/v_proj`` (``single_file.build``'s `rows`);
- ``final_layer.adaLN_modulation.1`` holds (shift, scale) where diffusers' ``norm_out.linear``
  holds (scale, shift): its halves are swapped after reading;
- the RMS norms' ``scale`` is diffusers' ``weight``.

What the shapes cannot tell: the RoPE axes (32, 32, 32, 32) of the released 128-dim heads, theta
2000 and eps 1e-6 (the class defaults every released config keeps). ``overrides`` replaces any
inferred value.

The VAE file (BFL's FLUX.2 ``ae.safetensors``, which ComfyUI also uses) is read as
``AutoencoderKLFlux2`` with the renaming of diffusers' ``convert_flux2_vae_checkpoint_to_diffusers``
(``scripts/convert_flux2_to_diffusers.py``, main at 58eb52c, l.71-226; the installed diffusers has
no single-file entry for this class): the ldm names (``encoder.down.N.block.M``, ``mid.block_1``,
``mid.attn_1``, ``nin_shortcut``, ``norm_out``; the decoder's ``up.N`` counted from the bottom),
``encoder.quant_conv`` / ``decoder.post_quant_conv`` as diffusers' top-level ``quant_conv`` /
``post_quant_conv``, the mid-block attention's 1x1-conv q/k/v/proj weights as Linear weights, and
the BatchNorm's ``bn.running_mean`` / ``bn.running_var`` (the latent normalisation) kept
(``bn.num_batches_tracked``, unused in eval, may be absent). The config follows from the shapes,
but for the GroupNorm groups, which no shape shows: the released 32. Every key and shape is checked
on the header before a tensor is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import ShapeRuleError
from masktrain.models.single_file import Fp8Load, build, read_component
from masktrain.models.weights_file import (
    DIT_PREFIXES,
    VAE_PREFIXES,
    CheckpointKind,
    Shapes,
    abbreviated,
    count,
    open_component,
    register_kinds,
    shape,
)

#: The released FLUX.2 RoPE axes for 128-dim heads.
FLUX2_AXES_DIMS_ROPE = (32, 32, 32, 32)
FLUX2_DIT = CheckpointKind(
    "a FLUX.2 transformer", "dit", lambda n: "single_stream_modulation.lin.weight" in n
)
# FLUX.1's ldm VAE keys plus the BatchNorm of the patchified latents
FLUX2_VAE = CheckpointKind(
    "a FLUX.2 VAE",
    "vae",
    lambda n: "bn.running_mean" in n and "encoder.down.0.block.0.conv1.weight" in n,
)
register_kinds(FLUX2_DIT, FLUX2_VAE)
#: The released VAE's GroupNorm groups (``AutoencoderKLFlux2``'s default): no tensor's shape shows it.
RELEASED_VAE_GROUPS = 32

# BFL name -> diffusers name, outside the blocks (the converter's FLUX2_TRANSFORMER_KEYS_RENAME_DICT)
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped after reading
}
_DOUBLE = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_BLOCK_KEY = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)")
_TOP_KEY = re.compile(r"(.+)\.(weight|bias)")


def diffusers_names(unprefixed: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """(diffusers name -> file key, each q/k/v part's third of its fused tensor: 0, 1 or 2) for
    the file's unprefixed keys; a key of no FLUX.2 layer keeps its name (``build`` names it as
    unexpected)."""
    to_file: dict[str, str] = {}
    thirds: dict[str, int] = {}
    for key, file_key in unprefixed.items():
        block = _BLOCK_KEY.fullmatch(key)
        top = _TOP_KEY.fullmatch(key)
        if block is not None:
            kind, index, layer, param = block.groups()
            param = "weight" if param == "scale" else param
            prefix = (
                f"transformer_blocks.{index}"
                if kind == "double_blocks"
                else f"single_transformer_blocks.{index}"
            )
            if kind == "double_blocks" and layer in _QKV:
                for third, part in enumerate(_QKV[layer]):
                    to_file[f"{prefix}.{part}.{param}"] = file_key
                    thirds[f"{prefix}.{part}.{param}"] = third
                continue
            renamed = (_DOUBLE if kind == "double_blocks" else _SINGLE).get(layer)
            to_file[f"{prefix}.{renamed}.{param}" if renamed else key] = file_key
        elif top is not None and top.group(1) in _TOP:
            to_file[f"{_TOP[top.group(1)]}.{top.group(2)}"] = file_key
        else:
            to_file[key] = file_key
    return to_file, thirds


def load_transformer_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``Flux2Transformer2DModel`` from one BFL-layout ``.safetensors`` file."""
    from diffusers import Flux2Transformer2DModel

    file, config, to_file, rows = _read(path, flag, overrides)
    model = build(Flux2Transformer2DModel, config, file, to_file, dtype, fp8, rows)
    linear = model.get_submodule("norm_out.linear")
    assert isinstance(linear, torch.nn.Linear)
    with torch.no_grad():  # BFL's (shift, scale) -> diffusers' (scale, shift)
        shift, scale = linear.weight.chunk(2, dim=0)
        linear.weight.copy_(torch.cat([scale, shift]))
    return model


def transformer_file_config(path: Path, flag: str) -> dict[str, Any]:
    """The ``Flux2Transformer2DModel`` config one ``.safetensors`` file's header implies."""
    return _read(path, flag, None)[1]


def _read(
    path: Path, flag: str, overrides: Mapping[str, Any] | None
) -> tuple[Any, dict[str, Any], dict[str, str], dict[str, slice]]:
    """(the open file, its config, diffusers name -> file key, the q/k/v parts' rows)."""
    thirds: dict[str, int] = {}

    def rename(unprefixed: dict[str, str]) -> dict[str, str]:
        to_file, found = diffusers_names(unprefixed)
        thirds.update(found)
        return to_file

    file, config, to_file = read_component(
        path, flag, DIT_PREFIXES, FLUX2_DIT, flux2_transformer_config, rename=rename, overrides=overrides
    )
    rows = {}
    for name, third in thirds.items():
        size = file.shapes[to_file[name]][0] // 3
        rows[name] = slice(third * size, (third + 1) * size)
    return file, config, to_file, rows


def flux2_transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``Flux2Transformer2DModel`` config from its (diffusers-named) shapes; the q/k/v parts read
    as their fused tensor's shape (head dim, widths and depths do not need them)."""
    overrides = dict(overrides or {})
    inner, in_channels = shape(shapes, "x_embedder.weight")
    head_dim = shape(shapes, "transformer_blocks.0.attn.norm_q.weight")[0]
    axes = overrides.pop("axes_dims_rope", None)
    if axes is None:
        if head_dim != 128:
            raise ShapeRuleError(
                f"head dim {head_dim} is not the released 128, so the RoPE axes are unknown; "
                "pass axes_dims_rope"
            )
        axes = FLUX2_AXES_DIMS_ROPE
    mlp_hidden = shape(shapes, "transformer_blocks.0.ff.linear_out.weight")[1]
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": in_channels,
        "num_layers": count(shapes, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": count(shapes, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape(shapes, "context_embedder.weight")[1],
        "timestep_guidance_channels": shape(shapes, "time_guidance_embed.timestep_embedder.linear_1.weight")[
            1
        ],
        "mlp_ratio": mlp_hidden / inner,
        "axes_dims_rope": tuple(axes),
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
    }
    out_channels = shape(shapes, "proj_out.weight")[0]
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config | overrides


# --- the VAE --------------------------------------------------------------------------------------

# BFL name -> diffusers name, outside the blocks (the converter's DIFFUSERS_VAE_TO_FLUX2_MAPPING)
_VAE_TOP = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "encoder.quant_conv": "quant_conv",
    "decoder.post_quant_conv": "post_quant_conv",
}
# the converter's update_vae_attentions_ldm_to_diffusers
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.block\.(\d+)\.(.+)")
_VAE_SAMPLER = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)")
_VAE_UP = re.compile(r"decoder\.up\.(\d+)\.")
_VAE_MID_RESNET = re.compile(r"(encoder|decoder)\.mid\.block_([12])\.(.+)")
_VAE_MID_ATTENTION = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)")
# diffusers' Linear weights that BFL stores as 1x1 convolutions (the converter's conv_attn_to_linear)
_CONV_AS_LINEAR = re.compile(r".+\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")
_OPTIONAL = ("bn.num_batches_tracked",)  # a BatchNorm counter eval never reads


def vae_diffusers_names(unprefixed: Mapping[str, str]) -> dict[str, str]:
    """Diffusers name -> file key for a BFL-layout VAE's unprefixed keys; a key of no FLUX.2 VAE
    layer keeps its name (the loader names it as unexpected)."""
    # gaps in the indices show as missing tensors
    up_blocks = 1 + max((int(m.group(1)) for k in unprefixed if (m := _VAE_UP.match(k))), default=-1)
    return {_vae_name(key, up_blocks): file_key for key, file_key in unprefixed.items()}


def _vae_name(key: str, up_blocks: int) -> str:
    def block(side: str, index: str) -> str:  # the decoder's ldm blocks count from the bottom
        if side == "encoder.down":
            return f"encoder.down_blocks.{index}"
        return f"decoder.up_blocks.{up_blocks - 1 - int(index)}"

    if match := _VAE_RESNET.fullmatch(key):
        side, index, resnet, rest = match.groups()
        return f"{block(side, index)}.resnets.{resnet}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
    if match := _VAE_SAMPLER.fullmatch(key):
        side, index, sampler, param = match.groups()
        return f"{block(side, index)}.{sampler}rs.0.conv.{param}"  # downsamplers / upsamplers
    if match := _VAE_MID_RESNET.fullmatch(key):
        side, resnet, rest = match.groups()
        return f"{side}.mid_block.resnets.{int(resnet) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
    if match := _VAE_MID_ATTENTION.fullmatch(key):
        side, layer, param = match.groups()
        return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION[layer]}.{param}"
    module, _, param = key.rpartition(".")
    return f"{_VAE_TOP[module]}.{param}" if module in _VAE_TOP else key


def load_vae_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An ``AutoencoderKLFlux2`` from one BFL-layout ``.safetensors`` file (FLUX.2's ``ae``)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2
    from safetensors import safe_open

    file, names = open_component(path, flag, VAE_PREFIXES, FLUX2_VAE)
    to_file = vae_diffusers_names({name.removeprefix(file.prefix): name for name in names})
    shapes = {name: vae_shape(name, file.shapes[key]) for name, key in to_file.items()}
    config = file.infer(flux2_vae_config, shapes, None)
    try:
        with init_empty_weights():
            model: torch.nn.Module = AutoencoderKLFlux2(**config)
    except (TypeError, ValueError, AssertionError) as e:
        raise file.error(f"the inferred AutoencoderKLFlux2 config {config} is invalid ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(to_file) - set(_OPTIONAL))
    unexpected = sorted(to_file[name] for name in set(to_file) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensors {abbreviated(missing)}"] if missing else []
        parts += [f"unexpected tensors {abbreviated(unexpected)}"] if unexpected else []
        raise file.error(f"does not match AutoencoderKLFlux2: {'; '.join(parts)}")
    for name, key in to_file.items():
        if shapes[name] != expected[name]:
            raise file.error(
                f"tensor {key!r} has shape {list(file.shapes[key])}, AutoencoderKLFlux2 expects "
                f"{list(expected[name])}"
            )
    floats = [key for name, key in to_file.items() if name not in _OPTIONAL]
    file.check_dtypes(floats)
    scaled = [key for key in floats if key in file.scales]
    if scaled:
        raise file.error(f"stores {abbreviated(scaled, 3)} as scaled fp8: pass a bf16 or float32 VAE file")
    state = {name: torch.zeros((), dtype=torch.long) for name in _OPTIONAL}
    with safe_open(file.file_of(names[0]), framework="pt") as f:
        for name, key in to_file.items():
            tensor = f.get_tensor(key)
            if name in _OPTIONAL:
                state[name] = tensor
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise file.error(f"tensor {key!r} holds NaN or infinity: the file is damaged")
            if dtype is not None or file.is_fp8(key):  # unscaled fp8 is exact in bf16
                tensor = tensor.to(dtype or torch.bfloat16)
            tensor = tensor.reshape(shapes[name])
            # safetensors' 8-byte alignment sends CPU kernels down other paths: own, aligned memory
            state[name] = tensor.clone() if tensor.data_ptr() % 64 else tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def vae_shape(name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape diffusers keeps of a tensor: a 1x1 convolution's weight as a Linear's."""
    if _CONV_AS_LINEAR.fullmatch(name) and len(stored) > 2 and math.prod(stored[2:]) == 1:
        return stored[:2]
    return stored


def flux2_vae_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``AutoencoderKLFlux2`` config from its (diffusers-named) shapes: blocks, widths, latent
    channels, quant convs, mid attention, the patch from the BatchNorm's width; the GroupNorm
    groups are :data:`RELEASED_VAE_GROUPS`."""
    blocks = count(shapes, r"encoder\.down_blocks\.(\d+)\.")
    latent_channels = shape(shapes, "decoder.conv_in.weight")[1]
    cells, rest = divmod(shape(shapes, "bn.running_mean")[0], latent_channels)
    patch = math.isqrt(cells)
    if rest or patch * patch != cells:
        raise ShapeRuleError(
            f"the BatchNorm's {shape(shapes, 'bn.running_mean')[0]} channels are not {latent_channels} "
            "latent channels times a square patch"
        )
    encoder = [shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(blocks)]
    # diffusers' up_blocks count from the bottom: the decoder's width i is up_blocks.{blocks - 1 - i}'s
    decoder = [
        shape(shapes, f"decoder.up_blocks.{blocks - 1 - i}.resnets.0.conv1.weight")[0] for i in range(blocks)
    ]
    config: dict[str, Any] = {
        "in_channels": shape(shapes, "encoder.conv_in.weight")[1],
        "out_channels": shape(shapes, "decoder.conv_out.weight")[0],
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
        "block_out_channels": tuple(encoder),
        "layers_per_block": count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": latent_channels,
        "norm_num_groups": RELEASED_VAE_GROUPS,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        "patch_size": (patch, patch),
    }
    if decoder != encoder:
        config["decoder_block_out_channels"] = tuple(decoder)
    return config | dict(overrides or {})
