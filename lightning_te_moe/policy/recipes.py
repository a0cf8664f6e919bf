"""Recipe names, their settings, and the one place that turns them into TE recipe objects (lazily)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import torch

RecipeName = Literal["bf16", "fp16", "fp32", "fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4"]
RECIPE_NAMES: tuple[str, ...] = get_args(RecipeName)

#: Recipes that run through TE's quantized ``autocast``; the others are plain torch dtypes.
TE_RECIPES: tuple[str, ...] = ("fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4")

#: TE recipe class for each quantized recipe name.
TE_CLASSES: dict[str, str] = {
    "fp8_delayed": "DelayedScaling",
    "fp8_current": "Float8CurrentScaling",
    "fp8_block": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
    "nvfp4": "NVFP4BlockScaling",
}
#: The recipe name of each TE recipe class (a TE recipe object's type, read without importing TE).
_NAME_OF_CLASS: dict[str, str] = {cls: key for key, cls in TE_CLASSES.items()}

#: Settings each quantized recipe is built with unless a rule or the user says otherwise.
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "fp8_delayed": {"fp8_format": "HYBRID", "amax_history_len": 1024, "amax_compute_algo": "max"},
    "fp8_current": {"fp8_format": "HYBRID"},
    "fp8_block": {"fp8_format": "E4M3"},
    "mxfp8": {"fp8_format": "E4M3"},
    "nvfp4": {"disable_rht": False},
}

#: Up to this many tokens per call, BF16 experts run on torch's ``grouped_mm`` (one launch per GEMM, offsets on the
#: device: no host sync) where TE would run one GEMM per expert (its native grouped GEMM unavailable). Measured on an
#: H100, GPT-OSS-20B expert layer, cuBLASLt 13.1 (docs/performance.md, 2026-11-24): grouped_mm 8.9 ms vs TE 10.1 ms at
#: 4,096 tokens, 28.8 vs 19.9 ms at 16,384; and in the full model at 1,024 tokens TE's per-expert path took 3.6 ms of
#: host time per projection and layer against 0.1 ms of GPU time (benchmarks/step_profile.py, 2026-11-27).
GROUPED_MM_MAX_TOKENS = 8192

#: How the experts' grouped GEMM runs: ``"native"``, one cuBLASLt grouped GEMM for all experts (TE
#: ``GroupedLinear(use_grouped_tensor=True)``, split sizes on the device); ``"split"``, one GEMM per expert (TE's
#: split-quantize path); ``"grouped_mm"``, BF16 on torch's ``grouped_mm`` up to :data:`GROUPED_MM_MAX_TOKENS` tokens a
#: call, TE's split path above; ``"torch"``, no TE (torch's ``grouped_mm`` or a loop).
GemmPath = Literal["native", "split", "grouped_mm", "torch"]
GEMM_PATHS: tuple[str, ...] = get_args(GemmPath)
GEMM_PATH_TEXT: dict[str, str] = {
    "native": "native grouped GEMM", "split": "one GEMM per expert",
    "grouped_mm": f"torch grouped_mm up to {GROUPED_MM_MAX_TOKENS:,} tokens a call, else one GEMM per expert",
    "torch": "torch grouped GEMM (no TE)"}

#: Per-expert row multiple each GEMM path needs under each quantized recipe (recipes not listed: 1, no padding).
#: ``split`` (and ``torch``, which pads the same so a step-down never changes the layout): TE
#: ``get_align_size_for_quantization`` (MXFP8 32: TE #2966). ``native``: every expert's rows go through TE's grouped
#: quantize kernels and grouped scale layouts (TE 2.20.2, ``common/``): FP8 block scaling quantizes 128x128 tiles
#: per expert (``cast/fp8_blockwise/group_quantize_fp8_blockwise.cuh``: "each tensor's first dimension must be a
#: multiple of 128 (VARYING_FIRST_DIM)", NaN gradients otherwise); MXFP8 and NVFP4 swizzle each expert's scales in
#: 128-row tiles (``gemm/cublaslt_grouped_gemm.cu`` ``padded_mxfp8_scale_inv_bytes`` / ``padded_nvfp4_...``, NVFP4's
#: grouped Hadamard cast: "x y both a multiple of 128"); FP8 current scaling has one scale per expert and keeps
#: FP8's 16 (GEMM leading dimensions); BF16/FP16 need none.
_SPLIT_ALIGNMENT = {"fp8_delayed": 16, "fp8_current": 16, "fp8_block": 16, "mxfp8": 32, "nvfp4": 128}
ALIGNMENT: dict[str, dict[str, int]] = {
    "native": {"fp8_current": 16, "fp8_block": 128, "mxfp8": 128, "nvfp4": 128},
    "split": _SPLIT_ALIGNMENT,
    "grouped_mm": _SPLIT_ALIGNMENT,
    "torch": _SPLIT_ALIGNMENT,
}

#: Quantized recipes whose trainable expert weights go to TE's native grouped GEMM as one grouped weight (TE
#: ``GroupedLinear``'s ``single_grouped_weight``, bound over our ``[E, out, in]`` parameter without a copy): TE then
#: quantizes all experts' weights with one ``tex.group_quantize`` (per-expert amax and scale, as one weight per
#: expert gets) instead of an amax and a cast-transpose launch per expert. Why: in a profile of the GPT-OSS-20B
#: expert layer under FP8 current scaling on TE's native path (H200, cuBLASLt 13.10, 2026-11-28), those per-expert
#: launches took 1.5 ms of a step in 128 launches, with GPU idle between them. The other recipes keep one weight per
#: expert: FP8 block scaling, MXFP8 and NVFP4 were not measured this way (the last two need Blackwell).
GROUPED_WEIGHT_RECIPES: tuple[str, ...] = ("fp8_current",)


def grouped_weight_quantize(recipe: Any) -> bool:
    """Whether TE's active ``recipe`` (a TE recipe object, None for BF16/FP16) quantizes the expert weights as one
    grouped weight on the native path (:data:`GROUPED_WEIGHT_RECIPES`)."""
    return recipe is not None and _NAME_OF_CLASS.get(type(recipe).__name__) in GROUPED_WEIGHT_RECIPES


#: How a ``backward_override`` shows in a recipe's label.
_BACKWARD_LABEL = {"high_precision": "+hp_bwd", "dequantized": "+dq_bwd"}

#: Torch compute dtype for a recipe's non-quantized math.
COMPUTE_DTYPE: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


def _check_path(path: str) -> str:
    if path not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {path!r}; valid paths are: {', '.join(GEMM_PATHS)}")
    return path


def _alignment(name: str, path: str) -> int:
    """A recipe missing from the native table (delayed scaling) is one TE runs on its split path even when asked
    for the native one: it gets the split path's multiple."""
    split = ALIGNMENT["split"].get(name, 1)
    return ALIGNMENT[_check_path(path)].get(name, split)


