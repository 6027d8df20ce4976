"""scripts/bench_vs_llama_cpp.py: bitnet-py and upstream llama.cpp timed on twin files in one run.

Runs on the fixtures' tiny-bitnet model: bitnet.cpp's I2_S file for us, a TQ2_0 file our converter makes from the
same hf/ weights for llama.cpp (the layouts match). Needs llama-cpp-python (CI installs it; without it these
skip, unless BITNET_PARITY_REQUIRE_PEER=1)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import fixture_path, load_script

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

pytestmark = pytest.mark.skipif(llama_cpp is None and os.environ.get("BITNET_PARITY_REQUIRE_PEER") != "1",
                                reason="llama-cpp-python not installed (scripts/install_llama_cpp_python.sh)")


@pytest.fixture(scope="module")
def peer_file(tmp_path_factory) -> Path:
    from bitnet_py.convert import convert
    out = tmp_path_factory.mktemp("peer") / "tiny-bitnet-tq2_0.gguf"
    convert(str(fixture_path("tiny-bitnet", "hf")), "tq2_0", str(out), progress=False)
    return out


def test_both_engines_timed_with_their_ratio(peer_file, capsys):
    ours = fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")
    script = load_script("bench_vs_llama_cpp")
    rc = script.main(["--ours", str(ours), "--peer", str(peer_file), "-p", "8", "-n", "4", "-t", "1",
                      "-r", "2", "--rounds", "2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layout"]["arch"] == "bitnet" and "I2_S" in res["layout"]["matrix_types"]
    assert "TQ2_0" in res["peer_types"]
    assert [(r["test"], r["threads"]) for r in res["results"]] == [("pp8", 1), ("tg4", 1)]
    for r in res["results"]:
        assert len(r["ours_runs"]) == len(r["peer_runs"]) == 2 and all(len(v) == 2 for v in r["peer_runs"])
        assert r["ours_tok_s"] > 0 and r["peer_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_tok_s"] / r["peer_tok_s"])
        assert len(r["round_ratios"]) == 2


def test_markdown_table(peer_file, capsys):
    ours = fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")
    script = load_script("bench_vs_llama_cpp")
    assert script.main(["--ours", str(ours), "--peer", str(peer_file), "-p", "4", "-n", "0", "-t", "1",
                        "-r", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| test | threads | bitnet-py tok/s | llama.cpp tok/s | ratio |" in out
    assert sum(line.startswith("| pp4 | 1 |") for line in out.splitlines()) == 1


def test_different_layouts_and_bad_input_are_refused(peer_file, capsys, tmp_path):
    script = load_script("bench_vs_llama_cpp")
    other = fixture_path("tiny-llama", "ggml-model-f32.gguf")
    assert script.main(["--ours", str(other), "--peer", str(peer_file)]) == 1
    assert "different layouts: arch llama vs bitnet" in capsys.readouterr().err
    ours = fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")
    assert script.main(["--ours", str(ours), "--peer", str(tmp_path / "missing.gguf")]) == 1
    assert "no such model file" in capsys.readouterr().err
    assert script.main(["--ours", str(ours), "--peer", str(peer_file), "-p", "0", "-n", "0"]) == 1
    assert "nothing to measure" in capsys.readouterr().err
