"""CUDA graphs of decoder layers on the GPU (:mod:`lightning_te_moe.graphs`, ``cuda_graphs=True``): captured where the
layer makes no host synchronization, and a graphed fit trains as the eager one does."""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from experts_helpers import gpu_fit, tiny_model

from lightning_te_moe.experts.gemm import native_grouped_gemm
from lightning_te_moe.graphs import graph_status, recompute_in_graphs

SIZES = dict(hidden=256, intermediate=256, experts=8, top_k=2, layers=2)


def _graph_decisions(plugin) -> list[str]:
    return [d.reason for d in plugin.decisions.decisions if d.rule == "cuda_graphs"]


@pytest.mark.grouped_mm
def test_a_graphed_fit_trains(tmp_path: Path) -> None:
    """The default plan (one GPU with TE: graphs by default) captures both decoder layers once, at the third step,
    and the fit trains as the eager one (cuda_graphs=False) does: no rollback, no step-down, the loss falls as far."""
    graphed, g = gpu_fit(tiny_model("gpt_oss", **SIZES), tmp_path / "graphs", steps=12)
    eager, e = gpu_fit(tiny_model("gpt_oss", **SIZES), tmp_path / "eager", steps=12, cuda_graphs=False)
    assert graphed.plan.cuda_graphs and "cuda-graphs-one-process" in {r.rule for r in graphed.plan.reasons}
    assert not eager.plan.cuda_graphs
    decisions = _graph_decisions(graphed)
    print("plan:", graphed.plan.summary(), "decisions:", decisions, "status:", graph_status(g))
    print("losses graphed:", [round(v, 4) for v in g.losses], "eager:", [round(v, 4) for v in e.losses])
    assert sum("captured" in reason for reason in decisions) == 2, decisions
    assert not [d for d in graphed.decisions.decisions if d.kind in ("rollback", "step_down", "stop")]
    assert not _graph_decisions(eager)
    if graphed.plan.summary() == eager.plan.summary():  # not below cuBLASLt 13.5: eager auto is BF16 there
        assert g.losses[:2] == e.losses[:2]  # the warm-up steps run eagerly
    assert all(math.isfinite(v) for v in g.losses)
    assert g.losses[-1] < 0.2 * g.losses[0] and e.losses[-1] < 0.2 * e.losses[0]


def test_a_layer_on_tes_split_path_is_refused_with_the_reason(tmp_path: Path) -> None:
    """TE's one GEMM per expert needs the split sizes on the host: that layer runs eagerly, and the decision says
    why. (On a current cuBLASLt BF16 experts take the native path, which is captured.)"""
    if native_grouped_gemm(None, torch.bfloat16):
        pytest.skip("BF16 experts take TE's native grouped GEMM on this stack (no host sync)")
    plugin, module = gpu_fit(tiny_model("gpt_oss", **SIZES), tmp_path, steps=5, recipe="bf16", cuda_graphs=True)
    decisions = _graph_decisions(plugin)
    print("decisions:", decisions, "status:", graph_status(module))
    assert decisions and all("host synchronization" in reason for reason in decisions), decisions
    assert all(math.isfinite(v) for v in module.losses)


