"""LoRA fine-tuning of the example model with the plugin: the adapters train, the base stays frozen, the loss falls,
and the checkpoint gives PEFT-format adapters that load into plain transformers + PEFT."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from experts_helpers import rel_err

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.cli import main
from lightning_te_moe.example.model import TinyMoELanguageModel, build_config
from lightning_te_moe.experts import GroupedExperts

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=32, intermediate_size=32, num_experts=4, num_heads=4, num_kv_heads=2, sliding_window=16,
             max_positions=64)


def _model(**kwargs: object) -> TinyMoELanguageModel:
    return TinyMoELanguageModel(lora_rank=4, lora_alpha=8, lr=1e-2, warmup_steps=1, **SIZES, **kwargs)


class Recording(TinyMoELanguageModel):
    """Keeps the training losses."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def test_lora_options_validate_early() -> None:
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        TinyMoELanguageModel(lora_rank=-1, **SIZES)
    with pytest.raises(ValueError, match="lora_attention and/or lora_experts"):
        TinyMoELanguageModel(lora_rank=4, lora_attention=False, lora_experts=False, **SIZES)


def test_lora_fit_trains_adapters_only_and_exports_peft_adapters(tmp_path: Path) -> None:
    module = Recording(lora_rank=4, lora_alpha=8, lr=1e-2, warmup_steps=1, **SIZES)
    module.losses = []
    start = {k: v.clone() for k, v in module.state_dict().items()}
    data = torch.arange(40).remainder(7).repeat(8, 1)[:, :33]  # a pattern the adapters can learn
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[TEMoEPrecision(print_plan=False)], max_steps=15,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader)

    experts = [m for m in module.modules() if isinstance(m, GroupedExperts)]
    assert len(experts) == 2 and all(m.lora is not None for m in experts)
    after = module.state_dict()
    lora = [k for k in start if ".lora_" in k]
    assert any(".experts.lora_B." in k for k in lora) and any(".self_attn.q_proj.lora_A." in k for k in lora)
    assert all(not torch.equal(after[k], start[k]) for k in lora)  # every adapter trained
    assert all(torch.equal(after[k], v) for k, v in start.items() if k not in lora)  # the base did not
    # The random base's frozen head caps how far adapters alone can take the loss (about ln 256 - 0.6 here).
    assert sum(module.losses[-5:]) < 0.95 * sum(module.losses[:5])

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = TinyMoELanguageModel.load_from_checkpoint(ckpt)  # unswapped, PEFT's own modules
    assert not any(isinstance(m, GroupedExperts) for m in restored.modules())
    restored.model.save_pretrained(tmp_path / "adapter")

    import transformers
    from peft import PeftModel

    torch.manual_seed(0)  # the example model's base weights
    config = build_config("gpt_oss", vocab_size=256, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, num_experts=4, top_k=2, sliding_window=16, max_positions=64)
    plain = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "adapter")
    batch = data[:2, :17]
    with torch.no_grad():
        want = module.eval()(batch)
        assert rel_err(restored.eval()(batch), want) <= 1e-5
        assert rel_err(plain.eval()(input_ids=batch).logits, want) <= 1e-5


def test_lora_yaml_runs_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load((ROOT / "examples/configs/gpt_oss_tiny_lora.yaml").read_text())
    assert config["model"]["lora_rank"] > 0 and config["model"]["lora_experts"]
    config["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, default_root_dir=str(tmp_path),
                             enable_progress_bar=False, logger=False)
    config["model"].update(hidden_size=32, intermediate_size=32, num_experts=4)
    config["data"].update(seq_len=32, batch_size=4, max_bytes=100_000)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    out = capsys.readouterr().out
    assert "2 with PEFT LoRA adapters (run as grouped GEMMs)" in out
    assert "LoRA 'default' r=16 alpha=32 (scaling 2) on down_proj, gate_up_proj" in out
    assert list(tmp_path.rglob("*.ckpt"))
