"""Fixtures shared by the CPU test files."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (experts/bias_glu.py) run on the CPU in Triton's interpreter; it must be chosen before anything
    # imports Triton (Lightning does). On a GPU machine they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpu_kinds import CPU_KINDS, pin_cpu  # noqa: E402


@pytest.fixture(params=sorted(CPU_KINDS))
def cpu_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, str, str]:
    """Runs the test once per CPU kind, with the probe pinned to it; gives (native BF16, auto's plan, its rule)."""
    kind = CPU_KINDS[request.param]
    pin_cpu(monkeypatch, kind[0])
    return kind
