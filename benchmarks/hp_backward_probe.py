"""Which te.Linear configurations run a high-precision backward under FP8 current scaling (TE 2.20.2)."""
import subprocess, sys, json
CASE = r'''
import sys, json, torch, transformer_engine.pytorch as te
from transformer_engine.common import recipe as R
pdtype, override, autocast = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
lin = te.Linear(256, 256, params_dtype=getattr(torch, pdtype)).cuda()
x = torch.randn(64, 256, device="cuda", requires_grad=True)
rec = R.Float8CurrentScaling(backward_override=None if override == "none" else override)
try:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), te.autocast(enabled=True, recipe=rec):
        y = lin(x)
    y.float().sum().backward()
    print(json.dumps({"ok": True, "wgrad": str(lin.weight.grad.dtype)}))
except Exception as e:
    print(json.dumps({"ok": False, "error": str(e).splitlines()[0][-160:]}))
'''
for pdtype in ("float32", "bfloat16"):
    for override in ("none", "high_precision", "dequantized"):
        for ac in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", CASE, pdtype, override, ac], capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            print(pdtype, override, "autocast" if ac == "1" else "no-autocast", line[-1] if line else out.stderr[-300:])
