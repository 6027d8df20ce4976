"""`--no-mmap`: a model file's bytes copied out of the file map into anonymous memory backed by huge pages.

A memory-mapped file is served from the page cache in 4 KiB pages, and Linux does not map those as 2 MiB pages
(`MADV_COLLAPSE` refuses file maps that are not executable). A decode step streams every weight once, so the
weights' TLB misses add up: on this project's Zen 3 dev machine the same matmuls read 7-14 % faster from memory
advised `MADV_HUGEPAGE`, and a decode step of the 2B-4T layout ran ~5 % faster (scripts/bench_ab.py, one
process). The price is start-up time: the copy itself is ~0.2 s per GB, but the kernel may first have to compact
memory to find free 2 MiB pages (0.1-4 s for 1.2 GB measured on a host whose page cache held several models).

The copy advises huge pages where the host offers them (`transparent_hugepage/enabled` = always or madvise);
elsewhere it is an ordinary anonymous copy (the file can then change or go away without affecting the model).
The file's pages are released from the process's resident set chunk by chunk as they are copied (a read-only
file map: they stay in the page cache), so the resident set never holds both copies. A file larger than the
memory available (MemAvailable) is not copied: GGUFFile keeps the map and logs a warning.
"""
from __future__ import annotations

import mmap
import re

import numpy as np

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MEMINFO = "/proc/meminfo"
COPY_CHUNK = 64 << 20  # bytes copied (then released from the file map) at a time


def huge_pages_mode(path: str = THP_ENABLED) -> str:
    """What the kernel does with anonymous memory: 'always', 'madvise', 'never', or '' where it does not say."""
    try:
        with open(path, encoding="ascii") as f:
            found = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return ""
    return found[1] if found else ""


def available_memory(path: str = MEMINFO) -> int | None:
    """Bytes the kernel could hand out without swapping (MemAvailable: free memory plus reclaimable caches,
    the file's own cached pages included), or None where it does not say."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def huge_pages_possible() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and huge_pages_mode() in ("always", "madvise")


def release(m: mmap.mmap, lo: int, hi: int) -> None:
    """madvise(DONTNEED) the whole pages of bytes [lo, hi) of a map: a read-only file map's pages leave the
    resident set (and stay cached); an anonymous map's pages are freed (they read as zeros afterwards)."""
    page = mmap.PAGESIZE
    lo, hi = (lo + page - 1) // page * page, hi // page * page
    if hi > lo and hasattr(m, "madvise"):
        try:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass


def copy_to_anonymous(src: mmap.mmap, size: int) -> mmap.mmap:
    """A private anonymous map holding src's first `size` bytes (advised MADV_HUGEPAGE where possible); src's
    pages are released as they are copied."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: an anonymous map without flags
        dst = mmap.mmap(-1, size)
    else:
        dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages_possible():
        try:
            dst.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    source = np.frombuffer(src, np.uint8, count=size)
    target = np.frombuffer(dst, np.uint8)
    for lo in range(0, size, COPY_CHUNK):
        hi = min(size, lo + COPY_CHUNK)
        target[lo:hi] = source[lo:hi]
        release(src, lo, hi)
    del source, target
    return dst


def huge_page_bytes(view: np.ndarray) -> int | None:
    """Bytes of the anonymous mapping that holds `view` that the kernel backs with huge pages now
    (AnonHugePages in /proc/self/smaps), or None where that file is not readable."""
    address = view.ctypes.data
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            inside = False
            for line in f:
                head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    inside = int(head[1], 16) <= address < int(head[2], 16)
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0
