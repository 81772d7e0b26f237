"""Control images (``control_directory``): the images a conditioned mode is given beside each item
(WAN one-frame's control frames, an I2V clip's start image, Qwen-Image-Edit's references), matched
to the items as musubi-tuner matches them (``dataset/datasources.py`` @ 30c658c):

- a control belongs to an item when its file name starts with the item's stem and ``.`` or ``_``
  (``walk.png``, ``walk_0.png``, ``walk_0001.jpg``); items with longer stems take theirs first, so
  ``walk_fast_0.png`` goes to ``walk_fast``, not to ``walk``;
- an item's controls are ordered by their number, the one without a number first
  (``walk.png``, ``walk_0.png``, ``walk_1.png``); a suffix that is not a number is an error naming
  the file.

Torch-free: ``train`` lists them to check each item's cache is fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from masktrain._native import list_images
from masktrain.errors import DataError


class ControlIndex:
    """The control images of a dataset's items, by item stem."""

    def __init__(self, directory: Path, stems: Iterable[str]) -> None:
        self.directory = directory
        pool = {path.name: path for path in list_images(directory)}
        self._by_stem: dict[str, list[Path]] = {}
        for stem in sorted(set(stems), key=len, reverse=True):
            matched = [name for name in pool if name.startswith((f"{stem}.", f"{stem}_"))]
            for name in matched:
                del pool[name]
            self._by_stem[stem] = sorted((directory / name for name in matched), key=_order(stem))

    def get(self, stem: str) -> list[Path]:
        """The item's control images in order (empty when it has none)."""
        return list(self._by_stem.get(stem, []))


def _order(stem: str) -> Callable[[Path], int]:
    def key(path: Path) -> int:
        name = path.stem
        if name == stem:
            return 0
        suffix = name.removeprefix(f"{stem}_")
        if not suffix.isdigit():
            raise DataError(
                f"{path}: a control image of '{stem}' is named {stem}.EXT or {stem}_N.EXT (N a number); "
                "rename it"
            )
        return int(suffix) + 1

    return key
