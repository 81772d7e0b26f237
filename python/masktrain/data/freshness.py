"""What a cache file was built from, written into its metadata by ``cache`` and checked by
``train`` with one ``stat`` per input file (torch-free: no decoding, no model).

Each latent file records two things next to its fingerprint:

- ``settings``: a digest of the dataset settings that shape every item's tensors (buckets,
  resolution, mask sources, clip extraction, the preprocessing rules and the format version);
- ``inputs``: the size and modification time of the item's source (each frame of a frame
  directory) and of its mask file.

A text-embedding file records ``caption_sha256``, the digest of the caption it encodes (and, for
Qwen-Image-Edit, whose prompt reads the control images, ``controls``: their stats). ``train``
recomputes all of them from the dataset as it is now: anything that differs is a stale item, named
with the ``masktrain cache`` command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from masktrain.catalog import ArchSpec
from masktrain.config.dataset import ImageDatasetConfig, VideoDatasetConfig
from masktrain.data import cache_format as fmt
from masktrain.data import layers
from masktrain.data.controls import ControlIndex
from masktrain.data.discovery import MediaItem, bucket_list
from masktrain.data.mask_sources import MaskSources
from masktrain.data.video import ClipSettings

SETTINGS_KEY = "settings"
INPUTS_KEY = "inputs"
CAPTION_KEY = "caption_sha256"
CONTROLS_KEY = "controls"
"""A Qwen-Image-Edit text file's control images (:func:`control_inputs`): its prompt read them."""


def dataset_settings(
    dataset: ImageDatasetConfig | VideoDatasetConfig, spec: ArchSpec, masks: MaskSources
) -> dict[str, object]:
    """The settings of `dataset` that shape every item's tensors."""
    buckets = dataset.buckets
    settings: dict[str, object] = {
        "buckets": bucket_list(buckets, spec.bucket_step),
        "resolution": list(buckets.resolution),
        "bucket_no_upscale": buckets.bucket_no_upscale,
        "rules": fmt.RESIZE_RULES,
        "format": fmt.FORMAT_VERSION,
    }
    if isinstance(dataset, ImageDatasetConfig):
        settings |= {
            "masking": masks.masking,
            "alpha_mask": dataset.alpha_mask,
            "require_mask": dataset.require_mask,
        }
        if dataset.control_resolution is not None or dataset.no_resize_control:  # only then: older
            # caches stay fresh (Qwen-Image-Edit's control sizes, cache/edit.py)
            settings["control_size"] = [dataset.control_resolution, dataset.no_resize_control]
        if dataset.multiple_target:  # likewise: Qwen-Image-Layered's items (data.layers)
            settings["multiple_target"] = True
    else:
        clips = ClipSettings.of(dataset, spec.video_fps or 0.0, spec.temporal_factor)
        settings |= {"masking": masks.masking, "clips": clips.fingerprint_part()}
        if dataset.require_mask:  # only then: older video caches stay fresh
            settings["require_mask"] = True
    return settings


def settings_digest(
    dataset: ImageDatasetConfig | VideoDatasetConfig, spec: ArchSpec, masks: MaskSources
) -> str:
    return fmt.fingerprint(dataset_settings(dataset, spec, masks))


def control_index(
    dataset: ImageDatasetConfig | VideoDatasetConfig, items: Iterable[MediaItem]
) -> ControlIndex | None:
    return (
        ControlIndex(dataset.control_directory, (item.stem for item in items))
        if dataset.control_directory
        else None
    )


def item_inputs(item: MediaItem, masks: MaskSources, controls: ControlIndex | None = None) -> str:
    """The item's input files as they are now: path, size and mtime of its source, its mask
    (``data.mask_sources``: every frame of a mask-frame folder; a ``DuplicateMaskError`` when two
    masks share its basename) and, with a ``control_directory``, its control images."""
    mask, _ = masks.resolve(item)
    inputs: dict[str, object] = {"source": fmt.source_stat(item.path), "mask": fmt.source_stat(mask)}
    if controls is not None:  # only then, so caches made without controls stay fresh
        inputs["controls"] = [fmt.source_stat(path) for path in controls.get(item.stem)]
    if item.layers:  # Qwen-Image-Layered: its layer images and per-image mask frames
        folder = masks.directory
        inputs["layers"] = layers.layer_inputs(item.layers, folder, item.stem)
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)


def control_inputs(item: MediaItem, controls: ControlIndex | None) -> str:
    """The item's control images as they are now (path, size, mtime each; ``[]`` without any):
    what an edit text embedding, which reads them, records under :data:`CONTROLS_KEY`."""
    paths = [] if controls is None else controls.get(item.stem)
    return json.dumps([fmt.source_stat(path) for path in paths], separators=(",", ":"), default=str)


def caption_digest(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()


def changed(recorded: str | None, now: str, what: str) -> str | None:
    """Why a file is stale when its `recorded` value differs from `now` (None when it does not)."""
    if recorded is None:
        return "cached by an older masktrain (no record of its inputs)"
    return None if recorded == now else f"{what} changed since it was cached"


def inputs_changed(recorded: str | None, now: str) -> str | None:
    """:func:`changed` for an item's :func:`item_inputs`, naming its control images when only
    they changed."""
    what = "its image or mask"
    if recorded is not None and recorded != now and _but_controls(recorded) == _but_controls(now):
        what = "its control images"
    return changed(recorded, now, what)


def _but_controls(inputs: str) -> object:
    """:func:`item_inputs` without the control images."""
    try:
        parsed = json.loads(inputs)
    except ValueError:
        return inputs
    return {k: v for k, v in parsed.items() if k != "controls"} if isinstance(parsed, dict) else inputs


BAKED_GAMMA = "cache_mask_gamma"
"""The metadata key of a cache file's baked mask gamma (``cache --cache_mask_gamma``; 1 = none)."""
BAKED_MIN_WEIGHT = "cache_mask_min_weight"
"""The metadata key of its baked mask floor (``cache --cache_mask_min_weight``; 0 = none)."""


def baked_transform(extra: Mapping[str, str]) -> tuple[float, float] | None:
    """(gamma, min weight) a cache file's metadata records, or None (an older file, or unreadable)."""
    try:
        return float(extra[BAKED_GAMMA]), float(extra[BAKED_MIN_WEIGHT])
    except (KeyError, ValueError):
        return None
