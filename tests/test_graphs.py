"""CUDA graphs of decoder layers (:mod:`lightning_te_moe.graphs`): which layers, when they are captured, and that a
replay computes what the eager layer computes, gradients and their accumulation included.

CUDA graphs do not exist on the CPU, so the capture is replaced by a stand-in whose "graphs" re-run the layer on the
captured static tensors when replayed (in recompute mode, as the real ones: the forward keeps only its output and the
backward runs the forward again): everything around it (the static inputs and outputs, which gradients go where
and as copies, warm-up, refusals, invalidation, the checkpointed eager calls of recompute mode) is the real code.
``tests/gpu/test_graphs_gpu.py`` captures for real.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import pytest
import torch
from experts_helpers import rel_err, tiny_model
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_te_moe import graphs
from lightning_te_moe.graphs import LayerGraphs, _Graph

CAPTURES: list[str] = []
ORDER: list[str] = []  # forward and backward captures, in the order they happened
LAYERS: list[nn.Module] = []  # the layers of the model under test, for the names in ORDER


class _Replayable:
    """Stands in for a CUDA graph: ``replay`` runs the captured computation again on the static tensors."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()

    def reset(self) -> None:
        self.fn = lambda: None


def _cpu_capture(self: LayerGraphs, leaves: list[Any], spec: Any, tensors: list[Tensor],
                 params: list[Tensor]) -> _Graph:
    inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
    it = iter(inputs)
    args, kwargs = pytree.tree_unflatten([graphs._over_static(leaf, it) for leaf in leaves], spec)
    targets = [t for t in inputs if t.requires_grad] + params
    recompute = self.recompute
    with torch.enable_grad(), torch.random.fork_rng():  # a capture runs nothing: it draws no random numbers
        first = self.eager(*args, **kwargs)
    output, grad_output = torch.empty_like(first), torch.empty_like(first)
    grads = tuple(torch.empty_like(t) for t in targets)
    live: dict[str, Tensor] = {}
    name = f"{type(self.module).__name__}{_position(self)}"

    def forward() -> None:
        with torch.enable_grad():
            out = self.eager(*args, **kwargs)
        if not recompute:  # recompute mode keeps nothing of the forward but its output
            live["out"] = out
        output.copy_(out.detach())

    def backward() -> None:
        if recompute:
            with torch.enable_grad():
                live["out"] = self.eager(*args, **kwargs)
        for static, grad in zip(grads, torch.autograd.grad(live.pop("out"), targets, grad_output, allow_unused=True)):
            static.copy_(grad) if grad is not None else static.zero_()

    def capture_backward(graph: _Graph) -> None:  # as the real one: at the first backward, in the model's order,
        ORDER.append(f"backward {name}")         # through the captured forward's autograd graph (its saved tensors)
        if not recompute:
            torch.autograd.grad(first, targets, grad_output, allow_unused=True, retain_graph=True)
        graph.backward, graph.grads, graph.capture_backward = _Replayable(backward), grads, None

    CAPTURES.append(type(self.module).__name__)
    ORDER.append(f"forward {name}")
    return _Graph(_Replayable(forward), None, inputs, output, grad_output, (), params,
                  capture_backward=capture_backward, recompute=recompute)


def _position(dispatcher: LayerGraphs) -> int:
    """Which of its model's layers the dispatcher serves (the order the model runs them)."""
    return next((i for i, module in enumerate(LAYERS) if module is dispatcher.module), -1)


