"""CUDA graphs of whole decoder layers: a training step that waits on the host no more.

A GPT-OSS-20B LoRA step launches about 22,000 kernels; the host issues them more slowly than an H100 runs them (the
full-size profile: 106 ms of kernels in a 500-650 ms step). Replaying a layer's forward and backward as two CUDA
graphs launches each as one call. A layer is graphed only where replaying is the same computation as running it:

- it made no host synchronization in a warm-up call (checked with torch's sync debug mode): no split sizes read on
  the host, so TE's native grouped GEMM or torch's grouped_mm, not TE's one GEMM per expert;
- grad enabled (a backward follows), on CUDA, no forward hooks inside it (a replay would skip them), not under
  activation checkpointing (its recompute needs the eager forward), and every non-tensor argument the same as at
  capture (tensor arguments are copied into the graph's static inputs; their shapes, dtypes and ``requires_grad``,
  and the module's train/eval mode, select the graph);
- nothing the graph read by address has moved since the capture: a rung change, frozen experts held quantized or
  released (:mod:`.experts.resident`), or quantized weights invalidated call :func:`invalidate_graphs`, and every
  layer captures again after a warm-up;
- one forward at a time: a second forward before the first one's backward runs eagerly (the graph's saved
  activations are static).

In recompute mode (:func:`recompute_in_graphs`: the memory fallback's first rung where the plan says so, rules
``graphed-recompute-*``) a layer's graphs are activation checkpointing: the forward graph runs the training forward
and keeps only its output (the layer's input stays in the graph's static input), and the backward graph runs the
forward again and then its backward. A layer then holds its input and output between forward and backward instead
of its saved activations, and the step stays two launches a layer. As torch's checkpoint does, the backward replays
from the random-number state the forward replayed from (dropout draws the same masks), then puts the state back.
Calls that cannot replay (warm-up, refused, ineligible) run under torch's non-reentrant checkpoint instead of plainly
eager, recomputing under the forward's precision (:mod:`.recompute`). Not graphed in this mode: delayed scaling
(TE's recompute phases swap its scales in Python, which a replay would skip).

A parameter's gradient leaves the graph as its static buffer (autograd then keeps it as ``.grad``, no copy); where
``.grad`` still is that buffer at the next backward (gradient accumulation, ``zero_grad(set_to_none=False)``) it
moves to a copy first, so accumulation behaves as without graphs. Trainable weights are never cached quantized across
replays: inside a capture TE quantizes them in the graph (:mod:`.experts.weight_cache`); frozen weights held only as
TE's quantized copies (:mod:`.experts.resident`) are read by address, and holding or releasing them invalidates.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from .recompute import PrecisionRecompute, PrecisionSnapshot, delayed_autocast

#: Eager calls of a new signature before its capture: the first sets up lazily built state (TE engines, frozen
#: weights held quantized), the second is checked for host synchronization.
WARMUP_CALLS = 2
#: Signatures (shapes) captured per layer; later ones run eagerly.
MAX_GRAPHS = 3

#: Non-tensor arguments a graph may hold fixed (compared by value); any other object makes the call eager.
_STATIC_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)

_epoch = 0

#: A layer's call in recompute mode without a graph: torch's non-reentrant checkpoint, recomputing under the forward's
#: precision (TE's recompute phases under delayed scaling).
_CHECKPOINT = PrecisionRecompute(functools.partial(checkpoint, use_reentrant=False))


def invalidate_graphs() -> None:
    """Something a captured graph reads by address moved or changed meaning: every layer captures again."""
    global _epoch
    _epoch += 1


def graph_epoch() -> int:
    return _epoch


@dataclass
class _Graph:
    """One captured forward/backward pair and its static tensors (the backward is captured at its first call)."""

    forward: torch.cuda.CUDAGraph
    backward: Optional[torch.cuda.CUDAGraph]
    inputs: tuple[Tensor, ...]
    output: Tensor
    grad_output: Tensor
    grads: tuple[Optional[Tensor], ...]  # for the inputs that require grad, then the trainable parameters
    params: list[Tensor]  # the trainable parameters at capture
    pending: bool = False  # a replayed forward whose backward has not run yet
    #: Recompute mode: the random-number state the forward replayed from (the backward's recompute replays from it).
    rng: Optional[Tensor] = None
    recompute: bool = False
    #: Captures ``backward`` and fills ``grads``; called by the first backward, in the model's backward order.
    capture_backward: Optional[Callable[["_Graph"], None]] = None

    def release(self) -> None:
        """Free the graphs and the static tensors in their pool now, not when the last reference goes (an autograd
        graph of a failed step, or its exception's frames, may still refer to this object)."""
        for captured in (self.forward, self.backward):
            if captured is not None:
                captured.reset()
        self.inputs, self.grads, self.params, self.capture_backward = (), (), [], None
        self.output = self.grad_output = torch.empty(0)


class GraphPools:
    """The memory pools of one model's layer graphs: one per input signature, shared by every layer.

    Graphs in one pool may reuse each other's freed memory, which is safe only when they replay in the order they
    were captured. A training step runs the layers' forwards in order and their backwards in reverse, so each layer's
    forward is captured in the forward pass and its backward at its first call in the backward pass (after every
    forward of the step): the pool's captures follow the replay order, and the layers reuse each other's freed
    transient memory, as in an eager step, instead of each pool keeping its own reserved. (Measured on GPT-OSS-20B,
    H100: the peak *allocated* memory is the same as with a pool per layer, 49.4 / 55.9 GiB at 1,024 / 2,048 tokens;
    reserved memory was not recorded.) A pool closes to forward captures at its first backward capture: a forward
    captured later (another shape, a layer refused at first) opens a new pool. TE frees its FP8 copies of saved inputs
    inside its backward; captured in this order, no graph that runs between a layer's forward and backward holds that
    memory.

    All captures (and their warm-ups) run on one side stream, :meth:`capture_stream`: the caching allocator reuses a
    freed block only for the stream it was allocated on, so with a stream per layer each layer's capture kept its own
    freed blocks (about 0.62 GiB per stream, 49 (pool, stream) pairs holding 19.8 GiB reserved but free when the
    graphed GPT-OSS-20B step ran out of memory at 4,096 tokens: H100, cuBLASLt 13.1, 2026-11-27,
    ``benchmarks/graph_memory.py``) and the shared pool reused nothing across layers. torch's own
    ``torch.cuda.graph`` shares one default capture stream for the same reason.
    """

    def __init__(self) -> None:
        self._open: dict[Hashable, Any] = {}
        self.epoch = graph_epoch()
        self._stream: Optional[torch.cuda.Stream] = None

    def capture_stream(self) -> torch.cuda.Stream:
        """The side stream every capture of these pools runs on (created at the first capture)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def for_forward(self, key: Hashable) -> Any:
        self._renew()
        if key not in self._open:
            self._open[key] = torch.cuda.graph_pool_handle()
        return self._open[key]

    def backward_captured(self, key: Hashable, pool: Any) -> None:
        if self._open.get(key) == pool:
            del self._open[key]

    def clear(self) -> None:
        self._open.clear()

    def _renew(self) -> None:
        if self.epoch != graph_epoch():  # the graphs that used the old pools are dropped
            self._open.clear()
            self.epoch = graph_epoch()


class _Replay(torch.autograd.Function):
    """Replays a captured forward; its backward replays the captured backward."""

    @staticmethod
    def forward(ctx: Any, graph: _Graph, num_inputs: int, *tensors: Tensor) -> Tensor:
        for static, value in zip(graph.inputs, tensors[:num_inputs]):
            if static.data_ptr() != value.data_ptr():
                # Through ``.data``: the static inputs are saved tensors of the captured forward, whose backward is
                # captured later in this step; a version bump would fail autograd's in-place check there.
                static.data.copy_(value)
        if graph.recompute:
            graph.rng = _rng_state()
        graph.forward.replay()
        graph.pending = True
        ctx.graph = graph
        return graph.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        graph: _Graph = ctx.graph
        graph.grad_output.copy_(grad)
        if graph.backward is None:
            assert graph.capture_backward is not None
            graph.capture_backward(graph)
        assert graph.backward is not None
        # Autograd keeps a returned gradient as ``.grad`` itself where the parameter had none: a parameter whose
        # ``.grad`` is still the graph's buffer (micro-batch 2+, or zeroed in place) moves to a copy before the
        # replay overwrites that buffer; otherwise no copy is made.
        param_grads = graph.grads[len(graph.grads) - len(graph.params):]
        for param, static in zip(graph.params, param_grads):
            if param.grad is not None and static is not None and param.grad.data_ptr() == static.data_ptr():
                param.grad = param.grad.clone()
        if graph.rng is not None:
            now = _rng_state()
            _set_rng_state(graph.rng)
            graph.backward.replay()
            _set_rng_state(now)
        else:
            graph.backward.replay()
        graph.pending = False
        grads = iter(graph.grads)
        out: list[Optional[Tensor]] = []
        for needs in ctx.needs_input_grad[2:]:
            static = next(grads) if needs else None
            out.append(None if static is None else static.detach())
        return (None, None, *out)


class LayerGraphs:
    """The CUDA-graph dispatcher installed as one module's ``forward`` (see the module doc)."""

    def __init__(self, module: nn.Module, on_event: Optional[Callable[[str, str, dict[str, Any]], None]] = None,
                 pools: Optional[GraphPools] = None) -> None:
        self.module = module
        self.pools = pools if pools is not None else GraphPools()
        self.eager = module.forward  # the bound class forward (installed over by :func:`install_cuda_graphs`)
        self.on_event = on_event
        self.graphs: dict[Hashable, _Graph] = {}
        self.calls: Counter[Hashable] = Counter()
        self.refused: dict[Hashable, str] = {}
        #: Calls that ran eagerly without being considered for a graph, by reason.
        self.skipped: Counter[str] = Counter()
        self.epoch = graph_epoch()
        #: Activation checkpointing inside the graphs (see the module doc); set by :func:`recompute_in_graphs`.
        self.recompute = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        reason = self._ineligible(leaves)
        if reason is not None:
            self.skipped[reason] += 1
            return self._run_eager(args, kwargs)
        tensors = [t for leaf in leaves for t in _graph_tensors(leaf)]
        static = tuple(_static_key(leaf) for leaf in leaves)
        other = next((leaf for leaf, key in zip(leaves, static) if key is _UNKNOWN), None)
        if other is not None:  # an object (a KV cache, a padding mask) may change between calls without a trace
            self.skipped[f"an argument of type {type(other).__name__}"] += 1
            return self._run_eager(args, kwargs)
        key = (spec, static, tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors),
               self.module.training)
        if self.epoch != graph_epoch():
            # Graphs read what moved, a refusal may not hold any more (a new rung): start again. Without either the
            # warm-up goes on: frozen experts held quantized at their first call invalidate every layer's graphs,
            # and restarting the others' warm-up then would move every capture one step later (GPT-OSS-20B,
            # cuBLASLt 13.10: the first timed step captured, 1,166 ms against 78).
            if self.graphs or self.refused:
                self.reset()
            self.epoch = graph_epoch()
        graph = self.graphs.get(key)
        if graph is None or graph.pending:
            return self._eager_or_capture(key, leaves, spec, tensors, args, kwargs)
        params = self._trainable()
        if len(params) != len(graph.params) or any(a is not b for a, b in zip(params, graph.params)):
            self.reset()  # which parameters train changed: the captured backward computes other gradients
            return self._eager_or_capture(key, leaves, spec, tensors, args, kwargs)
        return _Replay.apply(graph, len(tensors), *tensors, *params)

    def reset(self, abandon: bool = False) -> None:
        """Drop every graph (their memory pools go with them) and warm up again. A graph whose forward waits for its
        backward is released with the rest only when ``abandon`` says that backward will not come."""
        for graph in self.graphs.values():
            if abandon or not graph.pending:
                graph.release()
        self.graphs.clear()
        self.calls.clear()
        self.refused.clear()
        self.epoch = graph_epoch()

    # -- internals ------------------------------------------------------------------------------
    def _ineligible(self, leaves: list[Any]) -> Optional[str]:
        module = self.module
        if not torch.is_grad_enabled():  # no backward follows (eval mode alone does not say that: a pretrained
            return "grad disabled"         # transformers model trains in eval mode unless someone calls .train())
        if getattr(module, "gradient_checkpointing", False):
            return "activation checkpointing"
        if self.recompute and delayed_autocast():
            return "delayed scaling in recompute mode (TE's recompute phases swap its scales in Python)"
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "inside another capture"
        if not _on_cuda(leaves):
            return "not on CUDA"
        if _has_hooks(module):
            return "forward hooks"
        if any(callable(getattr(p, "to_local", None)) or type(p).__name__ == "FlatParameter"
               for p in module.parameters()):
            return "sharded parameters (FSDP gathers them into new memory at every call)"
        return None

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _run_eager(self, args: Any, kwargs: Any) -> Any:
        """The layer without a graph: plainly, or in recompute mode under torch's non-reentrant checkpoint (where a
        backward follows and the model does not checkpoint the layer itself)."""
        if self.recompute and torch.is_grad_enabled() and not getattr(self.module, "gradient_checkpointing", False):
            return _CHECKPOINT(self.eager, *args, **kwargs)
        return self.eager(*args, **kwargs)

    def _eager_or_capture(self, key: Hashable, leaves: list[Any], spec: Any, tensors: list[Tensor],
                          args: Any, kwargs: Any) -> Any:
        if key in self.refused or key in self.graphs or len(self.graphs) >= MAX_GRAPHS:
            return self._run_eager(args, kwargs)  # refused, a second forward before the first's backward, or full
        self.calls[key] += 1
        if self.calls[key] < WARMUP_CALLS:
            return self._run_eager(args, kwargs)
        if self.calls[key] == WARMUP_CALLS:
            out, syncs = _watch_syncs(lambda: self._run_eager(args, kwargs))
            if syncs:
                self._refuse(key, f"a host synchronization in its forward ({syncs[0]})",
                             {"synchronizations": syncs[:3]})
            elif not isinstance(out, Tensor):
                self._refuse(key, f"its forward returns a {type(out).__name__}, not one tensor", {})
            return out
        params = self._trainable()
        self.graphs[key] = self._capture(leaves, spec, tensors, params)
        self._event("swap", f"CUDA graphs captured for {type(self.module).__name__} ({len(self.graphs)} shape(s))",
                    {"inputs": [list(t.shape) for t in tensors]})
        return _Replay.apply(self.graphs[key], len(tensors), *tensors, *params)

    def _refuse(self, key: Hashable, reason: str, evidence: dict[str, Any]) -> None:
        self.refused[key] = reason
        self._event("skip", f"no CUDA graph for {type(self.module).__name__}: {reason}", evidence)

    def _capture(self, leaves: list[Any], spec: Any, tensors: list[Tensor], params: list[Tensor]) -> _Graph:
        """Warm up, then capture the forward into the signature's shared pool (:class:`GraphPools`), on the pools'
        side stream and against fresh leaves over the parameters (:func:`fresh_leaves`); the backward is captured at
        its first call (:meth:`_capture_backward`, or :meth:`_capture_recompute` in recompute mode)."""
        inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        it = iter(inputs)
        args, kwargs = pytree.tree_unflatten([_over_static(leaf, it) for leaf in leaves], spec)

        def run() -> Tensor:
            return self.eager(*args, **kwargs)

        torch.cuda.synchronize()
        side = self.pools.capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        forward = torch.cuda.CUDAGraph()
        pool_key = tuple((t.shape, t.dtype, t.requires_grad) for t in tensors), self.module.training
        pool = self.pools.for_forward(pool_key)
        with fresh_leaves(self.module, params) as leaves_now:
            targets = [t for t in inputs if t.requires_grad] + leaves_now
            with torch.cuda.stream(side):  # lazily built state (TE's workspaces, its backward's) before the capture
                out = run()
                torch.autograd.grad(out, targets, torch.zeros_like(out), allow_unused=True)
            del out
            side.synchronize()
            precision = PrecisionSnapshot.capture(delayed_scaling=False)
            with _te_capturing(), torch.cuda.graph(forward, pool=pool, stream=side, capture_error_mode="thread_local"):
                output = run()
                if self.recompute:  # the training forward's kernels; what it saved is freed inside the graph
                    output = output.detach()
        torch.cuda.current_stream().wait_stream(side)

        def capture_backward(graph: _Graph) -> None:
            if self.recompute:
                self._capture_recompute(graph, run, precision, side, pool_key, pool)
            else:
                self._capture_backward(graph, targets, side, pool_key, pool)

        return _Graph(forward, None, inputs, output, torch.empty_like(output), (), params,
                      capture_backward=capture_backward, recompute=self.recompute)

    def _capture_backward(self, graph: _Graph, targets: list[Tensor], side: torch.cuda.Stream, pool_key: Hashable,
                          pool: Any) -> None:
        """Capture the backward (inside autograd's backward pass, this layer's turn) into the forward's pool; the
        thread-local capture mode lets other threads (a DDP reducer's, NCCL's) go on meanwhile."""
        backward = torch.cuda.CUDAGraph()
        side.wait_stream(torch.cuda.current_stream())  # grad_output was copied on the current stream
        with _te_capturing(), torch.cuda.graph(backward, pool=pool, stream=side, capture_error_mode="thread_local"):
            # retain_graph: the saved activations stay allocated to the graphs that write and read them
            grads = torch.autograd.grad(graph.output, targets, graph.grad_output, allow_unused=True,
                                        retain_graph=True)
        torch.cuda.current_stream().wait_stream(side)
        self.pools.backward_captured(pool_key, pool)
        graph.backward, graph.grads, graph.capture_backward = backward, tuple(grads), None

    def _capture_recompute(self, graph: _Graph, run: Callable[[], Tensor], precision: PrecisionSnapshot,
                           side: torch.cuda.Stream, pool_key: Hashable, pool: Any) -> None:
        """Recompute mode: capture the forward again, over the static inputs and under the forward's precision
        (autograd's backward thread has neither its autocasts nor grad mode), then its backward; what the forward
        saved is freed inside the graph, for the next layer's capture to reuse."""
        backward = torch.cuda.CUDAGraph()
        side.wait_stream(torch.cuda.current_stream())
        with fresh_leaves(self.module, graph.params) as leaves_now, precision.recompute(), torch.enable_grad():
            targets = [t for t in graph.inputs if t.requires_grad] + leaves_now
            with _te_capturing(), torch.cuda.graph(backward, pool=pool, stream=side, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(run(), targets, graph.grad_output, allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        self.pools.backward_captured(pool_key, pool)
        graph.backward, graph.grads, graph.capture_backward = backward, tuple(grads), None

    def _event(self, kind: str, text: str, evidence: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, text, evidence)


@contextmanager
def fresh_leaves(module: nn.Module, params: list[Tensor]) -> Iterator[list[Tensor]]:
    """``module`` with each of ``params`` replaced by a new leaf over the same storage (a tied parameter by one leaf);
    yields the new leaves in ``params`` order and puts the parameters back on exit.

    A parameter's gradient-accumulation node is created once and reused while any autograd graph holds it: in a
    plain loop the previous step's ``loss`` keeps it alive, with the stream of the eager step that made it (the
    default stream). A backward captured against it would order that stream after the capture, which CUDA refuses
    ("operation would make the legacy stream depend on a capturing blocking stream"). New leaves get their nodes on
    the capturing stream; sharing the storage, the replays read the parameters' current values.
    """
    by_id = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    swapped = [(m, name, p) for m in module.modules() for name, p in m._parameters.items()
               if p is not None and id(p) in by_id]
    for m, name, p in swapped:
        m._parameters[name] = by_id[id(p)]
    try:
        yield [by_id[id(p)] for p in params]
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


_UNKNOWN = object()


def _static_key(leaf: Any) -> Any:
    """What a graph holds fixed for a non-tensor argument: its value (plain types), the description an object gives
    with ``graph_key()`` (e.g. the attention mask of :mod:`.attention.masks`), else :data:`_UNKNOWN`."""
    if isinstance(leaf, Tensor):
        return None
    if isinstance(leaf, _STATIC_TYPES):
        return leaf
    describe = getattr(leaf, "graph_key", None)
    key = describe() if callable(describe) else None
    return _UNKNOWN if key is None else (type(leaf).__name__, key)


def _graph_tensors(leaf: Any) -> list[Tensor]:
    """The tensors an argument brings into the graph: itself, or those an object lists with ``graph_tensors()``
    (a mask object's position tensors: the layer reads them, so each replay must see the current ones)."""
    if isinstance(leaf, Tensor):
        return [leaf]
    listed = getattr(leaf, "graph_tensors", None)
    return listed() if callable(listed) else []


def _over_static(leaf: Any, static: Iterator[Tensor]) -> Any:
    """The argument the capture runs with: over the graph's static input tensors, in :func:`_graph_tensors` order."""
    if isinstance(leaf, Tensor):
        return next(static)
    tensors = _graph_tensors(leaf)
    return leaf.with_graph_tensors([next(static) for _ in tensors]) if tensors else leaf


def _rng_state() -> Tensor:
    """The CUDA generator's state (seed and offset: a replay draws from the offset it finds), or the CPU's."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set_rng_state(state: Tensor) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def _on_cuda(leaves: list[Any]) -> bool:
    return any(isinstance(leaf, Tensor) and leaf.is_cuda for leaf in leaves)


@contextmanager
def _te_capturing() -> Iterator[None]:
    """TE's "a capture is under way" flag, as its own ``make_graphed_callables`` sets it (the one TE internal here:
    TE checks it where a capture must not build state, e.g. its attention's eager-only validations)."""
    try:
        from transformer_engine.pytorch import graph as te_graph
    except ImportError:
        yield
        return
    te_graph.set_capture_start()
    try:
        yield
    finally:
        te_graph.set_capture_end()


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _watch_syncs(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``fn()`` with torch's sync debug mode on: its result and the synchronizing operations it made."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return out, [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class a transformers model names in ``_no_split_modules``."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def install_cuda_graphs(model: nn.Module,
                        on_event: Optional[Callable[[str, str, dict[str, Any]], None]] = None) -> list[nn.Module]:
    """Install the dispatcher as the ``forward`` of each decoder layer of ``model``; returns the layers. Layers keep
    their class, parameters and ``state_dict``; :func:`remove_cuda_graphs` puts the class forward back."""
    layers = decoder_layers(model)
    pools = GraphPools()
    for layer in layers:
        if not isinstance(layer.__dict__.get("forward"), LayerGraphs):
            layer.forward = LayerGraphs(layer, on_event, pools)
    return layers


def dispatchers(model: nn.Module) -> list[LayerGraphs]:
    """The dispatchers installed in ``model`` (its own included)."""
    return [d for m in model.modules() if isinstance(d := m.__dict__.get("forward"), LayerGraphs)]


def remove_cuda_graphs(model: nn.Module) -> None:
    for dispatcher in dispatchers(model):
        del dispatcher.module.forward


def graph_status(model: nn.Module) -> dict[str, Any]:
    """How many decoder layers have dispatchers, how many replay a graph now, and why the others do not."""
    found = dispatchers(model)
    refused = sorted({reason for d in found for reason in d.refused.values()})
    skipped = sum((d.skipped for d in found), Counter())
    return {"layers": len(found), "graphed": sum(bool(d.graphs) for d in found), "refused": refused,
            "eager_calls": dict(skipped), "signatures": max((len(d.calls) for d in found), default=0),
            "recompute": sum(d.recompute for d in found)}


def drop_graphs(model: nn.Module) -> None:
    """Drop every graph of ``model``'s layers now, their memory pools with them (:func:`invalidate_graphs` drops them
    lazily, at each layer's next call): e.g. before training at other shapes, whose graphs would sit beside them, or
    after a step that failed (a forward still waiting for its backward is abandoned)."""
    for dispatcher in dispatchers(model):
        dispatcher.reset(abandon=True)
        dispatcher.pools.clear()


def recompute_in_graphs(model: nn.Module) -> int:
    """Turn every layer of ``model`` to recompute mode (activation checkpointing inside its graphs, see the module
    doc): their graphs and pools are dropped now and they capture again after a warm-up. Returns how many layers."""
    found = dispatchers(model)
    drop_graphs(model)
    for dispatcher in found:
        dispatcher.recompute = True
    return len(found)


def release_pending(model: nn.Module) -> None:
    """A new training step: a replayed forward whose backward never ran (a skipped ``backward``) is abandoned."""
    for dispatcher in dispatchers(model):
        for graph in dispatcher.graphs.values():
            graph.pending = False


def install_for_plugin(model: nn.Module, state: Any, decisions: Any) -> Optional[tuple[str, dict]]:
    """The plugin's CUDA-graph step (after the swaps): dispatchers on the decoder layers where the plan runs CUDA
    graphs, graphs dropped at every rung change, and each capture or refusal recorded as a decision."""
    if state.plan.environment.device_type != "cuda" or not state.plan.cuda_graphs:
        return None
    layers = install_cuda_graphs(model, lambda kind, text, evidence: decisions.record(
        kind, text, rule="cuda_graphs", evidence=evidence))
    if not layers:
        return "CUDA graphs: no decoder layers found (no `_no_split_modules` in the model)", {"layers": 0}
    state.on_change(lambda old, new: invalidate_graphs())
    kinds = sorted({type(layer).__name__ for layer in layers})
    caches = training_without_kv_cache(model)
    text = (f"CUDA graphs for {len(layers)} decoder layers ({', '.join(kinds)}), captured at the third training step "
            f"of each shape where the layer makes no host synchronization")
    if caches:
        text += ("; config.use_cache set to False (a KV cache object changes at every call and cannot be replayed; "
                 "generate() asks for its cache itself)")
    return text, {"layers": len(layers), "classes": kinds, "use_cache_off": caches}


def training_without_kv_cache(model: nn.Module) -> int:
    """transformers models build a KV cache in every forward while ``config.use_cache`` is on, training ones too
    (only generation reads it): switch it off, as transformers' own Trainer does for checkpointed training. Returns
    how many configs changed."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None) is True}
    for config in configs.values():
        config.use_cache = False
    return len(configs)
