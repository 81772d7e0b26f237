"""Host memory as ``bench_memory.py`` measures it: anonymous resident memory (``RssAnon``, not the
file pages a safetensors mmap adds to plain RSS), glibc's bytes in use, and their peaks sampled on
a thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

GIB = 2**30


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (heap, not mapped files); 0 off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
if LIBC is not None and hasattr(LIBC, "mallinfo2"):  # glibc >= 2.33
    LIBC.mallinfo2.restype = _MallInfo2


def malloc_live() -> int:
    """Bytes in use in glibc's heap and its mmapped blocks: RssAnon less what glibc keeps of freed
    memory, which it may or may not give back depending on its heap's layout (before the loader
    called ``malloc_trim``, the same fp8 load peaked anywhere from 1.07x to 2x its weights in
    RssAnon, always ~1.07x here); 0 elsewhere."""
    if LIBC is None or not hasattr(LIBC, "mallinfo2"):
        return 0
    info = LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class HostPeak:
    """Peaks of :func:`rss_anon` and :func:`malloc_live` above their values at construction,
    sampled every ~2 ms on a daemon thread (torch's kernels release the GIL, so it samples while
    they allocate)."""

    def __init__(self) -> None:
        self.base = (rss_anon(), malloc_live())
        self.peak = self.base
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            self.peak = (max(self.peak[0], rss_anon()), max(self.peak[1], malloc_live()))

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def reset(self) -> tuple[float, float]:
        """(RssAnon, live) peaks in GiB above the base so far; sampling restarts from now."""
        self._sample()
        with self._lock:
            peak, self.peak = self.peak, (rss_anon(), malloc_live())
        return (peak[0] - self.base[0]) / GIB, (peak[1] - self.base[1]) / GIB

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.reset()
