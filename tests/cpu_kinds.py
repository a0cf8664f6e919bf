"""The two kinds of x86-64 CPU the plan tells apart: with native BF16 (AVX512-BF16/AMX: plans BF16) and without
(BF16 emulated, slower than FP32: plans FP32). Tests about one kind pin the probe (the ``cpu_kind`` fixture in
conftest.py runs them on both); tests about this machine ask it."""

from __future__ import annotations

import pytest

from lightning_te_moe.policy import environment

#: CPU kind -> (native BF16, the plan ``auto`` makes there, the rule that decides it)
CPU_KINDS = {"native-bf16": (True, "bf16", "cpu-bf16"), "no-native-bf16": (False, "fp32", "cpu-fp32")}


def pin_cpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """Make the environment probe report a CPU with (or without) native BF16."""
    monkeypatch.setattr(environment, "_cpu_has_native_bf16", lambda: native_bf16)


def this_machines_cpu_plan() -> str:
    """What ``auto`` plans on this CPU, by what the probe reports."""
    return "bf16" if environment.probe_environment().cpu_bf16 else "fp32"
