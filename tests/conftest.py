"""Shared pytest fixtures and options."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# TL2 loads decode every time unless a test turns the repack cache on (tests/test_repack_cache.py): tests of the
# decoding itself must not read a cache file written by an earlier test or by the user
os.environ["BITNET_PY_REPACK_CACHE"] = "0"

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are files, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_fresh_python(code: str, timeout: int = 300, **env: str) -> None:
    """Run code in a new interpreter from the repository root with env added to the environment (switches read at
    import, such as BITNET_PY_AMX=0); fails the test with its stderr unless it exits 0."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr


def fixture_path(*parts: str) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"fixture missing: {p} (the shared fixtures must sit at ../shared/fixtures)")
    return p


_REF_CACHE: dict[str, dict] = {}


def load_reference(model: str, kind: str) -> dict:
    """ref-{kind}.json of a fixture model (kind in f32, i2_s, tl2, hf)."""
    key = f"{model}/{kind}"
    if key not in _REF_CACHE:
        _REF_CACHE[key] = json.loads(fixture_path(model, f"ref-{kind}.json").read_text())
    return _REF_CACHE[key]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return fixture_path()


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return json.loads(fixture_path("prompts.json").read_text())


# ---- live parity suite (tests/parity, docs/parity.md) -----------------------------------------------------------
def pytest_addoption(parser):
    g = parser.getgroup("parity", "live parity against a llama.cpp-family server (docs/parity.md)")
    g.addoption("--parity", action="store_true", default=False,
                help="run the tests marked `parity` (deselected otherwise)")
    g.addoption("--llama-server", metavar="PATH", default=None,
                help="llama-server binary to start on 127.0.0.1 for each model (e.g. bitnet.cpp's build/bin/llama-server)")
    g.addoption("--parity-url", metavar="URL", default=None,
                help="an already running llama-server-compatible server (use with --parity-model)")
    g.addoption("--parity-model", metavar="GGUF", action="append", default=None,
                help="GGUF path or fixture name (tiny-llama/f32, tiny-bitnet/tq2_0, ...); repeatable; "
                     "default: every fixture model the server can load")
    g.addoption("--parity-threads", metavar="N", type=int, default=2, help="threads for --llama-server")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--parity"):
        return
    deselected = [it for it in items if it.get_closest_marker("parity") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if it.get_closest_marker("parity") is None]
