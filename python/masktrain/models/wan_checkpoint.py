"""WAN checkpoints in one ``.safetensors`` file (ComfyUI / original layout, or diffusers names):
what they are, their key names in diffusers, and the diffusers config their shapes imply, for the
transformer (``WanTransformer3DModel``) and the WAN 2.1 / 2.2 VAE (``AutoencoderKLWan``; the
Qwen-Image VAE has the same layout and reads its keys and shapes through here too).

What the shapes cannot tell, and what we assume (true of every released model; ``overrides``
replaces any inferred config value, which is how tests load their tiny models):

- WAN transformers normalise q/k across heads and carry no per-head tensor, so the head count
  comes from ``inner dim / 128`` (Wan2.1-1.3B: 12 x 128, ffn 8960, 30 layers; Wan2.1/2.2-14B:
  40 x 128, ffn 13824, 40 layers; TI2V-5B: 24 x 128, ffn 14336, 30 layers; text_dim 4096,
  freq_dim 256, ``rope_max_seq_len`` 1024, eps 1e-6).
- VAE latent statistics are not weights: the WAN 2.1 VAE (16 channels) uses the diffusers class
  defaults, the WAN 2.2 TI2V-5B VAE (48 channels) the values of diffusers'
  ``scripts/convert_wan_to_diffusers.py`` (``vae22_diffusers_config``).

The transformer's names go through diffusers' own converter; the VAE's through our own mapping,
since diffusers' VAE converter assumes the released depth (a test checks the two agree on the
released layout).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import ShapeRuleError
from masktrain.models.loading import float_list
from masktrain.models.single_file import Fp8Load, build, load_component, read_component
from masktrain.models.weights_file import (
    DIT_PREFIXES,
    VAE_PREFIXES,
    CheckpointFile,
    CheckpointKind,
    Shapes,
    count,
    open_component,
    register_kinds,
    shape,
)

#: Head dim of every released WAN transformer (not recoverable from the weights).
WAN_HEAD_DIM = 128
# diffusers scripts/convert_wan_to_diffusers.py, vae22_diffusers_config (= Wan2_2_VAE in the
# Wan2.2 repository).
WAN22_VAE_LATENTS_MEAN = float_list(
    """
    -0.2289 -0.0052 -0.1323 -0.2339 -0.2799 0.0174 0.1838 0.1557
    -0.1382 0.0542 0.2813 0.0891 0.1570 -0.0098 0.0375 -0.1825
    -0.2246 -0.1207 -0.0698 0.5109 0.2665 -0.2108 -0.2158 0.2502
    -0.2055 -0.0322 0.1109 0.1567 -0.0729 0.0899 -0.2799 -0.1230
    -0.0313 -0.1649 0.0117 0.0723 -0.2839 -0.2083 -0.0520 0.3748
    0.0152 0.1957 0.1433 -0.2944 0.3573 -0.0548 -0.1681 -0.0667
    """
)
WAN22_VAE_LATENTS_STD = float_list(
    """
    0.4765 1.0364 0.4514 1.1677 0.5313 0.4990 0.4818 0.5013
    0.8158 1.0344 0.5894 1.0901 0.6885 0.6165 0.8454 0.4978
    0.5759 0.3523 0.7135 0.6804 0.5833 1.4146 0.8986 0.5659
    0.7069 0.5338 0.4889 0.4917 0.4069 0.4999 0.6866 0.4093
    0.5709 0.6065 0.6415 0.4944 0.5726 1.2042 0.5458 1.6887
    0.3971 1.0600 0.3943 0.5537 0.5444 0.4089 0.7468 0.7744
    """
)


def _is_vae(names: set[str]) -> bool:
    return bool(names & {"decoder.middle.0.residual.0.gamma", "decoder.mid_block.resnets.0.norm1.gamma"})


def _is_nested_vae(names: set[str]) -> bool:
    nested = ("encoder.downsamples.0.downsamples.", "encoder.down_blocks.0.resnets.")
    return any(n.startswith(nested) for n in names)


WAN_VACE = CheckpointKind(
    "a WAN VACE transformer (not supported)", None, lambda n: any(k.startswith("vace_blocks.") for k in n)
)
WAN_ANIMATE = CheckpointKind(
    "a WAN Animate transformer (not supported)",
    None,
    lambda n: any(k.startswith(("motion_encoder.", "face_adapter.")) for k in n),
)
WAN_DIT = CheckpointKind(
    "a WAN transformer",
    "dit",
    lambda n: "patch_embedding.weight" in n and any(k.startswith("blocks.") for k in n),
)
WAN22_VAE = CheckpointKind("a WAN 2.2 TI2V-5B VAE", "vae", lambda n: _is_vae(n) and _is_nested_vae(n))
WAN_VAE = CheckpointKind("a WAN 2.1 / Qwen-Image VAE", "vae", lambda n: _is_vae(n) and not _is_nested_vae(n))
T5 = CheckpointKind(
    "a T5 / UMT5 text encoder",
    "text",
    lambda n: any("SelfAttention" in k or k.startswith(("encoder.block.", "shared.")) for k in n),
)
register_kinds(WAN_VACE, WAN_ANIMATE, WAN_DIT, WAN22_VAE, WAN_VAE)
register_kinds(T5, fallback=True)


def load_transformer_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` from one ``.safetensors`` file, original/ComfyUI or diffusers names."""
    from diffusers import WanTransformer3DModel

    return load_component(
        WanTransformer3DModel,
        path,
        flag,
        DIT_PREFIXES,
        WAN_DIT,
        wan_transformer_config,
        rename=wan_transformer_names,
        overrides=overrides,
        dtype=dtype,
        fp8=fp8,
    )


def transformer_file_config(path: Path, flag: str) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config one ``.safetensors`` file's header implies (no tensor
    is read)."""
    _, config, _ = read_component(
        path, flag, DIT_PREFIXES, WAN_DIT, wan_transformer_config, rename=wan_transformer_names
    )
    return config


def load_t5_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A ``UMT5EncoderModel`` from one ``.safetensors`` file in transformers' names (ComfyUI's
    ``umt5_xxl_fp16.safetensors`` / ``..._fp8_e4m3fn_scaled``), its config read off the shapes;
    the embedding is stored once (``shared`` or ``encoder.embed_tokens``) and tied, as in
    transformers."""
    from transformers import UMT5Config, UMT5EncoderModel

    # build() makes models from keyword arguments; transformers leaves __init_subclass__ unannotated
    class UMT5FromShapes(UMT5EncoderModel):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(UMT5Config(**config))

    file, names = open_component(path, flag, (), T5)
    embed = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in file.shapes), None)
    if embed is None:
        raise file.error("is not a complete T5 encoder: no shared.weight nor encoder.embed_tokens.weight")
    to_file = {name: name for name in names if name not in ("shared.weight", "encoder.embed_tokens.weight")}
    to_file["shared.weight"] = to_file["encoder.embed_tokens.weight"] = embed
    config = file.infer(t5_config, {**file.shapes, "shared.weight": file.shapes[embed]}, None)
    return build(UMT5FromShapes, config, file, to_file, dtype)


