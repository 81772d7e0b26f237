"""One process per GPU under ``torchrun``: which share of the items this process owns, and the
few collective steps the commands need (barrier, gather, agreeing to stop, summing counts so every
process agrees on which LoRAs step, averaging the LoRA's gradients as DDP does). Without
``torchrun`` (no ``WORLD_SIZE``) this is a world of one and no process group is created.

A torchrun worker ends with its launcher: torchrun starts each worker in a session of its own, so
a launcher killed with SIGKILL (or by the OOM killer) would leave them training on, writing the
run's folder beside the next run. Each worker asks the kernel for :data:`LAUNCHER_DIED` when its
parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux; elsewhere a thread watches the parent pid),
which stops it as torchrun's own forwarded SIGTERM does: ``train`` saves a checkpoint after the step
and exits. A signal of its own, not SIGTERM: the kernel sends it again each time the worker passes
from one dying launcher thread to the next, and a repeated SIGTERM means "abort now"."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from masktrain.errors import Interrupted

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's items: every `world`-th from `rank`, disjoint across processes."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """`value` from every process, in rank order (on every process)."""
        if self.world == 1:
            return [value]
        values: list[T] = [value] * self.world
        dist.all_gather_object(values, value)
        return values

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (so all stop at the same step)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def total(self, counts: Mapping[str, int]) -> dict[str, int]:
        """`counts` summed over the processes (the same keys on every process; one all-reduce)."""
        if self.world == 1 or not counts:
            return dict(counts)
        values = torch.tensor([counts[key] for key in counts], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(values)
        return dict(zip(counts, (int(value) for value in values), strict=True))

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the processes (one all-reduce of
        them all; a parameter without a gradient counts as zeros)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            count = grad.numel()
            param.grad = flat[offset : offset + count].view_as(param).clone()
            offset += count


def _collective_device() -> torch.device:
    """Where a collective's own small tensors live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # this process's GPU
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(timeout_minutes: float | None = None) -> Iterator[Shard]:
    """This process's shard, in the process group `torchrun` describes (gloo on CPU, nccl on GPU),
    left when the block ends. On a normal end, and on an interruption every process agreed to,
    the processes leave together (a barrier first): one that tears down its gloo connections
    while its peer still uses them can abort the peer ("terminate called without an active
    exception", seen under load at the end of a torchrun cache run). On an error only this
    process may be leaving, so it leaves at once and its peers' next collective fails."""
    shard = start(timeout_minutes)
    try:
        yield shard
    except Interrupted:
        _leave(shard, together=True)
        raise
    except BaseException:
        _leave(shard, together=False)
        raise
    _leave(shard, together=True)


def start(timeout_minutes: float | None = None) -> Shard:
    """Join the process group `torchrun` describes in the environment (a world of one without it);
    a collective waits `timeout_minutes` for its peers (torch's default when None: 10 min for
    nccl, 30 for gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (not by a script of the user's)
        stop_with_launcher()
    if not dist.is_initialized():
        timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return Shard(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _leave(shard: Shard, together: bool) -> None:
    if shard.world > 1 and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


_PR_SET_PDEATHSIG = 1

#: The signal a torchrun worker gets when its launcher dies (SIGTERM where there is no SIGUSR2).
LAUNCHER_DIED: signal.Signals = getattr(signal, "SIGUSR2", signal.SIGTERM)


def stop_with_launcher(sig: signal.Signals = LAUNCHER_DIED) -> None:
    """Have `sig` sent to this process when its parent (torchrun) dies."""
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            if os.getppid() != launcher:  # it died before the request: nobody will send the signal
                os.kill(os.getpid(), sig)
            return
    threading.Thread(target=_watch_parent, args=(launcher, sig), daemon=True, name="launcher-watch").start()


def _watch_parent(launcher: int, sig: signal.Signals) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), sig)
