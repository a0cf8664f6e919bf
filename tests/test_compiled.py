"""torch.compile inside a LightningModule is seen at setup: the plan is made for a compiled model (rule
``compile-no-delayed`` rules delayed scaling out, with its reason), and swapped dense layers run compiled."""

from __future__ import annotations

import lightning as L
import pytest
import te_standin
import torch
from experts_helpers import tiny_model
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.compile import from_compiled
from te_standin import Float8CurrentScaling, autocast

from lightning_te_moe import PlanError, TEMoEPrecision
from lightning_te_moe.compiled import compiled_modules
from lightning_te_moe.dense import swap_dense
from lightning_te_moe.policy import Environment


class CompilesInside(BoringModel):
    """``self.layer = torch.compile(layer)`` in ``configure_model`` (Lightning calls it before the plugin's setup)."""

    def configure_model(self) -> None:
        if not compiled_modules(self):
            self.layer = torch.compile(self.layer, backend="eager")


def test_compiled_parts_are_found_wherever_they_are() -> None:
    assert compiled_modules(BoringModel()) == []
    inside = CompilesInside()
    inside.configure_model()
    assert compiled_modules(inside) == ["layer"]
    in_place = BoringModel()
    in_place.layer.compile(backend="eager")
    assert compiled_modules(in_place) == ["layer"]
    assert compiled_modules(from_compiled(torch.compile(BoringModel(), backend="eager"))) == ["<root>"]


def test_fit_plans_for_a_model_compiled_in_configure_model(tmp_path) -> None:
    plugin = TEMoEPrecision(print_plan=False)
    trainer = L.Trainer(plugins=[plugin], max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        accelerator="cpu", devices=1)
    trainer.fit(CompilesInside())
    assert plugin.plan.request["torch_compile"] is True


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_te_moe.plugin as plugin_mod

    monkeypatch.setattr(plugin_mod, "probe_environment", lambda device=None: Environment.assume(cc="9.0", te="2.20.2"))


def test_delayed_scaling_is_refused_for_a_model_that_compiles_itself(hopper: None) -> None:
    model = CompilesInside()
    model.configure_model()
    with pytest.raises(PlanError, match=r"recipe 'fp8_delayed' cannot run on .*DelayedScaling is rejected under"
                                        r" torch.compile. \[compile-no-delayed"):
        TEMoEPrecision("fp8_delayed", print_plan=False).convert_module(model)
    plugin = TEMoEPrecision("fp8_delayed", strict=False, print_plan=False, guard=False)
    plugin.convert_module(model)
    assert plugin.plan.dense.name == "fp8_current"
    assert any(r.rule == "compile-no-delayed" and "Stepped down to fp8_current" in r.text for r in plugin.plan.reasons)
    uncompiled = TEMoEPrecision("fp8_delayed", print_plan=False, guard=False)
    uncompiled.convert_module(BoringModel())
    assert uncompiled.plan.dense.name == "fp8_delayed"


def test_swapped_dense_layers_run_compiled_with_the_te_call_outside_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    te = te_standin.install(monkeypatch)
    model = tiny_model("mixtral")
    swap_dense(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast(recipe=Float8CurrentScaling()):
        expected = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")
        assert torch.equal(compiled(input_ids=ids).logits, expected)
    assert len(te.calls) == 16 and {c.recipe for c in te.calls} == {repr(Float8CurrentScaling())}
