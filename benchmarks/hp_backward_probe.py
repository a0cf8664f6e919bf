"""Which TE modules run a high-precision backward (``backward_override``) under FP8 current scaling, on this stack.

Rule ``hp-backward-fp32-params`` (``lightning_te_moe/policy/rules.py``) swaps the ladder's middle rung to
``"dequantized"`` because ``"high_precision"`` with FP32 master weights under BF16 autocast failed in ``te.Linear``'s
backward on cuBLASLt 13.1 ("Unable to find suitable cuBLAS GEMM algorithm"). This probe runs every case (``te.Linear``
and ``te.GroupedLinear``, FP32 / BF16 parameters, each override, with and without torch autocast) in a fresh process
each (a failed TE call can leave TE's global state broken), prints the stack (cuBLASLt as TE reads it and as the
loaded library reports it) and one JSON line per case, then one JSON verdict per override for the rule's case, saying
how to gate the rule on cuBLASLt (``When(cublaslt_below=...)``) from what this stack shows.

    python3 benchmarks/hp_backward_probe.py [--out hp_backward.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

CASE = r'''
import json, sys, torch, transformer_engine.pytorch as te
from transformer_engine.common import recipe as R
module, pdtype, override, autocast = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
dtype = getattr(torch, pdtype)
if module == "linear":
    layer = te.Linear(256, 256, params_dtype=dtype).cuda()
    call = lambda x: layer(x)
else:
    layer = te.GroupedLinear(2, 256, 256, params_dtype=dtype).cuda()
    call = lambda x: layer(x, [32, 32])
x = torch.randn(64, 256, device="cuda", requires_grad=True)
rec = R.Float8CurrentScaling(backward_override=None if override == "none" else override)
try:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), te.autocast(enabled=True, recipe=rec):
        y = call(x)
    y.float().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad] + [x.grad]
    finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    print(json.dumps({"ok": True, "finite": finite}))
except Exception as e:
    print(json.dumps({"ok": False, "error": str(e).splitlines()[0][-200:]}))
'''

OVERRIDES = ("none", "high_precision", "dequantized")


def stack() -> dict[str, Any]:
    import ctypes

    import torch
    import transformer_engine
    import transformer_engine_torch as tex

    def version(value: int) -> str:
        return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"

    try:
        loaded = version(int(ctypes.CDLL("libcublasLt.so.13").cublasLtGetVersion()))
    except OSError:
        loaded = None
    return {"device": torch.cuda.get_device_name(), "cc": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__, "transformer_engine": transformer_engine.__version__,
            "cublaslt": version(int(tex.get_cublasLt_version())), "cublaslt_loaded": loaded}


def run_case(module: str, pdtype: str, override: str, autocast: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CASE, module, pdtype, override, "1" if autocast else "0"],
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"ok": False, "error": out.stderr.strip()[-200:]}
    return {"module": module, "params": pdtype, "override": override, "autocast": autocast, **result}


def verdicts(cases: list[dict[str, Any]], cublaslt: str) -> list[dict[str, Any]]:
    """The rule's case (FP32 parameters under BF16 autocast), per override: does it run on this cuBLASLt?"""
    major_minor = ".".join(cublaslt.split(".")[:2])
    out = []
    for override in OVERRIDES[1:]:
        rows = [c for c in cases if c["params"] == "float32" and c["autocast"] and c["override"] == override]
        runs = all(c["ok"] and c.get("finite") for c in rows)
        if override == "high_precision":
            advice = (f"runs on cuBLASLt {cublaslt}: gate hp-backward-fp32-params with"
                      f" When(..., cublaslt_below='{major_minor}') if it failed on the older stack"
                      if runs else f"fails on cuBLASLt {cublaslt}: keep hp-backward-fp32-params for this stack")
        else:
            advice = ("the rule's replacement runs here" if runs
                      else "the rule's replacement fails here too: the ladder needs another middle rung")
        out.append({"verdict": override, "params": "float32", "autocast": "bf16", "cublaslt": cublaslt, "runs": runs,
                    "modules": {c["module"]: c.get("error", "ok") for c in rows}, "rule": advice})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the stack, cases and verdicts here")
    args = parser.parse_args()
    env = stack()
    print(json.dumps({"stack": env}), flush=True)
    cases = []
    for module in ("linear", "grouped_linear"):
        for pdtype in ("float32", "bfloat16"):
            for override in OVERRIDES:
                for autocast in (True, False):
                    cases.append(run_case(module, pdtype, override, autocast))
                    print(json.dumps(cases[-1]), flush=True)
    found = verdicts(cases, env["cublaslt"])
    for verdict in found:
        print(json.dumps(verdict), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"stack": env, "cases": cases, "verdicts": found}, indent=2))


if __name__ == "__main__":
    main()
