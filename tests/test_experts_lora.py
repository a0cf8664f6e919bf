"""PEFT LoRA on the experts (``target_parameters``) with the expert swap: the swapped model computes what PEFT
computes on the unswapped one (fp32, CPU), trains the same adapters, saves them in PEFT's format, merges, unswaps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from experts_helpers import rel_err, tiny_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_te_moe.experts import GroupedExperts, swap_experts, unswap_experts

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

ARCHS = ("gpt_oss", "mixtral")  # interleaved + transposed + biases; concatenated [E, 2I, H]
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def lora_config(r: int = 4, alpha: float = 8, **kwargs: Any) -> LoraConfig:
    """The usual GPT-OSS recipe, small; ``init_lora_weights=False`` so B is not zero and the adapters act."""
    kwargs.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    return LoraConfig(r=r, lora_alpha=alpha, target_parameters=TARGETS, init_lora_weights=False, **kwargs)


def peft_twins(arch: str, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, its deep copy with the experts swapped)."""
    ref = get_peft_model(tiny_model(arch), lora_config(**kwargs))
    ours = copy.deepcopy(ref)
    report = swap_experts(ours)
    assert len(report.swapped) == 2
    return ref, ours


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(seed))


def step(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Forward + a loss's backward; the logits."""
    logits = model(input_ids=batch).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.roll(-1, 1).flatten()).backward()
    return logits.detach()


def grouped(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class ProducedShapes(TorchDispatchMode):
    """Records the shapes of the tensors that non-view ops compute (views of the weights are not computations)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
        return out


def dense_expert_matrices(run: Callable[[], Any], hidden: int = 32, intermediate: int = 48) -> set[tuple[int, ...]]:
    """Computed tensors shaped like an expert weight (``[.., out, in]`` either way round) during ``run``."""
    mats = {(2 * intermediate, hidden), (hidden, 2 * intermediate), (hidden, intermediate), (intermediate, hidden)}
    with ProducedShapes() as seen:
        run()
    return {s for s in seen.shapes if s[-2:] in mats}


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_lora_matches_peft_logits_and_adapter_grads(arch: str) -> None:
    ref, ours = peft_twins(arch)
    batch = ids()
    want = step(ref, batch)
    got = step(ours, batch)
    assert rel_err(got, want) <= 1e-4
    theirs, mine = trainable(ref), trainable(ours)
    assert set(mine) == set(theirs)  # the same PEFT parameters, nothing else trains
    assert any("experts.lora_B" in n for n in mine) and any("experts.base_layer.lora_A" in n for n in mine)
    errors = {n: rel_err(mine[n].grad, theirs[n].grad) for n in theirs}
    assert all(e <= 1e-4 for e in errors.values()), errors
    for experts in grouped(ours):  # the base stays frozen
        assert experts.lora is not None and not experts.fc1.weight.requires_grad and experts.fc1.weight.grad is None
        assert experts.fc2.weight.grad is None


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_never_forms_a_dense_delta(arch: str) -> None:
    """PEFT's ParamWrapper builds ``W + scaling * B A`` per expert every forward; the swapped module runs the factors
    as grouped GEMMs on the rows and computes nothing shaped like an expert weight, forward or backward (rank 3:
    PEFT's ``[out, r * E]`` factor gradients must not look like one either)."""
    ref, ours = peft_twins(arch, r=3)
    batch = ids()
    assert dense_expert_matrices(lambda: step(ref, batch))  # the detector sees PEFT's delta
    assert dense_expert_matrices(lambda: step(ours, batch)) == set()


def test_swap_keeps_peft_structure_state_dict_and_reports_the_adapter() -> None:
    ref = get_peft_model(tiny_model("gpt_oss"), lora_config())
    ours = copy.deepcopy(ref)
    report = swap_experts(ours)
    entry = report.swapped[0]
    assert entry.path == "base_model.model.model.layers.0.mlp.experts.base_layer.base_layer"
    assert entry.lora == "LoRA 'default' r=4 alpha=8 (scaling 2) on down_proj, gate_up_proj"
    assert "2 with PEFT LoRA adapters" in report.summary() and entry.lora in report.render_text()
    assert report.to_dict()["entries"][0]["lora"] == entry.lora
    wrapper = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(wrapper, ParamWrapper) and isinstance(wrapper.base_layer, ParamWrapper)
    assert isinstance(wrapper.base_layer.base_layer, GroupedExperts)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    theirs, mine = get_peft_model_state_dict(ref), get_peft_model_state_dict(ours)
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_adapters_train_like_peft_and_save_in_peft_format(tmp_path: Path) -> None:
    ref, ours = peft_twins("gpt_oss")
    base = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, ours)]
    for i in range(3):
        for model, optimizer in zip((ref, ours), optimizers):
            optimizer.zero_grad()
            step(model, ids(i))
            optimizer.step()
    mine, theirs = get_peft_model_state_dict(ours), get_peft_model_state_dict(ref)
    assert max(rel_err(mine[k], theirs[k]) for k in theirs) <= 1e-4
    start = get_peft_model_state_dict(get_peft_model(tiny_model("gpt_oss"), lora_config()))
    assert all(not torch.equal(mine[k], start[k]) for k in start)  # every adapter trained
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base did not move

    ours.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model("gpt_oss"), tmp_path / "adapter")  # plain transformers + PEFT
    assert not grouped(loaded)
    batch = ids(7)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=batch).logits, ours(input_ids=batch).logits) <= 1e-5


