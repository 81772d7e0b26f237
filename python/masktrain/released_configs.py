"""The released transformers' diffusers configs (their ``transformer/config.json``), by model: the
data behind ``catalog``'s ``Released`` records (``masktrain plan --dit NAME``). Keys at the class
default may be left out. tests/test_released_configs.py counts each one's parameters against the
published size."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# WAN: the ``-Diffusers`` repositories' configs, as diffusers' scripts/convert_wan_to_diffusers.py
# writes them.
WAN_1_3B: Mapping[str, Any] = MappingProxyType(
    {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }
)
WAN_14B = MappingProxyType(dict(WAN_1_3B) | {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40})
WAN_TI2V_5B = MappingProxyType(
    dict(WAN_1_3B)
    | {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48}
)
# WAN 2.1 I2V (480p and 720p share it): 36 input channels (16 latent + 4 mask + 16 condition), the
# CLIP ViT-H/14 embedding (1280 wide) projected and attended through each block's image key/value
# projections; FLF2V adds the position table of its two images' 2 x 257 tokens; WAN 2.2 I2V A14B
# takes the 36 channels without CLIP (convert_wan_to_diffusers.py's configs).
WAN_I2V_14B = MappingProxyType(
    dict(WAN_14B) | {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
)
WAN_FLF2V_14B = MappingProxyType(dict(WAN_I2V_14B) | {"pos_embed_seq_len": 2 * 257})
WAN_22_I2V_14B = MappingProxyType(dict(WAN_14B) | {"in_channels": 36})
QWEN_IMAGE_20B: Mapping[str, Any] = MappingProxyType(
    {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    }
)
# FLUX.2 (diffusers' scripts/convert_flux2_to_diffusers.py get_flux2_transformer_config): dev is
# guidance-distilled (a guidance embedding); klein 4B / 9B and their base versions share one config
# per size, without it.
FLUX2_DEV: Mapping[str, Any] = MappingProxyType(
    {
        "patch_size": 1,
        "in_channels": 128,
        "num_layers": 8,
        "num_single_layers": 48,
        "attention_head_dim": 128,
        "num_attention_heads": 48,
        "joint_attention_dim": 15360,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (32, 32, 32, 32),
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": True,
    }
)
FLUX2_KLEIN_4B = MappingProxyType(
    dict(FLUX2_DEV)
    | {
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,
        "guidance_embeds": False,
    }
)
FLUX2_KLEIN_9B = MappingProxyType(
    dict(FLUX2_DEV)
    | {
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "joint_attention_dim": 12288,
        "guidance_embeds": False,
    }
)
# Qwen-Image 2.1 (diffusers' QwenImage21Transformer2DModel defaults, which its docstring gives as the
# released model's: 32 single-stream blocks of 4096, Qwen3-VL-8B's 4096-wide features, 64 latent
# channels taken unpatched).
QWEN_IMAGE_2_1_7B: Mapping[str, Any] = MappingProxyType(
    {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": 64,
        "num_layers": 32,
        "attention_head_dim": 128,
        "num_attention_heads": 32,
        "context_in_dim": 4096,
        "mlp_ratio": 3,
        "axes_dims_rope": (16, 56, 56),
    }
)
# Z-Image (diffusers' ZImageTransformer2DModel defaults, the released 6B model's: families.md §2.1;
# Turbo and base share it).
Z_IMAGE_6B: Mapping[str, Any] = MappingProxyType(
    {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 3840,
        "n_layers": 30,
        "n_refiner_layers": 2,
        "n_heads": 30,
        "n_kv_heads": 30,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 2560,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": (32, 48, 48),
        "axes_lens": (1024, 512, 512),
    }
)
