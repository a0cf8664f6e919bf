"""Per-expert row alignment follows the active recipe *and* the GEMM path TE takes.

TE's native grouped GEMM quantizes all experts with grouped kernels that need 128 rows per expert for FP8 block
scaling (TE prints "Grouped FP8 block-scaling quantize: each tensor's first dimension must be a multiple of 128
(VARYING_FIRST_DIM)" and the gradients are NaN otherwise), MXFP8 and NVFP4; its split path (one GEMM per expert)
needs TE's ``get_align_size_for_quantization``. On the CPU the stand-in engine and permute kernels of
``test_experts_te_bias.py`` take TE's place, and the engine enforces the native path's row multiple as TE's
kernels do.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from experts_helpers import rel_err
from test_experts_te_bias import _FakeEngine, _fused_kernels, _pair, _routing, _step

from lightning_te_moe.experts import module as experts_module
from lightning_te_moe.experts import te_routing
from lightning_te_moe.policy.recipes import ALIGNMENT, RecipeSpec, te_recipe_alignment

#: What TE's native grouped quantize kernels need per expert (read in TE 2.20.2's C++ sources).
NATIVE_ROWS = {"bf16": 1, "fp8_current": 16, "fp8_block": 128, "mxfp8": 128, "nvfp4": 128}
SPLIT_ROWS = {"bf16": 1, "fp8_current": 16, "fp8_block": 16, "mxfp8": 32, "nvfp4": 128}


SEEN: list[list[int]] = []


class _StrictEngine(_FakeEngine):
    """The stand-in engine, failing as TE's grouped quantize does on a block that is not a multiple of its rows;
    records the expert blocks it gets in ``SEEN``."""

    rows_needed = 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, splits: Optional[list[int]],
                 bias: Optional[torch.Tensor] = None, device_splits: Optional[torch.Tensor] = None,
                 recipe: Any = None) -> torch.Tensor:
        blocks = device_splits.tolist() if self.native and device_splits is not None else splits
        assert blocks is not None
        SEEN.append(blocks)
        bad = [s for s in blocks if s % self.rows_needed]
        if self.native and bad:
            raise RuntimeError(f"each tensor's first dimension must be a multiple of {self.rows_needed}: {bad}")
        return super().__call__(x, weight, splits, bias, device_splits, recipe)


def _strict(monkeypatch: pytest.MonkeyPatch, rows_needed: int, native: bool) -> None:
    monkeypatch.setattr(experts_module, "TEGroupedGemm", type("Engine", (_StrictEngine,), {"rows_needed": rows_needed}))
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: native)
    SEEN.clear()


@pytest.mark.parametrize("native", [False, True], ids=["split-path", "native-grouped"])
@pytest.mark.parametrize("recipe", ["bf16", "fp8_current", "fp8_block", "mxfp8", "nvfp4"])
def test_blocks_are_padded_for_the_path_te_takes(monkeypatch: pytest.MonkeyPatch, recipe: str, native: bool) -> None:
    """Every expert block the GEMMs see (the upper-bound slack block of the no-host-sync routing included) is a
    multiple of the row count the recipe needs on that path, and the layer computes the torch backend's function."""
    ref, te = _pair(monkeypatch, recipe)
    need = (NATIVE_ROWS if native else SPLIT_ROWS)[recipe]
    _strict(monkeypatch, NATIVE_ROWS[recipe], native)
    made = _fused_kernels(monkeypatch)
    x, index, weights = _routing()
    want, got = _step(ref, x, index, weights), _step(te, x, index, weights)
    assert max(rel_err(got[n], want[n]) for n in want) <= 1e-5
    assert len(made) == 1 and (made[0].splits is None) == native and len(SEEN) == 2
    assert all(s % need == 0 for blocks in SEEN for s in blocks), (need, SEEN)
    if native:
        assert sum(SEEN[0]) == te_routing.upper_bound_rows(13, 2, 8, need)
        assert SEEN[0][-1] > 0  # the slack block, aligned like the others
    if need > 1:
        assert max(SEEN[0][:-1]) == need  # padded to exactly the path's multiple, no further


