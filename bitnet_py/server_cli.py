"""`python serve.py` / `python -m bitnet_py serve`: parse flags, configure logging, start uvicorn.

The model loads on the engine thread after the socket is open (/health answers 503 "Loading model" meanwhile).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

API_KEY_ENV = "BITNET_PY_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from .huge_pages import KEEP_FILE_MAP_HELP, NO_MMAP_HELP
    from .sampling import NO_SCREEN_HELP
    p = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible server for BitNet b1.58 GGUF models")
    p.add_argument("--model", "-m", default=None,
                   help="GGUF path, local HF folder or hub repo id (default: the bundled model)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help="max tokens per sequence (default: the model's, capped at 8192)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache pool size in tokens, shared by all sequences (default: automatic)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", "-np", type=int, default=8, help="max sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="max sequences waiting beyond --parallel")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per engine step")
    p.add_argument("--no-prefix-cache", action="store_true", help="disable prompt-prefix KV reuse")
    p.add_argument("--api-key", default=None, help=f"require this key (default: env {API_KEY_ENV})")
    p.add_argument("--model-alias", "-a", default=None, help="model name reported by the API")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--tl2-config", default=None, help="kernel_config.ini for TL2 models")
    p.add_argument("--cache-type", choices=("f16", "f32"), default="f16",
                   help="KV cache precision: f16 = bitnet.cpp's arithmetic (default), f32 = no f16 roundings")
    p.add_argument("--head-type", choices=("f16", "int8"), default="f16",
                   help="int8: quantize an f16 output head per row at load (faster decode, approximate logits)")
    p.add_argument("--no-mmap", action="store_true",
                   help=NO_MMAP_HELP)
    p.add_argument("--keep-file-map", action="store_true", help=KEEP_FILE_MAP_HELP)
    p.add_argument("--no-screen-head", action="store_true", help=NO_SCREEN_HELP)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take before it is cancelled with a 504 (0 = no limit)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest accepted request body")
    p.add_argument("--max-header-bytes", type=int, default=16 * 1024,
                   help="largest accepted request head (request line + headers)")
    p.add_argument("--cors-origins", default=None,
                   help="comma-separated origins allowed to call the API from a browser (default: CORS off)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="on SIGTERM/SIGINT: seconds in-flight requests get to finish before their streams are "
                        "ended (finish_reason length)")
    return p


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("parallel", "prefill_chunk", "port"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_queue", "timeout", "shutdown_grace"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 1024 <= args.max_header_bytes <= 1 << 20:
        parser.error("--max-header-bytes must be in [1024, 1048576]")
    if args.max_body_bytes < 1024:
        parser.error("--max-body-bytes must be >= 1024")
    if args.ctx_size is not None and not 2 <= args.ctx_size <= 1 << 20:
        parser.error("--ctx-size must be in [2, 1048576]")


def uvicorn_config(app, host: str, port: int, max_header_bytes: int = 16 * 1024, shutdown_grace: float = 5.0,
                   log_level: str | None = None):
    """The uvicorn settings the server runs with (tests use them too): h11, whose parser caps the request head
    at `max_header_bytes` (httptools has no such cap), and a graceful-shutdown window past the engine's drain."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                          http="h11", h11_max_incomplete_event_size=max_header_bytes, ws="none",
                          timeout_keep_alive=5, timeout_graceful_shutdown=int(shutdown_grace) + 5)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server that drains the engine on SIGTERM/SIGINT (no new requests, in-flight ones get
        `drain_grace` seconds) and exits 0 after the graceful shutdown (uvicorn would re-raise the signal)."""

        engine = None
        drain_grace = 5.0

        def handle_exit(self, sig, frame) -> None:
            if self.engine is not None:
                self.engine.drain(self.drain_grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return Server


def load_options(args: argparse.Namespace) -> dict:
    """The Model.load keyword arguments that serve.py's flags set."""
    return dict(tl2_config=args.tl2_config, cache_type=args.cache_type, head_type=args.head_type,
                no_mmap=args.no_mmap, screen_head=not args.no_screen_head, promote=not args.keep_file_map)


def make_loader(model_spec: str | None, **options):
    """A function that resolves model_spec (bitnet_py.hub) and loads it with Model.load(path, **options)."""
    def load():
        from bitnet_py.hub import resolve_model
        from bitnet_py.model import Model
        path = resolve_model(model_spec)
        logger.info("loading %s", path)
        return Model.load(path, **options)
    return load


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    setup_logging(args.log_format, args.log_level)

    threads = args.threads or os.cpu_count() or 1
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception as exc:        # noqa: BLE001 - numba optional at import time of the CLI
        logger.warning("could not set numba threads: %s", exc)

    from bitnet_py.engine import Engine, EngineConfig
    from bitnet_py.server import ServerSettings, create_app
    _Server = _server_class()

    if args.model is not None and not os.path.exists(args.model) and "/" not in args.model:
        logger.error("model %r: no such file", args.model)
        return 2
    alias = args.model_alias or (os.path.basename(args.model) if args.model else "bitnet-b1.58-2B-4T")
    config = EngineConfig(max_num_seqs=args.parallel, max_queue=args.max_queue, ctx_size=args.ctx_size,
                          kv_cache_tokens=args.kv_cache_tokens, prefill_chunk=args.prefill_chunk,
                          enable_prefix_cache=not args.no_prefix_cache, threads=threads)
    loader = make_loader(args.model, **load_options(args))
    engine = Engine(loader, config, model_name=alias)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    settings = ServerSettings(model_alias=alias, model_path=args.model or "", api_key=api_key,
                              max_body_bytes=args.max_body_bytes, request_timeout=args.timeout or None,
                              cors_origins=origins, max_header_bytes=args.max_header_bytes)
    app = create_app(engine, settings)
    logger.info("serving on http://%s:%d (threads %d, parallel %d, queue %d, api key %s, cors %s)", args.host,
                args.port, threads, args.parallel, args.max_queue, "on" if api_key else "off",
                ",".join(origins) or "off")
    server = _Server(uvicorn_config(app, args.host, args.port, args.max_header_bytes, args.shutdown_grace))
    server.engine, server.drain_grace = engine, args.shutdown_grace

    def exit_if_load_fails() -> None:
        engine.ready_event.wait()
        if engine.state == "failed":
            logger.error("cannot serve: %s", engine.load_error)
            server.should_exit = True
    threading.Thread(target=exit_if_load_fails, name="load-watch", daemon=True).start()
    server.run()
    return 1 if engine.state == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
