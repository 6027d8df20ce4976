"""Memory backed by huge pages (2 MiB): the KV cache, and the model's bytes under `--no-mmap`.

Streams that cross many 4 KiB pages (every weight once per decode step; the K/V rows of every layer and head)
pay a page-table walk per page. Linux backs anonymous memory with transparent huge pages
where `transparent_hugepage/enabled` is `always`, or `madvise` and the memory is advised `MADV_HUGEPAGE`; numpy
does not advise its large arrays here (numpy 2.4: no `hg` in their VmFlags), and page-cache maps of ordinary files
stay in 4 KiB pages (`MADV_COLLAPSE` refuses them). Measured on this project's Zen 3 dev machine, one process,
rounds alternated:
- `zeros(shape, dtype)` (the KV cache): decode at depth 1000 / 2000 / 3800 1.060 / 1.069 / 1.147 against np.zeros.
- `copy_to_anonymous` (`--no-mmap`): the same ternary matmuls and f16 head read 7-14 % faster than from the file
  map, a decode step ~5-9 % (scripts/bench_ab.py --no-mmap). The price is start-up time: ~0.2 s per GB where the
  memory is already backed, 0.5-4.8 s for 1.2 GB on this VM, which faults every new page in from its host.

Where huge pages are not offered these are ordinary anonymous maps. The copy releases the file's pages from the
resident set chunk by chunk as they are copied (a read-only file map: they stay in the page cache), so the
resident set never holds both copies. A file larger than the memory available (MemAvailable, and the room left
under the process's cgroup memory limit: a container's) is not copied: GGUFFile keeps the map and logs a warning.
"""
from __future__ import annotations

import mmap
import os
import re

import numpy as np

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 62  # cgroup memory limits at or above this mean none (v1 writes 2^63 rounded down to a page)
COPY_CHUNK = 64 << 20  # bytes copied (then released from the file map) at a time
NO_MMAP_HELP = ("copy the model into anonymous memory (huge pages where the host offers them) before serving, "
                "instead of mapping the file and moving it into huge pages in the background: a slower start, the "
                "same decode speed")  # the --no-mmap flag of serve.py, bench, generate
KEEP_FILE_MAP_HELP = ("read the weights from the file's page-cache pages for good: no background copy into huge pages "
                      "after the load (bitnet_py.promotion; that copy makes decode ~10 %% faster); the pages stay "
                      "shared with other processes that map the same file")


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


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # also "max": no limit


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: str = PROC_CGROUP, root: str = CGROUP_ROOT) -> int | None:
    """Bytes this process's memory cgroup lets it add before its limit (a container's memory limit, which
    MemAvailable does not show): limit - charged + page cache (reclaimable), the least over the cgroup and its
    ancestors; None where no limit is set or the files do not say. cgroup v2 (memory.max, memory.current, `file`
    of memory.stat) and v1 (memory.limit_in_bytes, memory.usage_in_bytes, `total_cache`)."""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            top, files = root, ("memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):
            top, files = os.path.join(root, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
        else:
            continue
        folder = os.path.normpath(top + "/" + path.strip("/"))
        while folder.startswith(top):
            limit = _read_int(os.path.join(folder, files[0]))
            if limit is not None and limit < NO_LIMIT:
                usage = _read_int(os.path.join(folder, files[1])) or 0
                room = max(0, limit - usage + _stat_field(os.path.join(folder, "memory.stat"), files[2]))
                least = room if least is None else min(least, room)
            if folder == top:
                break
            folder = os.path.dirname(folder)
    return least


def fits_in_memory(size: int) -> bool:
    """Whether `size` more bytes fit in the memory available (MemAvailable) and under the process's cgroup memory
    limit (True where neither says)."""
    return all(room is None or size <= room for room in (available_memory(), cgroup_headroom()))


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


def anonymous_map(size: int) -> mmap.mmap:
    """A private anonymous map of `size` bytes (zeros until written), advised MADV_HUGEPAGE where possible."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: an anonymous map without flags
        return mmap.mmap(-1, max(1, size))
    m = mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages_possible():
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return m


def zeros(shape: tuple, dtype) -> np.ndarray:
    """np.zeros(shape, dtype) in an anonymous map advised huge pages (untouched pages are not resident)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(anonymous_map(count * dtype.itemsize), dtype, count=count).reshape(shape)


def copy_to_anonymous(src: mmap.mmap, size: int, skip: list[tuple[int, int]] = ()) -> mmap.mmap:
    """anonymous_map(size) holding src's first `size` bytes, except the whole pages inside the `skip` byte ranges
    (left untouched: zeros, not resident); src's pages are released as they are copied."""
    page = mmap.PAGESIZE
    holes = sorted(((lo + page - 1) // page * page, hi // page * page) for lo, hi in skip)
    holes = [(lo, hi) for lo, hi in holes if hi > lo]
    dst = anonymous_map(size)
    source = np.frombuffer(src, np.uint8, count=size)
    target = np.frombuffer(dst, np.uint8)
    for lo in range(0, size, COPY_CHUNK):
        hi = min(size, lo + COPY_CHUNK)
        start = lo
        for h_lo, h_hi in holes:  # the parts of [lo, hi) outside the holes
            if h_hi > start and h_lo < hi:
                target[start:max(start, h_lo)] = source[start:max(start, h_lo)]
                start = min(hi, max(start, h_hi))
        target[start:hi] = source[start:hi]
        release(src, lo, hi)
    del source, target
    return dst


def smaps_mappings() -> list[tuple[int, int, dict[str, list[str]]]] | None:
    """/proc/self/smaps as (start, end, fields) per mapping (fields: name -> values, e.g. "VmFlags" -> ["rd", "wr",
    ..., "hg"], "Rss" -> ["812", "kB"]), or None where that file is not readable."""
    mappings: list[tuple[int, int, dict[str, list[str]]]] = []
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    mappings.append((int(head[1], 16), int(head[2], 16), {}))
                elif mappings:
                    name, *values = line.split()
                    mappings[-1][2][name.rstrip(":")] = values
    except OSError:
        return None
    return mappings


def smaps_fields(view: np.ndarray) -> dict[str, list[str]] | None:
    """The /proc/self/smaps fields of the mapping that holds `view`; {} if no mapping does, None where that file is
    not readable."""
    mappings = smaps_mappings()
    if mappings is None:
        return None
    address = view.ctypes.data
    return next((fields for lo, hi, fields in mappings if lo <= address < hi), {})


def huge_page_bytes_in(address: int, size: int) -> int | None:
    """AnonHugePages bytes of all mappings inside [address, address + size) (a promoted map is split into many,
    bitnet_py.promotion), or None where /proc/self/smaps is not readable."""
    mappings = smaps_mappings()
    if mappings is None:
        return None
    return sum(int(fields.get("AnonHugePages", ["0"])[0]) * 1024 for lo, hi, fields in mappings
               if address <= lo and hi <= address + size)


def huge_page_bytes(view: np.ndarray) -> int | None:
    """Bytes of the anonymous mapping that holds `view` that the kernel backs with huge pages now
    (AnonHugePages in /proc/self/smaps), or None where that file is not readable."""
    fields = smaps_fields(view)
    return None if fields is None else int(fields.get("AnonHugePages", ["0"])[0]) * 1024
