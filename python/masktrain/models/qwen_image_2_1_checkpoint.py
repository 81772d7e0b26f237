"""Qwen-Image 2.1 transformers in one ``.safetensors`` file (ComfyUI / the original layout):
diffusers' names under ``model.diffusion_model.``, except each block's SwiGLU input, which ComfyUI
fuses into one ``img_mlp.gate_up`` Linear, gate rows first (diffusers 0.42.1
``convert_qwen_image21_transformer_checkpoint_to_diffusers``); masktrain reads its two halves as
``gate_layer`` and ``proj`` straight from the file (``single_file.build``'s `rows`).

What the shapes cannot tell: the patch size is 1 (the transformer takes the VAE's latents
unpatched); the RoPE axes are the released (16, 56, 56) for 128-dim heads; ``eps`` and
``causal_condition`` are the class defaults. ``overrides`` replaces any inferred value. The VAE
and the Qwen3-VL text encoder are not read from single files (diffusers has no converter for
the VAE either).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import ShapeRuleError
from masktrain.models.single_file import Fp8Load, build, read_component
from masktrain.models.weights_file import DIT_PREFIXES, CheckpointKind, Shapes, count, register_kinds, shape

#: The released RoPE axes of the 128-dim heads (QwenImage21Transformer2DModel's default).
AXES_DIMS_ROPE = (16, 56, 56)
FUSED = "img_mlp.gate_up.weight"
QWEN21_DIT = CheckpointKind(
    "a Qwen-Image 2.1 transformer",
    "dit",
    lambda n: "txt_in.text_norm.weight" in n and "modulation.1.weight" in n,
)
register_kinds(QWEN21_DIT)


def load_transformer_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``QwenImage21Transformer2DModel`` from one ``.safetensors`` file."""
    from diffusers import QwenImage21Transformer2DModel

    file, config, to_file = read_component(
        path, flag, DIT_PREFIXES, QWEN21_DIT, transformer_config, rename=_split_gate_up, overrides=overrides
    )
    return build(
        QwenImage21Transformer2DModel, config, file, to_file, dtype, fp8, rows=_rows(file.shapes, to_file)
    )


def transformer_file_config(path: Path, flag: str) -> dict[str, Any]:
    """The ``QwenImage21Transformer2DModel`` config one ``.safetensors`` file's header implies."""
    _, config, _ = read_component(
        path, flag, DIT_PREFIXES, QWEN21_DIT, transformer_config, rename=_split_gate_up
    )
    return config


def transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``QwenImage21Transformer2DModel`` config from its (diffusers-named) shapes."""
    overrides = dict(overrides or {})
    inner, in_channels = shape(shapes, "img_in.weight")
    head_dim = shape(shapes, "transformer_blocks.0.attn.norm_q.weight")[0]
    mlp_hidden = shape(shapes, "transformer_blocks.0.img_mlp.out.weight")[1]
    axes = overrides.pop("axes_dims_rope", None)
    if axes is None:
        if head_dim != 128:
            raise ShapeRuleError(
                f"head dim {head_dim} is not the released 128, so the RoPE axes are unknown; "
                "pass axes_dims_rope"
            )
        axes = AXES_DIMS_ROPE
    if mlp_hidden % inner:
        raise ShapeRuleError(f"the SwiGLU width {mlp_hidden} is not a multiple of the model width {inner}")
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shape(shapes, "proj_out.weight")[0],
        "num_layers": count(shapes, r"transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "context_in_dim": shape(shapes, "txt_in.in_layer.weight")[1],
        "mlp_ratio": mlp_hidden // inner,
        "axes_dims_rope": tuple(axes),
    }
    return config | overrides


def _split_gate_up(keys: dict[str, str]) -> dict[str, str]:
    """{unprefixed file key: file key} -> {diffusers name: file key}: a fused ``gate_up`` names
    both ``gate_layer`` and ``proj`` (:func:`_rows` says which half each is)."""
    renamed: dict[str, str] = {}
    for name, key in keys.items():
        if name.endswith(FUSED):
            block = name.removesuffix(FUSED)
            renamed[f"{block}img_mlp.gate_layer.weight"] = key
            renamed[f"{block}img_mlp.proj.weight"] = key
        else:
            renamed[name] = key
    return renamed


def _rows(shapes: Shapes, to_file: dict[str, str]) -> dict[str, slice]:
    """Each ``gate_layer`` is the first half of its fused tensor's rows, each ``proj`` the second."""
    rows: dict[str, slice] = {}
    for name, key in to_file.items():
        half = shapes[key][0] // 2
        if name.endswith("img_mlp.gate_layer.weight"):
            rows[name] = slice(0, half)
        elif name.endswith("img_mlp.proj.weight"):
            rows[name] = slice(half, 2 * half)
    return rows
