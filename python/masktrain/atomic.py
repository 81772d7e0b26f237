"""Atomic output: every file masktrain writes (cache files, LoRA files, checkpoints, reports) goes
through here, so a run killed at any moment leaves complete files or none.

A file is written to a hidden temporary beside its target (same folder, so the rename cannot
cross file systems), flushed to disk, then renamed over the target; the folder is flushed too,
so a power cut cannot lose the rename. A folder (a checkpoint) is filled under a hidden
temporary name and renamed into place the same way. Temporaries end in the native core's
``TEMP_SUFFIX`` (its writer, used by ``convert-alpha``, follows the same rule), and
:func:`remove_stale_temporaries` deletes those a killed run left behind.

Content is handed over as bytes (``safetensors.torch.save`` rather than ``save_file``): the
safetensors writer keeps a temporary file of its own that a killed run would leave behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from masktrain._native import TEMP_SUFFIX

__all__ = [
    "TEMP_SUFFIX",
    "directory",
    "remove_stale_temporaries",
    "temp_path",
    "write_bytes",
    "write_text",
]


def temp_path(target: Path) -> Path:
    """The hidden temporary for `target`; pid and thread id keep writer threads and torchrun
    processes that share a folder apart."""
    return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")


def _sync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `target` atomically: readers see the old file or the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(target)
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the new name points at it
        os.replace(temp, target)
        _sync_directory(target.parent)
    finally:
        temp.unlink(missing_ok=True)  # a no-op after the rename; removes a partial file otherwise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def directory(target: Path) -> Iterator[Path]:
    """Fill a folder that appears at `target` all at once: yields a hidden temporary folder,
    and when the block ends without an error renames it to `target` (replacing an old folder of
    that name). On an error the temporary is removed and `target` is left as it was."""
    temp = target.with_name(f".{target.name}{TEMP_SUFFIX}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        yield temp
        for child in temp.iterdir():
            if child.is_file():
                with open(child, "rb") as file:
                    os.fsync(file.fileno())
        _sync_directory(temp)
        if target.exists():  # e.g. the same step written again after a resume
            shutil.rmtree(target)
        os.replace(temp, target)
        _sync_directory(target.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries (files and folders) a killed run left in `folder`; returns how many.

    Run it before any writer starts (under torchrun: on one process, before a barrier), since
    it cannot tell a dead run's temporary from a live writer's.
    """
    removed = 0
    for stale in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed
