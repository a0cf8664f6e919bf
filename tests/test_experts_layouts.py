"""Other layouts: transformers 4.x ``nn.ModuleList`` blocks, a user's own experts via an adapter, codecs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from experts_helpers import rel_err
from torch import nn

from lightning_te_moe.experts import (GLU, ExpertsAdapter, ExpertsMatch, ExpertWeights, FusedCodec, GroupedExperts, ModuleListMoEBlock,
                                      register_adapter, swap_experts, unregister_adapter, unswap_experts)


class MixtralBlockSparseTop2MLP(nn.Module):
    """transformers 4.x Mixtral expert."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(hidden, ffn, bias=False), nn.Linear(ffn, hidden, bias=False), nn.Linear(
            hidden, ffn, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class Qwen2MoeMLP(nn.Module):
    """transformers 4.x Qwen2-MoE expert (and shared expert)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock4x(nn.Module):
    """The 4.x sparse-MoE block forward (Mixtral; with ``shared`` the Qwen2-MoE variant)."""

    def __init__(self, hidden: int = 32, ffn: int = 48, experts: int = 6, top_k: int = 2, qwen: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        mlp = Qwen2MoeMLP if qwen else MixtralBlockSparseTop2MLP
        self.experts = nn.ModuleList([mlp(hidden, ffn) for _ in range(experts)])
        if qwen:
            self.norm_topk_prob = False
            self.shared_expert = Qwen2MoeMLP(hidden, ffn)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            current = self.experts[e](hidden_states[None, top_x].reshape(-1, hidden)) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        if hasattr(self, "shared_expert"):
            final = final + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return final.reshape(batch, seq, hidden), router_logits


class Model4x(nn.Module):
    def __init__(self, qwen: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([SparseMoeBlock4x(qwen=qwen) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


@pytest.mark.parametrize("qwen", [False, True], ids=["mixtral-w1w3w2", "qwen2moe-gate-up-down+shared"])
def test_modulelist_blocks_match_and_round_trip(qwen: bool) -> None:
    ref = Model4x(qwen)
    swapped = copy.deepcopy(ref)
    report = swap_experts(swapped)
    assert [e.path for e in report.swapped] == ["layers.0", "layers.1"]
    assert isinstance(swapped.layers[0], ModuleListMoEBlock) and isinstance(swapped.layers[0].experts, GroupedExperts)
    assert swapped.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 7, 32)
    outs = []
    for model in (ref, swapped):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        outs.append((out.detach(), xi.grad))
    assert rel_err(outs[1][0], outs[0][0]) <= 1e-5 and rel_err(outs[1][1], outs[0][1]) <= 1e-5
    experts = swapped.layers[0].experts
    grads = experts.codec.encode(ExpertWeights(experts.fc1.weight.grad, None, experts.fc2.weight.grad, None))
    for key, grad in grads.items():
        assert rel_err(grad, ref.layers[0].experts.get_parameter(key).grad) <= 1e-5, key
    assert rel_err(swapped.layers[0].gate.weight.grad, ref.layers[0].gate.weight.grad) <= 1e-5
    assert unswap_experts(swapped) == 2
    assert type(swapped.layers[1]) is SparseMoeBlock4x
    for key, value in ref.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value), key


class MyExperts(nn.Module):
    """A user's experts: ``x @ W`` layout, ReLU-gated, its own forward signature (x, idx, w)."""

    def __init__(self, experts: int = 4, hidden: int = 16, ffn: int = 24) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * ffn) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(experts, ffn, hidden) * 0.2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for t in range(x.size(0)):
            for j in range(idx.size(1)):
                gate, up = (x[t] @ self.gate_up_proj[idx[t, j]]).chunk(2)
                out[t] += w[t, j] * ((torch.relu(gate) * up) @ self.down_proj[idx[t, j]])
        return out


class MyAdapter(ExpertsAdapter):
    name = "my-experts"

    def match(self, module: nn.Module) -> ExpertsMatch | None:
        if not isinstance(module, MyExperts):
            return None
        return ExpertsMatch(FusedCodec(transposed=True), GLU(nn.ReLU()), module)


def test_custom_adapter_swaps_a_users_experts() -> None:
    torch.manual_seed(0)
    ref = nn.ModuleDict({"moe": MyExperts()})
    swapped = copy.deepcopy(ref)
    assert not swap_experts(swapped).swapped  # unknown to the built-in adapters
    adapter = MyAdapter()
    register_adapter(adapter)
    try:
        report = swap_experts(swapped)
    finally:
        unregister_adapter(adapter)
    assert [(e.path, e.adapter, e.activation) for e in report.swapped] == [("moe", "my-experts", "glu(ReLU)")]
    x, idx, w = torch.randn(9, 16), torch.randint(0, 4, (9, 2)), torch.rand(9, 2)
    assert rel_err(swapped["moe"](x, idx, w), ref["moe"](x, idx, w)) <= 1e-5
    assert unswap_experts(swapped) == 1 and type(swapped["moe"]) is MyExperts


