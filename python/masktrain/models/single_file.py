"""One ``.safetensors`` file in the ComfyUI / original layout (``--dit``, ``--vae``), loaded offline.

diffusers' ``from_single_file`` fetches a config from the Hub unless it is given a local folder, so
we read the file ourselves: select the component's keys (ComfyUI prefixes them with
``model.diffusion_model.``), rename them to diffusers names, infer the diffusers config from the
tensor shapes, build the model on the meta device and assign the file's tensors to it (strictly:
a missing, unexpected or misshapen tensor is an error naming the file, never a random weight).
Tensors keep the file's dtype unless ``dtype`` is given (unscaled fp8 becomes bfloat16); buffers
that are not in the file (RoPE tables) are computed in float32, as the model builds them.

What the shapes cannot tell, and what we assume (true of every released model; ``overrides``
replaces any inferred config value, which is how tests load their tiny models):
- WAN transformers normalise q/k across heads and carry no per-head tensor, so the head count
  comes from ``inner dim / 128`` (Wan2.1-1.3B: 12 x 128, ffn 8960, 30 layers; Wan2.1/2.2-14B:
  40 x 128, ffn 13824, 40 layers; TI2V-5B: 24 x 128, ffn 14336, 30 layers; text_dim 4096,
  freq_dim 256, ``rope_max_seq_len`` 1024, eps 1e-6).
- Qwen-Image's head dim is the size of its per-head q norm; its RoPE axes are (16, 56, 56) for the
  released 128-dim heads and its patch size is 2.
- VAE latent statistics are not weights: the WAN 2.1 VAE (16 channels) and the Qwen-Image VAE use
  the diffusers class defaults, the WAN 2.2 TI2V-5B VAE (48 channels) the values of diffusers'
  ``scripts/convert_wan_to_diffusers.py`` (``vae22_diffusers_config``). The Qwen-Image VAE has the
  WAN 2.1 VAE's module layout (same names and shapes), so the same key mapping serves both.

Text encoders are never single files: ComfyUI's carry no tokenizer, and tokenizers cannot be
downloaded (``text_encoder_file_error``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masktrain.models.base import ModelLoadError
from masktrain.models.single_file_names import wan_transformer_names, wan_vae_names

__all__ = [
    "load_transformer_file",
    "load_vae_file",
    "qwen_transformer_config",
    "text_encoder_file_error",
    "wan_transformer_config",
    "wan_transformer_names",
    "wan_vae_config",
    "wan_vae_names",
]

logger = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]

#: Head dim of every released WAN transformer (not recoverable from the weights).
WAN_HEAD_DIM = 128
#: Qwen-Image's RoPE axes for its 128-dim heads.
QWEN_AXES_DIMS_ROPE = (16, 56, 56)
# diffusers scripts/convert_wan_to_diffusers.py, vae22_diffusers_config (= Wan2_2_VAE in the
# Wan2.2 repository).
WAN22_VAE_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_VAE_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

# ComfyUI checkpoints prefix each component; a file may bundle several of them.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Qwen-Image-Edit-2511's marker for "timestep zero for the reference image" (diffusers zero_cond_t).
QWEN_ZERO_COND_MARKER = "__index_timestep_zero__"
_FP8 = {"F8_E4M3", "F8_E5M2"}

# What a file holds, from its key names: (kind, words for messages).
WAN_DIT, QWEN_DIT, WAN_VAE, WAN22_VAE = "wan_dit", "qwen_dit", "wan_vae", "wan22_vae"
_KIND_WORDS = {
    WAN_DIT: "a WAN transformer",
    QWEN_DIT: "a Qwen-Image transformer",
    WAN_VAE: "a WAN 2.1 / Qwen-Image VAE",
    WAN22_VAE: "a WAN 2.2 TI2V-5B VAE",
    "wan_vace": "a WAN VACE transformer (not supported)",
    "wan_animate": "a WAN Animate transformer (not supported)",
    "qwen21_dit": "a Qwen-Image 2.1 transformer (not supported)",
    "t5": "a T5 / UMT5 text encoder",
    "qwen_text": "a Qwen2.5-VL text encoder",
}


def text_encoder_file_error(flag: str, path: Path | str) -> ModelLoadError:
    """The error for a single-file text encoder: it has no tokenizer and none can be downloaded."""
    return ModelLoadError(
        f"{flag} {path}: a single-file text encoder carries no tokenizer and nothing is downloaded; "
        "pass a local diffusers pipeline folder (text_encoder/ and tokenizer/) or a transformers "
        "folder that includes the tokenizer"
    )


def load_transformer_file(
    arch: str,
    path: Path,
    flag: str,
    *,
    dtype: torch.dtype | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` (``arch="wan"``) or ``QwenImageTransformer2DModel``
    (``arch="qwen_image"``) from one ``.safetensors`` file, original/ComfyUI or diffusers names."""
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    file = _open(path, flag)
    names = file.select(DIT_PREFIXES)
    kind = _identify(names)
    if arch == "wan":
        _expect(file, kind, WAN_DIT)
        to_file = wan_transformer_names({name.removeprefix(file.prefix): name for name in names})
        shapes = {new: file.shapes[old] for new, old in to_file.items()}
        config = file.infer(wan_transformer_config, shapes, overrides)
        return _build(WanTransformer3DModel, config, file, to_file, dtype)
    if arch == "qwen_image":
        _expect(file, kind, QWEN_DIT)
        to_file = {name.removeprefix(file.prefix): name for name in names}
        marker = to_file.pop(QWEN_ZERO_COND_MARKER, None)
        shapes = {new: file.shapes[old] for new, old in to_file.items()}
        config = file.infer(qwen_transformer_config, shapes, overrides)
        config.setdefault("zero_cond_t", marker is not None)
        return _build(QwenImageTransformer2DModel, config, file, to_file, dtype)
    raise ModelLoadError(f"{flag} {path}: no single-file transformer loader for --arch {arch!r}")


