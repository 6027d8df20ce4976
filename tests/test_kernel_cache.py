"""The on-disk kernel cache is keyed on every kernels/*.py source, so an edit to a file whose helpers other
files inline (simd.py, attention_fast.py) cannot leave stale compiled code running."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import config

KERNELS = Path(config.__file__).resolve().parent


def test_cache_dir_is_named_after_the_sources(tmp_path):
    assert config.CACHE_DIR.endswith(f"kernel-cache-{config.SOURCE_HASH}")
    copy = tmp_path / "k"
    shutil.copytree(KERNELS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert config.source_hash(copy) == config.SOURCE_HASH
    (copy / "simd.py").write_text((copy / "simd.py").read_text() + "\n# edited\n")
    assert config.source_hash(copy) != config.SOURCE_HASH


@pytest.mark.skipif(not config.CACHE, reason="kernel cache disabled (BITNET_PY_NO_CACHE)")
def test_cached_kernels_live_under_the_hashed_dir():
    from kernels.ternary_matmul import i2s_matmul
    assert Path(i2s_matmul._cache._cache_path).is_relative_to(config.CACHE_DIR)


def test_editing_an_inlined_helper_recompiles_its_callers(tmp_path):
    """A caller in one file, its helper in another: edit only the helper, and a fresh process must see the
    new helper (Numba alone would load the caller's cached code, keyed on the caller's unchanged file)."""
    pkg = tmp_path / "kernels"
    shutil.copytree(KERNELS, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "zz_helper.py").write_text("from numba import njit\nfrom .config import JIT\n\n\n"
                                      "@njit(**JIT)\ndef helper():\n    return 1\n")
    (pkg / "zz_user.py").write_text("from numba import njit\nfrom .config import JIT\nfrom .zz_helper import helper"
                                    "\n\n\n@njit(**JIT)\ndef user():\n    return helper() * 10\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"), BITNET_PY_NO_CACHE="0")
    code = "from kernels.zz_user import user; print(user())"

    def run() -> str:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert run() == "10"
    assert run() == "10"  # second process: from the cache
    assert list((tmp_path / "cache").glob("kernel-cache-*"))
    (pkg / "zz_helper.py").write_text((pkg / "zz_helper.py").read_text().replace("return 1", "return 2"))
    assert run() == "20"
