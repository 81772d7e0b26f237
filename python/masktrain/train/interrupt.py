"""Stopping a run cleanly: Ctrl-C (SIGINT), SIGTERM (a scheduler's stop, ``kill``, a torchrun
worker whose launcher died) or SIGHUP (the SSH session or terminal closed) sets a flag the loop
checks after each optimizer step, which then saves a checkpoint and stops; a second signal aborts
at once. A SIGHUP that was ignored when the run started (``nohup``) stays ignored. A torchrun
worker whose launcher died gets ``distributed.LAUNCHER_DIED`` (maybe several times: one per
launcher thread the kernel passes it through); it asks for the same stop and never aborts."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from masktrain.distributed import LAUNCHER_DIED

log = logging.getLogger(__name__)


class Interrupt:
    """The signal handlers of one run, installed while the ``with`` block runs."""

    SIGNALS = (
        signal.SIGINT,
        signal.SIGTERM,
        *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
        *([LAUNCHER_DIED] if LAUNCHER_DIED != signal.SIGTERM else []),
    )
    KEEP_IGNORED = tuple(sig for sig in SIGNALS if getattr(signal, "SIGHUP", None) == sig)
    """Signals left ignored when they are (``nohup`` ignores SIGHUP so that the run goes on)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Interrupt:
        try:
            self._previous = {
                sig: signal.signal(sig, self._handle)
                for sig in self.SIGNALS
                if not (sig in self.KEEP_IGNORED and signal.getsignal(sig) == signal.SIG_IGN)
            }
        except ValueError:  # not the main thread (e.g. called from a test thread)
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        launcher_died = signum == LAUNCHER_DIED and LAUNCHER_DIED != signal.SIGTERM
        if self.requested:
            if launcher_died:
                return
            raise KeyboardInterrupt
        self.requested = True
        if launcher_died:
            log.warning("the torchrun launcher died: saving a checkpoint after this step")
        else:
            name = signal.Signals(signum).name
            log.warning("%s: saving a checkpoint after this step (send it again to abort)", name)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
