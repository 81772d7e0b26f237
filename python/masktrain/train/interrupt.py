"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop, ``kill``) sets a flag
the loop checks after each optimizer step, which then saves a checkpoint and stops; a second
signal aborts at once."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Interrupt:
    """The signal handlers of one run, installed while the ``with`` block runs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Interrupt:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. called from a test thread)
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step (send it again to abort)", name)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
