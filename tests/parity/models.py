"""The GGUF files the parity suites run on: the fixtures' own files, plus TQ2_0 files our converter makes from the
fixtures' HF checkpoints (upstream llama.cpp reads TQ2_0 but not bitnet.cpp's I2_S / TL2)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bitnet_py.model import Model

from .prompts import FIXTURES

FIXTURE_MODELS = ("tiny-bitnet", "tiny-llama")
FIXTURE_KINDS = ("f32", "i2_s", "tl2")
CONVERTED_KINDS = ("tq2_0",)


@dataclass(frozen=True)
class ModelSpec:
    """One GGUF to compare on: a fixture file (`tiny-llama/f32`), a file our converter makes from a fixture's
    hf/ (`tiny-llama/tq2_0`), or any path."""
    name: str
    path: str | None = None  # None: made on demand by `materialize`

    @property
    def tl2(self) -> bool:
        return self.name.endswith("/tl2") or (self.path or "").endswith("-tl2.gguf")

    @property
    def ubatch(self) -> int:
        """bitnet.cpp's batched TL2 kernels are broken (fixtures README): TL2 runs one token per micro-batch."""
        return 1 if self.tl2 else 512

    def materialize(self, work_dir: Path) -> str:
        if self.path is not None:
            return self.path
        model, kind = self.name.split("/")
        out = work_dir / f"{model}-{kind}.gguf"
        if not out.exists():
            from bitnet_py.convert import convert
            tmp = out.with_suffix(".partial")
            convert(str(FIXTURES / model / "hf"), kind, str(tmp), progress=False)
            os.replace(tmp, out)
        return str(out)


def default_specs() -> list[ModelSpec]:
    specs = [ModelSpec(f"{m}/{k}", str(FIXTURES / m / f"ggml-model-{k}.gguf"))
             for m in FIXTURE_MODELS for k in FIXTURE_KINDS]
    return specs + [ModelSpec(f"{m}/{k}") for m in FIXTURE_MODELS for k in CONVERTED_KINDS]


def spec_from_option(value: str) -> ModelSpec:
    """--parity-model: a GGUF path, or a short name from default_specs() such as `tiny-llama/tq2_0`."""
    for s in default_specs():
        if value == s.name:
            return s
    p = Path(value)
    if not p.is_file():
        names = ", ".join(s.name for s in default_specs())
        raise ValueError(f"--parity-model {value!r}: no such file and not one of {names}")
    return ModelSpec(p.name, str(p.resolve()))


def load_ours(path: str) -> Model:
    """Our engine on the file; TL2 files inside the fixtures use the fixtures' kernel_config.ini."""
    ini = FIXTURES / "tl2-kernel_config.ini"
    inside = Path(path).resolve().is_relative_to(FIXTURES.resolve())
    return Model.load(path, tl2_config=str(ini) if inside and ini.exists() else None)
