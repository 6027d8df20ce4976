"""Move a mapped model's streamed bytes into huge pages in the background, at the same addresses.

A memory-mapped GGUF file is read through the page cache in 4 KiB pages: the hardware prefetchers stop at every
page end and each page costs a page-table walk. On the dev VM one thread streams a file map at 14 GB/s and the
same bytes in anonymous huge pages at 19-20 GB/s; a 2B-4T decode step runs ~10 % faster from the latter.
`--no-mmap` pays for its copy at load (0.5-4.8 s per GB on a VM that faults every new page in from its host); a
promotion keeps the fast mapped load and makes the copy afterwards, while the model already serves:

for each 2 MiB-aligned stretch of the map, a fresh anonymous map advised `MADV_HUGEPAGE` (at an address the kernel
picks: a fixed staging address could by then belong to another thread's map) is filled with the same bytes and
`mremap`-ed over the stretch. The kernel moves the whole huge page into place atomically (under the process's
mmap lock), so readers on other threads see the file's bytes or the identical copy, never a hole; numpy views keep
their addresses. The file's pages leave the resident set as their stretch is replaced (they stay in the page cache,
clean), so the resident set never holds both. Stretches that touch a `skip` range (tensors read a few rows at a
time or only at load: the token embedding, a screened head, repacked TL2 tensors) stay mapped (a screened head
follows once a request reads it whole: GGUFFile.promote_tensor). Linux only, where
transparent huge pages are offered (`always` or `madvise`); elsewhere nothing happens and the map serves as before.

A promotion holds a view of the whole map, so the map cannot be unmapped under it (mmap.close raises BufferError
while views exist); `stop()` ends it early (GGUFFile.close).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import threading
import time

import numpy as np

from .huge_pages import fits_in_memory, huge_pages_possible

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_PROT_READ, _PROT_WRITE = 1, 2
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MAP_FAILED = ctypes.c_void_p(-1).value
COPY_NICENESS = 10  # the copying thread yields to the kernels that serve meanwhile


def _libc():
    """libc with mmap/mremap/mprotect/munmap/madvise typed, or None off Linux (no mremap)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fns = {"mmap": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_long]),
               "mremap": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                                            ctypes.c_void_p]),
               "mprotect": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
               "munmap": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
               "madvise": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])}
        for name, (restype, argtypes) in fns.items():
            fn = getattr(libc, name)
            fn.restype, fn.argtypes = restype, argtypes
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def promotion_possible() -> bool:
    return _LIBC is not None and huge_pages_possible()


def stretches(address: int, size: int, skip: list[tuple[int, int]] = ()) -> list[int]:
    """Start addresses of the 2 MiB-aligned stretches inside [address, address + size) that overlap no byte range
    of `skip` (offsets from address)."""
    first = (address + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    out = []
    for start in range(first, address + size - HUGE_PAGE + 1, HUGE_PAGE):
        lo, hi = start - address, start - address + HUGE_PAGE
        if not any(s_lo < hi and s_hi > lo for s_lo, s_hi in skip):
            out.append(start)
    return out


def _copy_over(target: int) -> None:
    """Fill a fresh huge page with the HUGE_PAGE bytes at target and move it there. The page is a new map at an
    address the kernel picks (never MAP_FIXED: another thread may have been given any hole since the last one);
    the unaligned ends of that map are unmapped first, the aligned middle is moved whole."""
    raw = _LIBC.mmap(None, 2 * HUGE_PAGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if raw in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap of a staging huge page failed")
    page = (raw + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if page > raw:
        _LIBC.munmap(raw, page - raw)
    _LIBC.munmap(page + HUGE_PAGE, raw + 2 * HUGE_PAGE - page - HUGE_PAGE)
    _LIBC.madvise(page, HUGE_PAGE, mmap.MADV_HUGEPAGE)
    ctypes.memmove(page, target, HUGE_PAGE)
    _LIBC.mprotect(page, HUGE_PAGE, _PROT_READ)  # as read-only as the file map it replaces
    moved = _LIBC.mremap(page, HUGE_PAGE, HUGE_PAGE, _MREMAP_MAYMOVE | _MREMAP_FIXED, target)
    if moved != target:
        error = ctypes.get_errno()
        _LIBC.munmap(page, HUGE_PAGE)
        raise OSError(error, "mremap onto the file map failed")


class Promotion:
    """Promotes the stretches of one or more maps (each a u8 view of a whole read-only map, with skip ranges) on a
    background thread. `wait()` blocks until done; `promoted_bytes`, `seconds` and `error` say how it went; `ranges`
    where the maps lie."""

    def __init__(self, maps: list[tuple[np.ndarray, list[tuple[int, int]]]]):
        self._maps = maps  # keeps every map alive (and mapped) until the thread is done
        self.ranges = [(view.ctypes.data, view.nbytes) for view, _ in maps]  # (address, bytes) of each map
        self._stop = threading.Event()
        self.done = threading.Event()
        self.promoted_bytes = 0
        self.seconds = 0.0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="huge-page-promotion", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COPY_NICENESS)
        except (OSError, AttributeError):
            pass
        try:
            for view, skip in self._maps:
                for start in stretches(view.ctypes.data, view.nbytes, skip):
                    if self._stop.is_set():
                        return
                    _copy_over(start)
                    self.promoted_bytes += HUGE_PAGE
        except OSError as e:  # the stretches done so far stay promoted; the rest stays mapped
            self.error = str(e)
            log.warning("promotion of the weights to huge pages stopped: %s", e)
        finally:
            self._maps = []
            self.seconds = time.perf_counter() - t0
            self.done.set()
            log.info("weights promoted to huge pages: %.2f GB in %.1f s", self.promoted_bytes / 1e9, self.seconds)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def promote(maps: list[tuple[np.ndarray, list[tuple[int, int]]]]) -> Promotion | None:
    """Start promoting the maps (u8 views of whole read-only maps, each with byte ranges to leave mapped) -> the
    running Promotion, or None where it is not possible or the copy would not fit in the memory available."""
    if not promotion_possible():
        return None
    total = sum(len(stretches(v.ctypes.data, v.nbytes, skip)) for v, skip in maps) * HUGE_PAGE
    if not total:
        return None
    if not fits_in_memory(total):
        log.warning("weights not promoted to huge pages: %.2f GB do not fit in the memory available", total / 1e9)
        return None
    return Promotion(maps)
