"""The cached loader: finds the files `masktrain cache` wrote for a dataset TOML, groups them into
bucketed batches, and loads the next batches on a background thread while the step runs.

Which files are items: every latent file of the run's arch in each dataset's cache_directory
whose source image or video still exists (a file whose source was deleted is skipped, with a
count in the log). Each needs its text-embedding file. The batch order of an epoch is a pure
function of (seed, epoch), so a resumed run sees the batches it would have seen, and under DDP
process `rank` takes every `world`-th batch of the same order.

A batch holds items of one dataset and one latent shape. If any item in it has mask weights,
the others get ones (full weight), as the reference does; a batch without any has none.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from masktrain.config.dataset import load_dataset_config
from masktrain.data import cache_format as fmt

log = logging.getLogger(__name__)

Tag = TypeVar("Tag")

_LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_\w+$")


class CachedDataError(ValueError):
    """The cache cannot be trained on as it is; the message says which file and what to run."""


@dataclass(frozen=True)
class CachedItem:
    latent_path: Path
    text_path: Path
    latent_shape: tuple[int, int, int, int]
    """(C, F, h, w) of the stored latents."""
    has_mask: bool
    dataset: int
    """Index of the [[datasets]] table (batches never mix datasets)."""
    batch_size: int
    num_repeats: int


@dataclass
class Batch:
    index: int
    """Position in the epoch's global batch order (seeds this batch's noise and timesteps)."""
    latents: torch.Tensor
    """(B, C, F, h, w) float32."""
    mask_weights: torch.Tensor | None
    """(B, 1, F, h, w) raw weights in [0, 1], or None when no item of the batch has a mask."""
    text: list[torch.Tensor]
    """One (tokens, dim) embedding per item."""
    items: list[CachedItem]


def _latent_shape(shapes: dict[str, tuple[int, ...]], path: Path) -> tuple[tuple[int, ...], bool]:
    """(C, F, h, w) of the file's latents, and whether it holds mask weights."""
    latent = [name for name in shapes if _LATENT_KEY.match(name)]
    if len(latent) != 1:
        raise CachedDataError(
            f"{path}: expected one latents_* tensor, found {len(latent)}; re-run masktrain cache"
        )
    return shapes[latent[0]], any(name.startswith("mask_weights_") for name in shapes)


def find_cached_items(dataset_config: Path, arch: str) -> list[CachedItem]:
    """Every trainable item of the TOML's datasets, or a CachedDataError saying what to run."""
    config = load_dataset_config(dataset_config)
    pattern = re.compile(rf"_\d{{4,}}x\d{{4,}}_{re.escape(arch)}\.safetensors$")
    items: list[CachedItem] = []
    for number, dataset in enumerate(config.datasets):
        directory = dataset.cache_directory
        paths = sorted(p for p in directory.iterdir() if pattern.search(p.name)) if directory.is_dir() else []
        orphaned = 0
        for path in paths:
            metadata, shapes = fmt.read_header(path)
            if metadata.arch != arch:
                raise CachedDataError(f"{path}: made for arch '{metadata.arch}', not '{arch}'")
            shape, has_mask = _latent_shape(shapes, path)
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
                CachedItem(path, text, shape, has_mask, number, dataset.batch_size, dataset.num_repeats)  # type: ignore[arg-type]
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


def load_batch(index: int, items: list[CachedItem]) -> Batch:
    latents, masks, texts = [], [], []
    for item in items:
        tensors, _ = fmt.load_cache_file(item.latent_path)
        latent = next(t for key, t in tensors.items() if _LATENT_KEY.match(key))
        mask = next((t for key, t in tensors.items() if key.startswith("mask_weights_")), None)
        latents.append(latent.float())
        masks.append(None if mask is None else mask.float())
        text_tensors, _ = fmt.load_cache_file(item.text_path)
        texts.append(next(iter(text_tensors.values())))
    mask_weights = None
    template = next((m for m in masks if m is not None), None)
    if template is not None:
        mask_weights = torch.stack([torch.ones_like(template) if m is None else m for m in masks])
    return Batch(index, torch.stack(latents), mask_weights, texts, items)


class Prefetcher(Generic[Tag]):
    """Loads batches on a background thread, `depth` ahead of the consumer, from a (possibly
    endless) stream of ``(tag, index, items)``; yields ``(tag, Batch)``. One prefetcher serves a
    whole run, so the first batch of an epoch is loaded while the last one of the previous epoch
    trains. Records how long the consumer waited (the loader-stall share the benchmark reports)."""

    def __init__(self, batches: Iterable[tuple[Tag, int, list[CachedItem]]], depth: int = 2):
        self.waited = 0.0
        self._queue: queue.Queue[tuple[Tag, Batch] | BaseException | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(batches,), name="loader", daemon=True)
        self._thread.start()

    def _work(self, batches: Iterable[tuple[Tag, int, list[CachedItem]]]) -> None:
        try:
            for tag, index, items in batches:
                if self._stop.is_set():
                    return
                self._put((tag, load_batch(index, items)))
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
            return
        self._put(None)

    def _put(self, value: tuple[Tag, Batch] | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[Tag, Batch]]:
        while True:
            start = time.perf_counter()
            value = self._queue.get()
            self.waited += time.perf_counter() - start
            if value is None:
                return
            if isinstance(value, BaseException):
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
