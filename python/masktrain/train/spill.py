"""A run that slows down because the card is full: on Windows the driver then moves memory to
shared system memory instead of failing, and steps take ten times as long (trackers reported 28 s
becoming 313 s). :class:`SpillWatch` warns once per run when a step takes :data:`SLOWER` times the
median of the last :data:`WINDOW` steps (after :data:`WARMUP` steps) while the reserved memory is
at least :data:`FULL` of the card, naming the spill and the plan's swap setting."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

WARMUP = 5
"""Steps not watched (compilation, allocator warm-up, the first sampling)."""
WINDOW = 20
"""Steps whose median is the usual step time."""
SLOWER = 3.0
"""How many times the median a step must take to count as slow."""
FULL = 0.95
"""The fraction of the card's memory reserved at which a slow step is taken for a spill."""


class SpillWatch:
    """Watches step times (:meth:`observe`) against the reserved memory."""

    def __init__(self, total: int, reserved: Callable[[], int], fitting_swap: int | None, swap: int) -> None:
        self.total, self.reserved = total, reserved
        self.fitting_swap, self.swap = fitting_swap, swap
        self.steps = 0
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.warned = False

    @classmethod
    def on(cls, device: torch.device, fitting_swap: int | None, swap: int) -> SpillWatch | None:
        """A watch for a CUDA `device` (None elsewhere: nothing spills there)."""
        if device.type != "cuda":
            return None
        total = torch.cuda.get_device_properties(device).total_memory
        return cls(total, lambda: torch.cuda.memory_reserved(device), fitting_swap, swap)

    def observe(self, seconds: float) -> None:
        """One optimizer step took `seconds`."""
        self.steps += 1
        if self.steps <= WARMUP:
            return
        usual = statistics.median(self.recent) if self.recent else None
        self.recent.append(seconds)
        if self.warned or usual is None or seconds < SLOWER * usual:
            return
        reserved = self.reserved()
        if reserved < FULL * self.total:
            return
        self.warned = True
        advice = (
            f"the plan fits this card with --blocks_to_swap {self.fitting_swap}"
            if self.fitting_swap is not None and self.fitting_swap > self.swap
            else "more --blocks_to_swap, --fp8_base or a smaller bucket leave room"
        )
        log.warning(
            "step %d took %.1f s, %.1fx the median of the last steps (%.1f s), with %.1f of the card's "
            "%.1f GiB reserved: the driver is probably spilling into shared system memory (Windows does, "
            "instead of running out of memory); %s (masktrain plan shows the components)",
            self.steps,
            seconds,
            seconds / usual,
            usual,
            reserved / 2**30,
            self.total / 2**30,
            advice,
        )
