"""Cache files: one self-describing, fingerprinted safetensors file per item, written atomically.

Names follow musubi-tuner so users recognise them (``original_size`` is the source's own size):

- images: ``{stem}_{W:04d}x{H:04d}_{arch}.safetensors``
- video clips: ``{stem}_{start:05d}-{count:03d}_{W:04d}x{H:04d}_{arch}.safetensors``
- text embeddings: ``{stem}_{arch}_te.safetensors``

Tensors keep musubi's ``<name>_<FxHxW>_<dtype>`` keys (e.g. ``latents_1x8x8_bfloat16``,
``mask_weights_1x8x8_float32``, ``text_embeds_bfloat16``): :func:`tensor_key` writes them and
:func:`item_tensor_keys` finds them, and nothing else spells them. The safetensors
``__metadata__`` (all strings) says what made the file:

- ``arch``: short architecture name (``wan``, ``qi``, ...); a cache directory holds one arch.
- ``source``: the source image or video path.
- ``mask_source``: ``alpha``, ``file``, ``default`` (the dataset's ``default_mask``) or ``none``
  (full weight, and text-embedding files).
- ``bucket``: ``WxH`` of the bucket the item was resized to, ``none`` for text embeddings.
- ``fingerprint``: :func:`fingerprint` of everything that shaped the tensors.
- ``format_version``: :data:`FORMAT_VERSION`; bumping it makes every older file stale.
- any other string keys (VAE name, mask counts, ...) are kept in :attr:`CacheMetadata.extra`.

A ``cache`` run compares a file's fingerprint with the one it would write: equal means the item is
skipped, different means it is rebuilt in place, so users never need a fresh ``cache_directory``.
Files are written through :mod:`masktrain.atomic` (a hidden temporary, flushed, renamed), so a run
killed at any moment leaves complete files or none, plus temporaries the next run deletes.

Text embeddings, one convention for every family: ``text_embeds_<dtype>`` is (tokens, dim), exactly
the sequence the denoiser reads for that caption (``ModelFamily.encode_text``). A family whose
pipeline drops the padding (WAN, Qwen-Image, Z-Image) stores the caption's tokens only, so lengths
vary and ``ModelFamily.collate_text`` pads a batch and masks the padding as its pipeline does; a
family whose pipeline feeds the padded sequence without a mask (FLUX.2: 512 tokens, padding
positions hold real encoder outputs) stores all of it, and its batches need no mask. Several hidden
layers of one encoder (FLUX.2 stacks three) are one sequence, wider. Files written before this
convention are already in it: WAN and Qwen-Image text caches stay valid.

Reading a header (metadata and tensor shapes) imports no torch; loading tensors does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import safetensors

from masktrain import atomic
from masktrain._native import list_images
from masktrain.errors import (
    CacheArchMismatch,
    CachedDataError,
    CacheFileError,
    CacheSourceCollision,
    DataError,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = "2"
"""2: files record what they were built from (``data/freshness.py``), so ``train`` can tell a
stale item; files of version 1 are rebuilt by the next ``cache`` run."""

#: Version of the preprocessing rules (resize, luma, latent pooling, frame extraction): part of
#: every item fingerprint.
RESIZE_RULES = "masktrain-core-1"

KEY_ARCH = "arch"
KEY_SOURCE = "source"
KEY_MASK_SOURCE = "mask_source"
KEY_BUCKET = "bucket"
KEY_FINGERPRINT = "fingerprint"
KEY_FORMAT_VERSION = "format_version"
REQUIRED_KEYS = (KEY_ARCH, KEY_SOURCE, KEY_MASK_SOURCE, KEY_BUCKET, KEY_FINGERPRINT, KEY_FORMAT_VERSION)

MaskSource = Literal["alpha", "file", "default", "none"]
MASK_SOURCES: tuple[MaskSource, ...] = ("alpha", "file", "default", "none")
CacheStatus = Literal["missing", "fresh", "stale"]

_StrPath = str | os.PathLike[str]

# --- tensor keys ----------------------------------------------------------------------------------

LATENTS = "latents"
MASK_WEIGHTS = "mask_weights"
TEXT_EMBEDS = "text_embeds"
IMAGE_LATENTS = "latents_image"
"""WAN image-to-video's conditioning input (4 mask + C latent channels; musubi's key name)."""
IMAGE_EMBEDS = "clip"
"""WAN 2.1 I2V / FLF2V: the CLIP hidden states of the given frames, (K, T, D) (musubi's name)."""
FRAME_INDICES = "f_indices"
"""WAN one-frame: each latent frame's RoPE frame position, (F,) int32 (musubi's name)."""
_GRID_KEY = re.compile(
    r"^(?P<name>latents_image|latents|mask_weights)_(?P<f>\d+)x(?P<h>\d+)x(?P<w>\d+)_(?P<dtype>\w+)$"
)
_PLAIN_KEY = re.compile(r"^(?P<name>clip|f_indices)_(?P<dtype>[a-z]+\d*)$")
CONTROL_LATENTS = "latents_control"
"""Qwen-Image-Edit: control image i's latents, ``latents_control_{i}_1xHxW_<dtype>`` (musubi's
key), each at its own size (:func:`control_key`)."""
_CONTROL_KEY = re.compile(r"^latents_control_(?P<index>\d+)_\d+x\d+x\d+_\w+$")
KEY_CONDITION = "condition"
"""Metadata key of the mode a latent file was made for (``catalog.condition_name``: the
``--task`` of a conditioned mode, ``none`` for none); ``train`` refuses a file of another mode."""
KEY_MASK_POOLING = "mask_pooling"
"""How the cache pooled mask pixels onto each latent cell (``cache --mask_pooling``): ``area``,
``max`` or ``nearest``; a file without it was pooled by ``area``."""


def tensor_key(name: str, dtype: torch.dtype, grid: tuple[int, int, int] | None = None) -> str:
    """``latents_FxHxW_<dtype>``, ``mask_weights_FxHxW_<dtype>`` (with the (F, H, W) `grid`) or
    ``text_embeds_<dtype>`` (without)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if grid is None:
        return f"{name}_{dtype_name}"
    frames, height, width = grid
    return f"{name}_{frames}x{height}x{width}_{dtype_name}"


@dataclass(frozen=True)
class ItemTensorKeys:
    """Where an item file keeps its tensors."""

    latents: str
    mask_weights: str | None
    """None when the item was cached without masking."""
    image_latents: str | None = None
    """WAN image-to-video's conditioning input; None without one."""
    image_embeds: str | None = None
    """The CLIP hidden states of the given frames; None without."""
    frame_indices: str | None = None
    """WAN one-frame's frame positions; None without."""
    control_latents: tuple[str, ...] = ()
    """Qwen-Image-Edit: the control images' latents, in control order; empty without."""


def control_key(index: int, dtype: torch.dtype, grid: tuple[int, int, int]) -> str:
    """``latents_control_{index}_FxHxW_<dtype>``: control image `index`'s latents."""
    return tensor_key(f"{CONTROL_LATENTS}_{index}", dtype, grid)


def item_tensor_keys(keys: Iterable[str], path: _StrPath) -> ItemTensorKeys:
    """The latents key (exactly one), and the mask-weights key and each conditioning key (at most
    one each) among `keys`; a :class:`CachedDataError` naming the file otherwise."""
    by_name: dict[str, list[str]] = {
        name: [] for name in (LATENTS, MASK_WEIGHTS, IMAGE_LATENTS, IMAGE_EMBEDS, FRAME_INDICES)
    }
    controls: dict[int, list[str]] = {}
    for key in keys:
        match = _GRID_KEY.match(key) or _PLAIN_KEY.match(key)
        if match:
            by_name[match["name"]].append(key)
        elif control := _CONTROL_KEY.match(key):
            controls.setdefault(int(control["index"]), []).append(key)
    latents, masks = by_name[LATENTS], by_name[MASK_WEIGHTS]
    if len(latents) != 1 or any(len(found) > 1 for found in by_name.values()):
        raise CachedDataError(
            f"{path}: expected one latents_* tensor and at most one mask_weights_* tensor, found "
            f"{len(latents)} and {len(masks)}; re-run masktrain cache"
        )

    if sorted(controls) != list(range(len(controls))) or any(len(found) > 1 for found in controls.values()):
        raise CachedDataError(
            f"{path}: its latents_control_* tensors are not numbered 0, 1, ... once each "
            f"({', '.join(sorted(k for found in controls.values() for k in found))}); re-run masktrain cache"
        )

    def one(name: str) -> str | None:
        return by_name[name][0] if by_name[name] else None

    return ItemTensorKeys(
        latents[0],
        one(MASK_WEIGHTS),
        one(IMAGE_LATENTS),
        one(IMAGE_EMBEDS),
        one(FRAME_INDICES),
        tuple(controls[index][0] for index in range(len(controls))),
    )


# --- file names -----------------------------------------------------------------------------------


def item_cache_name(
    stem: str, original_size: tuple[int, int], arch: str, frames: tuple[int, int] | None = None
) -> str:
    """File name of an item's latent cache; ``frames`` is ``(start, count)`` for a video clip."""
    width, height = original_size
    clip = "" if frames is None else f"_{frames[0]:05d}-{frames[1]:03d}"
    return f"{stem}{clip}_{width:04d}x{height:04d}_{arch}.safetensors"


CLIPS_KEY = "clips"
"""Metadata key of a video's clip files: every clip of the video, ``start-count,start-count``."""


def clip_list(spans: list[tuple[int, int]]) -> str:
    """The ``clips`` metadata value of a video's (start, count) spans."""
    return ",".join(f"{start}-{count}" for start, count in spans)


def clip_file_names(stem: str, metadata: CacheMetadata) -> set[str]:
    """The file names of every clip a clip file's metadata lists (empty when it lists none)."""
    try:
        width, height = (int(v) for v in metadata.extra["original_size"].split("x"))
        spans = [clip.split("-") for clip in metadata.extra[CLIPS_KEY].split(",")]
        return {item_cache_name(stem, (width, height), metadata.arch, (int(a), int(b))) for a, b in spans}
    except (KeyError, ValueError):
        return set()


def text_cache_name(stem: str, arch: str) -> str:
    return f"{stem}_{arch}_te.safetensors"


def _item_pattern(arch: str, clips: bool) -> re.Pattern[str]:
    clip = r"_\d{5,}-\d{3,}" if clips else ""
    # (?!\._): macOS's AppleDouble files ("._x_0064x0064_wan.safetensors") are never cache files.
    return re.compile(rf"^(?!\._)(?P<stem>.*){clip}_\d{{4,}}x\d{{4,}}_{re.escape(arch)}\.safetensors$")


def is_item_file(name: str, arch: str) -> bool:
    """Whether `name` is a latent cache file (an image's or a video clip's) of `arch`."""
    return _item_pattern(arch, clips=False).match(name) is not None


def existing_item_files(directory: Path, arch: str, clips: bool = False) -> dict[str, list[Path]]:
    """Latent cache files already in `directory`, by item stem: image files, or with `clips`
    the video clip files (``{stem}_{start}-{count}_{W}x{H}_{arch}``)."""
    pattern = _item_pattern(arch, clips)
    found: dict[str, list[Path]] = {}
    if directory.is_dir():
        for path in directory.iterdir():
            match = pattern.match(path.name)
            if match:
                found.setdefault(match["stem"], []).append(path)
    return found


def source_stat(path: Path | None) -> list[object] | None:
    """The fingerprint part of a source or mask file: path, size and ``st_mtime_ns``; for a
    directory of video frames, those of each frame image (editing a frame does not touch the
    directory's own mtime)."""
    if path is None:
        return None
    if path.is_dir():
        return [str(path), [source_stat(frame) for frame in list_images(path)]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(parts: Mapping[str, object]) -> str:
    """Short sha256 of the canonical JSON of ``parts``: equal inputs give equal fingerprints.

    Callers put in everything that shaped the tensors, so any change makes the file stale: the
    source's size and ``st_mtime_ns``; the mask file's path, size and ``st_mtime_ns`` (or None);
    the ``alpha_mask`` flag; the bucket; the resize rules' version; the VAE / text encoder identity
    (path or ``tiny``, dtype); and :data:`FORMAT_VERSION`. Values must be JSON types or paths;
    anything else is a TypeError rather than a ``repr`` that could change between runs.
    """

    def encode_path(value: object) -> str:
        if isinstance(value, os.PathLike):
            return os.fsdecode(value)
        raise TypeError(f"fingerprint part of type {type(value).__name__} is not JSON: {value!r}")

    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=encode_path)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CacheMetadata:
    arch: str
    """Short architecture name the tensors were made for."""
    source: str
    """Path of the source image or video."""
    mask_source: MaskSource
    """Where the mask weights came from."""
    bucket: tuple[int, int] | None
    """(width, height) the item was resized to; None for text embeddings."""
    fingerprint: str
    """:func:`fingerprint` of the inputs that shaped the tensors."""
    format_version: str = FORMAT_VERSION
    """Cache format version the file was written with."""
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Any other string metadata, kept as is."""

    def __post_init__(self) -> None:
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, not {self.mask_source!r}")
        clash = sorted(set(self.extra) & set(REQUIRED_KEYS))
        if clash:
            raise ValueError(f"extra metadata may not redefine {clash}")

    def to_dict(self) -> dict[str, str]:
        bucket = "none" if self.bucket is None else f"{self.bucket[0]}x{self.bucket[1]}"
        fields = {
            KEY_ARCH: self.arch,
            KEY_SOURCE: self.source,
            KEY_MASK_SOURCE: self.mask_source,
            KEY_BUCKET: bucket,
            KEY_FINGERPRINT: self.fingerprint,
            KEY_FORMAT_VERSION: self.format_version,
        }
        return {**self.extra, **fields}

    @classmethod
    def from_dict(cls, d: Mapping[str, str], path: _StrPath) -> CacheMetadata:
        """Parse a file's metadata; ``path`` names the file in errors."""
        missing = [key for key in REQUIRED_KEYS if key not in d]
        if missing:
            raise CacheFileError(
                f"{path}: cache metadata lacks the key '{missing[0]}' (not written by this masktrain "
                "version?); delete the file or use another cache_directory"
            )
        try:
            bucket = _parse_bucket(d[KEY_BUCKET])
            extra = {key: value for key, value in d.items() if key not in REQUIRED_KEYS}
            return cls(
                arch=d[KEY_ARCH],
                source=d[KEY_SOURCE],
                mask_source=d[KEY_MASK_SOURCE],  # type: ignore[arg-type]  # checked in __post_init__
                bucket=bucket,
                fingerprint=d[KEY_FINGERPRINT],
                format_version=d[KEY_FORMAT_VERSION],
                extra=extra,
            )
        except ValueError as error:
            raise CacheFileError(f"{path}: invalid cache metadata: {error}") from error


def _parse_bucket(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ValueError(f"bucket {text!r} is not 'WxH'")
    return int(width), int(height)


def write_cache_file(path: _StrPath, tensors: Mapping[str, torch.Tensor], metadata: CacheMetadata) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically: readers see the old file or the new."""
    import safetensors.torch
    import torch

    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    for name, tensor in cpu.items():  # a VAE in bf16 can overflow: never cache what would poison training
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{path}: {name} holds non-finite values (NaN or infinity); not written")
    atomic.write_bytes(path, safetensors.torch.save(cpu, metadata=metadata.to_dict()))


def _open(path: Path, framework: str = "numpy") -> safetensors.safe_open:
    """The file, opened for its header (``numpy``: no torch import) or for torch tensors (``pt``)."""
    try:
        return safetensors.safe_open(path, framework)
    except safetensors.SafetensorError as error:
        raise CacheFileError(
            f"{path}: not a readable cache file ({error}); delete it so the next cache run rebuilds it"
        ) from error
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as error:  # e.g. a directory in the file's place; its message lacks the name
        raise CacheFileError(f"{path}: cannot be read as a cache file: {error}") from error


def _metadata_of(handle: safetensors.safe_open, path: Path) -> CacheMetadata:
    raw: dict[str, str] | None = handle.metadata()  # type: ignore[no-untyped-call]
    if raw is None:
        raise CacheFileError(
            f"{path}: safetensors file without metadata, not a masktrain cache file; "
            "delete it or use another cache_directory"
        )
    return CacheMetadata.from_dict(raw, path)


def read_metadata(path: _StrPath) -> CacheMetadata | None:
    """The file's metadata, or None when there is no file."""
    path = Path(path)
    try:
        handle = _open(path)
    except FileNotFoundError:
        return None
    with handle:
        return _metadata_of(handle, path)


def read_header(path: _StrPath) -> tuple[CacheMetadata, dict[str, tuple[int, ...]]]:
    """The file's metadata and its tensors' shapes by name, without reading tensor data."""
    path = Path(path)
    with _open(path) as handle:
        metadata = _metadata_of(handle, path)
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return metadata, shapes


def cache_status(path: _StrPath, *, arch: str, fingerprint: str, source: str | None = None) -> CacheStatus:
    """Whether the file at ``path`` can be reused by a run for ``arch`` whose inputs hash to
    ``fingerprint``, for the item ``source`` (None: any).

    A file for another arch, or made for another item that still exists, is an error rather than
    "stale": it means two runs or datasets share a directory, and silently overwriting one with the
    other would break the first. A recorded source that no longer exists (the dataset folder was
    moved) just means stale.
    """
    metadata = read_metadata(path)
    if metadata is None:
        return "missing"
    if metadata.arch != arch:
        raise CacheArchMismatch(
            f"{path}: was made for arch '{metadata.arch}', not '{arch}'; use another cache_directory "
            "for this architecture, or delete the file"
        )
    if source is not None and metadata.source != source:
        if Path(metadata.source).exists():
            raise CacheSourceCollision(
                f"{path}: was made for {metadata.source}, not {source}; two datasets share this "
                "cache_directory: give each its own"
            )
        return "stale"
    if metadata.fingerprint != fingerprint or metadata.format_version != FORMAT_VERSION:
        return "stale"
    return "fresh"


def reusable(
    path: Path, *, arch: str, fingerprint: str, skip_existing: bool, source: str | None = None
) -> bool:
    """Whether a cache run can keep `path`. A file of another arch or of another existing item is
    refused by name (:class:`CacheArchMismatch`, :class:`CacheSourceCollision`); a damaged file
    of ours is rebuilt with a warning; with `skip_existing` off nothing is kept."""
    try:
        status = cache_status(path, arch=arch, fingerprint=fingerprint, source=source)
    except (CacheArchMismatch, CacheSourceCollision):
        raise
    except CacheFileError as error:
        log.warning("%s; rebuilding it", error)
        return False
    return status == "fresh" and skip_existing


def load_cache_file(path: _StrPath) -> tuple[dict[str, torch.Tensor], CacheMetadata]:
    """All tensors of a cache file (on the CPU) and its metadata."""
    path = Path(path)
    with _open(path, "pt") as handle:
        metadata = _metadata_of(handle, path)
        try:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except safetensors.SafetensorError as error:
            raise CacheFileError(f"{path}: cannot read tensors ({error}); delete it") from error
    return tensors, metadata