def te_recipe_alignment(recipe: Any, path: str) -> int:
    """Per-expert row multiple for a TE recipe object on ``path`` (a user's own ``te.autocast``; no TE import).

    TE's ``CustomRecipe`` declares its own (``quantization_alignment``) and never runs the native path.
    """
    name = _NAME_OF_CLASS.get(type(recipe).__name__)
    if name is not None:
        return _alignment(name, path)
    declared = getattr(recipe, "quantization_alignment", None)
    if declared is None:
        raise ValueError(f"unsupported TE recipe type {type(recipe).__name__}: supported are "
                         f"{', '.join(sorted(TE_CLASSES.values()))} and recipes with a quantization_alignment")
    return int(declared)


def check_recipe_name(name: str) -> str:
    """The name itself, or a ValueError that lists the valid ones."""
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {name!r}; valid recipe names are: {', '.join(RECIPE_NAMES)}")
    return name


@dataclass(frozen=True)
class RecipeSpec:
    """A recipe by name plus its settings: JSON-serialisable, comparable, buildable into a TE recipe."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_recipe_name(self.name)

    def __hash__(self) -> int:  # settings is a dict: hash its items so specs can key caches
        return hash((self.name, tuple(sorted(self.settings.items()))))

    @property
    def is_te(self) -> bool:
        return self.name in TE_RECIPES

    @property
    def alignment(self) -> int:
        """Per-expert row multiple on TE's split path and the torch backend (1: no padding needed)."""
        return self.alignment_for("split")

    def alignment_for(self, path: str) -> int:
        """Per-expert row multiple the experts' grouped GEMM needs on ``path`` (:data:`GEMM_PATHS`)."""
        return _alignment(self.name, path)

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPE.get(self.name, torch.bfloat16)

    @property
    def backward_override(self) -> Optional[str]:
        return self.settings.get("backward_override")

    def label(self) -> str:
        """Short human form, e.g. ``fp8_current+hp_bwd`` (``+dq_bwd`` for the dequantized backward)."""
        defaults = DEFAULT_SETTINGS.get(self.name, {})
        extras = [
            f"{k}={v}"
            for k, v in sorted(self.settings.items())
            if k != "backward_override" and (k not in defaults or defaults[k] != v)
        ]
        text = self.name + _BACKWARD_LABEL.get(self.backward_override, "")
        return text + (f"({', '.join(extras)})" if extras else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeSpec:
        return cls(data["name"], dict(data.get("settings") or {}))

    @classmethod
    def of(cls, name: str, **overrides: Any) -> RecipeSpec:
        """The recipe with its default settings, then ``overrides``."""
        settings = dict(DEFAULT_SETTINGS.get(check_recipe_name(name), {}))
        settings.update(overrides)
        return cls(name, settings)

    def build(self) -> Any:
        """The TE recipe object (imports TE); None for the plain-dtype recipes."""
        if not self.is_te:
            return None
        from transformer_engine.common import recipe as te_recipe

        kwargs = dict(self.settings)
        if "fp8_format" in kwargs:
            kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
        if self.name != "fp8_delayed":
            kwargs.setdefault("backward_override", None)  # never inherit NVTE_BACKWARD_OVERRIDE silently
        return getattr(te_recipe, TE_CLASSES[self.name])(**kwargs)


#: NVFP4 settings the rules may force (SM120: no RHT, no stochastic rounding), read from a user's recipe object.
_NVFP4_KEYS = {"disable_rht", "disable_stochastic_rounding"}


def spec_from_te_recipe(recipe: Any) -> RecipeSpec:
    """Name and settings of a TE recipe object a user passed in (no TE import needed to call this)."""
    cls_name = type(recipe).__name__
    if cls_name not in _NAME_OF_CLASS:
        raise ValueError(
            f"unsupported TE recipe type {cls_name}; supported are {', '.join(sorted(_NAME_OF_CLASS))} "
            f"(or a recipe name: {', '.join(RECIPE_NAMES)})"
        )
    name = _NAME_OF_CLASS[cls_name]
    settings: dict[str, Any] = {}
    for key in set(DEFAULT_SETTINGS[name]) | {"backward_override"} | (_NVFP4_KEYS if name == "nvfp4" else set()):
        if hasattr(recipe, key):
            value = getattr(recipe, key)
            settings[key] = getattr(value, "name", value)  # Format enum -> its name
    if settings.get("backward_override") is None:
        settings.pop("backward_override", None)
    return RecipeSpec(name, settings)
