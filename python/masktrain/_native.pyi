"""Type stubs for the Rust extension module (checked by ``mypy.stubtest``)."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal, final

import numpy as np
import numpy.typing as npt

from masktrain.errors import MaskTrainError

_StrPath = str | os.PathLike[str]
_Pooling = Literal["area", "max", "nearest"]
_MaskArray = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]

__all__ = [
    "DEFAULT_PIXEL_LIMIT",
    "IMAGE_EXTENSIONS",
    "TEMP_SUFFIX",
    "MaskIndex",
    "PreparedItem",
    "__version__",
    "area_downsample",
    "choose_bucket",
    "convert_alpha_batch",
    "decode_image",
    "list_images",
    "load_mask",
    "pool_mask_frames",
    "prepare_batch",
    "prepare_loaded_mask",
    "prepare_loaded_mask_frames",
    "prepare_mask",
    "resize_image_to_bucket",
    "resize_mask_to_bucket",
    "resize_mask_to_size",
    "same_aspect",
    "thread_count",
]

DEFAULT_PIXEL_LIMIT: Final[int]
IMAGE_EXTENSIONS: Final[list[str]]
TEMP_SUFFIX: Final[str]
__version__: Final[str]

@final
class MaskIndex:
    def __new__(cls, directory: _StrPath) -> MaskIndex: ...
    @property
    def directory(self) -> Path: ...
    @property
    def duplicates(self) -> list[tuple[str, Path, Path]]: ...
    def get(self, stem: str) -> Path | None: ...
    def __len__(self) -> int: ...

@final
class PreparedItem:
    @property
    def path(self) -> Path: ...
    @property
    def image(self) -> npt.NDArray[np.uint8]: ...
    @property
    def mask(self) -> npt.NDArray[np.uint8] | None: ...
    @property
    def latent_mask(self) -> npt.NDArray[np.float32] | None: ...
    @property
    def mask_source(self) -> Literal["alpha", "file", "default", "none"]: ...
    @property
    def mask_path(self) -> Path | None: ...
    @property
    def bucket(self) -> tuple[int, int]: ...
    @property
    def original_size(self) -> tuple[int, int]: ...
    @property
    def mask_bit_depth(self) -> int: ...

def decode_image(
    path: _StrPath, *, pixel_limit: int = ...
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | None]: ...
def load_mask(
    path: _StrPath, *, pixel_limit: int = ...
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]: ...
def prepare_mask(
    mask_path: _StrPath,
    image_size: tuple[int, int],
    bucket: tuple[int, int],
    latent_factor: int = 8,
    *,
    source: _StrPath | None = None,
    media: Literal["image", "video"] = "image",
    pixel_limit: int = ...,
    cache_mask_gamma: float = 1.0,
    cache_mask_min_weight: float = 0.0,
    mask_pooling: _Pooling = "area",
) -> tuple[_MaskArray, npt.NDArray[np.float32]]: ...
def prepare_loaded_mask(
    mask: _MaskArray,
    mask_name: _StrPath,
    source_size: tuple[int, int],
    bucket: tuple[int, int],
    latent_factor: int = 8,
    *,
    source: _StrPath | None = None,
    media: Literal["image", "video"] = "video",
    cache_mask_gamma: float = 1.0,
    cache_mask_min_weight: float = 0.0,
    mask_pooling: _Pooling = "area",
) -> tuple[_MaskArray, npt.NDArray[np.float32]]: ...
def prepare_loaded_mask_frames(
    frames: _MaskArray,
    mask_name: _StrPath,
    source_size: tuple[int, int],
    bucket: tuple[int, int],
    *,
    source: _StrPath | None = None,
    media: Literal["image", "video"] = "video",
) -> _MaskArray: ...
def resize_image_to_bucket(rgb: npt.NDArray[np.uint8], bucket: tuple[int, int]) -> npt.NDArray[np.uint8]: ...
def resize_mask_to_bucket(
    mask: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], bucket: tuple[int, int]
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]: ...
def resize_mask_to_size(
    mask: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], size: tuple[int, int]
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]: ...
def area_downsample(values: npt.NDArray[np.float32], size: tuple[int, int]) -> npt.NDArray[np.float32]: ...
def pool_mask_frames(
    frames: npt.NDArray[np.float32] | _MaskArray,
    spatial_factor: int,
    temporal_factor: int,
    mode: _Pooling,
    *,
    cache_mask_gamma: float = 1.0,
    cache_mask_min_weight: float = 0.0,
) -> npt.NDArray[np.float32]: ...
def choose_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]: ...
def same_aspect(reference: tuple[int, int], other: tuple[int, int]) -> bool: ...
def list_images(directory: _StrPath) -> list[Path]: ...
def thread_count() -> int: ...
def prepare_batch(
    paths: Sequence[_StrPath],
    buckets: Sequence[tuple[int, int]],
    *,
    mask_index: MaskIndex | None = None,
    alpha_mask: bool = False,
    require_mask: bool = False,
    latent_factor: int = 8,
    pixel_limit: int = ...,
    cache_mask_gamma: float = 1.0,
    cache_mask_min_weight: float = 0.0,
    mask_paths: Sequence[_StrPath | None] | None = None,
    default_mask: _StrPath | None = None,
    mask_pooling: _Pooling = "area",
) -> list[PreparedItem | MaskTrainError | OSError]: ...
def convert_alpha_batch(
    jobs: Sequence[tuple[_StrPath, _StrPath, _StrPath, _StrPath | None, _StrPath | None]],
    *,
    pixel_limit: int = ...,
) -> list[MaskTrainError | OSError | None]: ...
