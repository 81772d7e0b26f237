"""Images as RGBA for the VAEs that read alpha (Qwen-Image-Layered's layers, Qwen-Image 2.1): the
native core's preparation gives RGB at the bucket (the alpha, when it is the mask, becomes mask
weights), so these read each image again with its alpha channel."""

from __future__ import annotations

import numpy as np

from masktrain import _native
from masktrain.data.buckets import Bucket


def rgba_at_bucket(rgb: np.ndarray, alpha: np.ndarray | None, bucket: Bucket) -> np.ndarray:
    """(H, W, 4) uint8: a decoded image at `bucket`, its alpha resized as a mask is (opaque without
    one; 16-bit alpha brought to 8 bits)."""
    resized = _native.resize_image_to_bucket(rgb, bucket)
    opacity: np.ndarray
    if alpha is None:
        opacity = np.full(resized.shape[:2], 255, dtype=np.uint8)
    else:
        opacity = _native.resize_mask_to_bucket(alpha, bucket)
        if opacity.dtype == np.uint16:
            opacity = ((opacity.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.concatenate([resized, opacity[..., None]], axis=-1)


def is_transparent(alpha: np.ndarray | None) -> bool:
    """Whether an alpha channel holds any pixel that is not fully opaque."""
    return alpha is not None and bool((alpha < np.iinfo(alpha.dtype).max).any())
