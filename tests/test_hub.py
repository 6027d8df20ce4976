"""bitnet_py.hub against a local stand-in for the Hugging Face hub (HTTP on 127.0.0.1; never the real hub).

StandInHub speaks the part of the hub API that huggingface_hub uses to list and download files (repo info,
tree listing, HEAD/GET of resolve URLs, error codes) and serves files from local folders; the deploy
rehearsal test imports it too.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bitnet_py import hub
from bitnet_py.gguf.constants import FTYPE_MOSTLY_I2_S, GGMLType, Keys
from bitnet_py.gguf.reader import GGUFFile

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
TOKEN = "hf_standin_secret"


class StandInHub:
    """repos: repo id -> {path in repo: local file}. Repos in ``private`` need ``Authorization: Bearer TOKEN``."""

    def __init__(self, repos: dict[str, dict[str, Path]], private: frozenset[str] = frozenset()):
        self.repos, self.private = repos, private
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandInHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str) -> str:
        listing = "\n".join(f"{p}:{f.stat().st_size}" for p, f in sorted(self.repos[repo].items()))
        return hashlib.sha1(f"{repo}\n{listing}".encode()).hexdigest()

    def _handler(self):
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, head: bool):
                body = json.dumps({"error": message}).encode()
                self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                          "Content-Type": "application/json"}, head)

            def _repo(self, org: str, name: str, head: bool) -> str | None:
                repo = f"{org}/{name}"
                authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
                if repo not in hub_.repos or (repo in hub_.private and not authorized):
                    self._error(404 if repo not in hub_.private else 401, "RepoNotFound",
                                "Repository not found", head)
                    return None
                return repo

            def _revision_ok(self, repo: str, revision: str, head: bool) -> bool:
                if urllib.parse.unquote(revision) in ("main", hub_.commit(repo)):
                    return True
                self._error(404, "RevisionNotFound", "Invalid rev id", head)
                return False

            def _route(self, head: bool):
                path = urllib.parse.urlsplit(self.path).path
                hub_.requests.append((self.command, path))
                hub_.auth_headers.append(self.headers.get("Authorization"))
                parts = [p for p in path.split("/") if p]
                if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
                    repo = self._repo(parts[2], parts[3], head)
                    if repo is None:
                        return
                    rest = parts[4:]
                    if rest[:1] == ["revision"] and len(rest) == 2:
                        if self._revision_ok(repo, rest[1], head):
                            self._json(self._info(repo), head)
                    elif rest[:1] == ["tree"] and len(rest) >= 2:
                        if self._revision_ok(repo, rest[1], head):
                            self._json(self._tree(repo), head)
                    elif not rest:
                        self._json(self._info(repo), head)
                    else:
                        self._error(404, "EntryNotFound", "unknown api route", head)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo(parts[0], parts[1], head)
                    if repo is None or not self._revision_ok(repo, parts[3], head):
                        return
                    local = hub_.repos[repo].get("/".join(urllib.parse.unquote(p) for p in parts[4:]))
                    if local is None:
                        self._error(404, "EntryNotFound", "Entry not found", head)
                        return
                    data = local.read_bytes()
                    self._send(200, data, {"X-Repo-Commit": hub_.commit(repo),
                                           "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                           "Content-Type": "application/octet-stream"}, head)
                else:
                    self._error(404, "RepoNotFound", "not a hub route", head)

            def _json(self, obj, head: bool):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _info(self, repo: str) -> dict:
                return {"id": repo, "modelId": repo, "sha": hub_.commit(repo), "private": repo in hub_.private,
                        "siblings": [{"rfilename": p} for p in sorted(hub_.repos[repo])], "tags": [],
                        "downloads": 0, "likes": 0}

            def _tree(self, repo: str) -> list[dict]:
                return [{"type": "file", "path": p, "size": f.stat().st_size,
                         "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
                        for p, f in sorted(hub_.repos[repo].items())]

        return Handler


def fixture_repos() -> dict[str, dict[str, Path]]:
    """The stand-in hub's repos, built from the shared fixtures."""
    gguf_dir, hf_dir = FIXTURES / "tiny-bitnet", FIXTURES / "tiny-bitnet" / "hf"
    readme = FIXTURES / "README.md"
    return {
        "test-org/tiny-bitnet-gguf": {**{p.name: p for p in sorted(gguf_dir.glob("*.gguf"))}, "README.md": readme},
        "test-org/tiny-bitnet": {p.name: p for p in sorted(hf_dir.iterdir()) if p.is_file()},
        "test-org/private-gguf": {"ggml-model-i2_s.gguf": gguf_dir / "ggml-model-i2_s.gguf"},
        "test-org/docs-only": {"README.md": readme},
    }