def load_vae_file(
    arch: str,
    path: Path,
    flag: str,
    *,
    dtype: torch.dtype | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """An ``AutoencoderKLWan`` (WAN 2.1 or 2.2 TI2V-5B) or ``AutoencoderKLQwenImage`` from one
    ``.safetensors`` file, original/ComfyUI or diffusers names."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    file = _open(path, flag)
    names = file.select(VAE_PREFIXES)
    kind = _identify(names)
    if arch == "wan":
        _expect(file, kind, WAN_VAE, WAN22_VAE)
        model_class: Any = AutoencoderKLWan
    elif arch == "qwen_image":
        _expect(file, kind, WAN_VAE)
        model_class = AutoencoderKLQwenImage
    else:
        raise ModelLoadError(f"{flag} {path}: no single-file VAE loader for --arch {arch!r}")
    try:
        to_file = wan_vae_names([name.removeprefix(file.prefix) for name in names])
    except ValueError as e:
        raise file.error(str(e)) from None
    to_file = {new: file.prefix + old for new, old in to_file.items()}
    shapes = {new: file.shapes[old] for new, old in to_file.items()}
    config = file.infer(wan_vae_config, shapes, overrides)
    if arch == "qwen_image":
        config = _qwen_vae_config(file, config)
    return _build(model_class, config, file, to_file, dtype)


# --- configs from shapes (diffusers names) ------------------------------------------------------


class _MissingTensor(KeyError):
    """A tensor the inference needs is absent: the file is not a complete model."""


class _ConfigError(ValueError):
    """The shapes do not determine a config; the message says what to pass."""


def _shape(shapes: Shapes, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise _MissingTensor(name)
    return shapes[name]


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes (0 when none)."""
    found = {int(m.group(1)) for name in shapes if (m := re.match(pattern, name))}
    if found and found != set(range(len(found))):
        raise _ConfigError(f"indices of {pattern!r} are not contiguous: {sorted(found)}")
    return len(found)


def wan_transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``WanTransformer3DModel`` config from diffusers-named shapes (see the module docstring)."""
    overrides = dict(overrides or {})
    inner, in_channels, *patch = _shape(shapes, "patch_embedding.weight")
    patch_size = tuple(patch)
    head_dim = int(overrides.pop("attention_head_dim", WAN_HEAD_DIM))
    if inner % head_dim:
        raise _ConfigError(
            f"inner dim {inner} is not a multiple of the head dim {head_dim} of released WAN models; "
            "pass the attention_head_dim"
        )
    image = "condition_embedder.image_embedder."
    config: dict[str, Any] = {
        "patch_size": patch_size,
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, "proj_out.weight")[0] // math.prod(patch_size),
        "text_dim": _shape(shapes, "condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": _shape(shapes, "condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": _shape(shapes, "blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": _count(shapes, r"blocks\.(\d+)\."),
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


def qwen_transformer_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``QwenImageTransformer2DModel`` config from its (diffusers-named) shapes."""
    overrides = dict(overrides or {})
    inner, in_channels = _shape(shapes, "img_in.weight")
    head_dim = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight")[0]
    patch_size = int(overrides.pop("patch_size", 2))
    axes = overrides.pop("axes_dims_rope", None)
    if axes is None:
        if head_dim != 128:
            raise _ConfigError(
                f"head dim {head_dim} is not the released 128, so the RoPE axes are unknown; "
                "pass axes_dims_rope"
            )
        axes = QWEN_AXES_DIMS_ROPE
    config: dict[str, Any] = {
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, "proj_out.weight")[0] // patch_size**2,
        "num_layers": _count(shapes, r"transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(shapes, "txt_in.weight")[1],
        "guidance_embeds": False,
        "axes_dims_rope": tuple(axes),
        "use_additional_t_cond": "time_text_embed.addition_t_embedding.weight" in shapes,
    }
    return config | overrides


def wan_vae_config(shapes: Shapes, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``AutoencoderKLWan`` config from diffusers-named shapes: WAN 2.1 layout (flat encoder
    ``down_blocks``) or WAN 2.2 TI2V-5B (``is_residual``: ``down_blocks.i.resnets.j``)."""
    overrides = dict(overrides or {})
    names = set(shapes)
    if any(re.match(r"encoder\.down_blocks\.[\d.]+(norm|to_qkv|proj)\.", n) for n in names):
        raise _ConfigError("attention blocks inside the encoder (attn_scales) are not supported")
    base_dim, in_channels = _shape(shapes, "encoder.conv_in.weight")[:2]
    residual = any(n.startswith("encoder.down_blocks.0.resnets.") for n in names)
    if residual:
        levels = _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
        num_res_blocks = _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        outs = [_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
        temporal = [
            f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in names for i in range(levels - 1)
        ]
    else:
        resamples = sorted(
            int(m.group(1))
            for n in names
            if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resample\.1\.weight", n))
        )
        num_res_blocks = resamples[0] if resamples else _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
        levels = len(resamples) + 1
        step = num_res_blocks + 1
        outs = [_shape(shapes, f"encoder.down_blocks.{i * step}.conv2.weight")[0] for i in range(levels)]
        resample = [i * step + num_res_blocks for i in range(levels - 1)]
        temporal = [f"encoder.down_blocks.{k}.time_conv.weight" in names for k in resample]
    if any(out % base_dim for out in outs):
        raise _ConfigError(f"encoder widths {outs} are not multiples of the base width {base_dim}")
    dim_mult = [out // base_dim for out in outs]
    z_dim = _shape(shapes, "post_quant_conv.weight")[0]
    patch = math.isqrt(in_channels // 3)
    config: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, "decoder.conv_out.weight")[0],
        "is_residual": residual,
        "patch_size": patch if patch > 1 else None,
        "scale_factor_spatial": 2 ** (levels - 1) * patch,
        "scale_factor_temporal": 2 ** sum(temporal),
    }
    decoder_dim = _shape(shapes, "decoder.conv_in.weight")[0] // dim_mult[-1]
    if decoder_dim != base_dim:
        config["decoder_base_dim"] = decoder_dim
    if "latents_mean" not in overrides or "latents_std" not in overrides:
        if z_dim == 48 and residual:
            config |= {"latents_mean": WAN22_VAE_LATENTS_MEAN, "latents_std": WAN22_VAE_LATENTS_STD}
        elif z_dim != 16:
            # 16 channels: the class defaults (WAN 2.1 VAE, Qwen-Image VAE).
            raise _ConfigError(
                f"no known latent statistics for a {z_dim}-channel VAE; pass latents_mean and latents_std"
            )
    return config | overrides


def _qwen_vae_config(file: _File, wan: dict[str, Any]) -> dict[str, Any]:
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


# --- the file -------------------------------------------------------------------------------------


@dataclass
class _File:
    """A safetensors file's header: key -> shape and dtype, and the prefix `select` chose."""

    path: Path
    flag: str
    shapes: Shapes
    dtypes: dict[str, str]
    prefix: str = ""

    def error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.flag} {self.path}: {what}")

    def select(self, prefixes: tuple[str, ...]) -> list[str]:
        """The keys of one component: those under the first prefix present, else all of them."""
        for prefix in prefixes:
            chosen = [k for k in self.shapes if k.startswith(prefix)]
            if chosen:
                self.prefix = prefix
                return chosen
        self.prefix = ""
        return list(self.shapes)

    def infer(
        self,
        rule: Callable[[Shapes, Mapping[str, Any] | None], dict[str, Any]],
        shapes: Shapes,
        overrides: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        try:
            return rule(shapes, overrides)
        except _MissingTensor as e:
            raise self.error(f"is not a complete checkpoint: tensor {e.args[0]!r} is missing") from None
        except _ConfigError as e:
            raise self.error(f"cannot infer the model config: {e}") from None


def _open(path: Path, flag: str) -> _File:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{flag} {path}: no such file")
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{flag} {path}: expected a .safetensors file (ComfyUI / original layout) or a local "
            "diffusers folder; pickled checkpoints (.pth, .ckpt, .bin) are not loaded"
        )
    shapes: Shapes = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = tuple(tensor.get_shape())
                dtypes[key] = tensor.get_dtype()
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{flag} {path}: cannot read the safetensors header ({e})") from None
    if not shapes:
        raise ModelLoadError(f"{flag} {path}: the file holds no tensors")
    if any(k.endswith(("scaled_fp8", ".scale_weight", ".weight_scale")) for k in shapes):
        raise ModelLoadError(
            f"{flag} {path}: scaled fp8 checkpoints are not supported; use a bf16 or fp16 file"
        )
    return _File(path=path, flag=flag, shapes=shapes, dtypes=dtypes)


def _identify(names: list[str]) -> str | None:
    """What the keys (with any ComfyUI prefix) belong to, or None."""
    stripped = {
        re.sub(r"^(model\.diffusion_model\.|diffusion_model\.|first_stage_model\.|vae\.)", "", n)
        for n in names
    }

    def has(*parts: str) -> bool:
        return any(p in stripped for p in parts)

    if any(n.startswith("vace_blocks.") for n in stripped):
        return "wan_vace"
    if any(n.startswith(("motion_encoder.", "face_adapter.")) for n in stripped):
        return "wan_animate"
    if has("patch_embedding.weight") and any(n.startswith("blocks.") for n in stripped):
        return WAN_DIT
    if has("txt_in.text_norm.weight"):
        return "qwen21_dit"
    if has("img_in.weight") and has("transformer_blocks.0.img_mod.1.weight"):
        return QWEN_DIT
    if has("decoder.middle.0.residual.0.gamma", "decoder.mid_block.resnets.0.norm1.gamma"):
        nested = ("encoder.downsamples.0.downsamples.", "encoder.down_blocks.0.resnets.")
        return WAN22_VAE if any(n.startswith(nested) for n in stripped) else WAN_VAE
    if any("SelfAttention" in n or n.startswith(("encoder.block.", "shared.")) for n in stripped):
        return "t5"
    if any(n.startswith(("model.layers.", "layers.", "visual.", "model.language_model.")) for n in stripped):
        return "qwen_text"
    return None


_ROLE = {WAN_DIT: "dit", QWEN_DIT: "dit", WAN_VAE: "vae", WAN22_VAE: "vae", "t5": "text", "qwen_text": "text"}
_ROLE_HINT = {
    "dit": "pass it to --dit",
    "vae": "pass it to --vae",
    "text": "text encoders need a local folder that includes their tokenizer",
}


def _expect(file: _File, kind: str | None, *wanted: str) -> None:
    if kind in wanted:
        return
    expected = " or ".join(_KIND_WORDS[w] for w in wanted)
    if kind is None:
        raise file.error(
            f"holds an unrecognised checkpoint, expected {expected} "
            f"(first keys: {_first(sorted(file.shapes))})"
        )
    role = _ROLE.get(kind)
    hint = "check --arch" if role == _ROLE[wanted[0]] else _ROLE_HINT.get(role or "", "")
    raise file.error(f"holds {_KIND_WORDS[kind]}, expected {expected}" + (f"; {hint}" if hint else ""))


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _build(
    model_class: Any,
    config: dict[str, Any],
    file: _File,
    to_file: dict[str, str],
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    """`model_class(**config)` on the meta device, then the file's tensors assigned to it; every
    key and shape is checked against the model before any tensor is read."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    try:
        with init_empty_weights(include_buffers=False):
            model = model_class(**config)
    except (TypeError, ValueError, AssertionError) as e:
        raise file.error(f"the inferred {model_class.__name__} config {config} is invalid ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(to_file))
    unexpected = sorted(set(to_file) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_first([to_file[k] for k in unexpected])}")
        raise file.error(f"does not match {model_class.__name__}: {'; '.join(parts)}")
    for name, shape in expected.items():
        if file.shapes[to_file[name]] != shape:
            raise file.error(
                f"tensor {to_file[name]!r} has shape {list(file.shapes[to_file[name]])}, "
                f"{model_class.__name__} expects {list(shape)}"
            )
    state: dict[str, torch.Tensor] = {}
    with safe_open(file.path, framework="pt") as f:
        for name, key in to_file.items():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point():
                if dtype is not None:
                    tensor = tensor.to(dtype)
                elif file.dtypes[key] in _FP8:
                    tensor = tensor.to(torch.bfloat16)  # fp8 cannot run as is; bf16 holds it exactly
            if tensor.data_ptr() % 64:
                # safetensors hands out tensors at the file's 8-byte alignment, and CPU kernels take
                # other paths on unaligned memory (the last bit of results differs): own copy.
                tensor = tensor.clone()
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s from %s (%d tensors)", model_class.__name__, file.path, len(state))
    return model.eval()
