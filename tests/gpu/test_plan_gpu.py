"""On the real GPU: the probe sees the device and TE, the plan picks FP8, TE autocast is active inside
training_step, and the example trains for 30 steps with a finite, falling loss."""

from __future__ import annotations

import math

import lightning as L
import torch
from packaging.version import Version

from lightning_te_moe import PrecisionRequest, TEMoEPrecision, make_plan, probe_environment
from lightning_te_moe.example import StdlibBytesDataModule, TinyMoELanguageModel


def test_probe_sees_device_te_and_versions():
    env = probe_environment()
    print("environment:", env.to_dict())
    assert env.device_type == "cuda" and env.compute_capability is not None
    assert env.te_version is not None and env.cudnn_version and env.cublaslt_version
    print("cuBLASLt", env.cublaslt_version)
    assert set(env.te_checks) == {"fp8", "mxfp8", "fp8_block", "nvfp4"}
    if env.compute_capability == (9, 0):
        assert env.te_checks["fp8"].available and not env.te_checks["mxfp8"].available
        assert not env.te_checks["nvfp4"].available and env.te_checks["mxfp8"].reason


def test_plans_gemm_path_is_tes_own_on_this_stack():
    """For every recipe TE runs here, the plan's experts GEMM path (the native-grouped rules) is what TE's own
    predicate says on this machine, and the high-precision-backward rung is one GEMM per expert."""
    from transformer_engine.pytorch.module.grouped_linear import is_module_grouped_tensor_path_supported

    from lightning_te_moe import RecipeSpec

    env = probe_environment()
    names = ["bf16"] + [n for n, family in (("fp8_delayed", "fp8"), ("fp8_current", "fp8"), ("fp8_block", "fp8_block"),
                                             ("mxfp8", "mxfp8"), ("nvfp4", "nvfp4")) if env.te_checks[family].available]
    seen = {}
    for name in names:
        plan = make_plan(env, PrecisionRequest(recipe="bf16", experts=name, strict=False))
        if plan.experts.name != name:  # a rule keeps the experts off it here (SM120: NVFP4)
            continue
        te_says = is_module_grouped_tensor_path_supported(plan.experts.build(), torch.bfloat16)
        seen[name] = plan.ladder[0].experts_gemm
        off_native = "grouped_mm" if name == "bf16" and torch.cuda.get_device_capability()[0] in (9, 10) else "split"
        assert plan.ladder[0].experts_gemm == ("native" if te_says else off_native), (name, env.cublaslt_version)
        if plan.experts.is_te and len(plan.ladder) > 2:
            hp = plan.ladder[1].experts
            assert plan.ladder[1].experts_gemm == "split"
            assert not is_module_grouped_tensor_path_supported(hp.build(), torch.bfloat16)
    print("cuBLASLt", env.cublaslt_version, "experts GEMM path per recipe:", seen)
    assert RecipeSpec.of("bf16").alignment_for(seen["bf16"]) == 1


def test_plan_on_real_device_picks_the_measured_fastest():
    """The dense layers get FP8, except on Hopper below cuBLASLt 13.5 without CUDA graphs, where BF16 was measured
    faster (rule hopper-split-dense-bf16) and FP8 stays the graphed plan's; the experts get the recipe measured
    fastest on this stack (H100: BF16 on cuBLASLt 13.1, FP8 current scaling on 13.10)."""
    env = probe_environment()
    plan = make_plan(env)
    print(plan.render_text(width=160))
    fp8 = ("fp8_current", "fp8_delayed", "fp8_block", "mxfp8", "nvfp4")
    if "hopper-split-dense-bf16" in {r.rule for r in plan.reasons}:
        assert plan.dense.name == "bf16"
        assert make_plan(env, PrecisionRequest(cuda_graphs=True)).dense.name in fp8
    else:
        assert plan.dense.name in fp8
    assert plan.ladder[-1].dense.name == "bf16"
    if env.compute_capability == (9, 0) and env.te_version.startswith("2.20"):
        assert plan.experts.name == ("fp8_current" if Version(env.cublaslt_version) >= Version("13.5") else "bf16")


class TEProbe(L.LightningModule):
    """A TE Linear model that records TE's autocast state inside training_step."""

    def __init__(self) -> None:
        super().__init__()
        import transformer_engine.pytorch as te

        self.layer = te.Linear(64, 64)
        self.seen: list[tuple[bool, str, bool]] = []

    def training_step(self, batch, batch_idx):
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager

        recipe = FP8GlobalStateManager.get_fp8_recipe()
        self.seen.append((FP8GlobalStateManager.is_fp8_enabled(), type(recipe).__name__,
                          torch.is_autocast_enabled("cuda")))
        return self.layer(batch).float().pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 64), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_te_autocast_active_inside_training_step(tmp_path):
    # a named FP8 recipe: auto runs BF16 on some stacks (hopper-split-dense-bf16), where no TE autocast is entered
    plugin, model = TEMoEPrecision("fp8_current", print_plan=False), TEProbe()
    trainer = L.Trainer(plugins=[plugin], accelerator="gpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(model)
    expected = type(plugin.state.te_recipe(plugin.plan.dense)).__name__
    assert trainer.precision == "transformer-engine"
    assert model.seen == [(True, expected, True)] * 3


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_example_trains_30_steps_on_gpu(tmp_path):
    history, plugin = LossHistory(), TEMoEPrecision()
    trainer = L.Trainer(plugins=[plugin], callbacks=[history], accelerator="gpu", devices=1, max_steps=30,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(TinyMoELanguageModel(), StdlibBytesDataModule(seq_len=128, batch_size=16, max_bytes=1_000_000))
    print("plan:", plugin.plan.summary(), "losses:", [round(x, 3) for x in history.losses])
    assert len(history.losses) == 30 and all(math.isfinite(x) for x in history.losses)
    assert sum(history.losses[-5:]) / 5 < 0.8 * sum(history.losses[:5]) / 5
    if "hopper-split-dense-bf16" in {r.rule for r in plugin.plan.reasons}:  # Hopper below cuBLASLt 13.5, eager
        assert plugin.plan.summary() == "bf16"
    else:
        assert plugin.plan.dense.is_te
