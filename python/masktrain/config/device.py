"""The ``--device`` flag of ``cache`` and ``train``, checked without importing torch; whether the
device exists on this machine is checked when the command starts, before any model loads."""

from __future__ import annotations

import re

from masktrain.errors import FlagError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def check_device(device: str | None) -> None:
    """Raise a :class:`FlagError` unless `device` is None (the default) or a device torch knows by
    that name: cpu, cuda, cuda:N or mps."""
    if device is not None and not _DEVICE.fullmatch(device):
        raise FlagError(f"--device must be cpu, cuda, cuda:N or mps, not {device!r}")
