"""Issue 6.2, 6.4, 6.5 with serve.py as a subprocess on the tiny fixture model: a burst beyond --max-queue,
SIGTERM (stop accepting, end in-flight streams with a final chunk carrying finish_reason, answer queued ones,
exit 0 within a bound) and damaged model files (clear one-line error, exit != 0, no traceback, small peak RSS)."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import REPO, fixture_path
from live_server import free_port, wait_healthy, wait_until

MODEL = "tiny-bitnet", "ggml-model-i2_s.gguf"


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_burst_then_sigterm_drains_and_exits_zero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn("--model", str(fixture_path(*MODEL)), "--port", str(port), "--threads", "1", "--parallel", "1",
                 "--max-queue", "1", "--ctx-size", "2048", "--shutdown-grace", "0.5", "--log-format", "json")
    try:
        wait_healthy(proc, url)
        # a long stream holds the one slot, so a burst of 3 finds 1 queue place: exactly 1 is admitted (it waits)
        # and 2 get 429/503 + Retry-After, whatever order the burst arrives in; none hangs
        body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}
        held, cut = threading.Event(), threading.Event()

        def hold_slot():
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={**body, "max_tokens": 2000, "stream": True}) as r:
                for line in r.iter_lines():
                    held.set()
                    if cut.is_set() or line == "data: [DONE]":
                        return                                      # closing the stream cancels it on the server
        t_hold = threading.Thread(target=hold_slot)
        t_hold.start()
        assert held.wait(60)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json={**body, "stream": i % 2 == 1},
                                   timeout=60) for i in range(3)]
            # the refusals come back while the slot is held
            wait_until(lambda: sum(f.done() for f in futures) >= 2, what="the burst was not refused")
            assert t_hold.is_alive()                                 # still holding: the count below is exact
            cut.set()
            rs = [f.result() for f in futures]
        t_hold.join(30)
        ok = [r for r in rs if r.status_code == 200]
        refused = [r for r in rs if r.status_code in (429, 503)]
        assert len(ok) == 1 and len(refused) == 2, [r.status_code for r in rs]
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200     # recovered

        # SIGTERM with a long stream running and a request queued behind it
        got: dict = {}
        lines: list[str] = []
        first = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
                                    "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()
        t_stream = threading.Thread(target=stream)
        t_stream.start()
        assert first.wait(60)
        t_queued = threading.Thread(target=lambda: got.update(queued=httpx.post(
            url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=60)))
        t_queued.start()
        deadline = time.time() + 30               # SIGTERM only once the second request waits in the engine queue
        while _metric(url, "bitnet_py:num_requests_waiting") < 1:
            assert time.time() < deadline and t_queued.is_alive(), "request never queued"
            time.sleep(0.02)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        refused_connection = False                 # soon no longer accepting connections; until then, 503s
        while not refused_connection:
            assert time.time() < t0 + 10, "still accepting connections 10 s after SIGTERM"
            try:
                r = httpx.post(url + "/v1/completions", json=body, timeout=5)
                assert r.status_code == 503, r.status_code
                time.sleep(0.05)
            except httpx.TransportError:
                refused_connection = True
        t_stream.join(30)
        t_queued.join(30)
        _, err = proc.communicate(timeout=30)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and elapsed < 15, (proc.returncode, elapsed)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"       # cut by the drain, with a final chunk
    assert len(lines) < 2000                                     # really cut, not run to max_tokens
    assert got["queued"].status_code == 503 and got["queued"].headers["retry-after"]   # answered, not dropped
    assert "Traceback" not in err


# ---- damaged model files --------------------------------------------------------------------------------------
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(data: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + _SCALAR[vtype]
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n
    (etype, count) = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if etype in _SCALAR:
        return pos + count * _SCALAR[etype]
    for _ in range(count):
        pos = _skip_value(data, pos, etype)
    return pos


def first_tensor_info(data: bytes) -> dict:
    """Byte positions of the first tensor-info fields of a GGUF v3 file."""
    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos = _skip_value(data, pos + 4, vtype)
    (nlen,) = struct.unpack_from("<Q", data, pos)
    pos += 8 + nlen
    (n_dims,) = struct.unpack_from("<I", data, pos)
    dims = pos + 4
    type_at = dims + 8 * n_dims
    return {"n_tensors_at": 8, "dims_at": dims, "n_dims": n_dims, "type_at": type_at, "offset_at": type_at + 4}


def _damaged(tmp_path, kind: str):
    data = bytearray(fixture_path(*MODEL).read_bytes())
    info = first_tensor_info(bytes(data))
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "bad_magic":
        data[0:4] = b"GGXX"
    elif kind == "lying_offset":
        struct.pack_into("<Q", data, info["offset_at"], 1 << 40)
    elif kind == "absurd_dims":
        struct.pack_into("<Q", data, info["dims_at"], 1 << 40)
    elif kind == "unknown_type":
        struct.pack_into("<I", data, info["type_at"], 200)
    elif kind == "absurd_tensor_count":
        struct.pack_into("<Q", data, info["n_tensors_at"], 1 << 60)
    elif kind == "empty":
        data = bytearray()
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(bytes(data))
    return path


KINDS = ["truncated", "bad_magic", "lying_offset", "absurd_dims", "unknown_type", "absurd_tensor_count", "empty"]


def test_damaged_model_files_fail_at_start_cleanly(tmp_path):
    procs = {}
    for kind in KINDS:                          # all at once: each start pays the interpreter + numba import
        procs[kind] = spawn("--model", str(_damaged(tmp_path, kind)), "--port", str(free_port()), "--threads", "1")
    failures = []
    for kind, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"{kind}: still running after 120 s")
            continue
        errors = [l for l in err.splitlines() if " ERROR " in l]
        if proc.returncode in (0, None) or proc.returncode < 0:
            failures.append(f"{kind}: exit {proc.returncode}")
        if "Traceback" in err or not errors:
            failures.append(f"{kind}: unclear error: {err[-500:]}")
    assert not failures, failures


# Runs a command in a grandchild and prints its exit code and peak RSS. Measuring the direct child of pytest
# would not do: a child forked (or vforked) from a large process starts with that process's RSS as its peak.
_PEAK_RSS_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, rusage = os.wait4(pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": rusage.ru_maxrss}))
"""


def test_damaged_model_start_has_small_peak_memory(tmp_path):
    """No multi-GB allocation: the peak RSS of a failed start stays far below a GB."""
    for kind in ("absurd_dims", "lying_offset", "absurd_tensor_count"):
        r = subprocess.run([sys.executable, "-c", _PEAK_RSS_LAUNCHER, str(REPO / "serve.py"), "--model",
                            str(_damaged(tmp_path, kind)), "--port", str(free_port()), "--threads", "1"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["exit"] > 0, (kind, r.stderr[-500:])
        assert " ERROR " in r.stderr and "Traceback" not in r.stderr, (kind, r.stderr[-500:])
        assert result["maxrss_kib"] < 800 * 1024, (kind, result)  # KiB on Linux