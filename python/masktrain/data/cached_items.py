"""The trainable items of a dataset TOML: which cache files ``masktrain train`` uses, and the
order of each epoch's batches. Torch-free (headers only), so the train preflight can list the
items and count the batches before any model loads.

Which files are items: every latent file of the run's arch in each dataset's cache_directory
whose source image or video still exists (a file whose source was deleted is skipped, with a
count in the log). Each needs its text-embedding file. The batch order of an epoch is a pure
function of (seed, epoch), so a resumed run sees the batches it would have seen, and under DDP
process `rank` takes every `world`-th batch of the same order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from masktrain.config.dataset import load_dataset_config
from masktrain.data import cache_format as fmt
from masktrain.errors import CachedDataError

log = logging.getLogger(__name__)


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


def find_cached_items(dataset_config: Path, arch: str) -> list[CachedItem]:
    """Every trainable item of the TOML's datasets, or a CachedDataError saying what to run."""
    config = load_dataset_config(dataset_config)
    items: list[CachedItem] = []
    for number, dataset in enumerate(config.datasets):
        directory = dataset.cache_directory
        paths = (
            sorted(p for p in directory.iterdir() if fmt.is_item_file(p.name, arch))
            if directory.is_dir()
            else []
        )
        orphaned = 0
        for path in paths:
            metadata, shapes = fmt.read_header(path)
            if metadata.arch != arch:
                raise CachedDataError(f"{path}: made for arch '{metadata.arch}', not '{arch}'")
            keys = fmt.item_tensor_keys(shapes, path)
            source = Path(metadata.source)
            if not source.exists():
                orphaned += 1
                continue
            text = directory / fmt.text_cache_name(source.stem, arch)
            if not text.is_file():
                raise CachedDataError(
                    f"{text}: text embeddings of {source} are missing; re-run masktrain cache "
                    f"--dataset_config {dataset_config} --arch {arch}"
                )
            items.append(
                CachedItem(
                    path,
                    text,
                    shapes[keys.latents],
                    keys.mask_weights is not None,
                    number,
                    dataset.batch_size,
                    dataset.num_repeats,
                )
            )
        if orphaned:
            log.warning("%s: %d cache files whose source no longer exists were skipped", directory, orphaned)
    if not items:
        raise CachedDataError(
            f"{dataset_config}: no cache files for --arch {arch}; run masktrain cache --dataset_config "
            f"{dataset_config} --arch {arch} first"
        )
    return items


def epoch_batches(items: list[CachedItem], seed: int, epoch: int) -> list[list[CachedItem]]:
    """The global batch order of one epoch: each item `num_repeats` times, shuffled within its
    (dataset, latent shape) group, cut into batches of the dataset's batch_size, batches shuffled."""
    rng = random.Random(f"masktrain-batches-{seed}-{epoch}")
    groups: dict[tuple[int, tuple[int, ...]], list[CachedItem]] = {}
    for item in items:
        groups.setdefault((item.dataset, item.latent_shape), []).extend([item] * item.num_repeats)
    batches: list[list[CachedItem]] = []
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        size = group[0].batch_size
        batches.extend(group[start : start + size] for start in range(0, len(group), size))
    rng.shuffle(batches)
    return batches
