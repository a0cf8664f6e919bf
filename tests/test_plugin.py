"""``TEMoEPrecision`` in a real ``Trainer.fit`` on CPU: planning at setup, autocast, checkpoints and resume."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from cpu_kinds import this_machines_cpu_plan
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_te_moe import Environment, PlanError, TEMoEPrecision, make_plan


class AutocastProbe(BoringModel):
    """Records, inside training_step, what the plugin's forward context switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().training_step(batch, batch_idx)


def _trainer(tmp_path, plugin, **kwargs) -> L.Trainer:
    defaults = dict(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    defaults.update(kwargs)
    return L.Trainer(plugins=[plugin], **defaults)


def test_auto_on_cpu_plans_by_cpu_kind_and_autocasts_accordingly(tmp_path, cpu_kind):
    native_bf16, recipe, _ = cpu_kind
    plugin, model = TEMoEPrecision(print_plan=False), AutocastProbe()
    trainer = _trainer(tmp_path, plugin)
    trainer.fit(model)
    assert plugin.plan.summary() == recipe
    assert trainer.precision == ("bf16-mixed" if native_bf16 else "32-true")
    seen = (True, torch.bfloat16) if native_bf16 else (False, torch.get_autocast_dtype("cpu"))
    assert model.seen == [seen] * 3
    assert [d.kind for d in plugin.decisions.decisions if d.kind != "swap"] == ["plan"]
    assert plugin.decisions.decisions[0].environment.startswith("cpu")
    swaps = [d.reason for d in plugin.decisions.decisions if d.kind == "swap"]
    assert all("not swapped" in r or "nothing changed" in r for r in swaps)  # BoringModel has no MoE


def test_bf16_on_cpu_autocasts_inside_training_step(tmp_path):
    plugin, model = TEMoEPrecision("bf16", print_plan=False), AutocastProbe()
    trainer = _trainer(tmp_path, plugin)
    trainer.fit(model)
    assert trainer.precision == "bf16-mixed"
    assert model.seen == [(True, torch.bfloat16)] * 3
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay FP32


def test_params_dtype_bfloat16_casts_parameters(tmp_path):
    plugin, model = TEMoEPrecision("bf16", params_dtype="bfloat16", print_plan=False), BoringModel()
    _trainer(tmp_path, plugin, max_steps=1).fit(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_quantized_recipe_on_cpu_is_a_clear_error_at_setup(tmp_path, cpu_kind):
    rule = cpu_kind[2]
    with pytest.raises(PlanError, match=rf"recipe 'fp8_current' cannot run on cpu.*{rule}.*Recipes allowed here:"
                                        r" bf16, fp32"):
        _trainer(tmp_path, TEMoEPrecision("fp8_current", print_plan=False)).fit(BoringModel())


def test_quantized_recipe_on_cpu_steps_down_when_not_strict(tmp_path):
    plugin = TEMoEPrecision("fp8_block", strict=False, print_plan=False)
    _trainer(tmp_path, plugin).fit(BoringModel())
    assert plugin.plan.dense.name == "bf16"
    assert any("Stepped down to bf16" in r.text for r in plugin.plan.reasons)


def test_unsupported_recipe_object_fails_at_construction():
    with pytest.raises(ValueError, match=r"TEMoEPrecision\(recipe=dict\(...\)\): unsupported TE recipe type dict;"
                                         " supported are"):
        TEMoEPrecision({"fp8_format": "E4M3"})


def test_plan_is_printed_at_setup(tmp_path, capsys, cpu_kind):
    _trainer(tmp_path, TEMoEPrecision()).fit(BoringModel())
    out = capsys.readouterr().out
    assert "lightning-te-moe precision plan" in out and cpu_kind[2] in out
    assert re.search(r"│ dense layers +│", out) and not re.search(r"│ experts +│", out)  # BoringModel: no MoE


def test_checkpoint_carries_plan_and_resume_keeps_it(tmp_path):
    first = TEMoEPrecision("bf16", deny=["fp16"], print_plan=False)
    trainer = _trainer(tmp_path, first, enable_checkpointing=True)
    trainer.fit(BoringModel())
    ckpt = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["TEMoEPrecision"]
    assert saved["plan"]["dense"]["name"] == "bf16" and saved["rung"] == 0

    again = TEMoEPrecision("bf16", deny=["fp16"], print_plan=False)
    trainer = _trainer(tmp_path, again, max_steps=5)
    trainer.fit(BoringModel(), ckpt_path=ckpt)
    assert again.plan.to_dict() == first.plan.to_dict()
    kinds = [d.kind for d in again.decisions.decisions if d.kind not in ("swap", "snapshot")]
    assert kinds == ["plan", "resume"]  # the first run's history, then the resume
    resume = next(d for d in again.decisions.decisions if d.kind == "resume")
    assert resume.step == 3 and "resumed on rung 0: bf16" in resume.reason


def test_resume_on_another_kind_of_machine_keeps_this_machines_plan(tmp_path, cpu_kind):
    recipe = cpu_kind[1]
    plugin = TEMoEPrecision(print_plan=False)
    _trainer(tmp_path, plugin, max_steps=1).fit(BoringModel())
    foreign = make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"))
    plugin.load_state_dict({"plan": foreign.to_dict(), "rung": 1, "decisions": []})
    assert plugin.plan.summary() == recipe and plugin.state.index == 0
    last = plugin.decisions.decisions[-1]
    assert last.kind == "resume" and f"keeping this machine's plan {recipe}" in last.reason
    assert last.from_ == "fp8_current+dq_bwd"


def test_autotune_without_gpu_keeps_the_rule_based_plan_and_says_why(tmp_path):
    plugin = TEMoEPrecision(autotune=True, print_plan=False)
    _trainer(tmp_path, plugin).fit(BoringModel())
    tuned = [d for d in plugin.decisions.decisions if d.kind == "autotune"]
    assert len(tuned) == 1 and tuned[0].step == 0
    assert tuned[0].reason.startswith("autotune skipped: autotune needs a CUDA device with Transformer Engine")
    assert plugin.plan.summary() == this_machines_cpu_plan()


def test_autotune_tokens_must_be_positive():
    with pytest.raises(ValueError, match=r"TEMoEPrecision\(autotune_tokens=0\): autotune_tokens must be a positive"
                                         " whole number of tokens"):
        TEMoEPrecision(autotune=True, autotune_tokens=0)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"params_dtype": "int8"}, ValueError, "TEMoEPrecision(params_dtype='int8'): params_dtype must be one of"
                                           " 'float32', 'bfloat16'"),
    ({"params_dtype": "float64"}, ValueError, "params_dtype must be one of 'float32', 'bfloat16'"),
    ({"recipe": "fp9"}, ValueError, "TEMoEPrecision(recipe='fp9'): recipe must be one of 'auto', 'bf16', 'fp16',"),
    ({"deny": "fp8_delayed"}, TypeError, "TEMoEPrecision(deny='fp8_delayed'): deny must be a list of recipe names,"
                                         " e.g. deny=['fp8_delayed']"),
    ({"allow": ["int8"]}, ValueError, "TEMoEPrecision(allow=['int8']): unknown recipe name(s) 'int8'; recipe names"
                                      " are: bf16, fp16, fp32,"),
    ({"allow": {"bf16": 1}}, TypeError, "allow must be a list of recipe names"),
    ({"strict": "false"}, TypeError, "TEMoEPrecision(strict='false'): strict must be True or False, got str"),
    ({"guard": 1}, TypeError, "TEMoEPrecision(guard=1): guard must be True or False, got int"),
    ({"cuda_graphs": "on"}, TypeError, "TEMoEPrecision(cuda_graphs='on'): cuda_graphs must be None (the plan decides),"
                                       " True or False, got str"),
    ({"guard_config": {"windw": 3}}, ValueError, "TEMoEPrecision(guard_config=...): unknown GuardConfig field(s)"
                                                 " 'windw'; its fields are: window, warmup,"),
    ({"guard_config": {"window": "100"}}, TypeError, "GuardConfig.window must be an int, got '100'"),
    ({"guard_config": {"window": 0}}, ValueError, "GuardConfig.window must be >= 1, got 0"),
    ({"guard_config": 5}, TypeError, "guard_config must be a GuardConfig or a dict of its fields (window,"),
])
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, message):
    with pytest.raises(error) as err:
        TEMoEPrecision(**kwargs)
    assert message in str(err.value)


def test_guard_config_may_be_a_dict_of_its_fields():
    from lightning_te_moe import GuardConfig

    plugin = TEMoEPrecision(guard_config={"window": 20, "rollback": "always"})
    assert plugin.guard_config == GuardConfig(window=20, rollback="always")