@pytest.fixture
def cpu_graphs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Graphs on the CPU: the stand-in capture, CPU tensors count as CUDA; returns the syncs each watched call
    reports (append to make the next watched call synchronize)."""
    syncs: list[list[str]] = []
    CAPTURES.clear()
    ORDER.clear()
    LAYERS.clear()
    monkeypatch.setattr(LayerGraphs, "_capture", _cpu_capture)
    monkeypatch.setattr(graphs, "_on_cuda", lambda leaves: True)
    monkeypatch.setattr(graphs, "_watch_syncs", lambda fn: (fn(), syncs.pop(0) if syncs else []))
    return syncs


class Block(nn.Module):
    """A decoder-layer-shaped block: a tensor, keyword tensors (one of them in a tuple) and static options."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)

    def forward(self, hidden: Tensor, mask: Optional[Tensor] = None, pair: tuple[Tensor, Tensor] = (),
                scale: float = 1.0, use_cache: bool = False) -> Tensor:
        out = self.frozen(torch.tanh(self.linear(hidden))) * scale + pair[0] * pair[1]
        return hidden + (out if mask is None else out * mask)


class Stack(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        pair = (torch.cos(x), torch.sin(x))
        for layer in self.layers:
            x = layer(x, mask=mask, pair=pair, scale=0.5, use_cache=False)
        return x


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _steps(model: nn.Module, xs: list[Tensor], zero: bool = True) -> tuple[list[Tensor], dict[str, Tensor]]:
    outs = []
    for x in xs:
        if zero:
            model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        out = model(x, mask=torch.ones(8))
        out.square().sum().backward()
        outs.append(out.detach().clone())
    return outs, _grads(model)


def _same_steps(model: nn.Module, want: nn.Module, ids: Tensor, steps: int = 4) -> None:
    """``steps`` language-model steps on ``ids`` (captured at the third): every gradient equals the eager model's."""
    for step in range(steps):
        for m in (model, want):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        assert all(rel_err(p.grad, q.grad) < 1e-5 for p, q in zip(model.parameters(), want.parameters())
                   if q.grad is not None), step


def test_layers_are_found_by_no_split_modules_and_keep_state_dict_and_function() -> None:
    model = tiny_model("gpt_oss")
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    want = model(input_ids=ids).logits
    layers = graphs.install_cuda_graphs(model)
    assert layers == list(model.model.layers)
    assert all(isinstance(layer.__dict__["forward"], LayerGraphs) for layer in layers)
    assert model.state_dict().keys() == before.keys()
    assert torch.equal(model(input_ids=ids).logits, want)  # on the CPU the dispatcher runs the layer as it is
    graphs.remove_cuda_graphs(model)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_the_capture_runs_against_fresh_leaves_over_the_parameters() -> None:
    """The capture computes gradients for new leaves over the parameters' storage (a parameter's old accumulation
    node, kept alive by a previous step's loss, would tie the capture to the default stream): same gradients, the
    parameters' own ``.grad`` untouched, a tied parameter one leaf, frozen ones as they are, updates to the
    parameters seen through the leaves, and every parameter back in place afterwards, also after an error."""
    model = Stack()
    shared = model.layers[0].linear.weight
    model.layers[2].linear.weight = shared  # tied
    model.layers[1].linear.bias.requires_grad_(False)
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(4, 8)
    want = torch.autograd.grad(model(x).square().sum(), params)
    kept_alive = model(x).sum()  # a previous step's loss: its graph holds the parameters' accumulation nodes
    with graphs.fresh_leaves(model, params) as leaves:
        assert [leaf.data_ptr() for leaf in leaves] == [p.data_ptr() for p in params]
        assert not any(leaf is p for leaf, p in zip(leaves, params)) and all(leaf.requires_grad for leaf in leaves)
        assert model.layers[0].linear.weight is model.layers[2].linear.weight is leaves[params.index(shared)]
        assert model.layers[1].linear.bias is before["layers.1.linear.bias"]  # frozen: not replaced
        got = torch.autograd.grad(model(x).square().sum(), leaves)
        with torch.no_grad():
            shared.mul_(2.0)  # an optimizer step on the parameter: the leaf reads the same memory
        assert torch.equal(model.layers[0].linear.weight, shared)
        with torch.no_grad():
            shared.div_(2.0)
    assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))
    assert all(p.grad is None for p in params)
    assert dict(model.named_parameters(remove_duplicate=False)) == before
    with pytest.raises(RuntimeError, match="inside"):
        with graphs.fresh_leaves(model, params):
            raise RuntimeError("inside")
    assert dict(model.named_parameters(remove_duplicate=False)) == before
    assert kept_alive.grad_fn is not None


