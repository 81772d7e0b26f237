"""The stages every cacher (image or video) shares: sorting this process's items into fresh and
stale by fingerprint, and preparation beside encoding — the CPU work for the next chunk of items
(decoding, resizing, masks; the native core and PyAV release the GIL) runs on a worker thread
while the caller encodes the current chunk on the accelerator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Triage(Protocol):
    def fingerprint(self, item: Any, /) -> str: ...

    def status(self, item: Any, fingerprint: str, /) -> str: ...


def stale_items(cacher: Triage, discovery: Any, shard: Any, summary: Any, progress: Any) -> tuple[list, list]:
    """This process's share of `discovery`, and those of its items that need (re)building, each
    with its fingerprint. Counts into `summary`: items, skipped (fresh), rebuilt (stale) and
    failed (discovery failures and items whose inputs cannot be read); grows the progress total."""
    items, discovery_failed = shard.take(discovery.items), shard.take(discovery.failed)
    summary.items = len(items) + len(discovery_failed)
    summary.failed.extend(discovery_failed)
    todo: list[tuple[Any, str]] = []
    for item in items:
        try:
            fingerprint = cacher.fingerprint(item)
        except (OSError, ValueError) as error:
            summary.failed.append((item.path, str(error)))
            continue
        status = cacher.status(item, fingerprint)
        if status == "fresh":
            summary.skipped += 1
        else:
            summary.rebuilt += status == "stale"
            todo.append((item, fingerprint))
    progress.total = (progress.total or 0) + len(todo)
    progress.refresh()
    return items, todo


class Preparer(Protocol):
    def prepare(self, chunk: list[Any], /) -> Sequence[Any]: ...


def prepared_chunks(
    cacher: Preparer, chunks: Sequence[list[T]], overlap: bool
) -> Iterator[tuple[list[T], Sequence[Any]]]:
    """Yield (chunk, prepared results). With the VAE on an accelerator the next chunk is prepared
    on a worker thread while the caller encodes this one. With the VAE on the CPU both stages need
    the same cores, and OpenMP's spinning threads make sharing them slower than taking turns, so
    chunks are prepared in turn."""
    if not overlap:
        for chunk in chunks:
            yield chunk, cacher.prepare(chunk)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        pending = pool.submit(cacher.prepare, chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            assert pending is not None
            results = pending.result()
            pending = pool.submit(cacher.prepare, chunks[index + 1]) if index + 1 < len(chunks) else None
            yield chunk, results
