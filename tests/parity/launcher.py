"""Start and stop a llama-server binary (bitnet.cpp's or upstream's) on 127.0.0.1 for one model."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from .peer import PeerClient

log = logging.getLogger(__name__)


class ServerCannotLoad(RuntimeError):
    """The binary exited or never became healthy with this model (e.g. a weight type it does not know)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(binary: str, model: str, port: int, threads: int, ctx: int, ubatch: int | None) -> list[str]:
    """The fixtures' llama-server invocation: one slot, given threads, context and micro-batch."""
    cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1",
           "--host", "127.0.0.1", "--port", str(port)]
    if ubatch:
        cmd += ["-ub", str(ubatch)]
    return cmd


class LlamaServerProcess:
    """`with LlamaServerProcess(binary, model, ...) as peer:` -> a PeerClient on a fresh free port."""

    def __init__(self, binary: str, model: str, threads: int = 2, ctx: int = 2048, ubatch: int | None = None,
                 startup_timeout: float = 180.0):
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError(f"--llama-server {binary!r} is not an executable file")
        self.binary, self.model = binary, model
        self.threads, self.ctx, self.ubatch = threads, ctx, ubatch
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.client: PeerClient | None = None
        self.log_path: Path | None = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def start(self) -> PeerClient:
        port = free_port()
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log_path = Path(name)
        cmd = server_command(self.binary, self.model, port, self.threads, self.ctx, self.ubatch)
        log.info("starting %s", " ".join(cmd))
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = PeerClient(f"http://127.0.0.1:{port}")
        try:
            self.client.wait_healthy(self.startup_timeout, alive=lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log_tail()
            self.stop()
            raise ServerCannotLoad(f"{Path(self.model).name}: {exc}\n--- server log tail ---\n{tail}") from None
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> PeerClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
