"""The cached loader: loads bucketed batches of the items ``data.cached_items`` lists, on a
background thread while the step runs.

A batch holds items of one dataset and one latent shape (Qwen-Image-Edit: and one count and size
of control images). If any item in it has mask weights, the others get ones (full weight), as the
reference does; a batch without any has none.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

import torch

from masktrain.data import cache_format as fmt
from masktrain.data.cached_items import CachedItem
from masktrain.errors import CachedDataError
from masktrain.models.base import Conditioning

Tag = TypeVar("Tag")


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
    condition: Conditioning | None = None
    """What a conditioned mode feeds the denoiser beside the latents (None: no conditioning)."""


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`tensors`, or a :class:`CachedDataError` naming the file when one holds NaN or infinity (a
    damaged file whose header still reads fresh: training on it would poison every step)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CachedDataError(
                f"{path}: holds non-finite values (NaN or infinity) in {key}; delete the file and run "
                "masktrain cache again"
            )
    return tensors


def load_batch(index: int, items: list[CachedItem]) -> Batch:
    latents, masks, texts = [], [], []
    conditions: dict[str, list[torch.Tensor | None]] = {name: [] for name in _CONDITION_FIELDS}
    controls: list[tuple[torch.Tensor, ...]] = []
    for item in items:
        tensors = check_finite(fmt.load_cache_file(item.latent_path)[0], item.latent_path)
        keys = fmt.item_tensor_keys(tensors, item.latent_path)
        latents.append(tensors[keys.latents].float())
        masks.append(None if keys.mask_weights is None else tensors[keys.mask_weights].float())
        for name in _CONDITION_FIELDS:
            key = getattr(keys, name)
            conditions[name].append(None if key is None else tensors[key])
        controls.append(tuple(tensors[key] for key in keys.control_latents))
        text_tensors = check_finite(fmt.load_cache_file(item.text_path)[0], item.text_path)
        texts.append(next(iter(text_tensors.values())))
    mask_weights = None
    template = next((m for m in masks if m is not None), None)
    if template is not None:
        mask_weights = torch.stack([torch.ones_like(template) if m is None else m for m in masks])
    condition = _condition(conditions, items)
    control_latents = _control_latents(controls, items)
    if control_latents is not None:
        condition = replace(condition or Conditioning(), control_latents=control_latents)
    return Batch(index, torch.stack(latents), mask_weights, texts, items, condition)


# The Conditioning fields stacked per item; `fmt.ItemTensorKeys` names each file's key alike.
_CONDITION_FIELDS = ("image_latents", "image_embeds", "frame_indices")


def _condition(found: dict[str, list[torch.Tensor | None]], items: list[CachedItem]) -> Conditioning | None:
    """The batch's conditioning, stacked: every item of a batch has the same conditioning keys
    (``train`` checked each file's mode); a mix is named."""
    stacked: dict[str, torch.Tensor] = {}
    for name, tensors in found.items():
        present = [t for t in tensors if t is not None]
        if not present:
            continue
        if len(present) != len(tensors):
            names = ", ".join(item.latent_path.name for item in items)
            raise CachedDataError(
                f"the batch of {names} mixes items with and without {name}; re-run masktrain cache"
            )
        stacked[name] = torch.stack(present)
        if stacked[name].is_floating_point():
            stacked[name] = stacked[name].float()
        else:
            stacked[name] = stacked[name].long()
    if not stacked:
        return None
    return Conditioning(
        image_latents=stacked.get("image_latents"),
        image_embeds=stacked.get("image_embeds"),
        frame_indices=stacked.get("frame_indices"),
    )


def _control_latents(
    found: list[tuple[torch.Tensor, ...]], items: list[CachedItem]
) -> tuple[torch.Tensor, ...] | None:
    """Qwen-Image-Edit: each control's latents stacked over the batch, (B, C, 1, h_i, w_i) each;
    None when the items have none. A batch's items share their control count and sizes
    (``cached_items.epoch_batches`` groups them so): the denoiser reads them off the first."""
    if len({tuple(tensor.shape for tensor in controls) for controls in found}) > 1:
        names = ", ".join(item.latent_path.name for item in items)
        raise CachedDataError(
            f"the batch of {names} mixes control images of other counts or sizes; re-run masktrain cache"
        )
    if not found[0]:
        return None
    return tuple(torch.stack([controls[i] for controls in found]).float() for i in range(len(found[0])))


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