def _plain_loop(cuda_graphs: bool, lr: float, steps: int = 8, recipe: str = "auto", recompute: bool = False,
                seq: int = 64, held: list[int] | None = None) -> tuple[list[float], list[float], Any, list[str]]:
    """The plugin without a Trainer, as a user's own loop runs it: each step's ``loss`` stays alive until the next
    forward has run (so its autograd graph, and the parameters' gradient-accumulation nodes, are still held while
    the third step captures). Returns the losses, the gradient norms, the model and torch's warnings about
    AccumulateGrad streams. ``recompute``: the layers in recompute mode; ``held``: gets the memory allocated
    between each step's forward and its backward, less what was allocated before the model was built."""
    from lightning_te_moe import TEMoEPrecision

    gc.collect()  # an earlier loop's model (layer and dispatcher refer to each other) and its graph pools
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = tiny_model("gpt_oss", **SIZES).cuda()
    plugin = TEMoEPrecision(recipe, cuda_graphs=cuda_graphs, guard=False, print_plan=False)
    model = plugin.convert_module(model).train()
    if recompute:
        assert recompute_in_graphs(model) == 2
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    ids = torch.randint(0, 64, (8, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses: list[float] = []
    norms: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            with plugin.forward_context():
                loss = model(input_ids=ids, labels=ids).loss
            if held is not None:
                held.append(torch.cuda.memory_allocated() - before)
            loss.backward()
            norms.append(float(sum(p.grad.float().square().sum() for p in trainable if p.grad is not None)) ** 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    streams = [str(w.message).splitlines()[0] for w in caught if "AccumulateGrad" in str(w.message)]
    return losses, norms, model, streams


@pytest.mark.grouped_mm
def test_a_plain_training_loop_is_graphed() -> None:
    """Outside a Trainer the previous step's loss keeps the parameters' gradient-accumulation nodes (made on the
    default stream) alive while the layer captures: the capture runs against fresh leaves over the parameters, so
    both layers capture, without torch's stream-mismatch warning. With the weights held (lr 0, BF16) every replayed
    step computes the eager step's loss and gradient up to kernel choice; under the default plan the loop trains.

    Measured (H100, cuBLASLt 13.1, 2026-11-27, lr 0): BF16 loss 5.25845 graphed vs 5.25654 eager, gradient norm
    10.776 vs 10.749 (the replays are constant, so this is kernel choice inside a capture, not drift); the default
    plan (FP8 current) 5.23728 vs 5.27075 and 11.83 vs 11.41, each as far from BF16 as FP8's own rounding puts it.
    The CPU tests (tests/test_graphs.py) show the replay plumbing exact to 1e-6."""
    loss_g, norm_g, model, streams = _plain_loop(cuda_graphs=True, lr=0.0, recipe="bf16")
    loss_e, norm_e, _, _ = _plain_loop(cuda_graphs=False, lr=0.0, recipe="bf16")
    status = graph_status(model)
    print("status:", status, "graphed:", loss_g, norm_g, "eager:", loss_e, norm_e)
    assert status["graphed"] == 2 and not status["refused"], status
    assert not streams, streams
    assert loss_g[:2] == loss_e[:2]  # the eager warm-up steps
    assert all(abs(g - e) <= 2e-3 * abs(e) for g, e in zip(loss_g, loss_e)), (loss_g, loss_e)
    assert all(abs(g - e) <= 1e-2 * abs(e) for g, e in zip(norm_g, norm_e)), (norm_g, norm_e)
    trained, _, model, streams = _plain_loop(cuda_graphs=True, lr=3e-3, steps=10)
    assert graph_status(model)["graphed"] == 2 and not streams
    assert all(math.isfinite(v) for v in trained) and trained[-1] < 0.5 * trained[0], trained


@pytest.mark.grouped_mm
def test_recompute_mode_replays_checkpointed_layers_with_the_eager_losses_and_less_memory() -> None:
    """Recompute mode (the memory fallback's first rung below cuBLASLt 13.5): each layer's forward graph keeps only
    its output and its backward graph recomputes the forward. Both layers capture; with the weights held (lr 0,
    BF16) every step's loss and gradient norm are the eager steps' (kernel choice inside a capture aside, as above);
    between forward and backward the graphs hold less memory than the graphs that keep the saved activations
    (measured: 192 against 352 MiB, H200, cuBLASLt 13.10, 2026-11-28); under the default plan the loop trains."""
    loss_e, norm_e, _, _ = _plain_loop(cuda_graphs=False, lr=0.0, recipe="bf16", seq=1024)
    kept: list[int] = []
    loss_k, _, _, _ = _plain_loop(cuda_graphs=True, lr=0.0, recipe="bf16", seq=1024, held=kept)
    held: list[int] = []
    loss_r, norm_r, model, streams = _plain_loop(cuda_graphs=True, lr=0.0, recipe="bf16", recompute=True, seq=1024,
                                                 held=held)
    status = graph_status(model)
    print("status:", status, "recompute:", loss_r, norm_r, "eager:", loss_e, norm_e,
          "held MiB (graphs / recompute graphs):", [round(b / 2**20, 1) for b in kept[-1:] + held[-1:]])
    assert status["graphed"] == 2 and status["recompute"] == 2 and not status["refused"], status
    assert not streams, streams
    assert all(abs(g - e) <= 2e-3 * abs(e) for g, e in zip(loss_r, loss_e)), (loss_r, loss_e)
    assert all(abs(g - e) <= 1e-2 * abs(e) for g, e in zip(norm_r, norm_e)), (norm_r, norm_e)
    assert held[-1] < kept[-1], (held, kept)
    trained, _, model, streams = _plain_loop(cuda_graphs=True, lr=3e-3, steps=10, recompute=True)
    assert graph_status(model)["graphed"] == 2 and not streams
    assert all(math.isfinite(v) for v in trained) and trained[-1] < 0.5 * trained[0], trained


def test_recompute_mode_under_delayed_scaling_checkpoints_eagerly() -> None:
    """Delayed scaling's recompute phases run in Python (TE swaps the scales per call), which a replay would skip:
    in recompute mode those layers run under torch's checkpoint instead, and the loop trains."""
    losses, _, model, _ = _plain_loop(cuda_graphs=True, lr=3e-3, steps=8, recipe="fp8_delayed", recompute=True)
    status = graph_status(model)
    print("status:", status, "losses:", losses)
    assert status["graphed"] == 0 and any("delayed scaling" in reason for reason in status["eager_calls"]), status
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses
