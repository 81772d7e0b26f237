"""Atomic output: every file masktrain writes (cache files, LoRA files, checkpoints, reports) goes
through here, so a run killed at any moment leaves complete files or none.

A file is written to a hidden temporary beside its target (same folder, so the rename cannot
cross file systems), flushed to disk, then renamed over the target; the folder is flushed too,
so a power cut cannot lose the rename. A folder (a checkpoint) is filled under a hidden
temporary name and renamed into place the same way. Temporaries end in the native core's
``TEMP_SUFFIX`` (its writer, used by ``convert-alpha``, follows the same rule).

Temporaries carry the id of the run that writes them (:data:`RUN_ID`; the process id, or rank
0's under torchrun, whose processes share folders by design), and a run marks each folder it
writes with a lock file it holds for its whole life (:func:`run_lock`, ``flock``: the kernel
releases it when the process dies, however it dies). :func:`remove_stale_temporaries` deletes
only the temporaries of runs that hold no lock, so a second run's start-up never removes a
live run's files.

Content is handed over as bytes (``safetensors.torch.save`` rather than ``save_file``): the
safetensors writer keeps a temporary file of its own that a killed run would leave behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from masktrain._native import TEMP_SUFFIX

__all__ = [
    "TEMP_SUFFIX",
    "directory",
    "remove_stale_temporaries",
    "run_lock",
    "set_run_id",
    "temp_path",
    "write_bytes",
    "write_text",
]

RUN_ID = str(os.getpid())
"""The id this process's temporaries carry: its own pid, or rank 0's under torchrun."""

_LOCK_PREFIX = ".masktrain-run."
_LOCK_SUFFIX = ".lock"
# The run id in a temporary's name: ".{name}.{run}-{pid}.{thread}" (ours), ".{name}.{pid}.ThreadId{n}"
# (the native writer's, whose run is its process) or ".{name}.{run}" (a folder).
_FILE_RUN = re.compile(r"\.(\d+)(?:-\d+)?\.(?:\d+|ThreadId\d+)$")
_FOLDER_RUN = re.compile(r"\.(\d+)$")


def set_run_id(run_id: str) -> None:
    """Make this process's temporaries carry `run_id` (every torchrun process takes rank 0's)."""
    global RUN_ID
    RUN_ID = run_id


def temp_path(target: Path) -> Path:
    """The hidden temporary for `target`: the run id, then pid and thread id, which keep writer
    threads and torchrun processes that share a folder apart."""
    unique = f"{RUN_ID}-{os.getpid()}.{threading.get_ident()}"
    return target.with_name(f".{target.name}.{unique}{TEMP_SUFFIX}")


def _sync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `target` atomically: readers see the old file or the new one."""
    target = Path(target)
    temp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the new name points at it
        os.replace(temp, target)
        _sync_directory(target.parent)
    except OSError as error:
        raise write_error(error, target) from error
    finally:
        temp.unlink(missing_ok=True)  # a no-op after the rename; removes a partial file otherwise


def write_error(error: OSError, target: Path) -> OSError:
    """`error` as one line naming the file that could not be written ("No space left on
    device" from a write names none); its ``errno`` is kept."""
    named = OSError(f"cannot write {target}: {error.strerror or error}")
    named.errno = error.errno
    return named


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def directory(target: Path) -> Iterator[Path]:
    """Fill a folder that appears at `target` all at once: yields a hidden temporary folder,
    and when the block ends without an error renames it to `target` (replacing an old folder of
    that name). On an error the temporary is removed and `target` is left as it was."""
    temp = target.with_name(f".{target.name}.{RUN_ID}{TEMP_SUFFIX}")
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


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Mark `folder` as written by this run until the block ends (the lock file is held, and
    removed at the end; a killed run's lock file stays, unheld, and the next cleanup removes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_LOCK_PREFIX}{RUN_ID}{_LOCK_SUFFIX}"
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _live_runs(folder: Path) -> set[str]:
    """The ids of runs that hold their lock on `folder`; unheld lock files are removed."""
    live = set()
    for path in folder.glob(f"{_LOCK_PREFIX}*{_LOCK_SUFFIX}"):
        run = path.name.removeprefix(_LOCK_PREFIX).removesuffix(_LOCK_SUFFIX)
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(run)
        else:
            path.unlink(missing_ok=True)  # its run is gone
        finally:
            os.close(descriptor)
    return live


def _run_of(temporary: Path) -> str | None:
    stem = temporary.name.removesuffix(TEMP_SUFFIX)
    match = (_FOLDER_RUN if temporary.is_dir() else _FILE_RUN).search(stem)
    return match[1] if match else None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries (files and folders) of runs that are gone from `folder`; returns
    how many. A temporary whose run holds its lock on the folder is live and stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    live = _live_runs(folder)
    removed = 0
    for stale in folder.glob(f".*{TEMP_SUFFIX}"):
        if _run_of(stale) in live:
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed
