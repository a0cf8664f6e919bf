"""Shared builders for the expert-swap tests: tiny transformers MoE models (no downloads) and comparisons."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_te_moe.experts import ExpertWeights, GroupedExperts

ARCHS = ("gpt_oss", "mixtral", "qwen3_moe", "deepseek_v3")


def tiny_config(arch: str, hidden: int = 32, intermediate: int = 48, experts: int = 8, top_k: int = 2,
                layers: int = 2) -> Any:
    import transformers

    common = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "gpt_oss":
        config = transformers.GptOssConfig(**common, intermediate_size=intermediate, head_dim=hidden // 4,
                                           num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    elif arch == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts,
                                            num_experts_per_tok=top_k)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=intermediate, head_dim=hidden // 4,
                                             moe_intermediate_size=intermediate, num_experts=experts,
                                             num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "deepseek_v3":
        common.update(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        config = transformers.DeepseekV3Config(**common, intermediate_size=intermediate,
                                               moe_intermediate_size=intermediate, n_routed_experts=experts,
                                               num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
                                               n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    else:
        raise ValueError(arch)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def tiny_model(arch: str, seed: int = 0, **sizes: Any) -> nn.Module:
    """A tiny causal LM in fp32 with every parameter randomised (routers and biases included)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **sizes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.3 if "router" in name or name.endswith("gate.weight") else 0.1)
    return model.float().eval()


def rel_err(a: Tensor, b: Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def original_layout_grads(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter gradient keyed by the *original* model's parameter names (swapped modules encoded back)."""
    grads: dict[str, Tensor] = {}
    grouped = {n: m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    for name, param in model.named_parameters():
        if not any(name.startswith(p + ".") for p in grouped) and param.grad is not None:
            grads[name] = param.grad
    for prefix, module in grouped.items():
        def grad(p: Any) -> Any:
            return None if p is None else (p.grad if p.grad is not None else torch.zeros_like(p))

        encoded = module.codec.encode(ExpertWeights(grad(module.fc1.weight), grad(module.fc1.bias),
                                                    grad(module.fc2.weight), grad(module.fc2.bias)))
        grads.update({f"{prefix}.{k}": v for k, v in encoded.items()})
    return grads


def twins(arch: str, **sizes: Any) -> tuple[nn.Module, nn.Module]:
    model = tiny_model(arch, **sizes)
    return model, copy.deepcopy(model)


def precision_state(experts: str, dense: str = "bf16") -> Any:
    """A one-rung :class:`PrecisionState` (dense recipe, experts recipe) without probing a device."""
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.policy.plan import Plan, Rung
    from lightning_te_moe.policy.recipes import RecipeSpec
    from lightning_te_moe.policy.state import PrecisionState

    return PrecisionState(Plan(ladder=(Rung(RecipeSpec.of(dense), RecipeSpec.of(experts)),), environment=Environment()))


def fp8_recipes_here() -> list[str]:
    """The FP8 recipes TE says this GPU runs (TE's own checks: never an entry into an unsupported recipe)."""
    import transformer_engine.pytorch as te

    names = ["fp8_delayed", "fp8_current"] if te.is_fp8_available() else []
    return names + (["fp8_block"] if te.is_fp8_block_scaling_available() else [])


def cuda_experts_layer(arch: str) -> nn.Module:
    """One tiny experts module of ``arch`` (BF16, CUDA), weights from the tiny model."""
    model = tiny_model(arch, hidden=64, intermediate=128, experts=8, layers=2)
    return model.model.layers[0].mlp.experts.cuda().to(torch.bfloat16)


def layer_step(module: nn.Module, x: Tensor, index: Tensor, weights: Tensor, grad: Tensor) -> dict[str, Tensor]:
    """One forward + backward of an experts layer: its output and the input and routing-weight gradients."""
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = module(x, index, weights)
    out.backward(grad)
    return {"out": out.detach().float(), "x.grad": x.grad.float(), "weights.grad": weights.grad.float()}


def cuda_topk_routing(tokens: int, seed: int = 0, empty_from: int = 5) -> tuple[Tensor, ...]:
    """For a layer from :func:`cuda_experts_layer` (H=64, E=8): inputs, distinct top-2 experts per token (a real
    router's top-k) with experts ``empty_from``.. getting no token, their routing weights, and an output gradient."""
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, 8, device="cuda", generator=gen)
    logits[:, empty_from:] = -torch.inf
    top, index = torch.topk(logits, 2, dim=-1)
    grad = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, index, torch.softmax(top, -1).to(torch.bfloat16), grad


def gpu_fit(model: nn.Module, root: Any, seq_len: int = 64, steps: int = 30, **plugin_args: Any) -> tuple[Any, Any]:
    """A next-token fit of ``model`` under the plugin's default plan on one GPU (AdamW, lr 3e-3, 8 random sequences):
    ``(plugin, module)``, the module's ``losses`` holding each step's loss. ``plugin_args`` go to the plugin."""
    import lightning as L

    from lightning_te_moe import TEMoEPrecision

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def training_step(self, batch: Tensor, _: int) -> Tensor:
            logits = self.model(input_ids=batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = torch.randint(0, 64, (8, seq_len + 1), generator=torch.Generator().manual_seed(0))
    plugin, module = TEMoEPrecision(**plugin_args), Tiny()
    trainer = L.Trainer(accelerator="gpu", devices=1, plugins=[plugin], max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return plugin, module


def te_row_id_map_on_cpu(routing_map: torch.Tensor, num_tokens: int, num_experts: int) -> torch.Tensor:
    """TE's ``make_row_id_map`` on the CPU, in its format: each token's destination rows (experts in order, tokens in
    order within an expert, no padding), then those rows' experts, then how many; unset entries hold garbage."""
    mask = routing_map.long()
    counts = mask.sum(0)
    dest = torch.cumsum(counts, 0) - counts + torch.cumsum(mask, 0) - mask
    out = torch.full((num_tokens, 2 * num_experts + 1), 12345, dtype=torch.int32)
    for t in range(num_tokens):
        experts = routing_map[t].nonzero().flatten()
        n = experts.numel()
        out[t, :n], out[t, num_experts:num_experts + n], out[t, -1] = dest[t, experts], experts, n
    return out
