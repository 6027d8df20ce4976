"""Streaming safetensors access for the converter: memory-mapped, one tensor at a time, bf16 without torch.

The `safetensors` package's numpy backend cannot return bfloat16 (numpy has no such dtype), so the few bytes of
header are parsed here (8-byte little-endian header length, JSON header with dtype/shape/data_offsets) and each
tensor is a zero-copy view of the mapping until `load_f32` widens it. Sharded checkpoints
(`model.safetensors.index.json`) are handled as one name space.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2", "U8": "<u1", "I8": "<i1",
           "I16": "<i2", "I32": "<i4", "I64": "<i8", "U16": "<u2", "U32": "<u4", "BOOL": "<u1"}
MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    """A checkpoint file we cannot read; the message says which and why."""


@dataclass(frozen=True)
class STensor:
    name: str
    dtype: str  # safetensors dtype name: BF16, F16, F32, U8, ...
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset
    nbytes: int


class SafetensorsFile:
    """One .safetensors file, memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: corrupt safetensors header length {n}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, STensor] = {}
        for name, h in header.items():
            try:
                dtype, shape, (s, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{path}: bad header entry for {name}") from None
            if dtype not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if e - s != nbytes or 8 + n + e > size:
                raise SafetensorsError(f"{path}: tensor {name} data out of bounds (truncated file?)")
            self.tensors[name] = STensor(name, dtype, shape, path, 8 + n + s, nbytes)

    def raw(self, t: STensor) -> np.ndarray:
        """Zero-copy typed view (BF16 as uint16) in the tensor's shape."""
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.start) if t.nbytes else \
            np.zeros(0, np.uint8)
        return buf.view(_DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Exact widening of raw bfloat16 bits (uint16) to float32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """All safetensors files of a Hugging Face model directory."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
        else:
            files = sorted(p for p in os.listdir(hf_dir) if p.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"{hf_dir}: no *.safetensors files (pytorch .bin checkpoints are not supported)")
        self.files = [SafetensorsFile(os.path.join(hf_dir, p)) for p in files]
        self.tensors: dict[str, tuple[SafetensorsFile, STensor]] = {}
        for sf in self.files:
            for name, t in sf.tensors.items():
                self.tensors[name] = (sf, t)

    def names(self) -> list[str]:
        """Tensor names in sorted order (what bitnet.cpp's converter iterates)."""
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> STensor:
        return self.tensors[name][1]

    def raw(self, name: str) -> np.ndarray:
        sf, t = self.tensors[name]
        return sf.raw(t)

    def load_f32(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The tensor (or its rows start:stop) as a new float32 array (bf16/f16 widened exactly)."""
        sf, t = self.tensors[name]
        a = sf.raw(t)
        if start is not None or stop is not None:
            a = a[start:stop]
        if t.dtype == "BF16":
            return bf16_to_f32(a)
        return a.astype(np.float32)

    def close(self) -> None:
        for sf in self.files:
            sf.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
