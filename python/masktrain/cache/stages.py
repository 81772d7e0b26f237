"""The stages every cacher (image or video) shares: sorting this process's items into fresh and
stale by fingerprint, and preparation beside encoding — the CPU work for the next chunk of items
(decoding, resizing, masks; the native core and PyAV release the GIL) runs on a worker thread
while the caller encodes the current chunk on the accelerator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Never, Protocol, TypeAlias, TypeVar

from tqdm import tqdm

from masktrain import _native
from masktrain.cache.summary import DatasetSummary
from masktrain.data.cache_format import CacheStatus
from masktrain.data.discovery import Discovery, MediaItem
from masktrain.distributed import Shard

ProgressBar: TypeAlias = "tqdm[Never]"
"""A progress bar the cachers advance by hand (it iterates nothing)."""

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)


class Triage(Protocol):
    def fingerprint(self, item: MediaItem, /) -> str: ...

    def status(self, item: MediaItem, fingerprint: str, /) -> CacheStatus: ...


class Preparer(Protocol[P_co]):
    def prepare(self, chunk: list[MediaItem], /) -> Sequence[P_co]: ...


def chunk_size(batch_size: int) -> int:
    """Items prepared per native call. Several batches' worth, so each bucket's batches come out
    full (one tensor shape, not a ragged tail per chunk) and the cores stay busy; small enough
    that the prepared images of two chunks stay a few hundred MB at most."""
    return max(8 * batch_size, 4 * _native.thread_count())


def stale_items(
    cacher: Triage, discovery: Discovery, shard: Shard, summary: DatasetSummary, progress: ProgressBar
) -> tuple[list[MediaItem], list[tuple[MediaItem, str]]]:
    """This process's share of `discovery`, and those of its items that need (re)building, each
    with its fingerprint. Counts into `summary`: items, skipped (fresh), rebuilt (stale) and
    failed (discovery failures and items whose inputs cannot be read); grows the progress total."""
    items, discovery_failed = shard.take(discovery.items), shard.take(discovery.failed)
    summary.items = len(items) + len(discovery_failed)
    summary.failed.extend(discovery_failed)
    todo: list[tuple[MediaItem, str]] = []
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


def prepared_chunks(
    cacher: Preparer[P], chunks: Sequence[list[MediaItem]], overlap: bool
) -> Iterator[tuple[list[MediaItem], Sequence[P]]]:
    """Yield (chunk, prepared results). With the VAE on an accelerator the next chunk is prepared
    on a worker thread while the caller encodes this one. With the VAE on the CPU both stages need
    the same cores, and OpenMP's spinning threads make sharing them slower than taking turns, so
    chunks are prepared in turn."""
    if not overlap:
        for chunk in chunks:
            yield chunk, cacher.prepare(chunk)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        pending: Future[Sequence[P]] | None = pool.submit(cacher.prepare, chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            assert pending is not None
            results = pending.result()
            pending = pool.submit(cacher.prepare, chunks[index + 1]) if index + 1 < len(chunks) else None
            yield chunk, results
