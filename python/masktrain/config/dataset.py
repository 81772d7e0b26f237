"""The dataset TOML: ``[general]`` plus ``[[datasets]]`` tables with musubi-tuner's keys, the mask
keys of the weighted-mask guide (``mask_directory``, ``alpha_mask``, ``require_mask``, plus
``default_mask`` and the JSONL ``mask_path``: ``data.mask_sources``) and the
sd-scripts bucket keys the guide's examples use (``min_bucket_reso``, ``max_bucket_reso``,
``bucket_reso_steps``).

Loading is strict, because a typo that silently does nothing ruins a training run: an unknown
key is an error naming the key, its table and the closest valid key. ``shuffle_caption`` and
``keep_tokens`` only warn: captions are encoded once into the cache, so they cannot apply.

Decisions where musubi is silent or differs:

- Relative paths are resolved against the TOML file's directory, not the working directory, so
  a config means the same thing wherever the command is run.
- ``caption_extension = "txt"`` means ``".txt"``.
- ``cache_directory`` defaults to the image or video directory and is required for JSONL
  sources; two datasets may not share one (their files would collide).
- ``resolution`` and bucket sizes must be multiples of 16 (the latent grid of WAN and
  Qwen-Image: 8x VAE times a 2x2 patch).
- As in musubi-tuner: ``target_frames`` are rounded down to 4N+1 (with a warning), sorted and
  deduplicated; ``frame_extraction = "uniform"`` with ``frame_sample = 1`` becomes ``head``;
  ``bucket_no_upscale`` without ``enable_bucket`` does nothing (a warning says so).
"""

from __future__ import annotations

import difflib
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from masktrain.errors import ConfigError

log = logging.getLogger(__name__)

BUCKET_STEP = 16
"""Bucket sides are multiples of this many pixels: the latent grid of WAN and Qwen-Image (an 8x
VAE times a 2x2 patch). ``bucket_reso_steps`` must be a multiple of it."""

# Bounds on every size that reaches an allocation, so a typo is an error naming the key rather
# than an attempt to allocate terabytes. 4096 x 4096 is within the decoder's pixel limit (a test
# keeps it so); 1025 frames (4 x 256 + 1) is eight times WAN's longest released clip.
MAX_SIDE = 4096
MAX_FRAMES = 1025
MAX_BATCH_SIZE = 1024
MAX_REPEATS = 100_000

FrameExtraction = Literal["head", "chunk", "slide", "uniform", "full"]
FRAME_EXTRACTIONS: tuple[str, ...] = ("head", "chunk", "slide", "uniform", "full")
DEFAULT_RESOLUTION = (960, 544)


@dataclass(frozen=True)
class BucketConfig:
    resolution: tuple[int, int]
    """(width, height); its area is the bucket area. An int in TOML means a square."""
    enable_bucket: bool = False
    """Group images by aspect ratio into equal-area buckets; off, every image uses `resolution`."""
    bucket_no_upscale: bool = False
    """Items whose area is at most `resolution`'s keep their own size rounded down to the bucket
    step instead of being enlarged (only with `enable_bucket`, as in musubi-tuner)."""
    min_bucket_reso: int | None = None
    """sd-scripts bucket generation: smallest bucket side."""
    max_bucket_reso: int | None = None
    """sd-scripts bucket generation: largest bucket side."""
    bucket_reso_steps: int | None = None
    """Bucket side step in pixels (default 16); a multiple of 16."""


@dataclass(frozen=True)
class _Common:
    cache_directory: Path
    """Where the cache files of this dataset go."""
    caption_extension: str
    """Extension of caption files, with its dot."""
    caption_directory: Path | None
    """Where captions are read from; None means beside the media."""
    batch_size: int
    """Items per batch (all of one bucket)."""
    num_repeats: int
    """How many times each item appears per epoch."""
    buckets: BucketConfig
    mask_directory: Path | None
    """Mask files matched to media by basename (for a video also a mask video, or a folder of mask
    frames ``NAME/00000.png, ...``)."""
    default_mask: Path | None
    """One still mask for every item with no mask of its own (its aspect must match the item's)."""
    require_mask: bool
    """Fail caching for an item with no mask instead of giving it full weight."""
    control_directory: Path | None
    """Control images matched to media by basename, musubi-tuner's naming (``NAME.png``, or
    ``NAME_0.png``, ``NAME_1.png``, ... for several): the conditioned modes' given images."""


