"""Z-Image transformers in one ``.safetensors`` file, offline: the original / ComfyUI layout
(``z_image_turbo_bf16.safetensors``, optionally under ``model.diffusion_model.``) or diffusers'
names. The original layout fuses each block's q, k and v into ``attention.qkv`` and names a few
modules differently (``x_embedder``, ``final_layer``, ``attention.out``, ``q_norm`` / ``k_norm``;
diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``, 0.42.1); it also holds an unused
``norm_final.weight``. Every key and shape is checked against the model before a tensor is read.

A diffusers-named file goes through ``single_file.build`` (fp8 while reading); an original one is
read tensor by tensor into the diffusers names, the fused qkv split in three (its rows are q, k, v),
and quantised to fp8 after loading when asked (so host memory holds the bf16 model first); an
original file stored in fp8 is refused for now (its scales are not split with the qkv yet).

What the shapes cannot tell: the RoPE axes (``axes_dims``, ``axes_lens``) and ``rope_theta`` are
the released model's for 128-dim heads; ``overrides`` replaces any inferred value (a model with
other heads must give its axes).

The VAE file is FLUX.1's ``ae.safetensors`` (the ldm layout: ``encoder.down.0.block.0.conv1``,
attention as 1x1 convolutions), which diffusers' ``convert_ldm_vae_checkpoint`` renames; its
config follows from the shapes (blocks, widths, latent channels, whether it has quant convs) and
the latent normalisation is the released one (0.3611, 0.1159: families.md §2.1), which diffusers'
own single-file path would not set. The renaming is run on the header's shapes first, so every key
and shape is checked before a tensor is read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import ShapeRuleError
from masktrain.models.fp8 import quantize_model
from masktrain.models.single_file import Fp8Load, build
from masktrain.models.weights_file import (
    DIT_PREFIXES,
    VAE_PREFIXES,
    CheckpointFile,
    CheckpointKind,
    Shapes,
    abbreviated,
    count,
    open_component,
    register_kinds,
    shape,
)

#: The released RoPE for 128-dim heads (diffusers' ZImageTransformer2DModel defaults).
RELEASED_ROPE: dict[str, Any] = {
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
    "rope_theta": 256.0,
}
#: Patch sizes of every released model: one embedder / final layer, ``2-1``.
PATCH = "2-1"

Z_IMAGE_DIT = CheckpointKind(
    "a Z-Image transformer",
    "dit",
    lambda n: "layers.0.adaLN_modulation.0.weight" in n and "cap_embedder.1.weight" in n,
)
Z_IMAGE_VAE = CheckpointKind(
    "a FLUX.1-style (ldm) VAE",
    "vae",
    # FLUX.2's VAE has the same ldm names plus its BatchNorm statistics
    lambda n: (
        "encoder.down.0.block.0.conv1.weight" in n
        and "decoder.up.0.block.0.conv1.weight" in n
        and "bn.running_mean" not in n
    ),
)
register_kinds(Z_IMAGE_DIT, Z_IMAGE_VAE)
#: The released VAE's latent normalisation (FLUX.1's; musubi's zimage_config, ComfyUI's Flux format).
RELEASED_LATENTS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}

#: Original-layout name parts -> diffusers' (diffusers' Z_IMAGE_KEYS_RENAME_DICT).
_RENAMES = (
    ("final_layer.", f"all_final_layer.{PATCH}."),
    ("x_embedder.", f"all_x_embedder.{PATCH}."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)
_FUSED = ".attention.qkv.weight"
_UNUSED = ("norm_final.weight",)


def load_transformer_file(
    path: Path,
    flag: str,
    dtype: torch.dtype | None = None,
    fp8: Fp8Load | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``ZImageTransformer2DModel`` from one ``.safetensors`` file of either layout."""
    from diffusers import ZImageTransformer2DModel

    file, names = open_component(path, flag, DIT_PREFIXES, Z_IMAGE_DIT)
    sources = diffusers_sources(file, names)
    config = file.infer(z_image_config, _shapes(file, sources), overrides)
    if not any(isinstance(source, tuple) for source in sources.values()):
        return build(
            ZImageTransformer2DModel, config, file, {k: str(v) for k, v in sources.items()}, dtype, fp8
        )
    model = _read_original(ZImageTransformer2DModel, config, file, sources, dtype)
    if fp8 is not None:
        quantize_model(model, fp8.targets, fp8.mode)
    return model.eval()


def transformer_file_config(path: Path, flag: str) -> dict[str, Any]:
    """The ``ZImageTransformer2DModel`` config one file's header implies."""
    file, names = open_component(path, flag, DIT_PREFIXES, Z_IMAGE_DIT)
    return file.infer(z_image_config, _shapes(file, diffusers_sources(file, names)), None)