def _steps_match_eager(eager: nn.Module, graphed: nn.Module, xs: list[Tensor], captured_at: int) -> dict[str, Tensor]:
    """One step each per input: the graphed model's outputs and gradients are the eager one's, and its 3 layers
    capture at step ``captured_at`` (0-based). Returns the last step's gradients."""
    for i, x in enumerate(xs):
        (want,), want_grads = _steps(eager, [x])
        (got,), got_grads = _steps(graphed, [x])
        assert rel_err(got, want) < 1e-6, i
        assert got_grads.keys() == want_grads.keys() and all(
            rel_err(got_grads[n], want_grads[n]) < 1e-6 for n in want_grads), i
        assert len(CAPTURES) == (3 if i >= captured_at else 0), i
    return got_grads


def test_replays_compute_the_eager_outputs_and_gradients(cpu_graphs: list[list[str]]) -> None:
    """Steps 1-2 run eagerly (set-up, then the synchronization check), step 3 captures, later steps replay: the
    same outputs and gradients as the eager model, step by step, with the non-tensor arguments held static."""
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    LAYERS.extend(graphs.install_cuda_graphs(graphed))
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    got_grads = _steps_match_eager(eager, graphed, xs, captured_at=2)
    assert not any("frozen" in n for n in got_grads)
    # The order a shared pool needs (GraphPools): every forward in the forward pass, the backwards in reverse.
    assert ORDER == ["forward Block0", "forward Block1", "forward Block2",
                     "backward Block2", "backward Block1", "backward Block0"]


def test_layers_share_one_pool_per_signature_until_a_backward_is_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pool per input signature for all of a model's layers; the first backward captured closes it to forwards
    (a forward captured after it would take memory a backward freed, out of replay order), and a rung change or
    anything else that drops the graphs starts new pools."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(handles))
    pools = graphs.GraphPools()
    a, b = ("1x1024",), ("1x2048",)
    assert pools.for_forward(a) == pools.for_forward(a) == 0 and pools.for_forward(b) == 1
    pools.backward_captured(a, 0)
    assert pools.for_forward(a) == 2 and pools.for_forward(b) == 1
    pools.backward_captured(a, 0)  # a backward of the closed pool: the open one stays open
    assert pools.for_forward(a) == 2
    graphs.invalidate_graphs()
    assert pools.for_forward(a) == 3 and pools.for_forward(b) == 4
    model = Stack()
    layers = graphs.install_cuda_graphs(model)
    assert len({id(layer.forward.pools) for layer in layers}) == 1


