"""Where each item's mask comes from, in one order for cache, train's freshness check and inspect.

Precedence, first that applies:

1. the image's alpha channel (``alpha_mask = true``, image datasets; decided by the native core,
   which sees the pixels);
2. the item's own ``mask_path`` from its JSONL record;
3. the file in ``mask_directory`` with the item's basename: for an image a still mask; for a video
   a still mask (one for every frame), a mask video in any container ``data.discovery`` lists, or a
   folder of mask frames ``NAME/00000.png, 00001.png, ...`` (``data.mask_frames``). Two of these for
   one basename is a :class:`DuplicateMaskError` naming both;
4. the dataset's ``default_mask`` (one still image, reported as mask source ``default``);
5. full weight, or the ``require_mask`` error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from masktrain import _native
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data.cache_format import MaskSource
from masktrain.data.discovery import VIDEO_EXTENSIONS, MediaItem
from masktrain.errors import DuplicateMaskError


class VideoMaskDirectory:
    """A video dataset's ``mask_directory``: still masks, mask videos and mask-frame folders by
    basename (listed once)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        by_stem: dict[str, list[Path]] = {}
        listed = [
            *_native.list_images(directory),
            *(
                entry
                for entry in directory.iterdir()
                if not entry.name.startswith(".")
                and (entry.is_dir() or (entry.suffix.lower() in VIDEO_EXTENSIONS and entry.is_file()))
            ),
        ]
        for path in sorted(listed):
            by_stem.setdefault(path.stem if path.is_file() else path.name, []).append(path)
        self._by_stem = by_stem

    def get(self, stem: str) -> Path | None:
        """The mask of `stem`; a :class:`DuplicateMaskError` naming both when two share it."""
        found = self._by_stem.get(stem, [])
        if len(found) > 1:
            raise DuplicateMaskError(
                f"duplicate mask basename '{stem}': {found[0]} and {found[1]}; keep one of them"
            )
        return found[0] if found else None


class MaskSources:
    """A dataset's mask sources: its directory index, the items' own paths and its default."""

    def __init__(self, dataset: ImageDatasetConfig | VideoDatasetConfig, items: Iterable[MediaItem]) -> None:
        self.dataset = dataset
        self.default = dataset.default_mask
        self.index: _native.MaskIndex | None = None
        self.video_index: VideoMaskDirectory | None = None
        if dataset.mask_directory is not None:
            if isinstance(dataset, ImageDatasetConfig):
                self.index = _native.MaskIndex(dataset.mask_directory)
            else:
                self.video_index = VideoMaskDirectory(dataset.mask_directory)
        self.any_own_path = any(item.mask_path is not None for item in items)

    @property
    def masking(self) -> bool:
        """Whether items carry mask weights at all (full weight for those without a mask)."""
        alpha = isinstance(self.dataset, ImageDatasetConfig) and self.dataset.alpha_mask
        return (
            alpha or self.dataset.mask_directory is not None or self.default is not None or self.any_own_path
        )

    @property
    def directory(self) -> Path | None:
        return self.dataset.mask_directory

    def directory_match(self, item: MediaItem) -> Path | None:
        """The item's file in ``mask_directory`` (None without a directory or a match)."""
        if self.index is not None:
            return self.index.get(item.stem)
        if self.video_index is not None:
            return self.video_index.get(item.stem)
        return None

    def resolve(self, item: MediaItem) -> tuple[Path | None, MaskSource]:
        """The item's mask file or folder and its mask source (``file``, ``default`` or ``none``):
        its ``mask_path``, else its directory match, else the default. Alpha, which only the pixels
        tell, is the native core's to decide for images."""
        own = item.mask_path or self.directory_match(item)
        if own is not None:
            return own, "file"
        if self.default is not None:
            return self.default, "default"
        return None, "none"
