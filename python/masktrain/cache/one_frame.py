"""``masktrain cache --one_frame`` for one image dataset (WAN one-frame, musubi-tuner's
``--one_frame``): each item's control images (``control_directory``) at their frame positions
(``fp_1f_clean_indices``) and the item itself, the target, at ``fp_1f_target_index``, laid out as
``models.wan_one_frame.one_frame_layout`` lays them out: every image encoded alone, the slots in
position order, the image-to-video condition marking the controls given, each slot's position for
the rotary embedding, and the mask weights 1.0 on the controls and the item's mask on the target
(the guide's rule). WAN 2.1 models also get the CLIP embedding of the control images: one for
``--task i2v-14B``, the first and the last for ``flf2v-14B``.

The control images are resized to the target's bucket as the target is (the native core's
resize). The file holds ``latents_{F}x{h}x{w}``, ``latents_image_{F}x{h}x{w}``,
``f_indices_int32``, ``mask_weights_{F}x{h}x{w}_float32`` (with masks) and ``clip_*``.
"""

from __future__ import annotations

import numpy as np
import torch

from masktrain import _native
from masktrain.cache.setup import CacheSetup
from masktrain.config.dataset import ImageDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data.buckets import Bucket
from masktrain.data.discovery import MediaItem
from masktrain.errors import DataError
from masktrain.models import wan_one_frame
from masktrain.models.loading import device_of


class OneFrameItems:
    """The one-frame tensors of one image dataset's items."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, ImageDatasetConfig) and setup.conditioning is not None
        self.setup, self.dataset, self.conditioning = setup, setup.dataset, setup.conditioning
        self._zero_frames: dict[Bucket, torch.Tensor] = {}

    def tensors(
        self, item: MediaItem, bucket: Bucket, target: torch.Tensor, weights: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The item's tensors under the cache's keys, from its target latents (C, 1, h, w) and its
        mask weights on the latent grid (h, w), None without a mask."""
        setup, dataset = self.setup, self.dataset
        where = str(item.path)
        paths = [] if setup.controls is None else setup.controls.get(item.stem)
        if not paths:
            names = f"{item.stem}.png, or {item.stem}_0.png, {item.stem}_1.png, ..."
            raise DataError(
                f"{item.path}: no control image in {dataset.control_directory} (one-frame training gives "
                f"each item its control images: {names})"
            )
        mode = self.conditioning.mode
        if self.conditioning.clip is not None and len(paths) != mode.given_frames:
            task = self.conditioning.name.removeprefix("one-frame ")
            raise DataError(
                f"{item.path}: {len(paths)} control image(s), but --task {task} takes {mode.given_frames} "
                "(i2v-14B: one control image; flf2v-14B: the start and the end)"
            )
        images = np.stack(
            [_native.resize_image_to_bucket(_native.decode_image(path)[0], bucket) for path in paths]
        )
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        controls = wan_one_frame.encode_frames(setup.family, setup.vae, pixels).float().cpu()
        layout = wan_one_frame.one_frame_layout(
            controls,
            target[:, 0].float(),
            self._zero_frame(bucket),
            dataset.fp_1f_clean_indices,
            dataset.fp_1f_target_index,
            None if weights is None else weights.float(),
            where,
        )
        dtype = target.dtype
        _, frames, height, width = layout.latents.shape
        grid = (frames, height, width)
        tensors = {
            fmt.tensor_key(fmt.LATENTS, dtype, grid): layout.latents.to(dtype),
            fmt.tensor_key(fmt.IMAGE_LATENTS, dtype, grid): layout.image_latents.to(dtype),
            fmt.tensor_key(fmt.FRAME_INDICES, torch.int32): layout.frame_indices.to(torch.int32),
        }
        if layout.mask_weights is not None:
            tensors[fmt.tensor_key(fmt.MASK_WEIGHTS, torch.float32, grid)] = layout.mask_weights
        if self.conditioning.clip is not None:
            from masktrain.models import clip_vision

            embeds = clip_vision.encode_images(self.conditioning.clip, pixels.to(device_of(setup.vae))).cpu()
            tensors[fmt.tensor_key(fmt.IMAGE_EMBEDS, embeds.dtype)] = embeds.contiguous()
        return tensors

    def _zero_frame(self, bucket: Bucket) -> torch.Tensor:
        """The latent of an all-zero pixel frame at `bucket`, encoded once per bucket."""
        if bucket not in self._zero_frames:
            width, height = bucket
            zero = wan_one_frame.zero_frame_latent(self.setup.family, self.setup.vae, height, width)
            self._zero_frames[bucket] = zero.float().cpu()
        return self._zero_frames[bucket]
