"""A tiny MoE causal language model built from a transformers config (no download), as a LightningModule."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

Architecture = Literal["gpt_oss", "mixtral", "qwen3_moe"]


def build_config(arch: Architecture, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                 num_heads: int, num_kv_heads: int, num_experts: int, top_k: int, sliding_window: int,
                 max_positions: int) -> Any:
    """A transformers config of the given MoE architecture, sized by the arguments."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                  tie_word_embeddings=False)
    if arch == "gpt_oss":
        config = transformers.GptOssConfig(
            **common, intermediate_size=intermediate_size, head_dim=hidden_size // num_heads,
            num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=sliding_window,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, router_aux_loss_coef=0.0)
        config._attn_implementation = "eager"  # GPT-OSS sinks rule out SDPA/FlashAttention
    elif arch == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=intermediate_size, num_local_experts=num_experts,
                                            num_experts_per_tok=top_k, sliding_window=None, router_aux_loss_coef=0.0)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=intermediate_size,
                                             moe_intermediate_size=intermediate_size, num_experts=num_experts,
                                             num_experts_per_tok=top_k, head_dim=hidden_size // num_heads,
                                             router_aux_loss_coef=0.0)
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: gpt_oss, mixtral, qwen3_moe")
    return config


class TinyMoELanguageModel(L.LightningModule):
    """Byte-level MoE language model: next-byte loss, validation loss and perplexity (torchmetrics).

    Args:
        arch: which transformers MoE architecture to build.
        hidden_size / intermediate_size / num_layers / num_heads / num_kv_heads: model size.
        num_experts / top_k: experts per MoE layer and experts per token.
        sliding_window: GPT-OSS sliding-window size (alternate layers).
        lr / weight_decay / warmup_steps: AdamW with linear warm-up then cosine decay over the run.
        lora_rank: > 0 fine-tunes PEFT LoRA adapters of this rank instead of every weight (the base is frozen);
            the plugin's expert swap keeps them and runs the expert adapters as grouped GEMMs.
        lora_alpha: LoRA scaling numerator (``scaling = lora_alpha / lora_rank``).
        lora_attention / lora_experts: adapt the attention projections (``q/k/v/o_proj``) and the expert weights
            (``experts.gate_up_proj``, ``experts.down_proj`` through PEFT's ``target_parameters``).
    """

    def __init__(self, arch: Architecture = "gpt_oss", hidden_size: int = 128, intermediate_size: int = 128,
                 num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, num_experts: int = 8,
                 top_k: int = 2, sliding_window: int = 64, max_positions: int = 2048, lr: float = 3e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 20, lora_rank: int = 0, lora_alpha: float = 32.0,
                 lora_attention: bool = True, lora_experts: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        import transformers

        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: no LoRA, train every weight), got {lora_rank}")
        if lora_rank and not (lora_attention or lora_experts):
            raise ValueError("lora_rank > 0 needs a target: lora_attention and/or lora_experts must be true")

        config = build_config(arch, vocab_size=256, hidden_size=hidden_size, intermediate_size=intermediate_size,
                              num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              num_experts=num_experts, top_k=top_k, sliding_window=sliding_window,
                              max_positions=max_positions)
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(config)
        if lora_rank:
            self.model = lora_model(self.model, lora_rank, lora_alpha, lora_attention, lora_experts)
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self(inputs).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return loss, logits, targets

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, logits, targets = self._loss(batch)
        self.val_loss.update(loss)
        self.val_ppl.update(logits, targets)
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # with LoRA: the adapters only
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(self.trainer.estimated_stepping_batches, 1)
        warmup = min(self.hparams.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lora_model(model: Any, rank: int, alpha: float, attention: bool, experts: bool) -> Any:
    """``model`` wrapped by PEFT LoRA: the usual GPT-OSS recipe (attention projections, and the expert weights
    through ``target_parameters``); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] if attention else [],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"] if experts else None)
    return get_peft_model(model, config)
