"""Measured speed of one MoE expert layer per CUDA stack: the evidence ``auto`` reads to choose the experts' recipe.

This is the one place to edit when the expert layer is re-measured (``benchmarks/moe_layer.py`` prints the rows;
``docs/performance.md`` keeps the tables). A record stands for the stacks its ``where`` matches: the GEMM path
its recipes take there, and a TE that runs the layer's code path as measured (TE's fused permute from 2.15, its
native grouped GEMM from 2.19). On such a machine ``recipe="auto"`` runs the experts on the fastest *measured*
recipe the rules allow (never one measured slower than another allowed one, BF16 included), whatever the dense
layers run. Where no record matches, the experts follow the dense layers' recipe; ``autotune=True`` measures the
model's own shapes instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .rules import When
from .te_features import since

if TYPE_CHECKING:
    from .environment import Environment

GPT_OSS_20B_LAYER = "GPT-OSS-20B expert layer (H=I=2880, E=32, top-4)"


@dataclass(frozen=True)
class ExpertLayerMeasurement:
    """One benchmark run: milliseconds per step of the expert layer, by experts recipe."""

    id: str
    where: When  # the stacks these numbers stand for
    source: str
    date: str
    device: str
    te: str
    cublaslt: str
    tokens: int
    trainable_ms: dict[str, float]  # one micro-batch per optimizer step: the layer a training step runs
    frozen_ms: dict[str, float] = field(default_factory=dict)  # every expert parameter frozen (fine-tuning)
    cached_ms: dict[str, float] = field(default_factory=dict)  # micro-batches 2..n (TE reuses its FP8 weights)
    layer: str = GPT_OSS_20B_LAYER
    note: str = ""

    def stack(self) -> str:
        return f"{self.device}, TE {self.te}, cuBLASLt {self.cublaslt}, {self.date}"

    def table(self, names: Optional[list[str]] = None) -> str:
        """``bf16 20.0 ms, fp8_delayed 23.0 ms, ...`` (fastest first) for ``names`` (default: every row)."""
        rows = {n: ms for n, ms in self.trainable_ms.items() if names is None or n in names}
        return ", ".join(f"{n} {ms:.1f} ms" for n, ms in sorted(rows.items(), key=lambda kv: kv[1]))


_HOPPER = {"device": "cuda", "cc_min": 9.0, "cc_below": 10.0}

MEASUREMENTS: tuple[ExpertLayerMeasurement, ...] = (
    ExpertLayerMeasurement(
        id="measured-h100-split", where=When(**_HOPPER, te_min=since("fused_permute"), cublaslt_below="13.5"),
        source="docs/performance.md (benchmarks/moe_layer.py)", date="2026-11-27", device="H100 80GB HBM3",
        te="2.20.2", cublaslt="13.1.0", tokens=16384,
        trainable_ms={"bf16": 19.6, "fp8_delayed": 23.7, "fp8_current": 27.4, "fp8_block": 22.2},
        frozen_ms={"bf16": 14.2, "fp8_delayed": 14.1, "fp8_current": 17.2, "fp8_block": 16.1},
        cached_ms={"fp8_delayed": 19.5, "fp8_current": 21.1, "fp8_block": 20.8},
        note="TE's split path (one GEMM per expert), which every FP8 recipe takes on Hopper below cuBLASLt 13.5;"
             " measured 15:51 UTC. At 65,536 tokens FP8 delayed was 18% faster than BF16 (55.3 vs 67.1 ms); at 1,024"
             " and 4,096 tokens every FP8 recipe was 2-4x slower than BF16."),
    ExpertLayerMeasurement(
        id="measured-h100-native",
        where=When(**_HOPPER, te_min=since("native_grouped_predicate"), cublaslt_min="13.5"),
        source="docs/performance.md (benchmarks/moe_layer.py)", date="2026-11-28", device="H100 80GB HBM3",
        te="2.20.2", cublaslt="13.10.0", tokens=16384,
        trainable_ms={"bf16": 19.0, "fp8_delayed": 20.8, "fp8_current": 17.8, "fp8_block": 19.2},
        cached_ms={"fp8_delayed": 20.7, "fp8_current": 16.1, "fp8_block": 17.7},
        frozen_ms={"bf16": 13.3, "fp8_delayed": 13.3, "fp8_current": 11.4, "fp8_block": 12.4},
        note="TE's native grouped GEMM for BF16, FP8 current and FP8 block scaling (block with 128 rows per expert);"
             " FP8 delayed runs the split path; the full run of 00:31 UTC. FP8 current ran eager four more times on"
             " H100s that day and BF16 three (00:42-05:43 UTC): 17.4-19.8 against 18.2-19.7 ms over all runs, within"
             " run-to-run noise of each other; replayed as CUDA graphs 15.9-16.1 against 17.5-18.0 ms. Since"
             " 3ebcfed FP8 current quantizes all experts' weights as one grouped weight: two runs at 07:44-07:46 UTC"
             " timed it eager at 18.04 / 17.37 ms against BF16's 18.82 / 18.67 (one weight per expert 20.95 / 19.23),"
             " graphed 15.84 / 15.83. At 65,536 tokens (2026-11-27, 15:55 UTC) FP8 delayed was 22% faster than BF16"
             " (55.0 vs 70.9 ms), FP8 current 12%."),
)


def measured_for(env: Environment) -> Optional[ExpertLayerMeasurement]:
    """The measurement that stands for ``env``'s stack, or None."""
    return next((m for m in MEASUREMENTS if m.where.matches(env)), None)
