"""Independent references the code is checked against: the reference trainer's preprocessing,
written with PIL / OpenCV / torch, for the native core (anchor-implementation.md sections 2.2,
2.3 and 2.5 of the team's notes); and the inverse of the one-file checkpoint name mappings
(diffusers name -> original / ComfyUI name), written from the original WAN modules' layout,
for ``models/wan_checkpoint.py``."""

from __future__ import annotations

import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def cover_geometry(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], float]:
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return (int(w * scale + 0.5), int(h * scale + 0.5)), scale


def centre_crop(array: np.ndarray, new: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    left, top = (new[0] - bucket[0]) // 2, (new[1] - bucket[1]) // 2
    return array[top : top + bucket[1], left : left + bucket[0]]


def resize_image_to_bucket(rgb: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (w, h) == bucket:
        return rgb
    new, scale = cover_geometry((w, h), bucket)
    if scale > 1:
        out = np.array(Image.fromarray(rgb).resize(new, Image.Resampling.LANCZOS))
    else:
        out = cv2.resize(rgb, new, interpolation=cv2.INTER_AREA)
    return centre_crop(out, new, bucket)


def resize_mask_to_bucket(mask: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    h, w = mask.shape[:2]
    if (w, h) == bucket:
        return mask
    new, scale = cover_geometry((w, h), bucket)
    if scale > 1:
        out = np.array(Image.fromarray(mask).resize(new, Image.Resampling.NEAREST))
    else:
        out = cv2.resize(mask, new, interpolation=cv2.INTER_AREA)
    return centre_crop(out, new, bucket)


def latent_mask(mask: np.ndarray, factor: int = 8, full_scale: float = 255.0) -> np.ndarray:
    h, w = mask.shape
    m = torch.from_numpy(mask.astype(np.float32) if mask.dtype == np.uint16 else mask)[None, None]
    m = m.float() / full_scale
    return F.interpolate(m, size=(h // factor, w // factor), mode="area")[0, 0].numpy()


def nearest_aspect_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = size[0] / size[1]
    errors = [abs(bw / bh - aspect) for bw, bh in buckets]
    return buckets[int(np.argmin(errors))]


_WAN_DIT_INVERSE = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
]


def wan_dit_original(name: str) -> str:
    top = {"scale_shift_table": "head.modulation", "proj_out.weight": "head.head.weight"}
    if name in top or name == "proj_out.bias":
        return top.get(name, "head.head.bias")
    for new, old in _WAN_DIT_INVERSE:
        name = name.replace(new, old)
    # The original calls the cross-attention norm norm3 and the FFN norm norm2.
    return re.sub(r"\.norm([23])\.", lambda m: f".norm{5 - int(m.group(1))}.", name)


_VAE_FIXED_INVERSE = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1",
    "decoder.conv_in": "decoder.conv1",
    "encoder.norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "decoder.norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
}
_RESNET_INVERSE = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}


def _resnet_original(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head == "conv_shortcut":
        return f"shortcut.{tail}"
    return f"{_RESNET_INVERSE[head]}.{tail}" if head in _RESNET_INVERSE else rest


def wan_vae_original(name: str, num_res_blocks: int, residual: bool) -> str:
    module, _, param = name.rpartition(".")
    if module in _VAE_FIXED_INVERSE:
        return f"{_VAE_FIXED_INVERSE[module]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", name):
        index = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[m.group(2)][m.group(3)]
        rest = _resnet_original(m.group(4)) if m.group(2) == "resnets" else m.group(4)
        return f"{m.group(1)}.middle.{index}.{rest}"
    group = num_res_blocks + 2  # decoder: resnets + 1, then a resample
    if residual:
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            side, kind, level, j, rest = m.groups()
            return f"{side}.{kind}samples.{level}.{kind}samples.{j}.{_resnet_original(rest)}"
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(?:down|up)sampler\.(.+)", name):
            side, kind, level, rest = m.groups()
            j = num_res_blocks if side == "encoder" else num_res_blocks + 1
            return f"{side}.{kind}samples.{level}.{kind}samples.{j}.{rest}"
    else:
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", name):
            return f"encoder.downsamples.{m.group(1)}.{_resnet_original(m.group(2))}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            level, j, rest = m.groups()
            return f"decoder.upsamples.{int(level) * group + int(j)}.{_resnet_original(rest)}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
            return f"decoder.upsamples.{int(m.group(1)) * group + num_res_blocks + 1}.{m.group(2)}"
    raise AssertionError(f"no original name for {name}")