def load_vae_file(path: Path, flag: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An ``AutoencoderKL`` from one ldm-layout ``.safetensors`` file (FLUX.1's ``ae``)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    file, names = open_component(path, flag, VAE_PREFIXES, Z_IMAGE_VAE)
    config = file.infer(vae_config, {n.removeprefix(file.prefix): file.shapes[n] for n in names}, None)
    with init_empty_weights():
        model: torch.nn.Module = AutoencoderKL(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    meta = {n: torch.empty(file.shapes[n], device="meta") for n in names}
    planned = {k: tuple(v.shape) for k, v in convert_ldm_vae_checkpoint(meta, config).items()}
    missing, unexpected = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensors {abbreviated(missing)}"] if missing else []
        parts += [f"unexpected tensors {abbreviated(unexpected)}"] if unexpected else []
        raise file.error(f"does not match AutoencoderKL: {'; '.join(parts)}")
    wrong = next((k for k in expected if planned[k] != expected[k]), None)
    if wrong is not None:
        raise file.error(
            f"tensor for {wrong!r} has shape {list(planned[wrong])}, expected {list(expected[wrong])}"
        )
    file.check_dtypes(names)
    with safe_open(file.file_of(names[0]), framework="pt") as f:
        read = {n: f.get_tensor(n) for n in names}
    state = {
        k: v if dtype is None else v.to(dtype) for k, v in convert_ldm_vae_checkpoint(read, config).items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def vae_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``AutoencoderKL`` config from the ldm-layout shapes (the scale and shift: the released ones)."""
    blocks = count(shapes, r"encoder\.down\.(\d+)\.")
    config: dict[str, Any] = {
        "in_channels": shape(shapes, "encoder.conv_in.weight")[1],
        "out_channels": shape(shapes, "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [
            shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(blocks)
        ],
        "layers_per_block": count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": shape(shapes, "decoder.conv_in.weight")[1],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        **RELEASED_LATENTS,
    }
    return config | dict(overrides or {})


Source = str | tuple[str, int]
"""Where a diffusers tensor comes from: a file key, or (fused qkv key, which third)."""


def diffusers_sources(file: CheckpointFile, names: list[str]) -> dict[str, Source]:
    """Diffusers name -> its source in the file, for a file in either layout."""
    sources: dict[str, Source] = {}
    for key in names:
        name = key.removeprefix(file.prefix)
        if name in _UNUSED:
            continue
        if name.endswith(_FUSED):
            block = name.removesuffix(_FUSED)
            for third, part in enumerate(("to_q", "to_k", "to_v")):
                sources[f"{block}.attention.{part}.weight"] = (key, third)
            continue
        for old, new in _RENAMES:
            if name.startswith(old) or (old.startswith(".") and old in name):
                name = name.replace(old, new, 1)
        sources[name] = key
    return sources


def _shapes(file: CheckpointFile, sources: Mapping[str, Source]) -> Shapes:
    """Each diffusers tensor's shape (a third of the fused qkv's rows)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, source in sources.items():
        if isinstance(source, tuple):
            rows, *rest = file.shapes[source[0]]
            shapes[name] = (rows // 3, *rest)
        else:
            shapes[name] = file.shapes[source]
    return shapes


def z_image_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``ZImageTransformer2DModel`` config from the diffusers-named shapes: the head dim is the q
    norm's size; the RoPE is :data:`RELEASED_ROPE` (for 128-dim heads)."""
    overrides = dict(overrides or {})
    dim = shape(shapes, "layers.0.attention.to_q.weight")[0]
    head_dim = shape(shapes, "layers.0.attention.norm_q.weight")[0]
    kv_width = shape(shapes, "layers.0.attention.to_k.weight")[0]
    if dim % head_dim or kv_width % head_dim:
        raise ShapeRuleError(f"q / k widths {dim} / {kv_width} are not multiples of {head_dim}-dim heads")
    patch_in = shape(shapes, f"all_x_embedder.{PATCH}.weight")[1]
    config: dict[str, Any] = {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": patch_in // 4,
        "dim": dim,
        "n_layers": count(shapes, r"layers\.(\d+)\."),
        "n_refiner_layers": count(shapes, r"noise_refiner\.(\d+)\."),
        "n_heads": dim // head_dim,
        "n_kv_heads": kv_width // head_dim,
        "qk_norm": True,
        "cap_feat_dim": shape(shapes, "cap_embedder.1.weight")[1],
        **RELEASED_ROPE,
    }
    return config | overrides


def _read_original(
    model_class: Any,
    config: dict[str, Any],
    file: CheckpointFile,
    sources: dict[str, Source],
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    """The model of an original-layout file: keys and shapes checked on the meta device, then each
    tensor read, split where fused, in `dtype` (bfloat16 when None)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    try:
        with init_empty_weights(include_buffers=False):
            model: torch.nn.Module = model_class(**config)
    except (TypeError, ValueError, AssertionError) as e:
        raise file.error(f"the inferred {model_class.__name__} config {config} is invalid ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(sources)), sorted(set(sources) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensors {abbreviated(missing)}"] if missing else []
        parts += [f"unexpected tensors {abbreviated(unexpected)}"] if unexpected else []
        raise file.error(f"does not match {model_class.__name__}: {'; '.join(parts)}")
    shapes = _shapes(file, sources)
    for name, wanted in expected.items():
        if shapes[name] != wanted:
            raise file.error(f"tensor for {name!r} has shape {list(shapes[name])}, expected {list(wanted)}")
    file.check_dtypes(sorted({s[0] if isinstance(s, tuple) else s for s in sources.values()}))
    target = dtype or torch.bfloat16
    state: dict[str, torch.Tensor] = {}
    with safe_open(file.file_of(next(iter(file.shapes))), framework="pt") as f:
        for name, source in sources.items():
            key, third = (source, None) if isinstance(source, str) else source
            tensor = f.get_tensor(key)
            if file.is_fp8(key):
                raise file.error(
                    f"stores {key!r} in fp8: original-layout fp8 Z-Image files are not read yet; use the "
                    "bf16 file"
                )
            if third is not None:
                tensor = tensor.chunk(3, dim=0)[third]
            if not bool(torch.isfinite(tensor).all()):
                raise file.error(f"tensor {key!r} holds NaN or infinity: the file is damaged")
            state[name] = tensor.to(target).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model
