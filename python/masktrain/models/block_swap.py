"""Block swap (``--blocks_to_swap N``): the last N transformer blocks keep their Linear weights
(and fp8 scales) in host memory, and each is copied to the device just ahead of its use, on a side
CUDA stream so the copy overlaps the blocks computing before it.

The layout between steps is musubi-tuner's: blocks ``0 .. B-N-1`` resident, ``B-N .. B-1`` on the
host. During a pass at most two swapped blocks are on the device (the one computing and the next
one arriving), as in musubi's H2D-only ring of two:

- forward: before block i runs it waits for its copy; the next swapped block's copy starts; after
  a swapped block has run it goes back to the host (a pointer change: base weights never change,
  so nothing is copied back), except the last block of a forward with grad, which the backward
  pass needs first;
- backward (gradient checkpointing, which block swap requires): when block i is recomputed, block
  i+1's backward is over, so it goes back to the host, block i is waited for and block i-1's copy
  starts;
- :meth:`BlockSwap.restore` puts the layout back: after the teacher's no-grad forward (whose
  blocks were never backpropagated) and after every backward, inside ``finally`` so an error never
  strands a layout. A block needed but not on the device is loaded on demand and counted, so a
  schedule that goes wrong costs speed, never correctness.

On the CPU the copies are no-ops (the device is the host) but every hook, the schedule and the
restore run the same; each event is logged at DEBUG level as the layout string (``D`` on the
device, ``H`` on the host, one letter per block), which is what the tests read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from masktrain.errors import TrainConfigError
from masktrain.models.placement import Slot, frozen_slots

log = logging.getLogger(__name__)

WINDOW = 2
"""Swapped blocks on the device at once: the one computing and the one arriving."""


def check_blocks_to_swap(blocks_to_swap: int, num_blocks: int) -> None:
    """``N`` must leave at least one block resident (musubi-tuner's assert)."""
    if not 0 <= blocks_to_swap <= num_blocks - 1:
        raise TrainConfigError(
            f"--blocks_to_swap {blocks_to_swap}: this transformer has {num_blocks} blocks, so at most "
            f"{num_blocks - 1} can be swapped"
        )


class BlockSwap:
    """The swap schedule of one transformer's blocks (see the module docstring)."""

    def __init__(
        self, blocks: torch.nn.ModuleList, blocks_to_swap: int, device: torch.device, pin: bool, name: str
    ) -> None:
        check_blocks_to_swap(blocks_to_swap, len(blocks))
        self.name = name
        self.device = device
        self.count = len(blocks)
        self.first_swapped = self.count - blocks_to_swap
        self.slots: dict[int, list[Slot]] = {
            i: frozen_slots(blocks[i], linear_weights_only=True, pin=pin)
            for i in range(self.first_swapped, self.count)
        }
        self.on_device: set[int] = set()
        self.arriving: dict[int, Any] = {}  # block -> CUDA event of its copy
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.recomputing = False
        self.loads_on_demand = 0
        self.copies = 0
        self._handles = []
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._post_hook(index)))

    def swappable_slots(self) -> list[Slot]:
        return [slot for slots in self.slots.values() for slot in slots]

    # --- the layout --------------------------------------------------------------------------------

    def layout(self) -> str:
        """One letter per block: ``D`` on the device, ``H`` in host memory."""
        return "".join(
            "D" if i < self.first_swapped or i in self.on_device else "H" for i in range(self.count)
        )

    def mark(self, event: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("block swap %s: %s: %s", self.name, event, self.layout())

    def restore(self, event: str) -> None:
        """Back to the between-steps layout: every swapped block on the host."""
        for index in sorted(self.on_device | set(self.arriving)):
            self._evict(index)
        self.mark(f"restored {event}")

    # --- moves -------------------------------------------------------------------------------------

    def _evict(self, index: int) -> None:
        self.arriving.pop(index, None)
        for slot in self.slots[index]:
            slot.to_host()
        self.on_device.discard(index)

    def _prefetch(self, index: int) -> None:
        if index in self.on_device or index in self.arriving or index not in self.slots:
            return
        self.copies += 1
        if self.stream is None:
            for slot in self.slots[index]:
                slot.to_device(self.device)
            self.arriving[index] = None
            return
        with torch.cuda.stream(self.stream):
            for slot in self.slots[index]:
                slot.to_device(self.device, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            event.record(self.stream)
        self.arriving[index] = event

    def _ensure(self, index: int) -> None:
        if index not in self.slots or index in self.on_device:
            return
        if index not in self.arriving:
            self.loads_on_demand += 1
            log.debug("block swap %s: block %d loaded on demand", self.name, index)
            self._prefetch(index)
        event = self.arriving.pop(index)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for slot in self.slots[index]:
                # the copy was allocated on the side stream: keep it until compute is done with it
                slot.current().record_stream(compute)
        self.on_device.add(index)

    def _next_swapped(self, after: int) -> int | None:
        index = max(after + 1, self.first_swapped)
        return index if index < self.count else None

    # --- hooks -------------------------------------------------------------------------------------

    def _pre_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self.recomputing:  # backward: block index+1 is done
                if index + 1 in self.slots:
                    self._evict(index + 1)
                self._ensure(index)
                if index - 1 in self.slots:
                    self._prefetch(index - 1)
                return
            self._ensure(index)
            upcoming = self._next_swapped(index)
            if upcoming is not None and len(self.on_device | set(self.arriving)) < WINDOW:
                self._prefetch(upcoming)

        return hook

    def _post_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.recomputing or index not in self.slots:
                return
            if torch.is_grad_enabled() and index == self.count - 1:
                return  # the backward pass starts with it
            self._evict(index)
            upcoming = self._next_swapped(index)
            if upcoming is not None:
                self._prefetch(upcoming)

        return hook

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        """The hooks run the backward schedule while a checkpointed block is recomputed."""
        previous, self.recomputing = self.recomputing, True
        try:
            yield
        finally:
            self.recomputing = previous
