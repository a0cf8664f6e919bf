"""The Transformer Engine APIs this package calls, the TE release each first shipped in, and what runs without it.

Read from TE's git history (release tags v2.2-v2.18, branch ``release_v2.19``) and TE 2.20.2's sources. A feature
without a fallback is required: the newest of those is the floor ``pyproject.toml`` declares (a test keeps the two
equal). Newer features are gated on the installed TE (:func:`te_has`) and fall back as stated; the rules table
turns each fallback that changes the plan into a plan line (``te_fixed_in`` = the version below).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from packaging.version import Version

from .environment import parse_version, te_installed_version


@dataclass(frozen=True)
class TEFeature:
    name: str
    since: str  # the first TE release that has it
    used_by: str
    fallback: Optional[str]  # what runs on an older TE; None: required (part of the floor)
    source: str


TE_FEATURES: tuple[TEFeature, ...] = (
    TEFeature("autocast", "2.9", "the plugin's forward context, the experts' nested autocast, autotune", None,
              "TE 2.9 renamed fp8.py to quantization.py and added te.autocast (fp8_autocast before)"),
    TEFeature("availability_reasons", "2.9", "policy/environment.py (is_*_available(return_reason=True))", None,
              "TE 2.9 quantization.py"),
    TEFeature("softmax_type", "2.8", "attention/ (DotProductAttention(softmax_type='learnable'), GPT-OSS sinks)",
              "attention stays the model's own (checked on TE's signature)",
              "TE 2.8 attention/dot_product_attention/dot_product_attention.py"),
    TEFeature("fused_permute", "2.15", "experts/te_routing.py (torch.ops.te_moe.permute_mask_map_fwd with pad_offsets)",
              "the experts move tokens with torch gathers (same function, slower)",
              "TE 2.15 permutation.py registers the te_moe custom ops"),
    TEFeature("backward_override", "2.15", "the ladder's high-precision-backward rung",
              "the ladder goes straight to BF16", "TE PR #2644 (first in TE 2.15)"),
    TEFeature("clamped_swiglu_offset", "2.17", "experts/activations.py (tex.clamped_swiglu with glu_linear_offset)",
              "TE 2.9-2.16's four-argument kernel, which adds GPT-OSS's +1 itself (the same function)",
              "TE 2.17 pytorch/csrc/extensions.h"),
    TEFeature("use_grouped_tensor", "2.17", "experts/gemm.py (GroupedLinear(use_grouped_tensor=...))",
              "the argument is left out: TE's split path", "TE 2.17 module/grouped_linear.py"),
    TEFeature("nvfp4_grouped", "2.17", "NVFP4 experts (GroupedLinear under NVFP4BlockScaling)",
              "experts run the next recipe", "TE #2455 (NVFP4 GroupedLinear first in TE 2.17)"),
    TEFeature("native_grouped_predicate", "2.19",
              "experts/gemm.py (grouped_linear.is_module_grouped_tensor_path_supported)",
              "the experts run TE's split path (one GEMM per expert)",
              "TE PR #3224 (branch release_v2.19, before its 2.19.0 version bump)"),
    TEFeature("single_grouped_weight", "2.20",
              "experts/gemm.py (GroupedLinear.single_grouped_weight: all experts' weights as one grouped weight)",
              "one weight per expert on the native path (TE quantizes them one by one)",
              "TE 2.20.2 module/grouped_linear.py (marked experimental there; older releases not checked: "
              "treated as absent)"),
)

_BY_NAME = {f.name: f for f in TE_FEATURES}

#: The oldest TE that has every required feature: ``pyproject.toml``'s ``transformer-engine`` floor.
TE_FLOOR: str = str(max(Version(f.since) for f in TE_FEATURES if f.fallback is None))


def since(name: str) -> str:
    """The first TE release with feature ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown TE feature {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name].since


@lru_cache(maxsize=None)
def te_has(name: str) -> bool:
    """Whether the installed TE has feature ``name`` (by its version; TE is not imported)."""
    installed = parse_version(te_installed_version())
    return installed is not None and installed >= Version(since(name))