@pytest.mark.parametrize("codec", [FusedCodec(), FusedCodec(transposed=True, interleaved=True, bias=True),
                                   FusedCodec(gated=False, bias=True)], ids=str)
def test_codec_round_trip_is_exact(codec: FusedCodec) -> None:
    e, h, i = 3, 8, 6
    up = 2 * i if codec.gated else i
    shapes = {codec.up_name: (e, h, up) if codec.transposed else (e, up, h),
              "down_proj": (e, i, h) if codec.transposed else (e, h, i),
              f"{codec.up_name}_bias": (e, up), "down_proj_bias": (e, h)}
    state = {k: torch.randn(shapes[k]) for k in codec.keys()}
    ours = codec.decode(state)
    assert ours.fc1_weight.shape == (e, up, h) and ours.fc2_weight.shape == (e, h, i)
    back = codec.encode(ours)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_interleaved_gate_up_is_split_into_halves() -> None:
    """GPT-OSS: even output columns are the gate, odd ones the up projection."""
    codec = FusedCodec(transposed=True, interleaved=True, bias=True)
    w = torch.arange(2 * 4).float().view(1, 1, 8).expand(1, 2, 8).contiguous()  # [E, H, 2I]
    ours = codec.decode({"gate_up_proj": w, "down_proj": torch.zeros(1, 4, 2), "gate_up_proj_bias": w[:, 0],
                         "down_proj_bias": torch.zeros(1, 2)})
    assert ours.fc1_weight[0, :, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert ours.fc1_bias is not None and ours.fc1_bias[0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def _decorated_experts(**flags: object) -> type[nn.Module]:
    """A transformers-5-style experts class the built-in adapter has never seen (its own gate, or no gate)."""
    from transformers.integrations.moe import use_experts_implementation

    class OddExperts(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            e, h, i = 4, 16, 24
            self.num_experts, self.swiglu_limit = e, 0.4
            if flags.get("has_gate", True):
                self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) * 0.5)
                self.act_fn: nn.Module = nn.SiLU()
            else:
                self.up_proj = nn.Parameter(torch.randn(e, i, h) * 0.5)
                self.act_fn = nn.GELU()
            self.down_proj = nn.Parameter(torch.randn(e, h, i) * 0.3)

        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:  # clamped SwiGLU without alpha (GLM-5 style)
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate.clamp(max=self.swiglu_limit)) * up.clamp(-self.swiglu_limit, self.swiglu_limit)

    return use_experts_implementation(OddExperts, **flags)


@pytest.mark.parametrize("flags, activation", [({}, "model's own"), ({"has_gate": False}, "ungated(GELU)")],
                         ids=["custom-_apply_gate", "no-gate"])
def test_unknown_5x_experts_keep_their_own_activation(flags: dict, activation: str) -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    ref = nn.ModuleDict({"experts": _decorated_experts(**flags)(SimpleNamespace(_experts_implementation="batched_mm"))})
    swapped = copy.deepcopy(ref)
    report = swap_experts(swapped)
    assert len(report.swapped) == 1 and report.swapped[0].activation.startswith(activation)
    x, idx, w = torch.randn(11, 16) * 3, torch.randint(0, 4, (11, 2)), torch.rand(11, 2)
    assert rel_err(swapped["experts"](x, idx, w), ref["experts"](x, idx, w)) <= 1e-5


