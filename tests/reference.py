"""The reference trainer's preprocessing, written with PIL / OpenCV / torch, as the independent
reference the native core is checked against (see ../shared/reference/anchor-implementation.md
sections 2.2, 2.3 and 2.5)."""

from __future__ import annotations

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
