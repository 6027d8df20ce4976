"""bitnet_py.allocator: activation-sized buffers freed and allocated again come back from the heap, without page
faults. Each case runs in a fresh interpreter: the malloc thresholds are process-wide and cannot be unset."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

# a prefill layer's pattern: arrays of a few MB allocated, written, freed, over and over
PROBE = """
import json, resource, sys
import numpy as np
from bitnet_py.allocator import keep_freed_buffers
applied = keep_freed_buffers() if sys.argv[1] == "keep" else False
def cycle():  # a layer: its arrays alive together (128 x 6912 and 128 x 2560 float32, ...), then all freed
    arrays = [np.empty(size // 4, np.float32) for size in (3_538_944, 1_310_720, 3_538_944, 884_736)]
    for a in arrays:
        a[:] = 1.0
    del arrays
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, env_extra: dict | None = None) -> dict:
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                                                            "GLIBC_TUNABLES")}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are glibc's (Linux)")
def test_freed_buffers_are_reused_without_page_faults():
    kept = _probe("keep")
    assert kept["applied"] is True
    pages_per_cycle = (3_538_944 * 2 + 1_310_720 + 884_736) // 4096
    assert kept["faults"] < pages_per_cycle  # 20 cycles, at most a few stray pages
    plain = _probe("plain")  # glibc's defaults: the same cycles fault their pages in again
    assert plain["faults"] > 5 * pages_per_cycle, plain


def test_user_malloc_settings_are_left_alone():
    assert _probe("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})["applied"] is False
    assert _probe("keep", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})["applied"] is False
