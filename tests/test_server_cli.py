"""serve.py as users run it: a subprocess with flags, JSON logs, a per-request log line, SIGTERM exit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, fixture_path
from live_server import free_port, wait_healthy


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_bad_flags_and_missing_model_exit_nonzero():
    bad = subprocess.run([sys.executable, str(REPO / "serve.py"), "--parallel", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--parallel" in bad.stderr
    proc = spawn("--model", str(REPO / "no-such-model.gguf"), "--port", str(free_port()))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "no-such-model.gguf" in err


def test_cli_serves_logs_json_and_exits_on_sigterm():
    port = free_port()
    model = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    proc = spawn("--model", model, "--port", str(port), "--threads", "1", "--parallel", "2", "--ctx-size", "256",
                 "--log-format", "json", "--model-alias", "tiny", env={"BITNET_PY_API_KEY": "k3y"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=90)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401          # key from the environment
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k3y"}, timeout=30,
                       json={"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        props = httpx.get(url + "/props", headers={"Authorization": "Bearer k3y"}, timeout=5).json()
        assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 256
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    records = [json.loads(line) for line in err.splitlines() if line.strip()]     # every line is JSON
    done = [r for r in records if r["logger"] == "bitnet_py.server_stream" and " done: " in r["message"]]
    assert len(done) == 1 and "generated 5 tokens" in done[0]["message"] and "tok/s" in done[0]["message"]
    assert not any("k3y" in line for line in err.splitlines())


@pytest.mark.parametrize("flag", ["--threads", "--ctx-size", "--max-queue"])
def test_numeric_flags_validated(flag):
    r = subprocess.run([sys.executable, str(REPO / "serve.py"), flag, "-5"], capture_output=True, text=True)
    assert r.returncode == 2 and flag in r.stderr


def test_cache_and_head_type_flags_reach_the_model():
    from bitnet_py.server_cli import build_parser, load_options, make_loader
    args = build_parser().parse_args(["--model", str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")),
                                      "--cache-type", "f32", "--head-type", "int8"])
    model = make_loader(args.model, **load_options(args))()
    assert model.cache_type == "f32" and model.new_kv_cache(2, 16).is_f32
    assert model.weights.output.i8 is not None and model.gguf.mapped
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cache-type", "q4"])


def test_no_mmap_flag_reaches_the_model():
    from bitnet_py.server_cli import build_parser, load_options, make_loader
    args = build_parser().parse_args(["--model", str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf")),
                                      "--no-mmap"])
    model = make_loader(args.model, **load_options(args))()
    assert not model.gguf.mapped


def test_keep_file_map_flag_reaches_the_model():
    from bitnet_py.server_cli import build_parser, load_options
    path = str(fixture_path("tiny-llama", "ggml-model-f32.gguf"))
    assert load_options(build_parser().parse_args(["--model", path]))["promote"] is True
    assert load_options(build_parser().parse_args(["--model", path, "--keep-file-map"]))["promote"] is False


def test_screened_head_is_on_unless_switched_off():
    from bitnet_py.server_cli import build_parser, load_options, make_loader
    path = str(fixture_path("tiny-bitnet", "ggml-model-i2_s.gguf"))
    for flags, screened in (([], True), (["--no-screen-head"], False)):
        args = build_parser().parse_args(["--model", path, *flags])
        model = make_loader(args.model, **load_options(args))()
        assert (model.weights.screen is not None) == screened
