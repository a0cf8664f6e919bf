"""Known facts about devices and TE versions, as data.

Each rule says when it applies (compute capability, TE/cuDNN/CUDA/cuBLASLt versions, what TE itself
reports), what it does (forbid recipes, force settings, drop a ladder step, set environment variables,
keep attention off TE's fused backend, or give the order ``auto`` tries recipes in) and why, citing its
source. The policy (``choose.py``) only reads this table; ``docs/policy.md`` is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .environment import parse_version
from .recipes import GROUPED_MM_MAX_TOKENS, TE_RECIPES
from .te_features import TE_FLOOR, since

if TYPE_CHECKING:
    from .environment import Environment


@dataclass(frozen=True)
class When:
    """Where a rule applies. Unset fields match anything; ranges are [min, below)."""

    device: Optional[str] = None  # "cpu" or "cuda"
    cc_min: Optional[float] = None
    cc_below: Optional[float] = None
    te_installed: Optional[bool] = None
    te_min: Optional[str] = None  # the rule holds from this TE version on ...
    te_fixed_in: Optional[str] = None  # ... and until this one; None while unfixed
    cudnn_below: Optional[str] = None
    torch_cuda_below: Optional[str] = None
    cublaslt_min: Optional[str] = None  # an unknown cuBLASLt never counts as new enough
    cublaslt_below: Optional[str] = None
    cpu_bf16: Optional[bool] = None
    torch_compile: Optional[bool] = None
    cuda_graphs: Optional[bool] = None  # the plan runs CUDA graphs: a GPU-bound step, where host costs weigh less
    sharded: Optional[bool] = None  # parameters sharded over several ranks (Lightning's FSDP / FSDP2 strategies)
    multi_process: Optional[bool] = None  # the run has several processes (DDP, FSDP)
    params_dtype: Optional[str] = None  # the dtype TEMoEPrecision keeps parameters in
    te_reports_unavailable: Optional[str] = None  # a family of TE's is_*_available checks

    def matches(self, env: Environment, torch_compile: bool = False, params_dtype: str = "float32",
                cuda_graphs: bool = False, sharded: bool = False, multi_process: bool = False) -> bool:
        if self.device is not None and env.device_type != self.device:
            return False
        if self.cc_min is not None and (env.cc is None or env.cc < self.cc_min):
            return False
        if self.cc_below is not None and (env.cc is None or env.cc >= self.cc_below):
            return False
        if self.te_installed is not None and env.has_te != self.te_installed:
            return False
        if (self.te_min or self.te_fixed_in) and not env.has_te:
            return False
        if self.te_min and env.te < parse_version(self.te_min):
            return False
        if self.te_fixed_in and env.te >= parse_version(self.te_fixed_in):
            return False
        if self.cublaslt_min and (env.cublaslt_version is None
                                  or parse_version(env.cublaslt_version) < parse_version(self.cublaslt_min)):
            return False
        for have, below in (
            (env.cudnn_version, self.cudnn_below),
            (env.torch_cuda, self.torch_cuda_below),
            (env.cublaslt_version, self.cublaslt_below),
        ):
            # an unknown version below a required one counts as too old: the safe side
            if below is not None and have is not None and parse_version(have) >= parse_version(below):
                return False
        if self.cpu_bf16 is not None and env.cpu_bf16 != self.cpu_bf16:
            return False
        if self.torch_compile is not None and torch_compile != self.torch_compile:
            return False
        if self.cuda_graphs is not None and cuda_graphs != self.cuda_graphs:
            return False
        if self.sharded is not None and sharded != self.sharded:
            return False
        if self.multi_process is not None and multi_process != self.multi_process:
            return False
        if self.params_dtype is not None and params_dtype != self.params_dtype:
            return False
        if self.te_reports_unavailable is not None:
            check = env.te_checks.get(self.te_reports_unavailable)
            if check is None or check.available:
                return False
        return True

    def describe(self) -> str:
        """Human form for the generated docs."""
        parts = []
        if self.device:
            parts.append(f"device {self.device}")
        if self.cc_min is not None or self.cc_below is not None:
            lo = f"{self.cc_min} <= " if self.cc_min is not None else ""
            hi = f" < {self.cc_below}" if self.cc_below is not None else ""
            parts.append(f"{lo}CC{hi}")
        if self.te_installed is not None:
            parts.append("TE installed" if self.te_installed else "TE not installed")
        if self.te_min or self.te_fixed_in:
            lo = f"TE >= {self.te_min}" if self.te_min else "TE"
            parts.append(lo + (f" < {self.te_fixed_in} (fixed in {self.te_fixed_in})" if self.te_fixed_in else ""))
        if self.cublaslt_min:
            parts.append(f"cuBLASLt >= {self.cublaslt_min}")
        for label, below in (("cuDNN", self.cudnn_below), ("torch CUDA", self.torch_cuda_below),
                             ("cuBLASLt", self.cublaslt_below)):
            if below:
                parts.append(f"{label} < {below}")
        if self.cpu_bf16 is not None:
            parts.append("CPU with native BF16" if self.cpu_bf16 else "CPU without native BF16")
        if self.torch_compile is not None:
            parts.append("under torch.compile" if self.torch_compile else "without torch.compile")
        if self.cuda_graphs is not None:
            parts.append("with CUDA graphs" if self.cuda_graphs else "without CUDA graphs")
        if self.sharded is not None:
            parts.append("parameters sharded (FSDP)" if self.sharded else "parameters not sharded")
        if self.multi_process is not None:
            parts.append("several processes" if self.multi_process else "one process")
        if self.params_dtype:
            parts.append(f"parameters in {self.params_dtype}")
        if self.te_reports_unavailable:
            parts.append(f"TE reports {self.te_reports_unavailable} unavailable")
        return ", ".join(parts) or "always"


@dataclass(frozen=True)
class Effect:
    """What a rule does to the plan."""

    forbid: tuple[str, ...] = ()
    experts_only: bool = False  # forbid for the expert GEMMs only; dense layers may still use it
    lifted_by_request: bool = False  # a recipe the user names (recipe= or allow=) runs anyway, with this rule's warning
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # recipe -> forced settings
    prefer: tuple[str, ...] = ()  # the order ``auto`` tries recipes in (first matching rule wins)
    auto_nvfp4: bool = False  # auto takes NVFP4 here without the user's auto_nvfp4=True
    native_grouped: tuple[str, ...] = ()  # recipes whose expert GEMMs TE runs as its native grouped GEMM here
    split_when_set: tuple[str, ...] = ()  # recipe settings that keep the experts on TE's split path when set
    bf16_grouped_mm: bool = False  # BF16 experts off TE's native GEMM run torch's grouped_mm at fine-tuning sizes
    drop_high_precision_backward: bool = False
    high_precision_backward_via: dict[str, str] = field(default_factory=dict)  # recipe -> recipe to use
    backward_override: Optional[str] = None  # the override value the ladder's middle step uses
    env: dict[str, str] = field(default_factory=dict)
    fused_attention: Optional[bool] = None
    cuda_graphs: Optional[bool] = None  # CUDA graphs of the decoder layers by default (the user's cuda_graphs= wins)
    graphed_recompute: Optional[bool] = None  # a step out of memory first recomputes inside the graphs (memory.py)

    def describe(self) -> str:
        parts = []
        if self.forbid:
            parts.append(("experts: no " if self.experts_only else "no ") + ", ".join(self.forbid)
                         + (" unless the user names it" if self.lifted_by_request else ""))
        for recipe, values in self.settings.items():
            parts.append(f"{recipe}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        if self.prefer:
            parts.append("auto tries " + " > ".join(self.prefer))
        if self.auto_nvfp4:
            parts.append("auto takes nvfp4 without auto_nvfp4=True")
        if self.native_grouped:
            parts.append("experts on TE's native grouped GEMM: " + ", ".join(self.native_grouped))
        if self.split_when_set:
            parts.append("experts on one GEMM per expert with " + " or ".join(self.split_when_set) + " set")
        if self.bf16_grouped_mm:
            parts.append("BF16 experts without TE's native grouped GEMM: torch grouped_mm up to"
                         f" {GROUPED_MM_MAX_TOKENS:,} tokens a call")
        if self.drop_high_precision_backward:
            parts.append("ladder skips the high-precision-backward step")
        for src, dst in self.high_precision_backward_via.items():
            parts.append(f"high-precision backward from {src} runs as {dst}")
        if self.backward_override:
            parts.append(f"ladder uses backward_override={self.backward_override!r}")
        if self.env:
            parts.append("sets " + ", ".join(f"{k}={v}" for k, v in self.env.items()))
        if self.fused_attention is False:
            parts.append("attention stays off TE's fused backend")
        if self.cuda_graphs is not None:
            parts.append("CUDA graphs of the decoder layers " + ("on" if self.cuda_graphs else "off")
                         + " unless cuda_graphs= says otherwise")
        if self.graphed_recompute is not None:
            parts.append("a step out of memory first " + ("recomputes inside the CUDA graphs" if self.graphed_recompute
                                                          else "drops the CUDA graphs"))
        return "; ".join(parts) or "note"


@dataclass(frozen=True)
class Rule:
    id: str
    ref: str
    when: When
    effect: Effect
    why: str


_QUANTIZED = TE_RECIPES
_FP8_SCALED = ("fp8_delayed", "fp8_current")

#: TE 2.20.2 ``module/grouped_linear.py``, the predicate TE's ``GroupedLinear`` asks before its native grouped GEMM.
_NATIVE_REF = "TE grouped_linear.is_module_grouped_tensor_path_supported (TE 2.20.2 L89-152; TE PR #3224, TE 2.19)"

RULES: tuple[Rule, ...] = (
    # -- what the machine can run at all, and the order auto tries -------------------------------
    Rule("cpu-bf16", "torch CPU autocast", When(device="cpu", cpu_bf16=True),
         Effect(forbid=_QUANTIZED + ("fp16",), prefer=("bf16", "fp32")),
         "CPU: TE needs a GPU; this CPU has native BF16 (AVX512-BF16/AMX), so torch autocast BF16."),
    Rule("cpu-fp32", "torch CPU autocast", When(device="cpu", cpu_bf16=False),
         Effect(forbid=_QUANTIZED + ("fp16",), prefer=("fp32", "bf16")),
         "CPU: TE needs a GPU; this CPU emulates BF16 (slower than FP32), so FP32."),
    Rule("no-te", "pip install 'lightning-te-moe[te]'", When(device="cuda", te_installed=False),
         Effect(forbid=_QUANTIZED),
         "Transformer Engine is not installed: torch autocast only (BF16, or FP16 before Ampere)."),
    Rule("pre-ampere", "CUDA bf16 needs sm_80", When(device="cuda", cc_below=8.0),
         Effect(forbid=_QUANTIZED + ("bf16",), prefer=("fp16", "fp32")),
         "Compute capability < 8.0 has no BF16: FP16 mixed precision with loss scaling."),
    Rule("ampere-bf16-only", "TE is_fp8_available: CC >= 8.9", When(device="cuda", cc_min=8.0, cc_below=8.9),
         Effect(forbid=_QUANTIZED, prefer=("bf16", "fp32")),
         "Compute capability 8.0-8.8 has BF16 tensor cores but no FP8."),
    Rule("ada-fp8", "TE is_fp8_available", When(device="cuda", cc_min=8.9, cc_below=9.0),
         Effect(forbid=("fp8_block", "mxfp8", "nvfp4"), prefer=("fp8_current", "fp8_delayed", "bf16", "fp32")),
         "Ada (8.9): per-tensor FP8 only; block scaling needs Hopper, MXFP8/NVFP4 need Blackwell."),
    Rule("ada-cublaslt", "TE is_fp8_available (cuBLASLt >= 12.1.3 on sm_89)",
         When(device="cuda", cc_min=8.9, cc_below=9.0, cublaslt_below="12.1.3"),
         Effect(forbid=_QUANTIZED),
         "FP8 on Ada needs cuBLASLt >= 12.1.3."),
    # -- CUDA graphs by default (decided before the rules below, which may read it) -----------------
    Rule("cuda-graphs-one-process",
         "measured (GPT-OSS-20B LoRA fine-tune on one H100 80GB, TE 2.20.2, 2026-11-27/28, benchmarks/full_model.py):"
         " docs/cuda-graphs.md, docs/performance.md",
         When(device="cuda", te_installed=True, multi_process=False, torch_compile=False),
         Effect(cuda_graphs=True),
         "One process on CUDA with TE: the eager step is host-bound (the host issues about 8,000 launches a step more"
         " slowly than the GPU runs them: GPU busy 13-40%, 0.52-0.82x transformers + flex attention at full size);"
         " with each decoder layer's forward and backward replayed as CUDA graphs the same plan ran 1.8-2.4x the"
         " reference at 1,024 tokens, GPU busy 92-97%, at a lower peak memory. So they are on unless"
         " cuda_graphs=False. Layers that synchronize with the host run eagerly (recorded), and a step out of"
         " memory recomputes inside the graphs or drops them (the memory fallback, rules graphed-recompute-*)."),
    Rule("cuda-graphs-several-processes",
         "not measured under DDP; FSDP gathers parameters into new memory at every call (lightning_te_moe/graphs.py)",
         When(device="cuda", multi_process=True),
         Effect(cuda_graphs=False),
         "Several processes (DDP, FSDP): CUDA graphs are off by default. Sharded layers cannot be replayed (FSDP"
         " gathers their weights into new memory at every call) and graphs under DDP are not measured;"
         " cuda_graphs=True turns them on where a layer allows."),
    Rule("cuda-graphs-compile",
         "torch.compile(mode='reduce-overhead') captures CUDA graphs of its own",
         When(device="cuda", torch_compile=True),
         Effect(cuda_graphs=False),
         "Under torch.compile the decoder layers are not graphed by default: the compiler decides (its"
         " mode='reduce-overhead' captures CUDA graphs itself)."),
    # -- what a step out of memory does first (lightning_te_moe/memory.py) ---------------------------
    Rule("graphed-recompute-hopper",
         "measured (GPT-OSS-20B LoRA fine-tunes at 8 x 1,024 tokens, one H200 capped at an H100's 78.5 GiB, TE 2.20.2,"
         " 2026-11-28, benchmarks/full_model.py): cuBLASLt 13.1 and 13.10, docs/cuda-graphs.md",
         When(device="cuda", cc_min=9.0, cc_below=10.0, cuda_graphs=True),
         Effect(graphed_recompute=True),
         "Hopper with CUDA graphs: a step out of memory first recomputes each decoder layer inside its CUDA graphs"
         " (activation checkpointing at two launches a layer). GPT-OSS-20B at 8 x 1,024 tokens then ran, on cuBLASLt"
         " 13.1, 483-486 ms with the experts frozen and 558-560 ms with LoRA on them, GPU busy 98%, against 545 and"
         " 633 ms (busy 86%) with the graphs dropped and eager checkpointing; on cuBLASLt 13.10, with LoRA on the"
         " experts, 496.5 ms at 98% busy (peak 64.9 GiB) where the other ladder took 728 ms at 67%, once the memory"
         " fallback packs the frozen weights' quantized copies anew (before that, they kept 30.4 GiB of freed"
         " activation memory reserved and the step did not fit). With the final code (2 x H200 capped, 15:05 UTC):"
         " 13.10 422.2 ms with the experts frozen (833.3 ms at 49% on the other ladder) and 499.6 ms with LoRA on"
         " them; 13.1 480.6 and 555.7 ms; GPU busy 98-99%."),
    Rule("hopper-sharded-bf16",
         "measured (GPT-OSS-20B, all parameters trainable, FSDP2 on 4 GPUs, sequence 4,096, TE 2.20.2, "
         "benchmarks/distributed.py): docs/distributed.md, 4 x H200 cuBLASLt 13.10 (2026-11-28) and 4 x H100 "
         "cuBLASLt 13.1 (2026-11-27)",
         When(device="cuda", cc_min=9.0, cc_below=10.0, sharded=True),
         Effect(forbid=_QUANTIZED, lifted_by_request=True),
         "Hopper with sharded parameters: every FP8 plan measured slower than BF16 in the full-size fine-tune under"
         " FSDP2 (FSDP gathers and quantizes the same way; not measured), on both CUDA stacks, and larger: on 4 x"
         " H200 with cuBLASLt 13.10 FP8 current (experts on TE's native"
         " grouped GEMM) took 0.97-0.98 s a step and 103.8 GiB against BF16's 0.66 s and 68.2 GiB, the same lease; on 4"
         " x H100 with cuBLASLt 13.1 FP8 dense layers took 1.15 s against 0.80 s. Sharded weights are gathered in"
         " BF16 and quantized again in every forward and backward, and TE's GroupedLinear keeps each layer's FP8"
         " expert weights for its backward. So auto runs BF16 there; a named recipe (recipe='fp8_current') still"
         " runs FP8, with this warning. Not measured on Blackwell."),
    Rule("hopper-split-dense-bf16",
         "measured (H100 80GB, TE 2.20.2, cuBLASLt 13.1, 2026-11-27): docs/dense.md 'Dense layers on TE at full size',"
         " docs/distributed.md, docs/performance.md (benchmarks/full_model.py, distributed.py, train_step.py)",
         When(device="cuda", cc_min=9.0, cc_below=10.0, cublaslt_below="13.5", cuda_graphs=False),
         Effect(prefer=("bf16", "fp8_current", "fp8_block", "fp8_delayed", "fp32")),
         "Hopper below cuBLASLt 13.5: FP8 dense layers measured slower than BF16 in every GPT-OSS-20B training step"
         " of 2026-11-27 on cuBLASLt 13.1 (TE's Linear adds quantize launches to a host-bound step; the"
         " projections are small): full-size LoRA fine-tune on one H100 357.7 vs 291.5 ms at 1,024 tokens and 465.2"
         " vs 338.0 ms at 4,096; full fine-tune on 4 x H100 (FSDP2) 1.15 vs 0.80 s a step; 4-layer step 126.4 vs"
         " 117.8 ms, all eager. The experts measured fastest in BF16 on this stack too, so auto runs BF16 there; a"
         " named recipe (recipe='fp8_current') still runs FP8. It applies only without CUDA graphs (cuda_graphs=False,"
         " several processes): with them the step is GPU-bound and the FP8 plan stands (1.81x the reference at 1,024"
         " tokens, H100, 2026-11-28). It does not apply on a current stack either."),
    Rule("hopper-fp8", "TE is_mxfp8_available / is_nvfp4_available: CC >= 10.0",
         When(device="cuda", cc_min=9.0, cc_below=10.0),
         Effect(forbid=("mxfp8", "nvfp4"), prefer=("fp8_current", "fp8_block", "fp8_delayed", "bf16", "fp32")),
         "Hopper (9.x): FP8 with per-tensor (current, delayed) or block scaling; no MXFP8/NVFP4."),
    Rule("block-needs-cuda-12.9", "TE is_fp8_block_scaling_available",
         When(device="cuda", cc_min=9.0, torch_cuda_below="12.9"),
         Effect(forbid=("fp8_block",)),
         "FP8 block scaling needs torch built with CUDA >= 12.9."),
    Rule("blackwell-mxfp8", "TE get_default_recipe (MXFP8 on 10.x/11.x)",
         When(device="cuda", cc_min=10.0, cc_below=12.0),
         Effect(prefer=("nvfp4", "mxfp8", "fp8_current", "fp8_block", "fp8_delayed", "bf16", "fp32")),
         "Blackwell (10.x/11.x): MXFP8 by default; NVFP4 only when allowed."),
    Rule("sm120-order", "TE #2382 (NVFP4 converges on SM120, FP8 block scaling does not); TE PR #3195",
         When(device="cuda", cc_min=12.0),
         Effect(prefer=("nvfp4", "fp8_current", "fp8_delayed", "bf16", "fp32"), auto_nvfp4=True),
         "SM120/SM121 (DGX Spark): NVFP4 without RHT and stochastic rounding is what trains there (TE #2382,"
         " DGX Spark users), so auto takes it without auto_nvfp4=True; else BF16."),
    # -- known TE problems -----------------------------------------------------------------------
    Rule("sm120-no-block", "TE #2382", When(device="cuda", cc_min=12.0),
         Effect(forbid=("fp8_block",)),
         "FP8 block scaling does not converge on SM120/SM121 'for any of its options' (power-of-2 scales are"
         " forced there)."),
    Rule("sm120-fp8-unproven", "TE #2382; no report of FP8 per-tensor scaling converging on SM120",
         When(device="cuda", cc_min=12.0),
         Effect(forbid=("fp8_current", "fp8_delayed"), lifted_by_request=True),
         "FP8 per-tensor scaling is unproven on SM120/SM121: no report we know of shows it converging there, so"
         " neither auto nor the experts take it unless you name it (recipe= or allow=)."),
    Rule("sm120-nvfp4-no-rht", "TE #2372; TE PR #3300 (RHT for SM120/SM121, open)", When(device="cuda", cc_min=12.0),
         Effect(settings={"nvfp4": {"disable_rht": True}}),
         "NVFP4's random Hadamard transform fails on SM120 ('Failed to set Shared Memory size'); disable_rht=True"
         " trains."),
    Rule("sm120-nvfp4-no-sr", "TE PR #3195 (support matrix); TE #3062; TE PR #3281 (all-zero SR data, TE 2.19)",
         When(device="cuda", cc_min=12.0),
         Effect(settings={"nvfp4": {"disable_stochastic_rounding": True}}),
         "NVFP4 on 12.x trains only without RHT and stochastic rounding (TE's support matrix; the default recipe"
         " crashes in the fused RHT kernel, TE #3062)."),
    Rule("sm120-no-mxfp8", "TE #2668", When(device="cuda", cc_min=12.0),
         Effect(forbid=("mxfp8",)),
         "TE has no MXFP8 kernels for SM120/SM121."),
    Rule("sm120-experts-no-nvfp4", f"TE #2372, TE #3219; {_NATIVE_REF}",
         When(device="cuda", cc_min=12.0),
         Effect(forbid=("nvfp4",), experts_only=True),
         "TE's grouped NVFP4 needs its random Hadamard transform (native path: CC 10.x/11.0 with RHT), which"
         " fails on SM120: experts run BF16 there."),
    Rule("sm120-fused-attn-cudnn", "TE PR #2693", When(device="cuda", cc_min=12.0, cudnn_below="9.18.1"),
         Effect(env={"NVTE_FUSED_ATTN": "0"}, fused_attention=False),
         "Fused attention on SM120 needs cuDNN >= 9.18.1; NVTE_FUSED_ATTN=0 keeps TE on another backend."),
    Rule("sm120-fused-attn-te", "TE PR #2693 (first in TE 2.14)",
         When(device="cuda", cc_min=12.0, te_installed=True, te_fixed_in="2.14"),
         Effect(env={"NVTE_FUSED_ATTN": "0"}, fused_attention=False),
         "TE before 2.14 disables fused attention on SM120; NVTE_FUSED_ATTN=0 says so up front."),
    Rule("mxfp8-e4m3", "Megatron-Bridge #638", When(),
         Effect(settings={"mxfp8": {"fp8_format": "E4M3"}}),
         "MXFP8 with the HYBRID format diverges: MXFP8 uses E4M3 in both directions."),
    Rule("experts-no-nvfp4-grouped", "TE #2455 (NVFP4 GroupedLinear path first in TE 2.17)",
         When(te_installed=True, te_fixed_in=since("nvfp4_grouped")),
         Effect(forbid=("nvfp4",), experts_only=True),
         "No NVFP4 grouped GEMM for GroupedLinear experts in this TE: experts use the next recipe."),
    Rule("experts-no-nvfp4-unknown-te", "TE #2455", When(te_installed=False),
         Effect(forbid=("nvfp4",), experts_only=True),
         "TE version unknown: experts do not get NVFP4 without a TE known to have NVFP4 grouped GEMMs (>= 2.17)."),
    Rule("te-below-floor", f"pyproject.toml (transformer-engine >= {TE_FLOOR}); policy/te_features.py",
         When(te_installed=True, te_fixed_in=TE_FLOOR),
         Effect(forbid=_QUANTIZED, fused_attention=False),
         f"This TE predates te.autocast and the other APIs the package needs (TE >= {TE_FLOOR}): it runs as if TE"
         " were absent (torch autocast, torch expert GEMMs, the model's own attention). Upgrade Transformer Engine."),
    Rule("backward-override-needs-2.15", "TE PR #2644 (first in TE 2.15)",
         When(te_installed=True, te_fixed_in=since("backward_override")),
         Effect(drop_high_precision_backward=True),
         "backward_override exists from TE 2.15: the ladder goes straight to BF16."),
    Rule("te-no-fused-permute", "TE 2.15 permutation.py (te_moe custom ops with pad_offsets)",
         When(device="cuda", te_installed=True, te_fixed_in=since("fused_permute")),
         Effect(),
         "TE before 2.15 has no mask-map permute kernels with padding: the experts move tokens with torch gathers"
         " (the same function, slower)."),
    Rule("delayed-rejects-backward-override", "TE recipe.DelayedScaling (backward_override must be None)", When(),
         Effect(high_precision_backward_via={"fp8_delayed": "fp8_current"}),
         "DelayedScaling rejects backward_override: the high-precision-backward step uses current scaling."),
    Rule("hp-backward-fp32-params",
         "benchmarks/hp_backward_probe.py (H100, TE 2.20.2: cuBLASLt 13.1, 2026-11-24 and 2026-11-27; cuBLASLt"
         " 13.10, 2026-11-27)",
         When(device="cuda", te_min="2.15", params_dtype="float32"),
         Effect(backward_override="dequantized"),
         "backward_override='high_precision' with FP32 master weights under BF16 autocast fails in te.Linear's"
         " backward ('Unable to find suitable cuBLAS GEMM algorithm') with cuBLASLt 13.1 and with 13.10 alike (so"
         " the rule is not gated on cuBLASLt); 'dequantized' (BF16 GEMMs on the dequantized saved operands, no FP8"
         " gradients) runs."),
    Rule("compile-no-delayed", "TE check_recipe_support", When(torch_compile=True),
         Effect(forbid=("fp8_delayed",)),
         "DelayedScaling is rejected under torch.compile."),
    # -- which GEMM path TE takes for the experts (TE's own predicate, as data) -------------------
    Rule("native-grouped-hopper", _NATIVE_REF,
         When(device="cuda", cc_min=9.0, cc_below=10.0, te_min=since("native_grouped_predicate"), cublaslt_min="13.4"),
         Effect(native_grouped=("bf16", "fp16")),
         "Hopper with cuBLASLt >= 13.4: TE runs BF16/FP16 experts as one cuBLASLt grouped GEMM, split sizes on the"
         " device. DelayedScaling never runs there (TE has no grouped delayed-scaling quantize)."),
    Rule("native-grouped-hopper-fp8-current", _NATIVE_REF,
         When(device="cuda", cc_min=9.0, cc_below=10.0, te_min=since("native_grouped_predicate"), cublaslt_min="13.5"),
         Effect(native_grouped=("fp8_current",)),
         "Hopper: FP8 current scaling runs TE's native grouped GEMM from cuBLASLt 13.5."),
    Rule("native-grouped-hopper-fp8-block", _NATIVE_REF + "; 'cuBLASLt 13.6 fixes Hopper grouped GEMM algo selection'",
         When(device="cuda", cc_min=9.0, cc_below=10.0, te_min=since("native_grouped_predicate"), cublaslt_min="13.6"),
         Effect(native_grouped=("fp8_block",)),
         "Hopper: FP8 block scaling runs TE's native grouped GEMM from cuBLASLt 13.6 (TE's source; some TE docs"
         " say 13.4). Its grouped quantize needs 128 rows per expert."),
    Rule("native-grouped-blackwell", _NATIVE_REF,
         When(device="cuda", cc_min=10.0, cc_below=11.1, te_min=since("native_grouped_predicate"), cublaslt_min="13.3"),
         Effect(native_grouped=("bf16", "fp16", "fp8_current", "mxfp8", "nvfp4")),
         "Blackwell (CC 10.x, 11.0) with cuBLASLt >= 13.3: TE's native grouped GEMM runs BF16/FP16, FP8 current"
         " scaling, MXFP8 and NVFP4 (with its RHT); FP8 block scaling stays on the split path there."),
    Rule("native-grouped-split-settings", _NATIVE_REF, When(device="cuda"),
         Effect(split_when_set=("backward_override", "disable_rht")),
         "A backward_override (the ladder's high-precision-backward rung) and NVFP4 without its random Hadamard"
         " transform run TE's split path: one GEMM per expert."),
    Rule("experts-bf16-grouped-mm",
         "benchmarks/step_profile.py (H100, cuBLASLt 13.1, 2026-11-27); docs/performance.md expert layer (2026-11-24)",
         When(device="cuda", cc_min=9.0, cc_below=11.0, te_installed=True),
         Effect(bf16_grouped_mm=True),
         "BF16 experts where TE's native grouped GEMM does not run them: torch's grouped_mm (one launch per GEMM,"
         " offsets on the device, no host sync) up to GROUPED_MM_MAX_TOKENS tokens a call, TE's one GEMM per expert"
         " above. Full GPT-OSS-20B at 1,024 tokens: TE's per-expert path took 3.6 ms of host time per projection and"
         " layer for 0.1 ms of GPU work; expert layer alone: grouped_mm 8.9 vs TE 10.1 ms at 4,096 tokens, 28.8 vs"
         " 19.9 ms at 16,384 (torch grouped_mm kernels: CC 9.x/10.x)."),
    Rule("te-no-native-grouped", _NATIVE_REF,
         When(device="cuda", cc_min=9.0, cc_below=11.1, te_installed=True,
              te_fixed_in=since("native_grouped_predicate")),
         Effect(),
         "TE before 2.19 has no is_module_grouped_tensor_path_supported: the experts run TE's split path (one GEMM"
         " per expert) whatever the cuBLASLt."),
    # -- which layers run the dense recipe --------------------------------------------------------
    Rule("dense-high-precision-parts",
         "DeepSeek-V3 technical report (arXiv 2412.19437) sec. 3.3.1; TE utils.assert_dim_for_fp8_exec",
         When(device="cuda", cc_min=8.9, te_installed=True),
         Effect(),
         "Dense linear layers (attention projections, shared experts, dense MLPs) run the dense recipe on"
         " te.Linear; the embeddings, the output head and the MoE routers stay in the compute dtype: a router's"
         " top-k flips on small logit errors and its GEMM is too narrow to gain, the head's logits feed the loss"
         " directly, an embedding is a lookup, not a GEMM. Layers whose dimensions are not multiples of 16 (32 for"
         " MXFP8/NVFP4) stay nn.Linear."),
    # -- TE's own availability checks, when TE is installed on the real device ------------------
    Rule("te-check-fp8", "TE is_fp8_available", When(te_reports_unavailable="fp8"),
         Effect(forbid=_FP8_SCALED + ("fp8_block", "mxfp8", "nvfp4")),
         "TE reports FP8 unavailable on this device."),
    Rule("te-check-fp8-block", "TE is_fp8_block_scaling_available", When(te_reports_unavailable="fp8_block"),
         Effect(forbid=("fp8_block",)),
         "TE reports FP8 block scaling unavailable on this device."),
    Rule("te-check-mxfp8", "TE is_mxfp8_available", When(te_reports_unavailable="mxfp8"),
         Effect(forbid=("mxfp8",)),
         "TE reports MXFP8 unavailable on this device."),
    Rule("te-check-nvfp4", "TE is_nvfp4_available", When(te_reports_unavailable="nvfp4"),
         Effect(forbid=("nvfp4",)),
         "TE reports NVFP4 unavailable on this device."),
)


def matching_rules(env: Environment, torch_compile: bool = False, params_dtype: str = "float32",
                   cuda_graphs: bool = False, sharded: bool = False, multi_process: bool = False) -> list[Rule]:
    return [rule for rule in RULES if rule.when.matches(env, torch_compile=torch_compile, params_dtype=params_dtype,
                                                        cuda_graphs=cuda_graphs, sharded=sharded,
                                                        multi_process=multi_process)]