def _sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 4.x PhiMoE's routing (inference path): top-1 by masked softmax, then top-1 of the rest."""
    weights, chosen, masked = [], [], scores
    for _ in range(2):
        with torch.no_grad():
            top, index = masked.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=top)
            far = ((top - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(dim=-1, index=index))
        chosen.append(index)
        masked = torch.scatter(masked, -1, index, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


class PhimoeSparseMoeBlock4x(SparseMoeBlock4x):
    """A PhiMoE-shaped 4.x block: Mixtral's attributes (gate, experts of w1/w2/w3, top_k), sparsemixer routing."""

    def __init__(self) -> None:
        super().__init__()
        self.router_jitter_noise = 0.01

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        router_logits = self.gate(hidden_states)
        routing_weights, selected = _sparsemixer(router_logits, self.router_jitter_noise)
        final = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(selected == e)
            final.index_add_(0, token, self.experts[e](hidden_states[token]) * routing_weights[token, slot, None])
        return final.reshape(batch, seq, hidden), router_logits


class HiddenOnlyBlock4x(SparseMoeBlock4x):
    """Mixtral's routing, but returns the hidden states alone (no router logits)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden_states)[0]


def _wrapped(block: nn.Module) -> nn.Module:
    return nn.ModuleDict({"moe": block})


def test_4x_block_with_other_routing_stays_with_a_reason() -> None:
    torch.manual_seed(0)
    model = _wrapped(PhimoeSparseMoeBlock4x())
    x = torch.randn(2, 7, 32)
    before = model["moe"](x)[0]
    report = swap_experts(model)
    assert not report.swapped and type(model["moe"]) is PhimoeSparseMoeBlock4x
    (entry,) = report.entries
    assert entry.status == "not swappable" and entry.adapter == "transformers-4-modulelist"
    assert entry.reason.startswith("PhimoeSparseMoeBlock4x routes differently from softmax -> top-2 -> renormalise:"
                                   " on probe tokens its output differs from ours by")
    assert torch.equal(model["moe"](x)[0], before)  # left whole, weights and all
    # what a swap would have done: Mixtral's routing on this block moves the output far beyond rounding
    ours = ModuleListMoEBlock(model["moe"], _LoopExperts(model["moe"].experts))
    assert rel_err(ours(x)[0], before) > 0.05


class _LoopExperts(nn.Module):
    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            out.index_add_(0, token, expert(x[token]) * w[token, slot, None])
        return out


def test_mixtral_4x_block_is_verified_then_swapped_and_other_shapes_stay() -> None:
    torch.manual_seed(0)
    report = swap_experts(nn.ModuleDict({"mixtral": SparseMoeBlock4x(), "qwen2": SparseMoeBlock4x(qwen=True),
                                         "hidden_only": HiddenOnlyBlock4x()}))
    assert sorted(e.path for e in report.swapped) == ["mixtral", "qwen2"]
    (kept,) = report.by_status("not swappable")
    assert kept.path == "hidden_only" and kept.reason == (
        "HiddenOnlyBlock4x.forward does not return (hidden_states, router_logits) shaped like the 4.x Mixtral block's")


def test_4x_block_on_the_meta_device_stays_until_its_weights_are_loaded() -> None:
    with torch.device("meta"):
        model = _wrapped(SparseMoeBlock4x())
    (entry,) = swap_experts(model).entries
    assert entry.status == "not swappable" and "on the meta device: its routing cannot be checked" in entry.reason


def test_one_frozen_expert_keeps_the_module_as_it_is() -> None:
    model = Model4x(qwen=False)
    model.layers[0].experts[2].requires_grad_(False)
    report = swap_experts(model)
    assert [e.path for e in report.swapped] == ["layers.1"]
    (kept,) = report.by_status("not swappable")
    assert kept.path == "layers.0" and kept.reason.startswith("2.w1.weight, 2.w3.weight frozen while")
    assert "grouped fc1.weight train; a grouped weight has one requires_grad" in kept.reason
    assert type(model.layers[0]) is SparseMoeBlock4x
    trainable = [p.requires_grad for e in model.layers[0].experts for p in e.parameters()]
    assert trainable.count(False) == 3 and trainable.count(True) == 3 * 5  # nothing else was frozen


def test_frozen_gate_up_with_trainable_down_keeps_each_flag_and_gradient() -> None:
    from experts_helpers import original_layout_grads, tiny_model

    ref = tiny_model("gpt_oss")
    for module in ref.modules():
        if type(module).__name__ == "GptOssExperts":
            module.gate_up_proj.requires_grad_(False)
    model = copy.deepcopy(ref)
    assert len(swap_experts(model).swapped) == 2
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert all(not m.fc1.weight.requires_grad and m.fc2.weight.requires_grad for m in experts)
    assert all(m.fc1.bias.requires_grad and m.fc2.bias.requires_grad for m in experts)
    ids = torch.randint(0, 64, (2, 9))
    for m in (ref, model):
        m(input_ids=ids).logits.square().mean().backward()
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None and "experts" in n}
    ours = original_layout_grads(model)
    assert sorted(k.rsplit(".", 1)[-1] for k in theirs) == sorted(["down_proj", "down_proj_bias",
                                                                   "gate_up_proj_bias"] * 2)
    for name, grad in theirs.items():
        assert rel_err(ours[name], grad) <= 1e-5, name
    assert unswap_experts(model) == 2
    restored = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
    assert all(not m.gate_up_proj.requires_grad and m.down_proj.requires_grad for m in restored)