@pytest.fixture()
def standin(monkeypatch):
    with StandInHub(fixture_repos(), private=frozenset({"test-org/private-gguf"})) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("BITNET_PY_CACHE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def test_local_file_is_returned_as_is(tmp_path):
    path = FIXTURES / "tiny-bitnet" / "ggml-model-tl2.gguf"
    assert hub.resolve_model(str(path)) == os.path.abspath(path)
    link = tmp_path / "model.gguf"  # like a file in the HF cache: a symlink to a nameless blob
    link.symlink_to(path)
    assert hub.resolve_model(str(link)) == str(link)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(hub.ModelResolveError, match="no such file"):
        hub.resolve_model(str(tmp_path / "nope.gguf"))


def test_local_folder_picks_gguf_of_quant_type():
    folder = FIXTURES / "tiny-llama"
    assert hub.resolve_model(str(folder), quant_type="tl2") == str(folder / "ggml-model-tl2.gguf")


def test_bundled_default(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_bundled_data_dir", lambda: tmp_path)
    with pytest.raises(hub.ModelResolveError, match="no bundled default model"):
        hub.resolve_model(None)
    (tmp_path / "ggml-model-i2_s.gguf").write_bytes(b"GGUF")
    (tmp_path / "ggml-model-tl2.gguf").write_bytes(b"GGUF")
    assert hub.resolve_model(None, quant_type="tl2") == str(tmp_path / "ggml-model-tl2.gguf")


def test_pick_gguf_by_quant_tag():
    files = ["README.md", "ggml-model-i2_s.gguf", "sub/ggml-model-i2_s.gguf", "bitnet-2B-tl2.gguf", "x-f32.gguf"]
    assert hub.pick_gguf(files, "i2_s") == "ggml-model-i2_s.gguf"
    assert hub.pick_gguf(files, "TL2") == "bitnet-2B-tl2.gguf"
    assert hub.pick_gguf(files, "tq2_0") is None


@pytest.mark.parametrize("quant", ["i2_s", "tl2"])
def test_downloads_gguf_of_quant_type_into_hf_cache(standin, tmp_path, quant):
    path = Path(hub.resolve_model("test-org/tiny-bitnet-gguf", quant_type=quant, cache_dir=tmp_path, progress=False))
    fixture = FIXTURES / "tiny-bitnet" / f"ggml-model-{quant}.gguf"
    assert path.name == fixture.name
    assert path.read_bytes() == fixture.read_bytes()
    snapshot = tmp_path / "models--test-org--tiny-bitnet-gguf" / "snapshots" / standin.commit("test-org/tiny-bitnet-gguf")
    assert path.parent == snapshot  # the standard HF cache layout
    assert all(auth is None for auth in standin.auth_headers)  # no token configured -> none sent


def test_explicit_file_and_missing_file(standin, tmp_path):
    path = hub.resolve_model("test-org/tiny-bitnet-gguf:ggml-model-f32.gguf", cache_dir=tmp_path, progress=False)
    assert Path(path).read_bytes() == (FIXTURES / "tiny-bitnet" / "ggml-model-f32.gguf").read_bytes()
    with pytest.raises(hub.ModelResolveError, match="no file 'nope.gguf'"):
        hub.resolve_model("test-org/tiny-bitnet-gguf:nope.gguf", cache_dir=tmp_path, progress=False)


def test_unknown_quant_lists_available_files(standin, tmp_path):
    with pytest.raises(hub.ModelResolveError, match="available: ggml-model-f32.gguf, ggml-model-i2_s.gguf"):
        hub.resolve_model("test-org/tiny-bitnet-gguf", quant_type="tq2_0", cache_dir=tmp_path, progress=False)


def test_missing_repo_and_repo_without_model(standin, tmp_path):
    with pytest.raises(hub.ModelResolveError, match="test-org/nope not found"):
        hub.resolve_model("test-org/nope", cache_dir=tmp_path, progress=False)
    with pytest.raises(hub.ModelResolveError, match="neither a GGUF file nor a safetensors checkpoint"):
        hub.resolve_model("test-org/docs-only", cache_dir=tmp_path, progress=False)


def test_unknown_revision(standin, tmp_path):
    with pytest.raises(hub.ModelResolveError, match="revision 'v9' of test-org/tiny-bitnet-gguf not found"):
        hub.resolve_model("test-org/tiny-bitnet-gguf", revision="v9", cache_dir=tmp_path, progress=False)


def test_hf_token_is_sent_for_private_repo(standin, tmp_path, monkeypatch):
    with pytest.raises(hub.ModelResolveError, match="HF_TOKEN"):
        hub.resolve_model("test-org/private-gguf", cache_dir=tmp_path, progress=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = hub.resolve_model("test-org/private-gguf", cache_dir=tmp_path, progress=False)
    assert Path(path).read_bytes() == (FIXTURES / "tiny-bitnet" / "ggml-model-i2_s.gguf").read_bytes()
    assert f"Bearer {TOKEN}" in standin.auth_headers


def test_offline_uses_cache_without_requests(standin, tmp_path, monkeypatch):
    online = hub.resolve_model("test-org/tiny-bitnet-gguf", cache_dir=tmp_path, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(standin.requests)
    assert hub.resolve_model("test-org/tiny-bitnet-gguf", cache_dir=tmp_path, progress=False) == online
    assert len(standin.requests) == before
    with pytest.raises(hub.ModelResolveError, match="HF_HUB_OFFLINE is set .* not in the local cache"):
        hub.resolve_model("test-org/tiny-bitnet-gguf", cache_dir=tmp_path / "empty", progress=False)
    assert len(standin.requests) == before


def _stub_converter(calls: list):
    def convert(hf_dir, outtype, out_path, tl2_config=None, progress=True):
        calls.append((hf_dir, outtype))
        Path(out_path).write_bytes(f"stub {outtype} {len(calls)}".encode())
    return convert


def test_safetensors_repo_is_converted_once_per_key(standin, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(hub, "_load_converter", lambda: _stub_converter(calls))
    repo = "test-org/tiny-bitnet"
    first = Path(hub.resolve_model(repo, cache_dir=tmp_path, progress=False))
    commit = standin.commit(repo)
    assert first == tmp_path / "bitnet-py" / "converted" / "test-org--tiny-bitnet" / commit / \
        f"i2_s-v{hub.CACHE_VERSION}" / "ggml-model-i2_s.gguf"
    hf_dir = Path(calls[0][0])
    assert hf_dir.name == commit and (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert (hf_dir / "tokenizer.model").is_file()  # the converter also needs the tokenizer files
    assert hub.resolve_model(repo, cache_dir=tmp_path, progress=False) == str(first) and len(calls) == 1
    tl2 = hub.resolve_model(repo, quant_type="tl2", cache_dir=tmp_path, progress=False)
    bumped = hub.resolve_model(repo, cache_dir=tmp_path, progress=False, cache_version="2")
    assert len({str(first), tl2, bumped}) == 3 and len(calls) == 3
    assert [c[1] for c in calls] == ["i2_s", "tl2", "i2_s"]
    hub.resolve_model(repo, cache_dir=tmp_path, progress=False, force=True)
    assert len(calls) == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # converted file found offline from the cached snapshot
    assert hub.resolve_model(repo, cache_dir=tmp_path, progress=False) == str(first) and len(calls) == 4


def test_failed_conversion_leaves_no_cached_file(standin, tmp_path, monkeypatch):
    def broken(hf_dir, outtype, out_path, tl2_config=None, progress=True):
        Path(out_path).write_bytes(b"partial")
        raise ValueError("unsupported architecture")
    monkeypatch.setattr(hub, "_load_converter", lambda: broken)
    with pytest.raises(hub.ModelResolveError, match="unsupported architecture"):
        hub.resolve_model("test-org/tiny-bitnet", cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "bitnet-py").rglob("*.gguf*"))


def test_safetensors_repo_converted_with_real_converter(standin, tmp_path):
    """Needs bitnet_py/convert.py: the converted I2_S ternary tensors equal bitnet.cpp's file."""
    path = hub.resolve_model("test-org/tiny-bitnet", quant_type="i2_s", cache_dir=tmp_path, progress=False)
    reference = FIXTURES / "tiny-bitnet" / "ggml-model-i2_s.gguf"
    with GGUFFile(path) as ours, GGUFFile(reference) as ref:
        assert ours.get(Keys.FILE_TYPE) == FTYPE_MOSTLY_I2_S
        name = "blk.0.attn_q.weight"
        assert ours.info(name).type_id == GGMLType.I2_S
        packed = ref.info(name).nbytes - 32  # compare codes and scale, not the 28 undefined tail bytes
        assert ours.raw(name)[: packed + 4].tobytes() == ref.raw(name)[: packed + 4].tobytes()


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet_py.hub", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)


def test_cli_prints_path_and_reports_errors(standin, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT),
           "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
    env.pop("HF_HUB_CACHE", None)
    done = _cli(["test-org/tiny-bitnet-gguf", "--quant-type", "tl2"], env)
    assert done.returncode == 0, done.stderr
    printed = Path(done.stdout.strip())
    assert printed.read_bytes() == (FIXTURES / "tiny-bitnet" / "ggml-model-tl2.gguf").read_bytes()
    assert str(printed).startswith(str(tmp_path / "hf" / "hub"))  # HF_HOME's standard cache
    assert "ggml-model-tl2.gguf" in done.stderr and "100%" in done.stderr  # the download progress bar
    missing = _cli(["test-org/nope", "--quiet"], env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert "test-org/nope not found" in missing.stderr