def test_block_scaling_on_the_native_path_needed_128_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split path's 16 rows per expert is what TE's native FP8 block-scaling quantize rejects."""
    _, te = _pair(monkeypatch, "fp8_block")
    _strict(monkeypatch, 128, native=True)
    _fused_kernels(monkeypatch)
    monkeypatch.setattr(te, "_alignment", lambda recipe, native: SPLIT_ROWS["fp8_block"])  # path-blind padding
    with pytest.raises(RuntimeError, match="multiple of 128"):
        _step(te, *_routing())


def test_alignment_per_path_and_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 block scaling: 128 rows where TE runs its native grouped GEMM, 16 on its split path (where the ladder's
    high-precision-backward rung runs); 1 for a module kept out of FP8."""
    _, te = _pair(monkeypatch, "fp8_block")
    assert te._alignment(None, native=True) == 128 and te._alignment(None, native=False) == 16
    te.fp8_reason = "hidden size not a multiple of 16"
    assert te._alignment(None, native=True) == 1


def test_alignment_table_is_the_documented_one() -> None:
    for name in NATIVE_ROWS:
        spec = RecipeSpec.of(name)
        assert spec.alignment_for("native") == NATIVE_ROWS[name]
        assert spec.alignment_for("split") == spec.alignment == SPLIT_ROWS[name] == spec.alignment_for("torch")
    assert RecipeSpec.of("fp8_delayed").alignment_for("split") == 16
    assert "fp8_delayed" not in ALIGNMENT["native"]  # TE never runs delayed scaling on its native path
    with pytest.raises(ValueError, match="unknown GEMM path 'fused'; valid paths are: native, split, grouped_mm, torch"):
        RecipeSpec.of("bf16").alignment_for("fused")


def test_a_users_own_te_recipe_is_aligned_by_its_type() -> None:
    """No plan state (a user's own ``te.autocast``): the TE recipe object's type picks the row multiple."""
    block = type("Float8BlockScaling", (), {})()
    mxfp8 = type("MXFP8BlockScaling", (), {})()
    custom = type("CustomRecipe", (), {"quantization_alignment": 64})()
    assert te_recipe_alignment(block, "native") == 128 and te_recipe_alignment(block, "split") == 16
    assert te_recipe_alignment(mxfp8, "native") == 128 and te_recipe_alignment(mxfp8, "split") == 32
    assert te_recipe_alignment(custom, "split") == 64
    with pytest.raises(ValueError, match="unsupported TE recipe type Mystery"):
        te_recipe_alignment(type("Mystery", (), {})(), "split")


def test_only_fp8_current_quantizes_the_expert_weights_as_one_grouped_weight() -> None:
    """The recipes whose trainable expert weights go to TE's native path as one grouped weight, by TE recipe type;
    BF16 (no recipe) and the other recipes keep one weight per expert."""
    from lightning_te_moe.policy.recipes import GROUPED_WEIGHT_RECIPES, TE_CLASSES, grouped_weight_quantize

    picked = {name for name, cls in TE_CLASSES.items() if grouped_weight_quantize(type(cls, (), {})())}
    assert picked == set(GROUPED_WEIGHT_RECIPES) == {"fp8_current"}
    assert not grouped_weight_quantize(None)
    assert not grouped_weight_quantize(type("CustomRecipe", (), {"quantization_alignment": 16})())


def test_an_engine_binds_one_grouped_weight_only_where_te_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's per-call choice (no TE needed to decide): TE's native path (its own predicate, not the module's
    choice), FP8 current, a TE with the feature, and the weight already in the compute dtype (an FP32 master weight
    under autocast keeps one weight per expert: TE casts those)."""
    from lightning_te_moe.experts import gemm

    engine = object.__new__(gemm.TEGroupedGemm)  # the decision reads only ``native``; building one needs TE
    current, block = type("Float8CurrentScaling", (), {})(), type("Float8BlockScaling", (), {})()
    bf16 = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    te_native = {"yes": True}
    monkeypatch.setattr(gemm, "native_grouped_gemm", lambda recipe, dtype: te_native["yes"])
    monkeypatch.setattr(gemm, "te_has", lambda name: name == "single_grouped_weight")
    engine.native = True
    assert engine.grouped_weight_runs(bf16, x, current)
    assert not engine.grouped_weight_runs(bf16, x, block) and not engine.grouped_weight_runs(bf16, x, None)
    assert not engine.grouped_weight_runs(bf16.float(), x, current)
    te_native["yes"] = False  # TE would run its split path: a single grouped weight would raise there
    assert not engine.grouped_weight_runs(bf16, x, current)
    te_native["yes"], engine.native = True, False
    assert not engine.grouped_weight_runs(bf16, x, current)
    engine.native = True
    monkeypatch.setattr(gemm, "te_has", lambda name: False)  # TE < 2.20
    assert not engine.grouped_weight_runs(bf16, x, current)
