"""Run the real app under uvicorn on 127.0.0.1 (random free port) in a background thread, for server tests."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from bitnet_py.engine import Engine, EngineConfig
from bitnet_py.server import ServerSettings, create_app
from bitnet_py.server_cli import uvicorn_config


def wait_healthy(proc, url: str, timeout: float = 120.0) -> None:
    """Poll url/health until 200; fail if the subprocess `proc` exits or the timeout passes."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and proc.poll() is None, "server did not become healthy"
        time.sleep(0.2)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition not reached") -> None:
    """Poll predicate() until it is true; fail after `timeout` seconds (generous: CI hosts may be loaded)."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.005)


def engine_idle(engine, timeout: float = 30.0) -> dict:
    """The engine's stats once nothing is in flight, running or holding KV blocks (its stats snapshot is
    published after a request's last event), or its stats when `timeout` has passed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s["in_system"] == 0 and s["kv_used_blocks"] == 0 and s["running"] == 0:
            return s
        time.sleep(0.01)
    return engine.stats()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, loader, config: EngineConfig | None = None, settings: ServerSettings | None = None,
                 wait_ready: bool = True) -> None:
        self.settings = settings or ServerSettings(model_alias="test-model")
        self.engine = Engine(loader, config or EngineConfig(), model_name=self.settings.model_alias)
        self.app = create_app(self.engine, self.settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn_config(self.app, "127.0.0.1", self.port, self.settings.max_header_bytes, shutdown_grace=0,
                             log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.engine.ready_event.wait(timeout) or self.engine.state != "ready":
            raise RuntimeError(f"engine not ready: {self.engine.state} {self.engine.load_error}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def metric(self, name: str, **labels) -> float:
        """Value of one sample of /metrics (0.0 if absent)."""
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