def test_every_capture_of_a_model_runs_on_one_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caching allocator reuses freed blocks per stream: captures on a stream per layer kept each layer's freed
    memory to itself (19.8 GiB reserved but free at the full-size out-of-memory error). One stream per model's
    pools, created once and kept across invalidations."""
    made: list[object] = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda: made.append(object()) or made[-1])
    layers = graphs.install_cuda_graphs(Stack())
    pools = layers[0].forward.pools
    streams = {id(layer.forward.pools.capture_stream()) for layer in layers}
    graphs.invalidate_graphs()
    assert len(streams) == 1 and pools.capture_stream() is made[0] and len(made) == 1


def test_gradients_accumulate_over_micro_batches_as_without_graphs(cpu_graphs: list[list[str]]) -> None:
    """The parameter gradients leave the graph as copies: accumulating three replayed micro-batches (and zeroing
    in place) gives the eager sums, not three times the last one."""
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    graphs.install_cuda_graphs(graphed)
    warm = [torch.randn(4, 8) for _ in range(3)]
    _steps(graphed, warm)  # captured now
    assert len(CAPTURES) == 3
    graphed.zero_grad(set_to_none=True)
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _, want = _steps(eager, xs, zero=False)
    _, got = _steps(graphed, xs, zero=False)
    graphed.zero_grad(set_to_none=False)
    eager.zero_grad(set_to_none=False)
    assert all(rel_err(got[n], want[n]) < 1e-6 for n in want)
    _, want = _steps(eager, xs[:2], zero=False)
    _, got = _steps(graphed, xs[:2], zero=False)
    assert all(rel_err(got[n], want[n]) < 1e-6 for n in want)


def test_a_second_forward_before_the_backward_runs_eagerly(cpu_graphs: list[list[str]]) -> None:
    """Two forwards then one backward of their sum: the second cannot reuse the graph's static activations."""
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    graphs.install_cuda_graphs(graphed)
    _steps(graphed, [torch.randn(4, 8) for _ in range(3)])
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        (model(a, mask=torch.ones(8)).sum() + model(b, mask=torch.ones(8)).square().sum()).backward()
    want, got = _grads(eager), _grads(graphed)
    assert all(rel_err(got[n], want[n]) < 1e-6 for n in want)


def test_dropped_graphs_free_their_memory_unless_a_backward_still_needs_them(cpu_graphs: list[list[str]]) -> None:
    """drop_graphs (the memory fallback, a change of shapes) releases each graph and its static tensors at once, even
    where something still refers to it (a failed step's autograd graph); a lazy invalidation (a rung change) does not
    release a forward whose backward is still to come: that backward runs on it and gives the eager gradients."""
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    graphs.install_cuda_graphs(graphed)
    _steps(graphed, [torch.randn(4, 8) for _ in range(3)])
    held = [g for d in graphs.dispatchers(graphed) for g in d.graphs.values()]
    assert len(held) == 3 and all(g.inputs and g.grads for g in held)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        first = model(a.clone().requires_grad_(True), mask=torch.ones(8))  # the captured signature
        if model is graphed:
            pending = [g for d in graphs.dispatchers(graphed) for g in d.graphs.values()]
            assert all(g.pending for g in pending)
            graphs.invalidate_graphs()  # every layer drops its graphs at its next call: the second forward
        (first.sum() + model(b.clone().requires_grad_(True), mask=torch.ones(8)).square().sum()).backward()
    assert all(g.inputs and g.grads for g in pending)  # released only after their backward ran: kept
    want, got = _grads(eager), _grads(graphed)
    assert all(rel_err(got[n], want[n]) < 1e-6 for n in want)
    _steps(graphed, [torch.randn(4, 8) for _ in range(3)])
    held = [g for d in graphs.dispatchers(graphed) for g in d.graphs.values()]
    assert len(held) == 3
    graphs.drop_graphs(graphed)
    assert all(g.inputs == () and g.grads == () and g.params == [] and g.output.numel() == 0 for g in held)


def test_a_layer_that_synchronizes_is_refused_and_recorded(cpu_graphs: list[list[str]]) -> None:
    events: list[tuple[str, str]] = []
    model = Stack(layers=1)
    graphs.install_cuda_graphs(model, lambda kind, text, evidence: events.append((kind, text)))
    cpu_graphs.append(["called a synchronizing CUDA operation"])
    _steps(model, [torch.randn(4, 8) for _ in range(5)])
    assert CAPTURES == []
    assert events == [("skip", "no CUDA graph for Block: a host synchronization in its forward (called a "
                               "synchronizing CUDA operation)")]


