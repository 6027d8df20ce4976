"""Shared pytest fixtures and options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixture_path(*parts: str) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"fixture missing: {p} (the shared fixtures must sit at ../shared/fixtures)")
    return p


_REF_CACHE: dict[str, dict] = {}


def load_reference(model: str, kind: str) -> dict:
    """ref-{kind}.json of a fixture model (kind in f32, i2_s, tl2, hf)."""
    key = f"{model}/{kind}"
    if key not in _REF_CACHE:
        _REF_CACHE[key] = json.loads(fixture_path(model, f"ref-{kind}.json").read_text())
    return _REF_CACHE[key]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return fixture_path()


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return json.loads(fixture_path("prompts.json").read_text())
