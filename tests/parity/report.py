"""Lines for the "parity report" section of pytest's terminal summary (timings and measured differences:
information, never an assertion)."""
from __future__ import annotations

LINES: list[str] = []


def add(line: str) -> None:
    LINES.append(line)