def test_unswap_gives_peft_its_modules_back_with_the_trained_adapters() -> None:
    ref, ours = peft_twins("gpt_oss")
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    step(ours, ids())
    optimizer.step()
    batch = ids(3)
    with torch.no_grad():
        trained = ours(input_ids=batch).logits
    assert unswap_experts(ours) == 2
    wrapper = ours.base_model.model.model.layers[0].mlp.experts
    assert type(wrapper) is ParamWrapper and type(wrapper.base_layer) is ParamWrapper
    assert type(wrapper.base_layer.base_layer).__name__ == "GptOssExperts"
    with torch.no_grad():
        assert rel_err(ours(input_ids=batch).logits, trained) <= 1e-5  # PEFT's own forward, same adapters
        assert rel_err(ours(input_ids=batch).logits, ref(input_ids=batch).logits) > 1e-3  # they did train
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in ref.parameters()]
    swap_experts(ours)  # and back again
    with torch.no_grad():
        assert rel_err(ours(input_ids=batch).logits, trained) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_on_the_swapped_model(arch: str) -> None:
    ref, ours = peft_twins(arch)
    batch = ids()
    with torch.no_grad():
        want = ref(input_ids=batch).logits
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    experts = merged.model.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts) and experts.lora is None
    plain = tiny_model(arch)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    with torch.no_grad():
        assert rel_err(merged(input_ids=batch).logits, want) <= 1e-5
        assert rel_err(merged(input_ids=batch).logits, copy.deepcopy(ref).merge_and_unload()(input_ids=batch).logits
                       ) <= 1e-5
    assert unswap_experts(merged) == 2
    assert type(merged.model.layers[0].mlp.experts).__name__ == type(plain.model.layers[0].mlp.experts).__name__
    with torch.no_grad():
        assert rel_err(merged(input_ids=batch).logits, want) <= 1e-5


def test_unload_merge_adapter_and_disable_adapter() -> None:
    ref, ours = peft_twins("gpt_oss")
    batch = ids()
    with torch.no_grad():
        want = ref(input_ids=batch).logits
        with ref.disable_adapter():
            base = ref(input_ids=batch).logits
        with ours.disable_adapter():
            assert rel_err(ours(input_ids=batch).logits, base) <= 1e-5
        assert rel_err(ours(input_ids=batch).logits, want) <= 1e-5  # enabled again
        experts = grouped(ours)[0]
        weight = experts.fc1.weight.clone()
        ours.merge_adapter()
        assert not torch.equal(experts.fc1.weight, weight)
        assert rel_err(ours(input_ids=batch).logits, want) <= 1e-5  # merged: the adapters are not added twice
        ours.unmerge_adapter()
        assert rel_err(experts.fc1.weight, weight) <= 1e-6
        assert rel_err(ours(input_ids=batch).logits, want) <= 1e-5
        unloaded = ours.unload()
        assert grouped(unloaded) and all(m.lora is None for m in grouped(unloaded))
        assert rel_err(unloaded(input_ids=batch).logits, base) <= 1e-5


