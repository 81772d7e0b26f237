"""The trainable items of a dataset TOML: the dataset listed exactly as ``masktrain cache`` lists
it, each item matched to the cache files made from it, and the order of each epoch's batches.
Torch-free (cache headers only, one ``stat`` per input file), so the train preflight runs it
before any model loads.

An item is trainable when its latent file(s) and its text-embedding file were made from it, from
the same dataset settings and from its source, mask and caption as they are now
(``data/freshness.py``); a video's clips are the ones its files' metadata lists. Anything else is
a problem named with the ``masktrain cache`` command that fixes it: an item never cached (a new
image, or one that failed in ``cache``), a stale one (its image, mask or caption changed after
caching, or the TOML's settings), or a cache file made for another dataset's item that shares the
folder. ``skip_stale`` turns the stale and uncached ones into a warning and leaves them out.
Cache files of items the dataset no longer has are ignored.

The batch order of an epoch is a pure function of (seed, epoch), so a resumed run sees the
batches it would have seen, and under DDP process `rank` takes every `world`-th batch of the same
order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from masktrain import catalog
from masktrain.catalog import ArchSpec
from masktrain.config.dataset import (
    DatasetConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    load_dataset_config,
)
from masktrain.data import cache_format as fmt
from masktrain.data import freshness
from masktrain.data.discovery import MediaItem, discover
from masktrain.data.mask_sources import MaskSources
from masktrain.errors import (
    CacheArchMismatch,
    CachedDataError,
    CacheFileError,
    CacheModeMismatch,
    CacheSourceCollision,
    MaskTrainError,
)

log = logging.getLogger(__name__)

_SHOWN = 10
"""Problems listed by name in one message; the rest are counted."""


@dataclass(frozen=True)
class CachedItem:
    latent_path: Path
    text_path: Path
    latent_shape: tuple[int, ...]
    """(C, F, h, w) of the stored latents."""
    has_mask: bool
    dataset: int
    """Index of the [[datasets]] table (batches never mix datasets)."""
    batch_size: int
    num_repeats: int
    control_shapes: tuple[tuple[int, ...], ...] = ()
    """Qwen-Image-Edit: (C, F, h, w) of each control image's latents, in order (the denoiser's
    positions are read off the first sample: a batch shares them)."""
    condition: str = catalog.NO_CONDITION
    """The mode its latent file was made for (``cache_format.KEY_CONDITION``)."""


class _Stale(CachedDataError):
    """Why one item cannot be trained on as its cache stands."""


class _NotCached(_Stale):
    """The item has no cache file at all."""


def find_cached_items(
    datasets: DatasetConfig | Path, arch: str, *, skip_stale: bool = False, condition: str | None = None
) -> list[CachedItem]:
    """Every trainable item of the datasets (a TOML already read, or its path), or a
    :class:`CachedDataError` naming the items that are not cached or stale and the command to run
    (with `skip_stale`: a warning, and those items are left out). With `condition` (the run's
    ``catalog.condition_name``) a file made for another mode is a :class:`CacheModeMismatch`."""
    config = datasets if isinstance(datasets, DatasetConfig) else load_dataset_config(datasets)
    dataset_config = config.source
    spec = catalog.arch(arch)
    items: list[CachedItem] = []
    problems: list[str] = []
    cached_any = False
    for number, dataset in enumerate(config.datasets):
        found, stale, cached = _dataset_items(number, dataset, spec)
        if condition is not None:
            check_condition(found, condition, spec, dataset_config)
        items += found
        problems += stale
        cached_any |= cached
    command = f"masktrain cache --dataset_config {dataset_config} --arch {arch}"
    if not cached_any:
        raise CachedDataError(f"{dataset_config}: no cache files for --arch {arch}; run {command} first")
    if problems:
        shown = "; ".join(problems[:_SHOWN]) + (
            f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        )
        if not skip_stale:
            raise CachedDataError(
                f"{dataset_config}: {len(problems)} item(s) not ready for training: {shown}; run {command} "
                "(or train with --skip_stale to leave them out)"
            )
        log.warning("--skip_stale: leaving out %d item(s) not ready for training: %s", len(problems), shown)
    if not items:
        raise CachedDataError(f"{dataset_config}: no cache files for --arch {arch}; run {command} first")
    return items


def check_condition(items: list[CachedItem], condition: str, spec: ArchSpec, dataset_config: Path) -> None:
    """Every item's latent file must have been made for the run's mode `condition`: a cache of
    text-to-video clips cannot train an image-to-video model, nor an I2V cache an FLF2V one."""
    for item in items:
        if item.condition != condition:
            raise CacheModeMismatch(
                f"{item.latent_path}: cached for {_said(item.condition, spec)}, but this run trains "
                f"{_said(condition, spec)}; cache the dataset again with the run's flags (masktrain cache "
                f"--dataset_config {dataset_config} --arch {spec.name} ... {_flags(condition, spec)})"
            )


def _said(condition: str, spec: ArchSpec) -> str:
    return "no conditioning" if condition == catalog.NO_CONDITION else _flags(condition, spec)


def _flags(condition: str, spec: ArchSpec) -> str:
    """The cache flags of the mode `condition` (``catalog.condition_name``)."""
    if condition == catalog.NO_CONDITION:
        return "without --task"
    task = condition.removeprefix("one-frame ")
    return f"{spec.task_flag} {task}" + (" --one_frame" if task != condition else "")


@dataclass(frozen=True)
class ItemState:
    """One item of a dataset as its cache stands: its fresh latent files (path, latent shape, has
    mask), or why it is not trainable (``cached``: whether it has a cache file at all)."""

    item: MediaItem
    files: list[tuple[Path, tuple[int, ...], bool, tuple[tuple[int, ...], ...], str]]
    """(path, latent shape, has mask, control latents' shapes) of each file."""
    text: Path | None
    problem: str | None
    cached: bool


def item_states(
    dataset: ImageDatasetConfig | VideoDatasetConfig, spec: ArchSpec
) -> tuple[list[ItemState], list[str]]:
    """Every listed item of `dataset` with its cache state, and the files that could not be listed."""
    discovery = discover(dataset)
    video = isinstance(dataset, VideoDatasetConfig)
    existing = fmt.existing_item_files(dataset.cache_directory, spec.name, clips=video)
    masks = MaskSources(dataset, discovery.items)
    controls = freshness.control_index(dataset, discovery.items)
    settings = freshness.settings_digest(dataset, spec, masks)
    states = []
    for item in discovery.items:
        try:
            inputs = freshness.item_inputs(item, masks, controls)
            latents = _latent_files(item, existing.get(item.stem, []), spec.name, settings, inputs, video)
            text = _text_file(
                item, dataset.cache_directory, spec.name, freshness.control_inputs(item, controls)
            )
        except (_Stale, MaskTrainError, OSError) as error:
            states.append(ItemState(item, [], None, str(error), not isinstance(error, _NotCached)))
            continue
        states.append(ItemState(item, latents, text, None, True))
    return states, [f"{path} (cannot be cached: {reason})" for path, reason in discovery.failed]


def _dataset_items(
    number: int, dataset: ImageDatasetConfig | VideoDatasetConfig, spec: ArchSpec
) -> tuple[list[CachedItem], list[str], bool]:
    """The dataset's trainable items, the problems of the others, and whether any item of it has
    a cache file at all."""
    states, problems = item_states(dataset, spec)
    items: list[CachedItem] = []
    for state in states:
        if state.problem is not None or state.text is None:
            problems.append(f"{state.item.path} ({state.problem})")
            continue
        items += [
            CachedItem(
                path,
                state.text,
                shape,
                has_mask,
                number,
                dataset.batch_size,
                dataset.num_repeats,
                controls,
                condition,
            )
            for path, shape, has_mask, controls, condition in state.files
        ]
    return items, problems, any(state.cached for state in states)


def _latent_files(
    item: MediaItem, paths: list[Path], arch: str, settings: str, inputs: str, video: bool
) -> list[tuple[Path, tuple[int, ...], bool, tuple[tuple[int, ...], ...], str]]:
    """(path, latent shape, has mask, control latents' shapes, the mode it was made for) of each
    latent file of `item` (one image, or every clip its files list), checked against the item as
    it is now."""
    headers = {}
    for path in paths:
        metadata, shapes = fmt.read_header(path)
        if metadata.arch != arch:
            raise CacheArchMismatch(
                f"its cache file {path.name} was made for arch '{metadata.arch}', not '{arch}'"
            )
        if metadata.source == str(item.path):
            headers[path.name] = (path, metadata, shapes)
        elif Path(metadata.source).exists():
            raise CacheSourceCollision(
                f"its cache file {path.name} was made for {metadata.source}: two datasets share the "
                "cache_directory; give each its own"
            )
    if not headers:
        raise _NotCached("not cached")
    if video:
        first = next(iter(headers.values()))[1]
        wanted = fmt.clip_file_names(item.stem, first)
        if not wanted:
            raise _Stale("its clip files list no clips (cached by an older masktrain)")
        missing = sorted(wanted - headers.keys())
        if missing:
            raise _Stale(f"its clip files {', '.join(missing[:3])} are missing")
        headers = {name: headers[name] for name in sorted(wanted)}
    elif len(headers) > 1:
        raise _Stale(f"more than one cache file ({', '.join(sorted(headers))})")
    files = []
    for path, metadata, shapes in headers.values():
        why = freshness.changed(metadata.extra.get(freshness.SETTINGS_KEY), settings, "the dataset settings")
        why = why or freshness.inputs_changed(metadata.extra.get(freshness.INPUTS_KEY), inputs)
        if why:
            raise _Stale(why)
        keys = fmt.item_tensor_keys(shapes, path)
        controls = tuple(shapes[key] for key in keys.control_latents)
        condition = metadata.extra.get(fmt.KEY_CONDITION) or catalog.NO_CONDITION  # older files: none
        files.append((path, shapes[keys.latents], keys.mask_weights is not None, controls, condition))
    return files


def _text_file(item: MediaItem, folder: Path, arch: str, controls: str) -> Path:
    """The item's text file, checked against its caption and, for an edit prompt (which read the
    control images), its control images as they are now (`controls`)."""
    path = folder / fmt.text_cache_name(item.stem, arch)
    try:
        metadata = fmt.read_metadata(path)
    except CacheFileError as error:
        raise _Stale(f"its text embeddings are damaged: {error}") from None
    if metadata is None:
        raise _Stale("its text embeddings are not cached")
    if metadata.source != str(item.path):
        raise _Stale(f"its text embeddings were made for {metadata.source}")
    recorded = metadata.extra.get(freshness.CAPTION_KEY)
    why = freshness.changed(recorded, freshness.caption_digest(item.caption), "its caption")
    read_controls = metadata.extra.get(freshness.CONTROLS_KEY)
    if not why and read_controls is not None:
        why = freshness.changed(read_controls, controls, "its control images")
    if why:
        raise _Stale(why)
    return path


#: What the items of one batch share: dataset, latent shape and control latents' shapes.
_BatchGroup = tuple[int, tuple[int, ...], tuple[tuple[int, ...], ...]]


def epoch_batches(items: list[CachedItem], seed: int, epoch: int) -> list[list[CachedItem]]:
    """The global batch order of one epoch: each item `num_repeats` times, shuffled within its
    (dataset, latent shape, control shapes) group, cut into batches of the dataset's batch_size,
    batches shuffled."""
    rng = random.Random(f"masktrain-batches-{seed}-{epoch}")
    groups: dict[_BatchGroup, list[CachedItem]] = {}
    for item in items:
        key = (item.dataset, item.latent_shape, item.control_shapes)
        groups.setdefault(key, []).extend([item] * item.num_repeats)
    batches: list[list[CachedItem]] = []
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        size = group[0].batch_size
        batches.extend(group[start : start + size] for start in range(0, len(group), size))
    rng.shuffle(batches)
    return batches


def process_batches(
    items: list[CachedItem], seed: int, rank: int, world: int, batches_per_epoch: int, epoch: int, done: int
) -> Iterator[tuple[tuple[int, int], int, list[CachedItem]]]:
    """Process `rank`'s batches (of `world`) from (epoch, done) on, endlessly: ``((epoch, batches
    done after this one), index in the epoch's global order, items)``. Every process takes the
    same number of batches per epoch, so all reach each optimizer step together."""
    while True:
        order = epoch_batches(items, seed, epoch)
        mine = list(enumerate(order))[rank::world][:batches_per_epoch]
        for position in range(done, len(mine)):
            index, batch_items = mine[position]
            yield (epoch, position + 1), index, batch_items
        epoch, done = epoch + 1, 0
