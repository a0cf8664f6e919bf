"""The plugin under Lightning's strategies, single process: which strategies it serves (and the error for the
others), FSDPStrategy's acceptance of it, FSDP units and casts from the plan, the plan's distributed reasons, and
the error for a model sharded before the swaps could run."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lightning as L
import pytest
import torch
import torch.distributed as dist
from experts_helpers import tiny_model
from guard_support import BF16, FP32, TinyRegression
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_te_moe import Plan, RecipeSpec, Rung, TEMoEPrecision, probe_environment
from lightning_te_moe.distributed import fsdp_wrap_policy, shard_units, strategy_support
from lightning_te_moe.distributed.sharding import fully_shard_units, gather_dtype, is_sharded, layer_classes
from lightning_te_moe.distributed.strategies import amax_reduction_group, distributed_reasons
from lightning_te_moe.experts import GroupedExperts, swap_experts


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_fsdp_precision_hook_is_overridden_so_other_strategies_see_a_plain_precision() -> None:
    hooks = {name for name in vars(FSDPPrecision) if not name.startswith("__")} - {"_abc_impl"}
    assert hooks and hooks <= set(vars(TEMoEPrecision)), hooks - set(vars(TEMoEPrecision))
    plugin = TEMoEPrecision(print_plan=False)
    batch = torch.ones(2, dtype=torch.float64)
    assert plugin.convert_input(batch) is batch and plugin.convert_output(batch) is batch  # no FSDP dtype casts
    with plugin.tensor_init_context(), plugin.module_init_context():
        assert torch.empty(1).dtype == torch.get_default_dtype()


def test_fsdp_strategy_accepts_the_plugin() -> None:
    plugin = TEMoEPrecision(print_plan=False)
    strategy = FSDPStrategy(precision_plugin=plugin)  # Lightning: "only work with FSDPPrecision" for any other
    assert strategy.precision_plugin is plugin
    with pytest.raises(RuntimeError, match="the plan is made at setup"):
        _ = plugin.mixed_precision_config


def test_strategy_support_names_what_works() -> None:
    assert strategy_support(SingleDeviceStrategy(device="cpu")).kind == "single"
    assert strategy_support(DDPStrategy()).kind == "ddp"
    assert strategy_support(FSDPStrategy()).kind == "fsdp"
    assert strategy_support(ModelParallelStrategy()).kind == "fsdp2"

    class DeepSpeedStrategy(DDPStrategy):  # stands in for Lightning's (a DDPStrategy subclass): refused first
        pass

    with pytest.raises(ValueError, match=r"cannot run under DeepSpeedStrategy: DeepSpeed's engine runs its own mixed"
                                         r" precision.*It runs under SingleDeviceStrategy .*ModelParallelStrategy"):
        strategy_support(DeepSpeedStrategy())

    custom = type("Custom", (), {})()  # a user's own strategy class, unknown to the table
    with pytest.raises(ValueError, match="does not know the strategy Custom: it runs under SingleDeviceStrategy"):
        strategy_support(custom)


def test_an_unserved_strategy_fails_at_setup(tmp_path: Path) -> None:
    class DeepSpeedStrategy(SingleDeviceStrategy):
        pass

    plugin = TEMoEPrecision(print_plan=False)
    trainer = L.Trainer(strategy=DeepSpeedStrategy(device=torch.device("cpu")), plugins=[plugin], max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot run under DeepSpeedStrategy"):
        trainer.fit(TinyRegression())


def test_fsdp_units_are_each_experts_module_and_each_decoder_layer() -> None:
    model = tiny_model("gpt_oss")
    swap_experts(model)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    layers = list(model.model.layers)
    assert {c.__name__ for c in layer_classes(model)} == {"GptOssDecoderLayer"}
    assert shard_units(model) == experts + layers  # innermost first, as fully_shard needs
    policy = fsdp_wrap_policy(model)
    assert set(policy._module_classes) == {GroupedExperts, type(layers[0])}


def test_fsdp_gathers_in_the_compute_dtype_unless_a_rung_computes_in_fp32() -> None:
    env = probe_environment(torch.device("cpu"))
    assert gather_dtype(Plan(ladder=(BF16,), environment=env)) == torch.bfloat16
    assert gather_dtype(Plan(ladder=(BF16, FP32), environment=env)) is None
    mixed = Rung(RecipeSpec.of("bf16"), RecipeSpec.of("fp32"))  # FP32 experts need FP32 weights too
    assert gather_dtype(Plan(ladder=(mixed,), environment=env)) is None


def test_the_plan_says_how_delayed_scaling_and_fp8_run_on_many_ranks() -> None:
    env = probe_environment(torch.device("cpu"))
    delayed = Plan(ladder=(Rung(RecipeSpec.of("fp8_delayed"), RecipeSpec.of("fp8_delayed")), BF16), environment=env)
    rules = [r.rule for r in distributed_reasons(delayed, True, 4)]
    assert rules == ["fp8-delayed-amax-reduction", "fp8-sharded-params", "fp8-sharded-experts-memory"]
    assert [r.rule for r in distributed_reasons(delayed, False, 2)] == ["fp8-delayed-amax-reduction"]
    dense_only = Plan(ladder=(Rung(RecipeSpec.of("fp8_current"), RecipeSpec.of("bf16")), BF16), environment=env)
    assert [r.rule for r in distributed_reasons(dense_only, True, 4)] == ["fp8-sharded-params"]  # BF16 experts
    assert distributed_reasons(delayed, False, 1) == ()
    assert distributed_reasons(Plan(ladder=(BF16,), environment=env), True, 8) == ()
    assert amax_reduction_group("fp8_delayed") is None  # no process group: nothing to reduce


def test_amax_reduction_group_is_every_rank_for_delayed_scaling_only(one_process_group: None) -> None:
    assert amax_reduction_group("fp8_current") is None
    assert amax_reduction_group("fp8_delayed") is None  # one rank: nothing to reduce


def test_a_model_sharded_before_the_swaps_is_a_clear_error(one_process_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model("gpt_oss")
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(RuntimeError, match=r"was sharded .* before TEMoEPrecision could plan, swap and cast it.*"
                                           r"lightning_te_moe.distributed.shard_model\(self\)"):
        TEMoEPrecision(print_plan=False).convert_module(model)


def test_fsdp2_reduces_gradients_in_the_dtype_asked_for_and_refuses_others_before_sharding(
        one_process_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    plan = Plan(ladder=(BF16,), environment=probe_environment(torch.device("cpu")))
    mesh = init_device_mesh("cpu", (1,))
    model = tiny_model("gpt_oss")
    swap_experts(model)
    with pytest.raises(ValueError, match=r"reduce_dtype=torch.float16 is not supported: FSDP2 reduces gradients in"
                                         r" one of torch.float32, torch.bfloat16"):
        fully_shard_units(model, plan, [model], mesh, reduce_dtype=torch.float16)
    assert not is_sharded(model) and all(m.original_layout for m in model.modules() if isinstance(m, GroupedExperts))
    _, summary, details = fully_shard_units(model, plan, [model], mesh, reduce_dtype=torch.bfloat16)
    assert details["reduce_dtype"] == "torch.bfloat16" and "gradients reduced in bfloat16;" in summary
    assert summary.endswith("quantized weights not kept between calls")
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert experts and not any(m.cache_quantized_weights or m.original_layout for m in experts)
    assert not any(r.enabled for m in experts for r in m._resident.values())
    assert model.model.layers[0]._get_fsdp_state()._mp_policy.reduce_dtype == torch.bfloat16


def test_plain_precision_hooks_still_clip_by_norm_outside_fsdp() -> None:
    plugin = TEMoEPrecision(print_plan=False)
    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.full((4,), 10.0)
    plugin.clip_grad_by_norm(torch.optim.SGD([weight], lr=0.1), 1.0)  # FSDPPrecision raises here
    assert torch.linalg.vector_norm(weight.grad).item() == pytest.approx(1.0, rel=1e-4)
    assert Precision.clip_grad_by_norm is not TEMoEPrecision.clip_grad_by_norm


def test_under_fabric_the_backward_is_one_clear_error() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[TEMoEPrecision(print_plan=False)])
    model, _ = fabric.setup(torch.nn.Linear(4, 4), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], 0.1))
    with pytest.raises(RuntimeError, match="is a lightning.Trainer plugin.*under Fabric use .*TEMoEFabricPrecision"):
        fabric.backward(model(torch.randn(2, 4)).sum())
