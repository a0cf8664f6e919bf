"""Weight layouts: our grouped layout, and codecs to and from each original experts layout.

Ours is TE's: ``fc1.weight [E, F, H]`` with ``F = 2I`` as ``[gate | up]`` halves (``I`` without a gate),
``fc2.weight [E, H, I]``, biases ``[E, F]`` / ``[E, H]``. A codec maps that to the original module's own
``state_dict`` keys and back, so checkpoints stay loadable by the unswapped model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol

import torch
from torch import Tensor


@dataclass
class ExpertWeights:
    """Expert weights in our layout (see module docstring)."""

    fc1_weight: Tensor
    fc1_bias: Optional[Tensor]
    fc2_weight: Tensor
    fc2_bias: Optional[Tensor]

    @property
    def num_experts(self) -> int:
        return self.fc2_weight.size(0)

    @property
    def hidden_size(self) -> int:
        return self.fc2_weight.size(1)

    @property
    def intermediate_size(self) -> int:
        return self.fc2_weight.size(2)


class WeightCodec(Protocol):
    """Converts between our layout and an original module's ``state_dict`` (keys relative to that module)."""

    def keys(self) -> tuple[str, ...]: ...

    def target(self, key: str) -> str:
        """The grouped parameter (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) ``key`` goes into."""
        ...

    def decode(self, state: Mapping[str, Tensor]) -> ExpertWeights: ...

    def encode(self, weights: ExpertWeights) -> dict[str, Tensor]: ...


def _deinterleave(t: Tensor, dim: int) -> Tensor:
    """``[g0, u0, g1, u1, ...]`` -> ``[g0, g1, ... | u0, u1, ...]`` along ``dim``."""
    return torch.cat([t[(slice(None),) * dim + (slice(i, None, 2),)] for i in (0, 1)], dim=dim)


def _interleave(t: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`_deinterleave`."""
    dim %= t.dim()
    gate, up = t.chunk(2, dim=dim)
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


@dataclass(frozen=True)
class FusedCodec:
    """transformers 5.x experts (``use_experts_implementation``): 3-D ``gate_up_proj``/``up_proj``, ``down_proj``.

    ``transposed``: stored ``x @ W`` (``[E, in, out]``, GPT-OSS); ``interleaved``: gate/up alternate along the
    output dim (GPT-OSS) instead of ``[gate | up]``.
    """

    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def keys(self) -> tuple[str, ...]:
        names = (self.up_name, "down_proj")
        return names + tuple(f"{n}_bias" for n in names) if self.bias else names

    def target(self, key: str) -> str:
        fc = "fc2" if key.startswith("down_proj") else "fc1"
        return f"{fc}.bias" if key.endswith("_bias") else f"{fc}.weight"

    def decode(self, state: Mapping[str, Tensor]) -> ExpertWeights:
        w1, w2 = state[self.up_name], state["down_proj"]
        b1 = state[f"{self.up_name}_bias"] if self.bias else None
        b2 = state["down_proj_bias"] if self.bias else None
        if self.transposed:
            w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
        if self.gated and self.interleaved:
            w1 = _deinterleave(w1, 1)
            b1 = _deinterleave(b1, 1) if b1 is not None else None
        return ExpertWeights(w1, b1, w2, b2)

    def encode(self, weights: ExpertWeights) -> dict[str, Tensor]:
        w1, b1, w2, b2 = weights.fc1_weight, weights.fc1_bias, weights.fc2_weight, weights.fc2_bias
        if self.gated and self.interleaved:
            w1 = _interleave(w1, 1)
            b1 = _interleave(b1, 1) if b1 is not None else None
        if self.transposed:
            w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        out = {self.up_name: w1, "down_proj": w2}
        if self.bias:
            assert b1 is not None and b2 is not None
            out.update({f"{self.up_name}_bias": b1, "down_proj_bias": b2})
        return out


@dataclass(frozen=True)
class ModuleListCodec:
    """transformers 4.x experts: ``nn.ModuleList`` of MLPs with ``gate``/``up``/``down`` ``nn.Linear`` children
    (Mixtral ``w1``/``w3``/``w2``, Qwen-MoE ``gate_proj``/``up_proj``/``down_proj``)."""

    num_experts: int
    gate: str
    up: str
    down: str
    bias: bool = False

    def keys(self) -> tuple[str, ...]:
        params = ("weight", "bias") if self.bias else ("weight",)
        return tuple(f"{i}.{n}.{p}" for i in range(self.num_experts) for n in (self.gate, self.up, self.down)
                     for p in params)

    def target(self, key: str) -> str:
        _, name, param = key.split(".")
        return f"{'fc2' if name == self.down else 'fc1'}.{param}"

    def _stack(self, state: Mapping[str, Tensor], name: str, param: str) -> Tensor:
        return torch.stack([state[f"{i}.{name}.{param}"] for i in range(self.num_experts)])

    def decode(self, state: Mapping[str, Tensor]) -> ExpertWeights:
        w1 = torch.cat([self._stack(state, self.gate, "weight"), self._stack(state, self.up, "weight")], dim=1)
        w2 = self._stack(state, self.down, "weight")
        if not self.bias:
            return ExpertWeights(w1, None, w2, None)
        b1 = torch.cat([self._stack(state, self.gate, "bias"), self._stack(state, self.up, "bias")], dim=1)
        return ExpertWeights(w1, b1, w2, self._stack(state, self.down, "bias"))

    def encode(self, weights: ExpertWeights) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        gates, ups = weights.fc1_weight.chunk(2, dim=1)
        for i in range(self.num_experts):
            out.update({f"{i}.{self.gate}.weight": gates[i], f"{i}.{self.up}.weight": ups[i],
                        f"{i}.{self.down}.weight": weights.fc2_weight[i]})
            if self.bias:
                assert weights.fc1_bias is not None and weights.fc2_bias is not None
                gate_b, up_b = weights.fc1_bias.chunk(2, dim=1)
                out.update({f"{i}.{self.gate}.bias": gate_b[i], f"{i}.{self.up}.bias": up_b[i],
                            f"{i}.{self.down}.bias": weights.fc2_bias[i]})
        return out
