"""Atomic output: every file masktrain writes (cache files, LoRA files, checkpoints, reports) goes
through here, so a run killed at any moment leaves complete files or none.

A file is written to a hidden temporary beside its target (same folder, so the rename cannot
cross file systems), flushed to disk, then renamed over the target; the folder is flushed too,
so a power cut cannot lose the rename. A folder (a checkpoint) is filled under a hidden
temporary name and renamed into place the same way. Temporaries end in the native core's
``TEMP_SUFFIX`` (its writer, used by ``convert-alpha``, follows the same rule).

Temporaries carry the id of the run that writes them (:data:`RUN_ID`: the process id and a tag
of the host, boot and pid namespace, so two containers that each run their command as pid 1 in
one shared folder do not share an id; rank 0's under torchrun, whose processes share folders by
design), and a run marks each folder it writes with a lock file it holds for its whole life
(:func:`run_lock`, ``flock``: the kernel releases it when the process dies, however it dies).
:func:`remove_stale_temporaries` deletes only the temporaries of runs that hold no lock, so a
second run's start-up never removes a live run's files. A run that must be a folder's only
writer (``train`` and its OUTPUT_DIR) takes the folder's owner lock as well: a second such run is
refused, naming the holder (its command, pid and host, which the lock file records).

Content is handed over as bytes (``safetensors.torch.save`` rather than ``save_file``): the
safetensors writer keeps a temporary file of its own that a killed run would leave behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from masktrain._native import TEMP_SUFFIX

__all__ = [
    "TEMP_SUFFIX",
    "directory",
    "owner",
    "remove_stale_temporaries",
    "run_lock",
    "set_run_id",
    "temp_path",
    "write_bytes",
    "write_text",
]


def _namespace_tag() -> str:
    """What tells this process's pid apart from the same number elsewhere: the host name, the boot
    and the pid namespace (a container's command runs as pid 1), as 8 hex digits."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:  # not Linux
        parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


RUN_ID = f"{os.getpid()}_{_namespace_tag()}"
"""The id this process's temporaries and lock files carry: its pid and :func:`_namespace_tag`
(``4242_1f2e3d4c``), or rank 0's under torchrun."""

_LOCK_PREFIX = ".masktrain-run."
_LOCK_SUFFIX = ".lock"
_OWNER_LOCK = ".masktrain-owner.lock"
# A run id: "{pid}_{tag}", or a bare number (the native writer's pid, an older masktrain's run id).
_RUN = r"(\d+(?:_[0-9a-f]+)?)"
# The run id in a temporary's name: ".{name}.{run}-{pid}.{thread}" (ours), ".{name}.{pid}.ThreadId{n}"
# (the native writer's, whose run is its process) or ".{name}.{run}" (a folder).
_FILE_RUN = re.compile(rf"\.{_RUN}(?:-\d+)?\.(?:\d+|ThreadId\d+)$")
_FOLDER_RUN = re.compile(rf"\.{_RUN}$")


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


def _hold(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of `path` (created if need be) that holds its ``flock``; None when another
    process holds it and `wait` is False. The lock is taken on the file that is at `path` once it is
    held: a lock file removed between our open and our lock (its holder let go of it, or a clean-up
    found it unheld) is opened again."""
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, now = os.fstat(descriptor), os.stat(path)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except FileNotFoundError:
            os.close(descriptor)
            continue
        except BaseException:
            os.close(descriptor)
            raise
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return descriptor
        os.close(descriptor)


def _record(descriptor: int, command: str | None) -> None:
    """Write who holds a lock into its file, for the message of a run it refuses."""
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "run": RUN_ID}
    record["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(record).encode())


def _release(path: Path, descriptor: int) -> None:
    path.unlink(missing_ok=True)  # while held: a process waiting on this file sees it gone and retries
    os.close(descriptor)


def _holder(path: Path) -> str:
    """Who a lock file says holds it: ``masktrain train (pid 4242 on host gpu1, since ...)``."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        command = f"masktrain {record['command']}" if record.get("command") else "a masktrain run"
        return f"{command} (pid {record['pid']} on host {record['host']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # gone, or being written
        return "another masktrain run"


def owner(folder: Path) -> str | None:
    """The live run that holds `folder` for itself (:func:`run_lock` with `owner`), described as
    :func:`_holder` does, or None. It looks with a shared lock held for an instant, never taking the
    folder."""
    path = folder / _OWNER_LOCK
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(descriptor)
    return None


@contextlib.contextmanager
def run_lock(folder: Path, *, owner: str | None = None) -> Iterator[None]:
    """Mark `folder` as written by this run until the block ends (the lock file is held, and
    removed at the end; a killed run's lock file stays, unheld, and the next cleanup removes it).

    `owner` (the command, e.g. ``"train"``): this run must be the folder's only writer. If another
    live run holds the folder that way, a :class:`BlockingIOError` is raised at once whose
    ``strerror`` names that run (command, pid, host) and whose ``filename`` is `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if owner is not None:
            owner_path = folder / _OWNER_LOCK
            owner_lock = _hold(owner_path, wait=False)
            if owner_lock is None:
                raise BlockingIOError(errno.EWOULDBLOCK, _holder(owner_path), str(folder))
            held.callback(_release, owner_path, owner_lock)
            _record(owner_lock, owner)
        path = folder / f"{_LOCK_PREFIX}{RUN_ID}{_LOCK_SUFFIX}"
        descriptor = _hold(path, wait=True)
        assert descriptor is not None
        held.callback(_release, path, descriptor)
        _record(descriptor, owner)
        yield


def _live_runs(folder: Path) -> set[str]:
    """The ids of runs that hold their lock on `folder`; unheld lock files are removed. (The owner
    lock is not probed: a probe would hold it for an instant, and a run taking it then would be
    refused; a killed owner's file stays until the next owner takes it and lets it go.)"""
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
            path.unlink(missing_ok=True)  # its run is gone (a run about to hold it opens it again)
        finally:
            os.close(descriptor)
    return live


def _is_live(run: str | None, live: set[str]) -> bool:
    if run is None or run in live:
        return run is not None
    if "_" not in run:  # a bare pid (the native writer's): live if any live run has that pid
        return any(other.split("_", 1)[0] == run for other in live)
    return False


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
        if _is_live(_run_of(stale), live):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed
