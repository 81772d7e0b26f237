"""Qwen-Image checkpoints in one ``.safetensors`` file: the transformer
(``QwenImageTransformer2DModel``, ComfyUI uses the diffusers names) and the VAE
(``AutoencoderKLQwenImage``, whose parameters have the WAN 2.1 VAE's layout, so its keys and
shapes are read through ``wan_checkpoint``; diffusers itself cannot load it from one file).

What the shapes cannot tell: the head dim is the size of the per-head q norm; the RoPE axes are
(16, 56, 56) for the released 128-dim heads and the patch size is 2. The VAE's latent statistics
are the diffusers class defaults. ``overrides`` replaces any inferred config value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.models.single_file import (
    DIT_PREFIXES,
    CheckpointFile,
    CheckpointKind,
    Fp8Load,
    ShapeRuleError,
    Shapes,
    build,
    count,
    open_component,
    register_kinds,
    shape,
)
from masktrain.models.wan_checkpoint import WAN_VAE, read_vae_file

#: Qwen-Image's RoPE axes for its 128-dim heads.
QWEN_AXES_DIMS_ROPE = (16, 56, 56)
# Qwen-Image-Edit-2511's marker for "timestep zero for the reference image" (diffusers zero_cond_t).
QWEN_ZERO_COND_MARKER = "__index_timestep_zero__"

QWEN21_DIT = CheckpointKind(
    "a Qwen-Image 2.1 transformer (not supported)", None, lambda n: "txt_in.text_norm.weight" in n
)
QWEN_DIT = CheckpointKind(
    "a Qwen-Image transformer",
    "dit",
    lambda n: "img_in.weight" in n and "transformer_blocks.0.img_mod.1.weight" in n,
)
QWEN_TEXT = CheckpointKind(
    "a Qwen2.5-VL text encoder",
    "text",
    lambda n: any(k.startswith(("model.layers.", "layers.", "visual.", "model.language_model.")) for k in n),
)
register_kinds(QWEN21_DIT, QWEN_DIT)
register_kinds(QWEN_TEXT, fallback=True)


def load_transformer_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``QwenImageTransformer2DModel`` from one ``.safetensors`` file."""
    from diffusers import QwenImageTransformer2DModel

    file, names = open_component(path, flag, DIT_PREFIXES, QWEN_DIT)
    to_file = {name.removeprefix(file.prefix): name for name in names}
    marker = to_file.pop(QWEN_ZERO_COND_MARKER, None)
    config = file.infer(qwen_transformer_config, file.renamed_shapes(to_file), overrides)
    config.setdefault("zero_cond_t", marker is not None)
    return build(QwenImageTransformer2DModel, config, file, to_file, dtype, fp8)


def load_vae_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """An ``AutoencoderKLQwenImage`` from one ``.safetensors`` file (WAN 2.1 VAE layout)."""
    from diffusers import AutoencoderKLQwenImage

    file, wan_config, to_file = read_vae_file(path, flag, overrides, WAN_VAE)
    return build(AutoencoderKLQwenImage, _qwen_vae_config(file, wan_config), file, to_file, dtype)


def qwen_transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``QwenImageTransformer2DModel`` config from its (diffusers-named) shapes."""
    overrides = dict(overrides or {})
    inner, in_channels = shape(shapes, "img_in.weight")
    head_dim = shape(shapes, "transformer_blocks.0.attn.norm_q.weight")[0]
    patch_size = int(overrides.pop("patch_size", 2))
    axes = overrides.pop("axes_dims_rope", None)
    if axes is None:
        if head_dim != 128:
            raise ShapeRuleError(
                f"head dim {head_dim} is not the released 128, so the RoPE axes are unknown; "
                "pass axes_dims_rope"
            )
        axes = QWEN_AXES_DIMS_ROPE
    config: dict[str, Any] = {
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": shape(shapes, "proj_out.weight")[0] // patch_size**2,
        "num_layers": count(shapes, r"transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape(shapes, "txt_in.weight")[1],
        "guidance_embeds": False,
        "axes_dims_rope": tuple(axes),
        "use_additional_t_cond": "time_text_embed.addition_t_embedding.weight" in shapes,
    }
    return config | overrides


def _qwen_vae_config(file: CheckpointFile, wan: dict[str, Any]) -> dict[str, Any]:
    """The ``AutoencoderKLQwenImage`` spelling of a WAN-2.1-layout config."""
    if wan["is_residual"] or wan["in_channels"] != wan["out_channels"] or wan.get("decoder_base_dim"):
        raise file.error("holds a WAN 2.2 style VAE; expected a Qwen-Image VAE")
    keep = (
        "base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "temperal_downsample",
        "latents_mean",
        "latents_std",
    )
    return {k: wan[k] for k in keep if k in wan} | {"input_channels": wan["in_channels"]}
