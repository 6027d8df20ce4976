"""kernels.config's OpenMP wait setting: polite unless the user (or a deploy file) chose, and the choice reported."""
import json
import os
import subprocess
import sys

import pytest

from bitnet_py.bench_report import openmp_note
from conftest import REPO

PROBE = ("import json, os; from kernels import config; "
         "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), config.openmp_wait()]))")


def _config_env(**env) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env, expected", [
    ({}, ["10000", None, "GOMP_SPINCOUNT=10000 (polite default)"]),
    ({"GOMP_SPINCOUNT": "1000000"}, ["1000000", None, "GOMP_SPINCOUNT=1000000"]),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, [None, "PASSIVE", "OMP_WAIT_POLICY=PASSIVE"]),
])
def test_spin_count_is_set_only_where_the_user_chose_nothing(env, expected):
    assert _config_env(**env) == expected


def test_bench_header_names_the_wait_setting_for_the_omp_layer():
    assert openmp_note({"threading_layer": "omp", "openmp_wait": "GOMP_SPINCOUNT=1000000"}) == \
        " (GOMP_SPINCOUNT=1000000)"
    assert openmp_note({"threading_layer": "tbb", "openmp_wait": "GOMP_SPINCOUNT=10000 (polite default)"}) == ""
