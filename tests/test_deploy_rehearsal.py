"""Local deploy rehearsal: deploy/gcp_c3d.yaml's own `setup` and `run` scripts on this machine.

Like a VM would, but in a temp HOME, with MODEL_REPO on the local stand-in hub (tests/test_hub.py), the
project already installed (BITNET_PY_SKIP_INSTALL=1: no network), NUM_THREADS=1 and a free PORT. Ends with
/health = 200 and a /v1/completions answer equal to bitnet.cpp's greedy tokens for the same model, then
tears the server's process group down. The other YAMLs share these scripts (checked below).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from test_hub import FIXTURES, StandInHub, fixture_repos

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
REPO_ID = "test-org/tiny-bitnet-gguf"
STARTUP_TIMEOUT_S = 900  # model load + Numba JIT compile on a shared 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def test_other_yamls_share_the_rehearsed_scripts():
    task = yaml.safe_load((DEPLOY / "gcp_c3d.yaml").read_text())
    for name in ("gcp_h3.yaml", "runpod_cpu.yaml", "service.yaml"):
        other = yaml.safe_load((DEPLOY / name).read_text())
        assert (other["setup"], other["run"]) == (task["setup"], task["run"]), name


def test_setup_and_run_scripts_serve_completions(tmp_path):
    task = yaml.safe_load((DEPLOY / "gcp_c3d.yaml").read_text())
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    # the scripts' `python` is this interpreter: a wrapper, not a symlink (a symlink outside a virtualenv's bin/
    # starts the base interpreter, without the virtualenv's packages)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    port = _free_port()
    reference = json.loads((FIXTURES / "tiny-bitnet" / "ref-i2_s.json").read_text())["results"][0]

    with StandInHub(fixture_repos()) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BITNET_PY_"))}
        env.update({k: str(v) for k, v in task["envs"].items()})
        env.update(HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO_ROOT),
                   HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", BITNET_PY_SKIP_INSTALL="1", MODEL_REPO=REPO_ID, QUANT_TYPE="i2_s",
                   NUM_THREADS="1", PORT=str(port))
        setup = subprocess.run(["bash", "-c", task["setup"]], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert "model ready at" in setup.stdout
        cached = list((home / ".cache" / "huggingface" / "hub").rglob("ggml-model-i2_s.gguf"))
        assert len(cached) == 1 and (home / ".cache" / "bitnet-py" / "deploy-cache-version").read_text().strip() == "1"
        setup_requests = len(hub.requests)

        log = open(tmp_path / "server.log", "w")
        server = subprocess.Popen(["bash", "-c", task["run"]], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            status = None
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    status, _ = _http("GET", f"{base}/health", timeout=10)
                except OSError:
                    status = None
                if status == 200:
                    break
                time.sleep(2)
            assert status == 200, (tmp_path / "server.log").read_text()[-4000:]
            assert len(hub.requests) == setup_requests  # `run` found the model offline, in the setup's cache

            code, answer = _http("POST", f"{base}/v1/completions",
                                 {"prompt": reference["prompt"], "max_tokens": 6, "temperature": 0})
            assert code == 200, (tmp_path / "server.log").read_text()[-4000:]
            expected = b"".join(bytes.fromhex(h) for h in reference["gen_pieces_hex"][:6]).decode()
            assert answer["choices"][0]["text"] == expected
            assert answer["usage"]["completion_tokens"] == 6
        finally:
            _stop(server)
            log.close()
        assert server.poll() is not None
        with socket.socket() as s:  # teardown released the port
            assert s.connect_ex(("127.0.0.1", port)) != 0
