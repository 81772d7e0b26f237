"""Qwen-Image-Layered datasets (``multiple_target = true``), laid out as musubi-tuner lays them out
(``dataset/datasources.py`` @ 30c658c): in the image directory, each image with a caption file
(``NAME.png`` + ``NAME.txt``) is an item, the image to decompose (the base), and every image
without a caption named ``NAME_<n>`` is one of its RGBA layers, in the order of n. Longer names
claim first, so ``cat_1_0.png`` is a layer of a captioned ``cat_1.png``, not of ``cat.png``.

Where masktrain is stricter than musubi, so that a misnamed file is named rather than trained on
silently: the part after ``NAME_`` must be a number (musubi reads only the part after the last
``_``), two layers of one number are an error, an image with no caption that is no item's layer
fails (musubi ignores it), and so does an item without layers (musubi fails at the first step).
Every item has the same number of layers, as musubi requires.

Masks: ``mask_directory/NAME.png`` is one mask for every image of the item, or the folder
``mask_directory/NAME/`` holds one mask per image, frame i for image i (the base first), in
name order (``00000.png``, ``00001.png``, ...): :func:`mask_frames`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from masktrain import _native
from masktrain.data import cache_format as fmt
from masktrain.errors import ConfigError


@dataclass
class LayeredEntries:
    """A layered image directory, split: the items (the captioned images) and their layers."""

    bases: list[tuple[Path, str | None]] = field(default_factory=list)
    """(image, caption) of each item, in listing order."""
    layers: dict[Path, tuple[Path, ...]] = field(default_factory=dict)
    """Each item's layer images, in layer order."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """Images that are no item and no layer, and items without layers, with why."""


def split_layers(entries: list[tuple[Path, str | None]]) -> LayeredEntries:
    """The items of a layered directory listing (image, caption or None), each with its layers
    (see the module docstring); a misnamed layer or an item whose layer count differs from the
    others' is a :class:`ConfigError` naming the file."""
    captioned = [(path, caption) for path, caption in entries if caption is not None]
    candidates = {path for path, caption in entries if caption is None}
    found = LayeredEntries()
    # longer names first, as musubi matches them
    for path, _ in sorted(captioned, key=lambda entry: (-len(entry[0].name), entry[0].name)):
        prefix = f"{path.stem}_"
        claimed = sorted(p for p in candidates if p.stem.startswith(prefix))
        candidates.difference_update(claimed)
        found.layers[path] = _ordered(path, claimed, prefix)
    for path, caption in captioned:
        if found.layers[path]:
            found.bases.append((path, caption))
        else:
            found.failed.append(
                (path, f"no layer images beside it ({path.stem}_0.png, {path.stem}_1.png, ...)")
            )
    for path in sorted(candidates):
        found.failed.append(
            (
                path,
                "no caption file, and not a layer (NAME_<n>) of a captioned image: a layered dataset's "
                "items are its captioned images",
            )
        )
    counts = {path: len(found.layers[path]) for path, _ in found.bases}
    if len(set(counts.values())) > 1:
        first, *others = counts
        odd = next(path for path in others if counts[path] != counts[first])
        raise ConfigError(
            f"{odd}: {counts[odd]} layer image(s), but {first.name} has {counts[first]}: every item of a "
            "multiple_target dataset has the same number of layers (as musubi-tuner requires)"
        )
    return found


def _ordered(base: Path, layers: list[Path], prefix: str) -> tuple[Path, ...]:
    """`base`'s `layers` sorted by their number; a layer whose name is not ``NAME_<n>``, or two of
    one number, are named."""
    numbered: dict[int, Path] = {}
    for layer in layers:
        number = layer.stem[len(prefix) :]
        if not (number.isascii() and number.isdigit()):
            raise ConfigError(
                f"{layer}: a layer of {base.name} is named {prefix}<n>, n a number (its place in the layer "
                "order); rename it"
            )
        if int(number) in numbered:
            raise ConfigError(
                f"{layer} and {numbered[int(number)]}: two layers of {base.name} numbered {int(number)}"
            )
        numbered[int(number)] = layer
    return tuple(numbered[number] for number in sorted(numbered))


def mask_folder(masks: Path | None, stem: str) -> Path | None:
    """The item's per-image mask folder ``mask_directory/NAME/`` (None when there is none)."""
    folder = None if masks is None else masks / stem
    return folder if folder is not None and folder.is_dir() else None


def mask_frames(masks: Path | None, stem: str) -> list[Path] | None:
    """The item's per-image masks in name order, frame i for image i (the base first); None
    without a ``mask_directory/NAME/`` folder."""
    folder = mask_folder(masks, stem)
    return None if folder is None else _native.list_images(folder)


def layer_inputs(layers: tuple[Path, ...], masks: Path | None, stem: str) -> list[object]:
    """What an item's layers add to its inputs (``freshness.item_inputs``): each layer image's
    stats and its mask frames' (their folder's listing)."""
    return [[fmt.source_stat(layer) for layer in layers], fmt.source_stat(mask_folder(masks, stem))]
