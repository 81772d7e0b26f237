"""Discovery: the items of a dataset (media path, caption, cache stem) and its bucket list.

Captions are ``{stem}{caption_extension}`` in ``caption_directory`` (default: beside the image),
stripped; an image without one trains with an empty caption and is counted in a warning. JSONL
sources hold ``{"image_path": ..., "caption": ...}`` per line, relative paths resolved against
the JSONL file's directory. Two items with one stem would write one cache file, so both fail.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from masktrain import _native
from masktrain.config.dataset import BucketConfig, ConfigError, ImageDatasetConfig
from masktrain.data.buckets import DEFAULT_STEP, Bucket, musubi_buckets, sd_scripts_buckets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclass
class Discovery:
    items: list[ImageItem]
    failed: list[tuple[Path, str]]
    missing_captions: int


def bucket_list(config: BucketConfig) -> list[Bucket]:
    """The buckets a dataset's images choose from: `resolution` alone when bucketing is off;
    musubi's generator when no sd-scripts key is set; sd-scripts' otherwise, a missing
    `min_bucket_reso` meaning half the square side and a missing `max_bucket_reso` twice it."""
    if not config.enable_bucket:
        return [config.resolution]
    step = config.bucket_reso_steps or DEFAULT_STEP
    if config.min_bucket_reso is None and config.max_bucket_reso is None and config.bucket_reso_steps is None:
        return musubi_buckets(config.resolution, step)
    side = int(max(config.resolution))
    low = config.min_bucket_reso or max(step, side // 2 // step * step)
    high = config.max_bucket_reso or side * 2
    return sd_scripts_buckets(config.resolution, low, high, step)


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _from_directory(dataset: ImageDatasetConfig) -> list[tuple[Path, str | None]]:
    assert dataset.image_directory is not None
    caption_dir = dataset.caption_directory or dataset.image_directory
    return [
        (path, _read_caption(caption_dir / f"{path.stem}{dataset.caption_extension}"))
        for path in _native.list_images(dataset.image_directory)
    ]


def _from_jsonl(path: Path) -> list[tuple[Path, str | None]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = record.get("image_path", record.get("image_path_0"))
            if not isinstance(image, str):
                raise ValueError("no 'image_path'")
        except (ValueError, AttributeError) as error:
            raise ConfigError(f"{path}:{number}: not an image record ({error})") from error
        image_path = Path(image).expanduser()
        caption = record.get("caption")
        entries.append((image_path if image_path.is_absolute() else path.parent / image_path, caption))
    return entries


def discover_images(dataset: ImageDatasetConfig) -> Discovery:
    entries = _from_directory(dataset) if dataset.image_directory else _from_jsonl(dataset.image_jsonl_file)
    stems = Counter(path.stem for path, _ in entries)
    items, failed = [], []
    for path, caption in entries:
        if stems[path.stem] > 1:
            failed.append((path, f"another image has the same basename '{path.stem}'; their cache files "
                                 "would collide, rename one"))  # fmt: skip
        else:
            items.append(ImageItem(path, caption or ""))
    missing = sum(1 for _, caption in entries if caption is None)
    if missing:
        log.warning("%d images have no caption file (%s); they train with an empty caption",
                    missing, dataset.caption_extension)  # fmt: skip
    return Discovery(items=items, failed=failed, missing_captions=missing)