@dataclass(frozen=True)
class ImageDatasetConfig(_Common):
    image_directory: Path | None
    """Images to train on (exclusive with `image_jsonl_file`)."""
    image_jsonl_file: Path | None
    """JSON lines with `image_path` and `caption` (exclusive with `image_directory`)."""
    alpha_mask: bool
    """Take the mask from the image's alpha channel when it has one."""
    fp_1f_clean_indices: tuple[int, ...] = ()
    """WAN one-frame: the frame position of each control image, in control order."""
    fp_1f_target_index: int | None = None
    """WAN one-frame: the target image's frame position."""
    control_resolution: tuple[int, int] | None = None
    """Qwen-Image-Edit: each control image is resized to this area, its aspect kept (musubi-tuner's
    key); None: 1024x1024, the area the edit pipelines encode each control at."""
    no_resize_control: bool = False
    """Qwen-Image-Edit: each control image keeps its own size, its sides rounded down to multiples
    of 16 (with ``control_resolution``: only those larger than its area are resized)."""
    multiple_target: bool = False
    """Qwen-Image-Layered (musubi-tuner's key): each captioned image ``NAME`` is the base of an item
    whose RGBA layers are the images ``NAME_0``, ``NAME_1``, ... beside it (``data.layers``)."""


@dataclass(frozen=True)
class VideoDatasetConfig(_Common):
    video_directory: Path | None
    """Videos to train on (exclusive with `video_jsonl_file`)."""
    video_jsonl_file: Path | None
    """JSON lines with `video_path` and `caption` (exclusive with `video_directory`)."""
    target_frames: tuple[int, ...]
    """Clip lengths in frames, each 4N+1 (rounded down), sorted, without repeats."""
    frame_extraction: FrameExtraction
    """How clips are cut from a video: head, chunk, slide, uniform or full (`uniform` with
    `frame_sample = 1` becomes `head`, as in musubi-tuner)."""
    frame_stride: int
    """`slide`: frames between clip starts."""
    frame_sample: int
    """`uniform`: number of clips, evenly spaced."""
    max_frames: int
    """`full`: the longest clip."""
    source_fps: float | None
    """The videos' frame rate; frames are dropped to the model's rate when set."""


@dataclass(frozen=True)
class DatasetConfig:
    source: Path
    """The TOML file this was loaded from."""
    datasets: tuple[ImageDatasetConfig | VideoDatasetConfig, ...]


# Keys valid in [general] and, overriding it, in each [[datasets]] table.
_ASCENDABLE = {
    "caption_extension",
    "batch_size",
    "num_repeats",
    "resolution",
    "enable_bucket",
    "bucket_no_upscale",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
}
_COMMON = {
    "cache_directory",
    "caption_directory",
    "mask_directory",
    "default_mask",
    "require_mask",
    "control_directory",
}
_IMAGE = {
    "image_directory",
    "image_jsonl_file",
    "alpha_mask",
    "fp_1f_clean_indices",
    "fp_1f_target_index",
    "fp_1f_no_post",
    "control_resolution",
    "no_resize_control",
    "multiple_target",
}
_VIDEO = {
    "video_directory",
    "video_jsonl_file",
    "target_frames",
    "frame_extraction",
    "frame_stride",
    "frame_sample",
    "max_frames",
    "source_fps",
}
# Keys that do nothing once captions are encoded into the cache: accepted with a warning.
_IGNORED = {"shuffle_caption", "keep_tokens"}
_WHY_IMAGE_ONLY = {
    "alpha_mask": "videos have no alpha channel; give videos masks with mask_directory (a still mask, "
    "a mask video or a folder of mask frames, matched by basename)",
}
# Other trainers' mask keys (AkaneTendo25's musubi-tuner fork): an error naming masktrain's, rather
# than a key that silently does nothing.
OTHER_TRAINERS_KEYS = {
    "loss_mask_directory": "mask_directory",
    "default_loss_mask_path": "default_mask",
    "loss_mask_path": "mask_path (per item, in the image_jsonl_file / video_jsonl_file records)",
    "image_loss_mask_path": "mask_path (per item, in the image_jsonl_file records)",
    "video_loss_mask_path": "mask_path (per item, in the video_jsonl_file records)",
    "loss_mask_invert": "nothing: invert the masks themselves (white = full loss)",
}


class _Table:
    """One TOML table being read: typed getters that name the file and table in every error."""

    def __init__(self, values: Mapping[str, Any], where: str, base: Path) -> None:
        self.values, self.where, self.base = dict(values), where, base

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: '{key}' {message}")

    def check_keys(self, valid: set[str]) -> None:
        for key in self.values:
            if key in OTHER_TRAINERS_KEYS:
                raise self.error(key, f"is another trainer's key; masktrain's is {OTHER_TRAINERS_KEYS[key]}")
            if key in _IGNORED:
                log.warning("%s: '%s' is ignored: captions are encoded once into the cache", self.where, key)
            elif key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
                hint = (
                    f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
                )
                raise self.error(key, f"is not a known key{hint}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def integer(
        self, key: str, default: int | None, minimum: int = 1, maximum: int | None = None
    ) -> int | None:
        value = self.values.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, not {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be an integer <= {maximum}, not {value!r}")
        return value

    def path(self, key: str) -> Path | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a path string, not {value!r}")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of a user this machine does not have, or no home folder
            home = value.split("/")[0]
            raise self.error(
                key, f"{value}: {home} names no home folder on this machine; write the full path"
            ) from None
        return path if path.is_absolute() else self.base / path


def _merge(general: Mapping[str, Any], dataset: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in general.items() if k in _ASCENDABLE}
    merged.update(dataset)
    return merged


def _resolution(table: _Table) -> tuple[int, int]:
    value = table.get("resolution", list(DEFAULT_RESOLUTION))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise table.error("resolution", f"must be [width, height] or one integer, not {value!r}")
    width, height = value
    if width > MAX_SIDE or height > MAX_SIDE:
        raise table.error("resolution", f"{width}x{height} must be at most {MAX_SIDE} on each side")
    if width % BUCKET_STEP or height % BUCKET_STEP:
        raise table.error("resolution", f"{width}x{height} must be a multiple of {BUCKET_STEP} on both sides")
    return width, height


def _buckets(table: _Table) -> BucketConfig:
    steps = table.integer("bucket_reso_steps", None, BUCKET_STEP, MAX_SIDE)
    if steps is not None and steps % BUCKET_STEP:
        raise table.error("bucket_reso_steps", f"must be a multiple of {BUCKET_STEP}, not {steps}")
    low = table.integer("min_bucket_reso", None, BUCKET_STEP, MAX_SIDE)
    high = table.integer("max_bucket_reso", None, BUCKET_STEP, MAX_SIDE)
    if low is not None and high is not None and low > high:
        raise table.error("min_bucket_reso", f"({low}) must not exceed max_bucket_reso ({high})")
    enable = table.boolean("enable_bucket", False)
    no_upscale = table.boolean("bucket_no_upscale", False)
    if no_upscale and not enable:
        # musubi-tuner turns it off the same way: without buckets every item takes `resolution`.
        log.warning("%s: 'bucket_no_upscale' has no effect without enable_bucket = true", table.where)
        no_upscale = False
    return BucketConfig(
        resolution=_resolution(table),
        enable_bucket=enable,
        bucket_no_upscale=no_upscale,
        min_bucket_reso=low,
        max_bucket_reso=high,
        bucket_reso_steps=steps,
    )


def _caption_extension(table: _Table) -> str:
    value = table.get("caption_extension", ".txt")
    if not isinstance(value, str) or not value:
        raise table.error("caption_extension", f"must be a non-empty string such as '.txt', not {value!r}")
    return normalize_caption_extension(value)


def normalize_caption_extension(extension: str) -> str:
    """``"txt"`` means ``".txt"``: the guide always writes the dot, users sometimes do not."""
    return extension if not extension or extension.startswith(".") else "." + extension


def _source(table: _Table, directory_key: str, jsonl_key: str) -> tuple[Path | None, Path | None]:
    directory, jsonl = table.path(directory_key), table.path(jsonl_key)
    if (directory is None) == (jsonl is None):
        raise ConfigError(f"{table.where}: set exactly one of '{directory_key}' and '{jsonl_key}'")
    return directory, jsonl


def _common(table: _Table, media: Path | None, jsonl_key: str) -> dict[str, Any]:
    cache = table.path("cache_directory") or media
    if cache is None:
        raise ConfigError(f"{table.where}: 'cache_directory' is required with '{jsonl_key}'")
    return {
        "cache_directory": cache,
        "caption_extension": _caption_extension(table),
        "caption_directory": table.path("caption_directory"),
        "batch_size": table.integer("batch_size", 1, 1, MAX_BATCH_SIZE),
        "num_repeats": table.integer("num_repeats", 1, 1, MAX_REPEATS),
        "buckets": _buckets(table),
        "mask_directory": table.path("mask_directory"),
        "default_mask": table.path("default_mask"),
        "require_mask": table.boolean("require_mask", False),
        "control_directory": table.path("control_directory"),
    }


def _check_mask_keys(
    table: _Table, config: ImageDatasetConfig | VideoDatasetConfig, media: Path | None
) -> None:
    """A mask directory that is the media directory, and ``require_mask`` without any mask source."""
    kind = "image" if isinstance(config, ImageDatasetConfig) else "video"
    if media is not None and config.mask_directory is not None and _same(media, config.mask_directory):
        raise table.error(
            "mask_directory",
            f"is the {kind}_directory: every {kind} would be its own mask; point it at the folder of masks",
        )
    if config.default_mask is not None and config.default_mask.is_dir():
        raise table.error("default_mask", f"{config.default_mask} is a folder; give one still mask image")
    jsonl = config.image_jsonl_file if isinstance(config, ImageDatasetConfig) else config.video_jsonl_file
    alpha = isinstance(config, ImageDatasetConfig) and config.alpha_mask
    if config.require_mask and not alpha and config.mask_directory is None and jsonl is None:
        raise ConfigError(
            f"{table.where}: require_mask=true but no mask source configured. "
            + (
                "Set alpha_mask=true and/or mask_directory in your dataset config."
                if kind == "image"
                else "Set mask_directory in your dataset config."
            )
        )


def _image_dataset(table: _Table) -> ImageDatasetConfig:
    table.check_keys(_ASCENDABLE | _COMMON | _IMAGE)
    directory, jsonl = _source(table, "image_directory", "image_jsonl_file")
    config = ImageDatasetConfig(
        **_common(table, directory, "image_jsonl_file"),
        image_directory=directory,
        image_jsonl_file=jsonl,
        alpha_mask=table.boolean("alpha_mask", False),
        **_one_frame(table),
        **_control_size(table),
        multiple_target=table.boolean("multiple_target", False),
    )
    if config.multiple_target and jsonl is not None:
        raise table.error(
            "multiple_target",
            "reads the layers beside each image of image_directory (NAME_0.png, NAME_1.png, ...); "
            "image_jsonl_file is not supported with it: use image_directory",
        )
    _check_mask_keys(table, config, directory)
    return config


def _one_frame(table: _Table) -> dict[str, Any]:
    """musubi-tuner's one-frame keys: the controls' frame positions (a list of distinct integers
    >= 0) and the target's (an integer >= 0, none of the controls'). ``fp_1f_no_post`` is
    FramePack's and does nothing for WAN: accepted, as musubi accepts it."""
    indices = table.get("fp_1f_clean_indices", [])
    if not isinstance(indices, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices
    ):
        raise table.error("fp_1f_clean_indices", f"must be a list of integers >= 0, not {indices!r}")
    if len(set(indices)) != len(indices):
        raise table.error("fp_1f_clean_indices", f"repeats a frame position: {indices}")
    if indices != sorted(indices):  # musubi puts control k at the k-th smallest position, whatever the order
        raise table.error(
            "fp_1f_clean_indices",
            f"must be increasing (control image k takes the k-th position), not {indices}",
        )
    target = table.integer("fp_1f_target_index", None, minimum=0)
    if target is not None and target in indices:
        raise table.error(
            "fp_1f_target_index", f"{target} is also a control's position in fp_1f_clean_indices"
        )
    table.boolean("fp_1f_no_post", False)
    return {"fp_1f_clean_indices": tuple(indices), "fp_1f_target_index": target}


def _control_size(table: _Table) -> dict[str, Any]:
    """musubi-tuner's Qwen-Image-Edit control size keys: ``control_resolution`` (one integer or
    [width, height], an area) and ``no_resize_control``."""
    value = table.get("control_resolution")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if value is not None and (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in value)
    ):
        raise table.error(
            "control_resolution", f"must be [width, height] or one integer in [1, {MAX_SIDE}], not {value!r}"
        )
    return {
        "control_resolution": None if value is None else (value[0], value[1]),
        "no_resize_control": table.boolean("no_resize_control", False),
    }


def _target_frames(table: _Table) -> tuple[int, ...]:
    value = table.get("target_frames", [1])
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise table.error("target_frames", f"must be a list of positive integers, not {value!r}")
    if max(value) > MAX_FRAMES:
        raise table.error("target_frames", f"must be a list of integers in [1, {MAX_FRAMES}], not {value!r}")
    frames = set()
    for count in value:
        rounded = (count - 1) // 4 * 4 + 1
        if rounded != count:
            log.warning(
                "%s: target_frames %d rounded down to %d (frame counts are 4N+1)", table.where, count, rounded
            )
        frames.add(rounded)
    return tuple(sorted(frames))


def _video_dataset(table: _Table) -> VideoDatasetConfig:
    for key, why in _WHY_IMAGE_ONLY.items():
        if key in table.values:
            raise table.error(key, f"cannot be used in a video dataset: {why}")
    table.check_keys(_ASCENDABLE | _COMMON | _VIDEO)
    directory, jsonl = _source(table, "video_directory", "video_jsonl_file")
    extraction = table.get("frame_extraction", "head")
    if extraction not in FRAME_EXTRACTIONS:
        raise table.error(
            "frame_extraction", f"must be one of {', '.join(FRAME_EXTRACTIONS)}, not {extraction!r}"
        )
    fps = table.get("source_fps")
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf
    ):
        raise table.error("source_fps", f"must be a positive number, not {fps!r}")
    sample = table.integer("frame_sample", 1, 1, MAX_FRAMES)
    if extraction == "uniform" and sample == 1:
        log.warning(
            '%s: frame_extraction = "uniform" with frame_sample = 1 is "head" (one clip from the '
            "start); set frame_sample to the number of clips you want",
            table.where,
        )
        extraction = "head"
    config = VideoDatasetConfig(
        **_common(table, directory, "video_jsonl_file"),
        video_directory=directory,
        video_jsonl_file=jsonl,
        target_frames=_target_frames(table),
        frame_extraction=extraction,
        frame_stride=table.integer("frame_stride", 1, 1, MAX_FRAMES) or 1,
        frame_sample=sample or 1,
        max_frames=table.integer("max_frames", 129, 1, MAX_FRAMES) or 129,
        source_fps=float(fps) if fps is not None else None,
    )
    _check_mask_keys(table, config, directory)
    return config


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def read_utf8(path: Path, fix: str) -> str:
    """The text of `path`; a file that is not UTF-8 is a :class:`ConfigError` naming it and saying
    how to `fix` it (OSError for a file that cannot be read)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); {fix}"
        ) from None


def load_dataset_config(path: Path) -> DatasetConfig:
    """Read and validate a dataset TOML. Raises ConfigError (or OSError for an unreadable file)."""
    try:
        document = tomllib.loads(read_utf8(path, "save it as UTF-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    base = path.resolve().parent
    for key in document:
        if key in _ASCENDABLE | _COMMON | _IMAGE | _VIDEO:
            raise ConfigError(f"{path}: '{key}' must be inside a [[datasets]] (or [general]) table")
        if key not in ("general", "datasets"):
            close = difflib.get_close_matches(key, ["general", "datasets"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown top-level table or key '{key}'{hint}")
    general = document.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError(f"{path}: [general] must be a table")
    general_table = _Table(general, f"{path}: [general]", base)
    for key in general:
        if key in _COMMON | _IMAGE | _VIDEO:
            raise general_table.error(key, "belongs in a [[datasets]] table, not in [general]")
    general_table.check_keys(_ASCENDABLE)
    tables = document.get("datasets", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(
            f"{path}: no [[datasets]] table; add at least one with image_directory or video_directory"
        )

    datasets: list[ImageDatasetConfig | VideoDatasetConfig] = []
    for number, raw in enumerate(tables, start=1):
        table = _Table(_merge(general, raw), f"{path}: [[datasets]] #{number}", base)
        is_video = "video_directory" in raw or "video_jsonl_file" in raw
        datasets.append(_video_dataset(table) if is_video else _image_dataset(table))

    seen: dict[Path, int] = {}
    for number, dataset in enumerate(datasets, start=1):
        cache = dataset.cache_directory.resolve()
        if cache in seen:
            raise ConfigError(
                f"{path}: [[datasets]] #{seen[cache]} and #{number} share cache_directory "
                f"{dataset.cache_directory}; give each dataset its own"
            )
        seen[cache] = number
    return DatasetConfig(source=path, datasets=tuple(datasets))
