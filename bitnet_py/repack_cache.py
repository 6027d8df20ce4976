"""On-disk cache of weights prepared at load (TL2 / TQ1_0 / TQ2_0 tensors repacked to I2_S bytes, ternary
tensors in the base-3 layout as ``<name>#b3`` on hosts that use it, the screened head's int8 copy),
memory-mapped on later loads.

The kernels read only I2_S's layout (or the base-3 one made from it), so every load of a TL2 file decodes each
ternary tensor into a new copy (1.7-2.3 s of a ~3 s load at the 2B-4T layout on 2 vCPUs, most of the rest being
page faults on that copy);
TQ1_0/TQ2_0 files likewise (5-6 s at 2B-4T shapes), whose f32 block scales are stored beside the bytes as
tensor ``<name>#block_scales``. The screened head's int8 copy of an f16 output head (bitnet_py.screened_head:
0.3-1.5 s to build at 2B-4T) is kept the same way, as ``<head>#screen_q`` and ``<head>#screen_rows``, for I2_S
files too.
The first load writes the repacked bytes to one cache file; later loads map it instead (no decoding, no
anonymous copy: the pages are shared page cache like an I2_S file's). Entries a load does not read (the screened
head's copy, in a load without the screen) are named `unwanted`: a promotion (`skip`) and a no_mmap copy leave them
in the file map, where `save` still reads them.

File: ``$BITNET_PY_CACHE/repacked/<stem>-<path hash>-<key hash>.i2s`` (``BITNET_PY_CACHE`` as in hub.py,
default ``~/.cache/bitnet-py``), where the key covers the source file's real path, size, mtime and inode, the
TL2 tiling and FORMAT_VERSION: an edited, replaced or re-tiled model gets a new file (the old one of the
same path is deleted). Layout: a HEADER_BYTES JSON header (``{"key", "tensors": {name: [offset, nbytes]}}``,
NUL-padded) after MAGIC, then each tensor's bytes at a page-aligned offset. A header that does not match,
or a file shorter than its table says, is ignored and rewritten. Files are written to a temporary name,
fsynced and renamed, so a crash leaves either no cache file or a complete one.

``BITNET_PY_REPACK_CACHE=0`` turns the cache off (the tests do, except the cache's own); a cache folder that
cannot be written only logs a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from .huge_pages import copy_to_anonymous, fits_in_memory

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the repacked layout or this file format changes (2: base-3 byte encoding)
MAGIC = b"BNPY-I2S-REPACK\n"
HEADER_BYTES = 1 << 16
ALIGN = 4096
TQ_SCALES_SUFFIX = "#block_scales"  # TQ1_0/TQ2_0: the f32 block scales [M, K/256] stored beside the bytes
ENV_SWITCH = "BITNET_PY_REPACK_CACHE"


def read_only(packed: np.ndarray) -> np.ndarray:
    """Repacked weights are read-only like the memory-mapped ones (I2_S files, the repack cache): Numba compiles
    a kernel per array type, read-only included, so all ternary weights then share one compiled set."""
    packed.flags.writeable = False
    return packed


def cache_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").lower() not in ("0", "false", "no", "off")


def cache_folder() -> Path:
    env = os.environ.get("BITNET_PY_CACHE")
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(env).expanduser() if env else xdg / "bitnet-py"
    return base / "repacked"


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _dead_writer(path: Path) -> bool:
    """Whether path is the temporary file of a writer process that no longer runs."""
    parts = path.name.split(".")
    if len(parts) < 3 or parts[-1] != "tmp" or not parts[-2].isdigit():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class RepackCache:
    """The cache file of one source GGUF and tiling: `get(name)` -> mapped u8 array or None (a miss);
    `put(name, packed)` collects this load's repacked tensors; `save()` writes them if anything missed."""

    def __init__(self, source: str | os.PathLike, tiling: dict, folder: Path | None = None, anonymous: bool = False,
                 unwanted: tuple[str, ...] = (), b3: bool = False):
        """anonymous: copy a cache file that is hit into anonymous memory (the model's no_mmap). unwanted: suffixes
        of entry names this load does not read (the screened head's copy when the head is not screened): they are
        neither copied nor promoted (`skip`), and stay readable from the file map for `save`. b3: this load keeps
        ternary tensors in the base-3 layout (bitnet_py.weights), part of the key: a load without it (another
        host, BITNET_PY_B3=0) writes its own file rather than map base-3 entries it does not read."""
        self.anonymous = anonymous
        self.unwanted = tuple(unwanted)
        real = os.path.realpath(source)
        st = os.stat(real)
        tiles = sorted((m, k, t.bm, t.bk) for (m, k), t in tiling.items())
        self.key = json.dumps({"version": FORMAT_VERSION, "path": real, "size": st.st_size,
                               "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "tiling": tiles, "b3": b3})
        self.folder = folder or cache_folder()
        self._prefix = f"{Path(real).stem}-{_digest(real, 8)}-"
        self.path = self.folder / f"{self._prefix}{_digest(self.key, 16)}.i2s"
        self.file_map: np.ndarray | None = None  # u8 view of the whole cache file's map, when one is hit and mapped
        self.skip: list[tuple[int, int]] = []  # byte ranges of the file map with the unwanted entries
        self._mapped: dict[str, np.ndarray] = self._open()
        self._new: dict[str, np.ndarray] = {}

    @property
    def hit(self) -> bool:
        return bool(self._mapped)

    def _open(self) -> dict[str, np.ndarray]:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < HEADER_BYTES:
                    return {}
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return {}
        try:
            head = bytes(mm[:HEADER_BYTES])
            if not head.startswith(MAGIC):
                raise ValueError("bad magic")
            meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
            if meta.get("key") != self.key:
                raise ValueError("key mismatch")
            tensors = meta["tensors"]
            for name, (offset, nbytes) in tensors.items():
                if offset < HEADER_BYTES or offset + nbytes > size:
                    raise ValueError(f"tensor {name} outside the file")
            skip = [(offset, offset + nbytes) for name, (offset, nbytes) in tensors.items()
                    if name.endswith(self.unwanted)]
            file_data = np.frombuffer(mm, dtype=np.uint8)
            copied = self.anonymous and fits_in_memory(size - sum(hi - lo for lo, hi in skip))
            data = np.frombuffer(copy_to_anonymous(mm, size, skip), dtype=np.uint8) if copied else file_data
            out = {}
            for name, (offset, nbytes) in tensors.items():  # unwanted entries' bytes: in the file map only
                out[name] = (file_data if name.endswith(self.unwanted) else data)[offset:offset + nbytes]
            self.file_map, self.skip = (None, []) if copied else (data, skip)
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring repack cache %s (%s); it will be rewritten", self.path, e)
            return {}

    def get(self, name: str, nbytes: int) -> np.ndarray | None:
        arr = self._mapped.get(name)
        return arr if arr is not None and arr.nbytes == nbytes else None

    def put(self, name: str, packed: np.ndarray) -> None:
        self._new[name] = packed

    def save(self) -> None:
        """Write a complete cache file when this load repacked anything (all tensors, mapped or new)."""
        if not self._new:
            return
        tensors = {**self._mapped, **self._new}
        table, offset = {}, HEADER_BYTES
        for name, arr in tensors.items():
            table[name] = [offset, int(arr.nbytes)]
            offset = (offset + arr.nbytes + ALIGN - 1) // ALIGN * ALIGN
        header = MAGIC + json.dumps({"key": self.key, "tensors": table}).encode()
        if len(header) > HEADER_BYTES:
            log.warning("repack cache not written: %d tensors do not fit its header", len(table))
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(header.ljust(HEADER_BYTES, b"\0"))
                for name, arr in tensors.items():
                    fh.seek(table[name][0])
                    fh.write(memoryview(np.ascontiguousarray(arr)))
                fh.truncate(offset)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("repack cache not written to %s: %s (TL2 files will be repacked at every load)",
                        self.folder, e)
            _remove(tmp)
            return
        for old in self.folder.glob(f"{self._prefix}*"):  # earlier versions of the same source, dead writers' files
            if old != self.path and (old.suffix == ".i2s" or _dead_writer(old)):
                _remove(old)
        log.info("wrote repack cache %s (%.0f MB)", self.path, offset / 1e6)
