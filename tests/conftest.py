"""Fixtures shared by the CPU test files."""

from __future__ import annotations

import pytest
from cpu_kinds import CPU_KINDS, pin_cpu


@pytest.fixture(params=sorted(CPU_KINDS))
def cpu_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, str, str]:
    """Runs the test once per CPU kind, with the probe pinned to it; gives (native BF16, auto's plan, its rule)."""
    kind = CPU_KINDS[request.param]
    pin_cpu(monkeypatch, kind[0])
    return kind
