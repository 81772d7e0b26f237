"""``masktrain cache --model_version layered`` (Qwen-Image-Layered) for one image dataset with
``multiple_target = true``: each item is a base image and its RGBA layers (``data.layers``).

As musubi-tuner caches them (``qwen_image_cache_latents.py`` @ 30c658c): every image is decoded
with its alpha (a base without one gets an opaque alpha), resized onto the base's bucket (colour as
the native core resizes images, alpha as it resizes masks: the same geometry), and encoded alone
by the RGBA VAE, so the file holds ``latents_{L}x{h}x{w}`` with L = 1 + layers, the base first.
The base's latents are also the item's control, ``latents_control_0_1x{h}x{w}``: the clean image
the model decomposes, which the loader hands the denoiser as it hands Qwen-Image-Edit its controls.

Masks: the item's ``mask_directory/NAME.png`` weights every image alike (the native core prepares
it with the base); a folder ``mask_directory/NAME/`` gives each image its own, frame i for image i,
as many frames as images. Both are ``mask_weights_{L}x{h}x{w}_float32``. Alpha is content, so it is
never the mask (``catalog.Mode.alpha_is_content``: ``cache.runner`` refuses ``alpha_mask``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from masktrain import _native
from masktrain.cache.rgba import rgba_at_bucket
from masktrain.cache.setup import CacheSetup
from masktrain.config.cache import CacheConfig
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import layers
from masktrain.data.discovery import MediaItem
from masktrain.errors import ConfigError, DataError, MaskTrainError
from masktrain.models import qwen_layered

#: What the native core prepared for an image, or the error it failed with.
Prepared = _native.PreparedItem | MaskTrainError | OSError


def is_layered(config: CacheConfig) -> bool:
    """Whether the run caches Qwen-Image-Layered."""
    return config.mode is not None and config.mode.kind == "layered"


def check_dataset(config: CacheConfig, dataset: ImageDatasetConfig | VideoDatasetConfig, number: int) -> None:
    """Before any model loads: a layered run takes image datasets of layers."""
    where = f"{config.dataset_config}: [[datasets]] #{number}"
    multiple = isinstance(dataset, ImageDatasetConfig) and dataset.multiple_target
    if is_layered(config) and not multiple:
        raise ConfigError(
            f"{where}: --model_version layered trains image datasets with 'multiple_target = true' (each "
            "captioned NAME.png with its layers NAME_0.png, NAME_1.png, ...)"
        )
    if multiple and not is_layered(config):
        raise ConfigError(
            f"{where}: 'multiple_target = true' is for --model_version layered (Qwen-Image-Layered)"
        )


class LayeredItems:
    """The RGBA images and per-image masks of one layered dataset's items, read beside the native
    core's preparation of the base (on its worker thread) and used when the chunk is encoded."""

    def __init__(self, setup: CacheSetup) -> None:
        assert isinstance(setup.dataset, ImageDatasetConfig)
        self.setup, self.dataset = setup, setup.dataset
        self._pixels: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, setup: CacheSetup) -> LayeredItems | None:
        """The dataset's layered cacher (None when the run is not layered); the VAE must be the
        RGBA one exactly when it is."""
        layered = is_layered(setup.config)
        qwen_layered.check_vae(setup.vae, setup.config.vae, layered)
        return cls(setup) if layered else None

    def load(self, chunk: list[MediaItem], results: list[Prepared]) -> list[Prepared]:
        """`results` with each prepared item's images and mask frames read (kept for :meth:`encode`
        and :meth:`weights`); an item whose layer or mask cannot be read fails, named."""
        for index, (item, result) in enumerate(zip(chunk, results, strict=True)):
            if not isinstance(result, _native.PreparedItem):
                continue
            try:
                self._pixels[str(item.path)] = self._images(item, result)
                frames = self._mask_frames(item, result)
            except (MaskTrainError, OSError) as error:
                results[index] = error
                continue
            if frames is not None:
                self._masks[str(item.path)] = frames
        return results

    def _images(self, item: MediaItem, prepared: _native.PreparedItem) -> np.ndarray:
        """(L, H, W, 4) uint8: the base and its layers as RGBA at the base's bucket."""
        images = [rgba_at_bucket(*_native.decode_image(item.path), prepared.bucket)]
        for layer in item.layers:
            rgb, alpha = _native.decode_image(layer)
            if not _native.same_aspect(prepared.original_size, (rgb.shape[1], rgb.shape[0])):
                width, height = prepared.original_size
                raise DataError(
                    f"{layer}: {rgb.shape[1]}x{rgb.shape[0]}, but its base {item.path.name} is "
                    f"{width}x{height}: a layer has its base's aspect ratio"
                )
            images.append(rgba_at_bucket(rgb, alpha, prepared.bucket))
        return np.stack(images)

    def _mask_frames(self, item: MediaItem, prepared: _native.PreparedItem) -> np.ndarray | None:
        """(L, h, w) float32 weights of a mask folder (None without one), each frame prepared as
        the native core prepares a mask file (``--cache_mask_gamma`` / ``--cache_mask_min_weight``
        baked in)."""
        masks = self.dataset.mask_directory
        frames = layers.mask_frames(masks, item.stem)
        count = 1 + len(item.layers)
        if frames is None:
            if self.dataset.require_mask and prepared.mask_path is None:
                raise DataError(
                    f"{item.path}: require_mask=true but no mask found (no {item.stem}.png nor {item.stem}/ "
                    "in mask_directory)"
                )
            return None
        folder = layers.mask_folder(masks, item.stem)
        if prepared.mask_path is not None:
            raise DataError(
                f"{item.path}: both the mask file {prepared.mask_path} and the mask folder {folder}; keep one"
            )
        if len(frames) != count:
            raise DataError(
                f"{folder}: {len(frames)} mask frame(s) for {count} images (the base and {count - 1} "
                "layers): frame i is image i's mask"
            )
        config = self.setup.config
        weights = [
            _native.prepare_mask(
                frame,
                prepared.original_size,
                prepared.bucket,
                self.setup.factor,
                source=item.path,
                cache_mask_gamma=config.cache_mask_gamma,
                cache_mask_min_weight=config.cache_mask_min_weight,
                mask_pooling=config.mask_pooling,
            )[1]
            for frame in frames
        ]
        return np.stack(weights)

    def encode(self, batch: list[tuple[MediaItem, _native.PreparedItem, str]]) -> torch.Tensor:
        """(B, C, L, h, w): every image of every item of `batch` encoded alone by the RGBA VAE."""
        images = np.stack([self._pixels.pop(str(item.path)) for item, _, _ in batch])  # (B, L, H, W, 4)
        b, count, height, width, _ = images.shape
        pixels = torch.from_numpy(images).reshape(b * count, height, width, 4)
        pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).unsqueeze(2)  # (B*L, 4, 1, H, W)
        latents = self.setup.family.encode_pixels(self.setup.vae, pixels).cpu()  # (B*L, C, 1, h, w)
        _, channels, _, h, w = latents.shape
        return latents.reshape(b, count, channels, h, w).permute(0, 2, 1, 3, 4)

    def weights(
        self, item: MediaItem, prepared: _native.PreparedItem, weights: torch.Tensor | None
    ) -> tuple[fmt.MaskSource, Path | None, torch.Tensor | None]:
        """(mask source, mask path, weights) of `item`: its mask folder's (L, h, w) frames, or the
        mask file's (h, w) weights the native core prepared (every image alike)."""
        frames = self._masks.pop(str(item.path), None)
        if frames is None:
            return prepared.mask_source, prepared.mask_path, weights
        return "file", layers.mask_folder(self.dataset.mask_directory, item.stem), torch.from_numpy(frames)

    def tensors(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The item's control: its base's latents (C, 1, h, w), latent frame 0."""
        base = latents[:, :1].contiguous()
        _, frames, height, width = base.shape
        return {fmt.control_key(0, base.dtype, (frames, height, width)): base}
