"""Measured auto on the H100: the timings are real, the choice follows them, training runs on the choice."""

from __future__ import annotations

import math

import lightning as L
import torch

from lightning_te_moe import PrecisionRequest, TEMoEPrecision, make_plan, probe_environment
from lightning_te_moe.policy.autotune import MARGIN, autotune_model
from lightning_te_moe.example import StdlibBytesDataModule, TinyMoELanguageModel
from lightning_te_moe.experts import swap_experts
from lightning_te_moe.policy.state import PrecisionState


def test_autotune_on_a_gpt_oss_20b_expert_layer():
    """GPT-OSS-20B's expert shapes (E=32, H=I=2880, top-4) at 16,384 tokens: every allowed experts recipe is timed
    and the choice is the fastest unless within the noise margin of the rule-based one (the measured one)."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = transformers.GptOssConfig(hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                                       num_experts_per_tok=4)
    holder = torch.nn.Module()
    holder.config = config
    holder.experts = GptOssExperts(config)
    env = probe_environment()
    state = PrecisionState(make_plan(env))
    swap_experts(holder, state=state)
    holder.to("cuda", torch.bfloat16)
    plan, result, shape = autotune_model(holder, env, PrecisionRequest(), tokens=16384)
    print("autotune at GPT-OSS-20B expert shapes:", shape, {k: round(v, 2) for k, v in result.timings_ms.items()},
          "->", result.chosen, "|", result.reason)
    assert shape == {"num_experts": 32, "hidden_size": 2880, "intermediate_size": 2880, "tokens": 16384, "top_k": 4}
    assert set(result.timings_ms) == {"fp8_current", "bf16", "fp8_delayed", "fp8_block"}
    assert all(0 < v < 1000 for v in result.timings_ms.values())
    fastest = min(result.timings_ms, key=result.timings_ms.get)
    rule = result.timings_ms[result.rule_choice]
    expected = fastest if result.timings_ms[fastest] < rule * (1 - MARGIN) else result.rule_choice
    assert result.chosen == expected and plan.experts.name == expected  # autotune re-chooses the experts only
    assert plan.dense == make_plan(env).dense


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fit_with_autotune_runs_on_the_chosen_recipe(tmp_path):
    history, plugin = LossHistory(), TEMoEPrecision(autotune=True, autotune_tokens=4096)
    trainer = L.Trainer(plugins=[plugin], callbacks=[history], accelerator="gpu", devices=1, max_steps=20,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    model = TinyMoELanguageModel(hidden_size=256, intermediate_size=512, num_experts=8)
    trainer.fit(model, StdlibBytesDataModule(seq_len=256, batch_size=16, max_bytes=1_000_000))
    tuned = [d for d in plugin.decisions.decisions if d.kind == "autotune"]
    print([d.line() for d in tuned])
    assert len(tuned) == 1 and tuned[0].step == 0
    timings = tuned[0].evidence["timings_ms"]
    assert set(timings) == {"fp8_current", "bf16", "fp8_delayed", "fp8_block"}
    assert plugin.state.index == 0 and tuned[0].to == plugin.state.rung.label()
    assert plugin.plan.request["autotune"] is True
    assert len(history.losses) == 20 and all(math.isfinite(x) for x in history.losses)
    assert sum(history.losses[-5:]) < sum(history.losses[:5])