def test_several_adapters_follow_set_adapter() -> None:
    ref = get_peft_model(tiny_model("mixtral"), lora_config())
    ref.add_adapter("second", lora_config(r=2, alpha=3, target_modules=["q_proj"]))
    ours = copy.deepcopy(ref)
    report = swap_experts(ours)
    assert "LoRA 'second' (inactive) r=2 alpha=3" in report.swapped[0].lora
    batch = ids()
    for name in ("second", "default"):
        ref.set_adapter(name)
        ours.set_adapter(name)
        want, got = step(ref, batch), step(ours, batch)
        assert rel_err(got, want) <= 1e-4, name
        grads = {n: p.grad for n, p in trainable(ours).items()}
        assert all(f".{name}." in n for n in grads)
        assert max(rel_err(g, dict(ref.named_parameters())[n].grad) for n, g in grads.items()) <= 1e-4
    ref.base_model.set_adapter(["default", "second"])  # both active: each adds its update
    ours.base_model.set_adapter(["default", "second"])
    assert rel_err(step(ours, batch), step(ref, batch)) <= 1e-4


@pytest.mark.parametrize("target", TARGETS)
def test_one_expert_parameter_with_rslora(target: str) -> None:
    ref = get_peft_model(tiny_model("gpt_oss"), LoraConfig(r=3, lora_alpha=5, target_parameters=[target],
                                                           use_rslora=True, init_lora_weights=False))
    ours = copy.deepcopy(ref)
    (entry,) = swap_experts(ours).swapped[:1]
    assert entry.lora == f"LoRA 'default' r=3 alpha=5 (scaling 2.88675) on {target.split('.')[-1]}"  # 5 / sqrt(3)
    batch = ids()
    assert rel_err(step(ours, batch), step(ref, batch)) <= 1e-4
    assert max(rel_err(p.grad, dict(ref.named_parameters())[n].grad) for n, p in trainable(ours).items()) <= 1e-4


def test_lora_dropout_and_other_peft_methods_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="lora_dropout"):  # PEFT itself defines no dropout for target_parameters
        get_peft_model(tiny_model("gpt_oss"), lora_config(lora_dropout=0.1))

    model = get_peft_model(tiny_model("gpt_oss"), lora_config())
    model.base_model.model.model.layers[0].mlp.experts.lora_dropout["default"] = nn.Dropout(0.1)
    report = swap_experts(model)
    refused = report.by_status("not swappable")
    assert [e.path for e in refused] == ["base_model.model.model.layers.0.mlp.experts.base_layer.base_layer"]
    assert "lora_dropout" in refused[0].reason and "no reference to reproduce" in refused[0].reason
    assert type(model.base_model.model.model.layers[0].mlp.experts.base_layer.base_layer).__name__ == "GptOssExperts"
    assert len(report.swapped) == 1  # the other layer is fine

    from peft.tuners.tuners_utils import BaseTunerLayer

    class OtherMethod(nn.Module, BaseTunerLayer):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base_layer = base

    holder = nn.Module()
    holder.experts = OtherMethod(tiny_model("gpt_oss").model.layers[0].mlp.experts)
    (entry,) = swap_experts(holder).entries
    assert entry.status == "not swappable" and "PEFT OtherMethod on the experts: only LoRA" in entry.reason


def test_lora_on_modulelist_expert_linears_is_refused_clearly() -> None:
    from test_experts_layouts import Model4x

    model = get_peft_model(Model4x(qwen=False), LoraConfig(r=2, target_modules=["w1"]))
    report = swap_experts(model)
    assert len(report.by_status("not swappable")) == 2 and not report.swapped
    assert "PEFT adapters on the expert MLPs' Linear layers are not swapped" in report.entries[0].reason


def test_swap_first_then_peft_is_peft_error_and_unswap_first_works() -> None:
    model = tiny_model("gpt_oss")
    swap_experts(model)
    with pytest.raises(ValueError, match="target_parameters"):
        get_peft_model(copy.deepcopy(model), lora_config(target_modules=None))
    unswap_experts(model)
    ref = get_peft_model(tiny_model("gpt_oss"), lora_config())
    ours = get_peft_model(model, lora_config())
    ours.load_state_dict(ref.state_dict())
    swap_experts(ours)
    batch = ids()
    with torch.no_grad():
        assert rel_err(ours(input_ids=batch).logits, ref(input_ids=batch).logits) <= 1e-5
