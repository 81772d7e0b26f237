"""A video's mask laid onto its kept frames and pooled per clip the way the causal VAE groups
frames (latent frame 0 <- pixel frame 0, latent frame k <- pixel frames 4k-3 ... 4k).

The mask (``data.mask_sources``) is a still image, a mask video or a folder of mask frames:

- a still is prepared by the native core exactly as an image's mask file (luma, 16 bit kept, aspect
  within 1% of the video's first frame, cover-resized onto the bucket, pooled onto the latent grid)
  and holds for every frame;
- a mask video or frame folder lives on the source video's timeline (``data.mask_frames``: frame i of
  a folder is source frame i; a mask video is aligned by timestamps; a shorter mask is padded with its
  last frame, a longer one cut, each with a warning). The mask frames of the kept frames (after
  ``source_fps`` resampling) go through the same aspect check and resize onto the bucket, and each
  clip's frames are pooled by ``_native.pool_mask_frames`` in the cache's ``--mask_pooling`` mode,
  the baked ``--cache_mask_gamma`` / ``--cache_mask_min_weight`` applied per pixel before pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masktrain import _native
from masktrain.config.cache import MaskPoolingMode
from masktrain.data import mask_frames
from masktrain.data.video import DecodedVideo
from masktrain.errors import DataError


def frames_size(frame: np.ndarray) -> str:
    return f"{frame.shape[1]}x{frame.shape[0]}"


@dataclass(frozen=True)
class MaskPooling:
    """How mask pixels become latent weights: the VAE's factors and the cache's settings."""

    spatial_factor: int
    temporal_factor: int
    mode: MaskPoolingMode = "area"
    gamma: float = 1.0
    min_weight: float = 0.0


@dataclass
class ClipMasks:
    """A video's mask on its kept frames: the latent weights of any clip of them."""

    pooling: MaskPooling
    static: np.ndarray | None = None
    """(h, w) weights for every frame (a still mask, or full weight); None for a per-frame mask."""
    frames: np.ndarray | None = None
    """(M, H, W) uint8 / uint16: the distinct mask frames the kept frames use, at the bucket size."""
    rows: np.ndarray | None = None
    """For each kept frame, its row of `frames`."""

    def weights(self, start: int, count: int) -> np.ndarray:
        """(F, h, w) float32 weights of the clip of `count` kept frames from `start`."""
        pooling = self.pooling
        latent_frames = (count - 1) // pooling.temporal_factor + 1
        if self.static is not None:
            return np.broadcast_to(self.static, (latent_frames, *self.static.shape)).copy()
        assert self.frames is not None and self.rows is not None
        return _native.pool_mask_frames(
            self.frames[self.rows[start : start + count]],
            pooling.spatial_factor,
            pooling.temporal_factor,
            pooling.mode,
            cache_mask_gamma=pooling.gamma,
            cache_mask_min_weight=pooling.min_weight,
        )


def full_weight(decoded: DecodedVideo, pooling: MaskPooling) -> ClipMasks:
    """Weight 1 everywhere: a video without a mask while masking is on."""
    width, height = decoded.bucket
    factor = pooling.spatial_factor
    return ClipMasks(pooling, static=np.ones((height // factor, width // factor), np.float32))


def is_still(mask: Path) -> bool:
    """Whether `mask` is one still image (not a mask video, not a folder of frames)."""
    return mask.is_file() and mask.suffix.lower().lstrip(".") in _native.IMAGE_EXTENSIONS


def clip_masks(mask: Path, video: Path, decoded: DecodedVideo, pooling: MaskPooling) -> ClipMasks:
    """The mask `mask` of `video` laid onto its `decoded` kept frames (errors name both files)."""
    if is_still(mask):
        _, weights = _native.prepare_mask(
            mask,
            decoded.original_size,
            decoded.bucket,
            pooling.spatial_factor,
            source=video,
            media="video",
            cache_mask_gamma=pooling.gamma,
            cache_mask_min_weight=pooling.min_weight,
            mask_pooling=pooling.mode,
        )
        return ClipMasks(pooling, static=weights)
    read = mask_frames.read_mask_frames(mask)
    on_source = mask_frames.align(read, decoded.source_frame_count, decoded.source_times, video)
    kept = on_source[np.asarray(decoded.source_indices)]
    used, rows = np.unique(kept, return_inverse=True)
    frames = [read.frames[int(i)] for i in used]
    odd = next(
        (int(i) for i, frame in zip(used, frames, strict=True) if frame.shape != frames[0].shape), None
    )
    if odd is not None:
        raise DataError(
            f"{mask}: mask frame {odd} is {frames_size(read.frames[odd])}, frame {int(used[0])} is "
            f"{frames_size(frames[0])}; every frame of a mask must have one size"
        )
    stacked = np.stack(frames)
    bucket_frames = _native.prepare_loaded_mask_frames(
        stacked, mask, decoded.original_size, decoded.bucket, source=video, media="video"
    )
    return ClipMasks(pooling, frames=bucket_frames, rows=rows.reshape(-1))
