"""Qwen-Image checkpoints in one ``.safetensors`` file: the transformer
(``QwenImageTransformer2DModel``, ComfyUI uses the diffusers names) and the VAE
(``AutoencoderKLQwenImage``, whose parameters have the WAN 2.1 VAE's layout, so its keys and
shapes are read through ``wan_checkpoint``; diffusers itself cannot load it from one file).

What the shapes cannot tell: the head dim is the size of the per-head q norm; the RoPE axes are
(16, 56, 56) for the released 128-dim heads and the patch size is 2. The VAE's latent statistics
are the diffusers class defaults. ``overrides`` replaces any inferred config value.

The Qwen2.5-VL text encoder file (ComfyUI's ``qwen_2.5_vl_7b.safetensors``, bf16 or fp8) holds the
language model under ``model.`` (transformers' older names; ``model.language_model.`` in the newer
ones) beside the vision tower (``visual.``) and ``lm_head``; masktrain reads the language model
only (``Qwen2_5_VLTextModel``: Qwen-Image's prompt features are its last hidden state). Every
released Qwen2.5 model has 128-dim heads, so the head counts follow from the q and k widths; the
multimodal RoPE sections are the released (16, 24, 24).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import ShapeRuleError
from masktrain.models.single_file import Fp8Load, build, load_component, read_component
from masktrain.models.wan_checkpoint import WAN_VAE, read_vae_file
from masktrain.models.weights_file import (
    DIT_PREFIXES,
    CheckpointFile,
    CheckpointKind,
    Shapes,
    count,
    open_component,
    register_kinds,
    shape,
)

#: Qwen-Image's RoPE axes for its 128-dim heads.
QWEN_AXES_DIMS_ROPE = (16, 56, 56)
# Qwen-Image-Edit-2511's marker for "timestep zero for the reference image" (diffusers zero_cond_t).
QWEN_ZERO_COND_MARKER = "__index_timestep_zero__"

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
#: The text model's key prefixes in ComfyUI's / transformers' files, newest first.
QWEN_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
QWEN_TEXT_HEAD_DIM = 128
QWEN_MROPE_SECTION = (16, 24, 24)
register_kinds(QWEN_DIT)
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

    return load_component(
        QwenImageTransformer2DModel,
        path,
        flag,
        DIT_PREFIXES,
        QWEN_DIT,
        qwen_transformer_config,
        markers={QWEN_ZERO_COND_MARKER: "zero_cond_t"},
        overrides=overrides,
        dtype=dtype,
        fp8=fp8,
    )


def transformer_file_config(path: Path, flag: str) -> dict[str, Any]:
    """The ``QwenImageTransformer2DModel`` config one ``.safetensors`` file's header implies."""
    _, config, _ = read_component(
        path,
        flag,
        DIT_PREFIXES,
        QWEN_DIT,
        qwen_transformer_config,
        markers={QWEN_ZERO_COND_MARKER: "zero_cond_t"},
    )
    return config


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
        # Qwen-Image-Layered's layer RoPE has no weights; the "is RGB" embedding above is its only
        # mark, and it comes with the layer RoPE (musubi builds both from is_layered)
        "use_layer3d_rope": "time_text_embed.addition_t_embedding.weight" in shapes,
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


def load_text_encoder_file(
    path: Path, flag: str, dtype: torch.dtype | None = None, *, overrides: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """A ``Qwen2_5_VLTextModel`` (the language model of Qwen2.5-VL) from one ``.safetensors`` file;
    the vision tower and ``lm_head`` in the file are not read."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    # build() makes models from keyword arguments; transformers leaves __init_subclass__ unannotated
    class TextModelFromShapes(Qwen2_5_VLTextModel):  # type: ignore[no-untyped-call]
        def __init__(self, **config: Any) -> None:
            super().__init__(Qwen2_5_VLTextConfig(**config))

    file, _ = open_component(path, flag, (), QWEN_TEXT)
    prefix = next((p for p in QWEN_TEXT_PREFIXES if f"{p}embed_tokens.weight" in file.shapes), None)
    if prefix is None:
        raise file.error("is not a complete Qwen2.5-VL text encoder: no embed_tokens.weight")
    to_file = {
        key.removeprefix(prefix): key
        for key in file.shapes
        if key.startswith(prefix)
        and key.removeprefix(prefix).startswith(("embed_tokens.", "layers.", "norm."))
    }
    config = file.infer(qwen_text_config, file.renamed_shapes(to_file), overrides)
    return build(TextModelFromShapes, config, file, to_file, dtype)


def qwen_text_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``Qwen2_5_VLTextConfig`` from the text model's shapes (128-dim heads, see the module doc)."""
    overrides = dict(overrides or {})
    vocab, hidden = shape(shapes, "embed_tokens.weight")
    head_dim = int(overrides.pop("head_dim", QWEN_TEXT_HEAD_DIM))
    q_width = shape(shapes, "layers.0.self_attn.q_proj.weight")[0]
    kv_width = shape(shapes, "layers.0.self_attn.k_proj.weight")[0]
    if q_width % head_dim or kv_width % head_dim:
        raise ShapeRuleError(f"q / k widths {q_width} / {kv_width} are not multiples of {head_dim}-dim heads")
    section = list(overrides.pop("mrope_section", QWEN_MROPE_SECTION))
    config: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shape(shapes, "layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": count(shapes, r"layers\.(\d+)\."),
        "num_attention_heads": q_width // head_dim,
        "num_key_value_heads": kv_width // head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": section},
    }
    return config | overrides
