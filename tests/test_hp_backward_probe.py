"""Rule ``hp-backward-fp32-params`` can be gated on cuBLASLt from what ``benchmarks/hp_backward_probe.py`` finds
(its verdicts checked on injected cases; the probe itself needs a GPU)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hp_backward_probe import verdicts  # noqa: E402

from lightning_te_moe import Environment, make_plan  # noqa: E402
from lightning_te_moe.policy import rules  # noqa: E402


def _cases(hp_ok: bool) -> list[dict[str, Any]]:
    out = []
    for module in ("linear", "grouped_linear"):
        for override in ("none", "high_precision", "dequantized"):
            ok = hp_ok or override != "high_precision"
            out.append({"module": module, "params": "float32", "override": override, "autocast": True, "ok": ok,
                        **({"finite": True} if ok else {"error": "Unable to find suitable cuBLAS GEMM algorithm"})})
    return out


def test_verdicts_say_how_to_gate_the_rule() -> None:
    failing = {v["verdict"]: v for v in verdicts(_cases(hp_ok=False), "13.1.0")}
    assert not failing["high_precision"]["runs"] and "keep hp-backward-fp32-params" in failing["high_precision"]["rule"]
    assert failing["high_precision"]["modules"]["linear"].startswith("Unable to find")
    assert failing["dequantized"]["runs"]
    running = {v["verdict"]: v for v in verdicts(_cases(hp_ok=True), "13.10.0")}
    assert running["high_precision"]["runs"] and "cublaslt_below='13.10'" in running["high_precision"]["rule"]


def test_the_rule_can_be_gated_on_cublaslt(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``cublaslt_below`` set from the probe, FP32 master weights get the high-precision backward from that
    cuBLASLt on and the dequantized one below it."""
    gated = tuple(dataclasses.replace(r, when=dataclasses.replace(r.when, cublaslt_below="13.10"))
                  if r.id == "hp-backward-fp32-params" else r for r in rules.RULES)
    monkeypatch.setattr(rules, "RULES", gated)
    new = make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"))
    old = make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.5.0"))  # FP8 dense (13.1: BF16 plan)
    assert new.ladder[1].dense.backward_override == "high_precision"
    assert old.ladder[1].dense.backward_override == "dequantized"
