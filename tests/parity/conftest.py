"""Fixtures of the --parity suite: one peer (started or given) and our model per GGUF, and the report lines.
The command-line options are registered in tests/conftest.py."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from bitnet_py.model import Model

from . import report
from .launcher import LlamaServerProcess, ServerCannotLoad
from .models import ModelSpec, default_specs, load_ours, spec_from_option
from .peer import PeerClient


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: live parity against a llama.cpp-family server (needs --parity)")


def pytest_generate_tests(metafunc):
    if "parity_spec" not in metafunc.fixturenames:
        return
    given = metafunc.config.getoption("--parity-model")
    try:
        specs = [spec_from_option(v) for v in given] if given else default_specs()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    metafunc.parametrize("parity_spec", specs, ids=[s.name for s in specs], scope="session")


def pytest_terminal_summary(terminalreporter):
    if report.LINES:
        terminalreporter.write_sep("-", "parity report")
        for line in report.LINES:
            terminalreporter.write_line(line)


@dataclass
class ParityCase:
    spec: ModelSpec
    path: str
    model: Model
    peer: PeerClient


@pytest.fixture(scope="session")
def parity_case(request, parity_spec, tmp_path_factory):
    cfg = request.config
    binary, url = cfg.getoption("--llama-server"), cfg.getoption("--parity-url")
    if bool(binary) == bool(url):
        raise pytest.UsageError("--parity needs exactly one of --llama-server PATH or --parity-url URL")
    if url and not cfg.getoption("--parity-model"):
        raise pytest.UsageError("--parity-url needs --parity-model: the GGUF that server runs")
    path = parity_spec.materialize(tmp_path_factory.mktemp("parity-models"))
    model = load_ours(path)
    if url:
        peer = PeerClient(url)
        peer.wait_healthy(60)
        yield ParityCase(parity_spec, path, model, peer)
        peer.close()
        return
    proc = LlamaServerProcess(binary, path, threads=cfg.getoption("--parity-threads"),
                              ubatch=parity_spec.ubatch if parity_spec.tl2 else None)
    try:
        peer = proc.start()
    except ServerCannotLoad as exc:
        if cfg.getoption("--parity-model"):
            pytest.fail(f"the server cannot load the requested model: {exc}")
        pytest.skip(f"{binary} cannot load {parity_spec.name} (its weight types or architecture): "
                    f"{str(exc).splitlines()[0]}")
    try:
        yield ParityCase(parity_spec, path, model, peer)
    finally:
        proc.stop()