def t5_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``UMT5Config`` from transformers-named shapes: vocabulary and width from the embedding,
    heads and buckets from a per-layer relative attention bias (UMT5 has one per layer)."""
    vocab, d_model = shape(shapes, "shared.weight")
    inner = shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    config: dict[str, Any] = {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "num_heads": heads,
        "d_ff": shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        "num_layers": count(shapes, r"encoder\.block\.(\d+)\."),
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
    }
    return config | dict(overrides or {})


def read_vae_file(
    path: Path, flag: str, overrides: Mapping[str, Any] | None, *wanted: CheckpointKind
) -> tuple[CheckpointFile, dict[str, Any], dict[str, str]]:
    """(the open file, its ``AutoencoderKLWan`` config, diffusers name -> file key) of a VAE file
    of one of the `wanted` kinds; shared with the Qwen-Image VAE, which has this layout."""
    file, names = open_component(path, flag, VAE_PREFIXES, *wanted)
    try:
        to_file = wan_vae_names([name.removeprefix(file.prefix) for name in names])
    except ValueError as e:
        raise file.error(str(e)) from None
    to_file = {new: file.prefix + old for new, old in to_file.items()}
    return file, file.infer(wan_vae_config, file.renamed_shapes(to_file), overrides), to_file


def load_vae_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """An ``AutoencoderKLWan`` (WAN 2.1 or 2.2 TI2V-5B) from one ``.safetensors`` file."""
    from diffusers import AutoencoderKLWan

    file, config, to_file = read_vae_file(path, flag, overrides, WAN_VAE, WAN22_VAE)
    return build(AutoencoderKLWan, config, file, to_file, dtype)


# --- configs from shapes (diffusers names) ------------------------------------------------------


def wan_transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``WanTransformer3DModel`` config from diffusers-named shapes (see the module docstring)."""
    overrides = dict(overrides or {})
    inner, in_channels, *patch = shape(shapes, "patch_embedding.weight")
    patch_size = tuple(patch)
    head_dim = int(overrides.pop("attention_head_dim", WAN_HEAD_DIM))
    if inner % head_dim:
        raise ShapeRuleError(
            f"inner dim {inner} is not a multiple of the head dim {head_dim} of released WAN models; "
            "pass the attention_head_dim"
        )
    image = "condition_embedder.image_embedder."
    config: dict[str, Any] = {
        "patch_size": patch_size,
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shape(shapes, "proj_out.weight")[0] // math.prod(patch_size),
        "text_dim": shape(shapes, "condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": shape(shapes, "condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": shape(shapes, "blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": count(shapes, r"blocks\.(\d+)\."),
        "cross_attn_norm": "blocks.0.norm2.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in shapes else None,
        # I2V / FLF2V (Wan 2.1): a CLIP image embedder and extra k/v projections.
        "image_dim": shapes[image + "norm1.weight"][0] if image + "norm1.weight" in shapes else None,
        "added_kv_proj_dim": (
            shapes["blocks.0.attn2.add_k_proj.weight"][1]
            if "blocks.0.attn2.add_k_proj.weight" in shapes
            else None
        ),
        "pos_embed_seq_len": shapes[image + "pos_embed"][1] if image + "pos_embed" in shapes else None,
    }
    return config | overrides


def wan_vae_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``AutoencoderKLWan`` config from diffusers-named shapes: WAN 2.1 layout (flat encoder
    ``down_blocks``) or WAN 2.2 TI2V-5B (``is_residual``: ``down_blocks.i.resnets.j``)."""
    overrides = dict(overrides or {})
    names = set(shapes)
    if any(re.match(r"encoder\.down_blocks\.[\d.]+(norm|to_qkv|proj)\.", n) for n in names):
        raise ShapeRuleError("attention blocks inside the encoder (attn_scales) are not supported")
    base_dim, in_channels = shape(shapes, "encoder.conv_in.weight")[:2]
    residual = any(n.startswith("encoder.down_blocks.0.resnets.") for n in names)
    if residual:
        levels = count(shapes, r"encoder\.down_blocks\.(\d+)\.")
        num_res_blocks = count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        outs = [shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
        temporal = [
            f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in names for i in range(levels - 1)
        ]
    else:
        resamples = sorted(
            int(m.group(1))
            for n in names
            if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resample\.1\.weight", n))
        )
        num_res_blocks = resamples[0] if resamples else count(shapes, r"encoder\.down_blocks\.(\d+)\.")
        levels = len(resamples) + 1
        step = num_res_blocks + 1
        outs = [shape(shapes, f"encoder.down_blocks.{i * step}.conv2.weight")[0] for i in range(levels)]
        resample = [i * step + num_res_blocks for i in range(levels - 1)]
        temporal = [f"encoder.down_blocks.{k}.time_conv.weight" in names for k in resample]
    if any(out % base_dim for out in outs):
        raise ShapeRuleError(f"encoder widths {outs} are not multiples of the base width {base_dim}")
    dim_mult = [out // base_dim for out in outs]
    z_dim = shape(shapes, "post_quant_conv.weight")[0]
    patch = math.isqrt(in_channels // 3)
    config: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
        "in_channels": in_channels,
        "out_channels": shape(shapes, "decoder.conv_out.weight")[0],
        "is_residual": residual,
        "patch_size": patch if patch > 1 else None,
        "scale_factor_spatial": 2 ** (levels - 1) * patch,
        "scale_factor_temporal": 2 ** sum(temporal),
    }
    decoder_dim = shape(shapes, "decoder.conv_in.weight")[0] // dim_mult[-1]
    if decoder_dim != base_dim:
        config["decoder_base_dim"] = decoder_dim
    if "latents_mean" not in overrides or "latents_std" not in overrides:
        if z_dim == 48 and residual:
            config |= {"latents_mean": WAN22_VAE_LATENTS_MEAN, "latents_std": WAN22_VAE_LATENTS_STD}
        elif z_dim != 16:
            # 16 channels: the class defaults (WAN 2.1 VAE, Qwen-Image VAE).
            raise ShapeRuleError(
                f"no known latent statistics for a {z_dim}-channel VAE; pass latents_mean and latents_std"
            )
    return config | overrides


# --- key names --------------------------------------------------------------------------------------


def wan_transformer_names(names: dict[str, str]) -> dict[str, str]:
    """diffusers name -> file key, from {unprefixed name: file key}, through diffusers' own
    converter (run on the names only: it renames keys and carries the values along)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if "condition_embedder.time_embedder.linear_1.weight" in names:
        return dict(names)  # already diffusers names
    converted = convert_wan_transformer_to_diffusers(dict(names))
    # FLF2V's image position embedding, which only diffusers' conversion script maps.
    emb_pos = "img_emb.emb_pos"
    return {
        new.replace(emb_pos, "condition_embedder.image_embedder.pos_embed"): old
        for new, old in converted.items()
    }


_VAE_FIXED = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
}
_RESNET_PARTS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _resnet(rest: str) -> str:
    for old, new in _RESNET_PARTS:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _is_resample(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def wan_vae_names(keys: list[str]) -> dict[str, str]:
    """diffusers name -> original key for a WAN 2.1, WAN 2.2 or Qwen-Image VAE.

    diffusers' ``convert_wan_vae_to_diffusers`` hard-codes the released WAN 2.1 VAE (three decoder
    resnets per level, one decoder shortcut) and does not cover the WAN 2.2 VAE; this is the same
    mapping written for any depth (the test checks it equals diffusers' on the released layout).
    Keys already in diffusers names pass through unchanged."""
    # WAN 2.1 layout: the decoder's flat ``upsamples`` hold (num_res_blocks + 1) resnets then a
    # resample per level; the first resample's index gives the group size.
    first = [
        int(m.group(1))
        for k in keys
        if (m := re.match(r"decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", k))
    ]
    group = min(first) + 1 if first else len(keys)
    out: dict[str, str] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _VAE_FIXED:
            new = f"{_VAE_FIXED[module]}.{param}"
        elif m := re.match(r"(encoder|decoder)\.middle\.([012])\.(.+)", key):
            new = f"{m.group(1)}.{_MIDDLE[m.group(2)]}{_resnet(m.group(3))}"
        elif m := re.match(
            r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)", key
        ):
            # WAN 2.2: nested per-level blocks; the level's resample becomes its down/upsampler.
            side, level, rest = m.group(1), m.group(2), m.group(4)
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if _is_resample(rest):
                new = f"{side}.{blocks}.{level}.{'downsampler' if side == 'encoder' else 'upsampler'}.{rest}"
            else:
                new = f"{side}.{blocks}.{level}.resnets.{m.group(3)}.{_resnet(rest)}"
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.+)", key):
            new = f"encoder.down_blocks.{m.group(1)}.{_resnet(m.group(2))}"
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.+)", key):
            level, index = divmod(int(m.group(1)), group)
            rest = m.group(2)
            if _is_resample(rest):
                new = f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{level}.resnets.{index}.{_resnet(rest)}"
        else:
            new = key
        out[new] = key
    if len(out) != len(keys):
        raise ValueError("two VAE keys map to one diffusers name; the file mixes layouts")
    return out