def test_what_moves_under_a_graph_makes_every_layer_capture_again(cpu_graphs: list[list[str]]) -> None:
    """A rung change or frozen weights re-held (:func:`invalidate_graphs`), or a change of which parameters train:
    the graphs are dropped and captured again after a new warm-up."""
    model = Stack(layers=2)
    graphs.install_cuda_graphs(model)
    x = [torch.randn(4, 8) for _ in range(3)]
    _steps(model, x)
    assert len(CAPTURES) == 2
    graphs.invalidate_graphs()
    _steps(model, x[:2])
    assert len(CAPTURES) == 2  # warming up again
    _steps(model, x[:1])
    assert len(CAPTURES) == 4
    model.layers[0].linear.bias.requires_grad_(False)
    _steps(model, x)
    assert len(CAPTURES) == 5  # layer 0 only, after its own warm-up
    (_, grads) = _steps(model, x[:1])
    assert "layers.0.linear.bias" not in grads and "layers.1.linear.bias" in grads


def _saved_tensors(model: nn.Module, x: Tensor) -> int:
    """How many tensors one forward of ``model`` saves for its backward outside any checkpoint (which saves under
    hooks of its own); then the backward."""
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x.clone().requires_grad_(True), mask=torch.ones(8))
    out.square().sum().backward()
    return saved[0]


def test_recompute_mode_replays_the_eager_step_and_checkpoints_its_eager_calls(cpu_graphs: list[list[str]]) -> None:
    """recompute_in_graphs (the first rung of the memory fallback's graphed-recompute ladder) drops the captured
    graphs; the layers warm up again under torch's checkpoint (each saves only its input; the Stack saves its cos and
    sin), capture at the third call, replay checkpointed graphs, and every step's outputs and gradients are the
    eager model's."""
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    LAYERS.extend(graphs.install_cuda_graphs(graphed))
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    plain = _saved_tensors(graphed, xs[0])
    _steps(graphed, xs[1:3])
    assert len(CAPTURES) == 3 and graphs.graph_status(graphed)["recompute"] == 0
    assert graphs.recompute_in_graphs(graphed) == 3
    status = graphs.graph_status(graphed)
    assert status["graphed"] == 0 and status["recompute"] == 3
    CAPTURES.clear()
    ORDER.clear()
    assert _saved_tensors(eager, xs[0]) == plain > 5 and _saved_tensors(graphed, xs[0]) == 2 + 3  # warm-up call 1
    _steps_match_eager(eager, graphed, xs, captured_at=1)
    assert graphs.graph_status(graphed)["graphed"] == 3
    assert ORDER == ["forward Block0", "forward Block1", "forward Block2",
                     "backward Block2", "backward Block1", "backward Block0"]


class NoisyBlock(Block):
    """A block with dropout: it draws random numbers in every training forward."""

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return nn.functional.dropout(super().forward(hidden, *args, **kwargs), 0.25, self.training)


def _noisy_stack() -> Stack:
    model = Stack(layers=1)
    model.layers[0] = NoisyBlock()
    model._no_split_modules = ["NoisyBlock"]
    return model


def test_recompute_mode_recomputes_dropout_with_the_forwards_random_numbers(cpu_graphs: list[list[str]]) -> None:
    """As torch's checkpoint: the backward's recompute replays from the random-number state the forward replayed
    from, so it draws the forward's dropout masks (the gradients are the eager step's, step after step), and puts the
    state back (the next step draws what it would have drawn eagerly)."""
    eager, graphed = _noisy_stack().train(), _noisy_stack().train()
    graphed.load_state_dict(eager.state_dict())
    graphs.install_cuda_graphs(graphed)
    graphs.recompute_in_graphs(graphed)
    for i in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        torch.manual_seed(100 + i)
        (want,), want_grads = _steps(eager, [x])
        after_eager = torch.get_rng_state()
        torch.manual_seed(100 + i)
        (got,), got_grads = _steps(graphed, [x])
        assert torch.equal(torch.get_rng_state(), after_eager), i
        assert rel_err(got, want) < 1e-6 and all(rel_err(got_grads[n], want_grads[n]) < 1e-6 for n in want_grads), i
    status = graphs.graph_status(graphed)
    assert len(CAPTURES) == 1 and status["graphed"] == 1 and not status["refused"], status


