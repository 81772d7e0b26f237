"""Discovery: the items of a dataset (media path, caption, cache stem), its bucket list and the
bucket each item takes.

Captions are ``{stem}{caption_extension}`` in ``caption_directory`` (default: beside the image or
video), stripped; an item without one trains with an empty caption and is counted in a warning.
JSONL sources hold ``{"image_path": ..., "caption": ...}`` (``"video_path"`` for videos) per
line, and optionally the item's own ``"mask_path"`` (``data.mask_sources``), relative paths resolved
against the JSONL file's directory; another trainer's mask key (``loss_mask_path``) is an error
naming ``mask_path``. Two items with one stem would
write one cache file, so both fail. An item whose path is not valid UTF-8 (Linux allows any bytes
in a name: an archive unpacked from Windows holds Latin-1 names) fails too: masks, cache files
and their metadata are keyed by the name as text. With ``multiple_target`` (Qwen-Image-Layered)
the items are the captioned images, each with its layer images (``data.layers``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from masktrain import _native
from masktrain.config.dataset import (
    BUCKET_STEP,
    BucketConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    read_utf8,
)
from masktrain.data import layers
from masktrain.data.buckets import Bucket, musubi_buckets, no_upscale_bucket, sd_scripts_buckets
from masktrain.errors import ConfigError

log = logging.getLogger(__name__)


#: Video containers listed from a ``video_directory`` (musubi-tuner's list, any case).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class MediaItem:
    """An image, or a video (a file, or from JSONL a directory of frame images)."""

    path: Path
    caption: str
    layers: tuple[Path, ...] = ()
    """Qwen-Image-Layered (``multiple_target``): its layer images, in layer order (``data.layers``)."""
    mask_path: Path | None = None
    """Its own mask from a JSONL record's ``mask_path`` (a still, a mask video or a frame folder)."""

    @property
    def stem(self) -> str:
        return self.path.stem


ImageItem = MediaItem
VideoItem = MediaItem


@dataclass
class Discovery:
    items: list[MediaItem]
    failed: list[tuple[Path, str]]
    missing_captions: int


def bucket_step(config: BucketConfig, family_step: int = BUCKET_STEP) -> int:
    """The bucket side step: ``bucket_reso_steps``, else the family's (``ArchSpec.bucket_step``:
    16, or 32 for Qwen-Image 2.1); a step or a fixed resolution that is not a multiple of the
    family's is a :class:`ConfigError`."""
    step = config.bucket_reso_steps or family_step
    if step % family_step:
        raise ConfigError(
            f"bucket_reso_steps = {step}: this model needs bucket sides that are multiples of "
            f"{family_step}; set bucket_reso_steps to a multiple of {family_step}"
        )
    if not config.enable_bucket and any(side % family_step for side in config.resolution):
        width, height = config.resolution
        raise ConfigError(
            f"resolution {width}x{height}: this model needs sides that are multiples of {family_step}"
        )
    return step


def bucket_list(config: BucketConfig, family_step: int = BUCKET_STEP) -> list[Bucket]:
    """The buckets a dataset's images choose from: `resolution` alone when bucketing is off;
    musubi's generator when no sd-scripts key is set; sd-scripts' otherwise, a missing
    `min_bucket_reso` meaning half the square side and a missing `max_bucket_reso` twice it. Sides
    are multiples of :func:`bucket_step`."""
    step = bucket_step(config, family_step)
    if not config.enable_bucket:
        return [config.resolution]
    if config.min_bucket_reso is None and config.max_bucket_reso is None and config.bucket_reso_steps is None:
        return musubi_buckets(config.resolution, step)
    side = int(max(config.resolution))
    low = config.min_bucket_reso or max(step, side // 2 // step * step)
    high = config.max_bucket_reso or side * 2
    return sd_scripts_buckets(config.resolution, low, high, step)


def own_size_bucket(size: Bucket, config: BucketConfig, family_step: int = BUCKET_STEP) -> Bucket | None:
    """``bucket_no_upscale``: an item whose area is at most the resolution's keeps its own size
    rounded down to the bucket step (musubi's ``BucketSelector``); None means the item takes the
    normal choice from the bucket list."""
    area = config.resolution[0] * config.resolution[1]
    if not config.bucket_no_upscale or size[0] * size[1] > area:
        return None
    return no_upscale_bucket(size, config.resolution, bucket_step(config, family_step))


def choose_bucket(
    size: Bucket, config: BucketConfig, buckets: list[Bucket], family_step: int = BUCKET_STEP
) -> Bucket:
    """The bucket an item of (width, height) `size` is resized to."""
    return own_size_bucket(size, config, family_step) or _native.choose_bucket(size[0], size[1], buckets)


def _read_caption(path: Path) -> str | None:
    fix = f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 '{path}' > caption.utf8, then replace it)"
    try:
        return read_utf8(path, fix).strip()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the caption file ({error.strerror})") from None