def test_recompute_mode_under_delayed_scaling_runs_checkpointed_eagerly(cpu_graphs: list[list[str]],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under delayed scaling TE's recompute phases swap the scales in Python, which a replay would skip: in recompute
    mode such calls run under torch's checkpoint (with those phases, lightning_te_moe.recompute), with the eager
    gradients; without recompute mode the layers are graphed as before."""
    monkeypatch.setattr(graphs, "delayed_autocast", lambda: True)
    eager, graphed = Stack(), Stack()
    graphed.load_state_dict(eager.state_dict())
    graphs.install_cuda_graphs(graphed)
    graphs.recompute_in_graphs(graphed)
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _, want = _steps(eager, xs)
    _, got = _steps(graphed, xs)
    status = graphs.graph_status(graphed)
    assert CAPTURES == [] and status["eager_calls"] == {
        "delayed scaling in recompute mode (TE's recompute phases swap its scales in Python)": 12}
    assert all(rel_err(got[n], want[n]) < 1e-6 for n in want)
    assert _saved_tensors(graphed, xs[0]) == 2 + 3
    plain = Stack()
    graphs.install_cuda_graphs(plain)
    _steps(plain, xs[:3])
    assert len(CAPTURES) == 3


def test_an_invalidation_before_any_capture_does_not_restart_the_warm_up(cpu_graphs: list[list[str]]) -> None:
    """Frozen experts held quantized at their first call invalidate every graph; a layer that has none yet goes on
    with its warm-up, so the capture still comes at the third step."""
    model = Stack(layers=2)
    graphs.install_cuda_graphs(model)
    x = [torch.randn(4, 8) for _ in range(3)]
    _steps(model, x[:1])
    graphs.invalidate_graphs()  # as ResidentWeights.keep() does in the first step
    _steps(model, x[1:])
    assert len(CAPTURES) == 2


def test_a_model_in_eval_mode_that_trains_is_graphed_by_mode(cpu_graphs: list[list[str]]) -> None:
    """Lightning keeps a pretrained transformers model in eval mode unless it is switched: with grad enabled its
    layers are graphed all the same; train and eval mode get a graph each."""
    model = Stack(layers=1).eval()
    graphs.install_cuda_graphs(model)
    _steps(model, [torch.randn(4, 8) for _ in range(3)])
    assert CAPTURES == ["Block"]
    model.train()
    _steps(model, [torch.randn(4, 8) for _ in range(3)])
    assert CAPTURES == ["Block", "Block"]


@pytest.mark.parametrize("case", ["no_grad", "checkpointing", "hook", "sharded"])
def test_no_graph_outside_a_plain_training_forward(cpu_graphs: list[list[str]], case: str) -> None:
    model = Stack(layers=1)
    graphs.install_cuda_graphs(model)
    layer = model.layers[0]
    if case == "checkpointing":
        layer.gradient_checkpointing = True
    if case == "hook":
        layer.linear.register_forward_hook(lambda *args: None)
    if case == "sharded":  # a DTensor parameter (FSDP2) gathers into new memory at every call
        layer.linear.weight.to_local = lambda: layer.linear.weight
    for _ in range(4):
        if case == "no_grad":
            with torch.no_grad():
                model(torch.randn(4, 8))
        else:
            _steps(model, [torch.randn(4, 8)])
    assert CAPTURES == []


def test_the_plugin_installs_graphs_on_a_cuda_plan_and_drops_them_at_a_rung_change() -> None:
    from lightning_te_moe.guard.decisions import DecisionLog
    from lightning_te_moe.policy.choose import PrecisionRequest, make_plan
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.policy.state import PrecisionState

    model, log = Stack(layers=2), DecisionLog()
    cpu = PrecisionState(make_plan(Environment(), PrecisionRequest()))
    assert graphs.install_for_plugin(model, cpu, log) is None
    assert not any("forward" in layer.__dict__ for layer in model.layers)
    state = PrecisionState(make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"), PrecisionRequest()))
    summary, details = graphs.install_for_plugin(model, state, log)
    assert details == {"layers": 2, "classes": ["Block"], "use_cache_off": 0}
    assert "CUDA graphs for 2 decoder layers" in summary
    epoch = graphs.graph_epoch()
    state.set_index(1)
    assert graphs.graph_epoch() == epoch + 1


def test_a_transformers_model_trains_without_a_kv_cache_object_in_its_layers(cpu_graphs: list[list[str]]) -> None:
    """transformers builds a ``DynamicCache`` in every forward while ``use_cache`` is on: no graph could replay its
    updates, so the plugin's step turns it off for training forwards, and the layers are then captured."""
    from lightning_te_moe.guard.decisions import DecisionLog
    from lightning_te_moe.policy.choose import PrecisionRequest, make_plan
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.policy.state import PrecisionState

    model = tiny_model("gpt_oss").train()
    assert model.config.use_cache
    ids = torch.randint(0, 64, (2, 9))
    graphs.install_cuda_graphs(model)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    assert CAPTURES == [] and graphs.graph_status(model)["eager_calls"] == {"an argument of type DynamicCache": 6}
    state = PrecisionState(make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"), PrecisionRequest()))
    summary, details = graphs.install_for_plugin(model, state, DecisionLog())
    assert details["use_cache_off"] == 1 and "use_cache set to False" in summary and not model.config.use_cache
    want = copy.deepcopy(model)
    graphs.remove_cuda_graphs(want)
    _same_steps(model, want, ids)
    assert CAPTURES == ["GptOssDecoderLayer"] * 2


def test_a_causal_mask_object_is_held_by_its_description_and_a_padding_mask_is_not() -> None:
    """The swapped attention's mask object: without padding it is the causal mask of its window (the same at every
    step of a shape: a graph holds its description); with a padding mask its tensors change, so the call runs
    eagerly."""
    from lightning_te_moe.attention.masks import DeferredMask

    causal = dict(batch_size=2, q_length=9, kv_length=9, local_size=8, allow_is_causal_skip=True, attention_mask=None,
                  cache_position=torch.arange(9))
    key = graphs._static_key(DeferredMask(dict(causal)))
    assert key == graphs._static_key(DeferredMask(dict(causal, cache_position=torch.arange(9))))
    assert key != graphs._static_key(DeferredMask(dict(causal, local_size=None)))
    mask = DeferredMask(dict(causal))
    assert graphs._graph_tensors(mask) == [causal["cache_position"]]  # the layer may read it: a graph input
    static = torch.arange(9) + 100
    rebuilt = graphs._over_static(mask, iter([static]))
    assert rebuilt.kwargs["cache_position"] is static and rebuilt.kwargs["local_size"] == 8
    assert graphs._static_key(rebuilt) == key
    padded = DeferredMask(dict(causal, attention_mask=torch.ones(2, 9, dtype=torch.bool)))
    assert graphs._static_key(padded) is graphs._UNKNOWN
    assert graphs._static_key(object()) is graphs._UNKNOWN and graphs._static_key(3) == 3


def test_layers_with_swapped_attention_take_its_mask_tensors_as_graph_inputs(cpu_graphs: list[list[str]]) -> None:
    """Swapped attention receives the mask object of :mod:`.attention.masks`: its layers are captured (not refused for
    an unknown argument) and the replayed steps compute the eager gradients."""
    from lightning_te_moe.attention import swap_attention

    model = tiny_model("gpt_oss").train()
    model.config.use_cache = False
    swap_attention(model, core="reference")
    want = copy.deepcopy(model)
    graphs.install_cuda_graphs(model)
    ids = torch.randint(0, 64, (2, 9))
    _same_steps(model, want, ids)
    assert CAPTURES == ["GptOssDecoderLayer"] * 2 and graphs.graph_status(model)["eager_calls"] == {}