def list_videos(directory: Path) -> list[Path]:
    """Video files directly inside `directory`, sorted (extensions matched in any case; macOS's
    ``._`` AppleDouble files left out, as the native core leaves them out of image listings)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: video_directory not found (or not a directory)")
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("._") and p.is_file()
    )


def _with_captions(
    paths: list[Path], media_dir: Path, dataset: ImageDatasetConfig | VideoDatasetConfig
) -> list[tuple[Path, str | None]]:
    caption_dir = dataset.caption_directory or media_dir
    return [(path, _read_caption(caption_dir / f"{path.stem}{dataset.caption_extension}")) for path in paths]


#: Other trainers' per-item mask keys in a JSONL record: an error naming ``mask_path``.
OTHER_MASK_KEYS = ("loss_mask_path", "image_loss_mask_path", "video_loss_mask_path")
MASK_KEY = "mask_path"


def _record_path(path: Path, number: int, key: str, value: str) -> Path:
    """A record's path `value` under `key`, resolved against the JSONL file's folder."""
    try:
        resolved = Path(value).expanduser()
    except RuntimeError:  # ~user of a user this machine does not have, or no home folder
        raise ConfigError(
            f"{path}:{number}: '{key}' {value}: {value.split('/')[0]} names no home folder on this "
            "machine; write the full path"
        ) from None
    return resolved if resolved.is_absolute() else path.parent / resolved


def _from_jsonl(path: Path, key: str) -> tuple[list[tuple[Path, str | None]], dict[Path, Path]]:
    """The (media, caption) entries of a JSONL file, and each item's own ``mask_path``."""
    entries, masks = [], {}
    for number, line in enumerate(read_utf8(path, "save it as UTF-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            media = record.get(key, record.get(f"{key}_0"))
            if not isinstance(media, str):
                raise ValueError(f"no '{key}'")
        except (ValueError, AttributeError) as error:
            raise ConfigError(f"{path}:{number}: not a record with '{key}' ({error})") from error
        for other in OTHER_MASK_KEYS:
            if other in record:
                raise ConfigError(
                    f"{path}:{number}: '{other}' is another trainer's key; masktrain's is '{MASK_KEY}'"
                )
        media_path = _record_path(path, number, key, media)
        mask = record.get(MASK_KEY)
        if mask is not None:
            if not isinstance(mask, str) or not mask:
                raise ConfigError(f"{path}:{number}: '{MASK_KEY}' must be a path string, not {mask!r}")
            masks[media_path] = _record_path(path, number, MASK_KEY, mask)
        entries.append((media_path, record.get("caption")))
    return entries, masks


def _not_utf8(path: Path) -> str | None:
    """Why `path` cannot be an item (its name, or a folder's above it, is not valid UTF-8), or None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes of the bytes that are not UTF-8
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            return "the file name is not valid UTF-8; rename it"
        return "the name of a folder above it is not valid UTF-8; rename that folder"
    return None


def _discovery(
    entries: list[tuple[Path, str | None]],
    kind: str,
    caption_extension: str,
    masks: dict[Path, Path] | None = None,
) -> Discovery:
    stems = Counter(path.stem for path, _ in entries)
    masks = masks or {}
    items, failed = [], []
    for path, caption in entries:
        mask = masks.get(path)
        if (problem := _not_utf8(path)) is not None:
            failed.append((path, problem))
        elif stems[path.stem] > 1:
            reason = f"another {kind} has the same basename '{path.stem}'; their cache files would collide"
            failed.append((path, f"{reason}, rename one"))
        elif mask is not None and not mask.exists():
            failed.append(
                (path, f"its mask_path {mask} does not exist; fix the JSONL record or remove the key")
            )
        else:
            items.append(MediaItem(path, caption or "", mask_path=mask))
    missing = sum(1 for _, caption in entries if caption is None)
    if missing:
        log.warning(
            "%d %ss have no caption file (%s); they train with an empty caption",
            missing,
            kind,
            caption_extension,
        )
    return Discovery(items=items, failed=failed, missing_captions=missing)


def discover_images(dataset: ImageDatasetConfig) -> Discovery:
    if dataset.image_directory is not None:
        paths = _native.list_images(dataset.image_directory)
        entries = _with_captions(paths, dataset.image_directory, dataset)
        masks: dict[Path, Path] = {}
    else:
        assert dataset.image_jsonl_file is not None
        entries, masks = _from_jsonl(dataset.image_jsonl_file, "image_path")
    if dataset.multiple_target:  # Qwen-Image-Layered: the captioned images, each with its layers
        split = layers.split_layers(entries)
        found = _discovery(split.bases, "image", dataset.caption_extension)
        items = [replace(item, layers=split.layers[item.path]) for item in found.items]
        return Discovery(items, [*found.failed, *split.failed], found.missing_captions)
    return _discovery(entries, "image", dataset.caption_extension, masks)


def discover_videos(dataset: VideoDatasetConfig) -> Discovery:
    if dataset.video_directory is not None:
        paths = list_videos(dataset.video_directory)
        entries = _with_captions(paths, dataset.video_directory, dataset)
        masks: dict[Path, Path] = {}
    else:
        assert dataset.video_jsonl_file is not None
        entries, masks = _from_jsonl(dataset.video_jsonl_file, "video_path")
    return _discovery(entries, "video", dataset.caption_extension, masks)


def discover(dataset: ImageDatasetConfig | VideoDatasetConfig) -> Discovery:
    """The items of an image or a video dataset."""
    return discover_images(dataset) if isinstance(dataset, ImageDatasetConfig) else discover_videos(dataset)
