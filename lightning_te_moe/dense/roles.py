"""What each linear layer of a model is (attention, shared expert, MLP, router, head, ...) and whether it may run on TE.

Routers, the output head and the embeddings stay in the compute dtype by the rules table's
``dense-high-precision-parts`` rule (the plan cites it); expert layers are the expert swap's; PEFT adapters stay
as PEFT made them; weight dimensions TE's quantized GEMMs cannot take stay ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

#: The rule that keeps routers, the output head and embeddings out of the quantized recipes.
HIGH_PRECISION_RULE = "dense-high-precision-parts"
#: Attribute names of MoE routers that some models build from ``nn.Linear`` (Mixtral 4.x ``gate``, Qwen2-MoE
#: ``shared_expert_gate``); transformers 5.x routers are their own classes (``*Router``).
ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class Verdict:
    """``role``: what the layer is; ``reason``: why it stays as it is (empty: it goes to TE); ``rule``: the rule id."""

    role: str
    reason: str = ""
    rule: str = ""


#: Why each part stays in the compute dtype (the rule's own text, in the plan, says it for all of them).
KEPT_BY_RULE: dict[str, str] = {
    "output head": "its logits feed the loss directly",
    "router": "its top-k flips on small logit errors and its GEMM is too narrow to gain",
    "embedding": "a lookup, not a GEMM",
}


def _by_rule(role: str) -> Verdict:
    return Verdict(role, f"{KEPT_BY_RULE[role]}: stays in the compute dtype [rule {HIGH_PRECISION_RULE}]",
                   HIGH_PRECISION_RULE)


def _is_router(path: str, parent: Optional[nn.Module]) -> bool:
    name = path.rpartition(".")[2]
    return name in ROUTER_NAMES or name.endswith("_gate") or (
        parent is not None and "Router" in type(parent).__name__)


def _role(path: str, parent: Optional[nn.Module]) -> str:
    parent_name = type(parent).__name__ if parent is not None else ""
    if any("shared_expert" in part for part in path.split(".")):
        return "shared expert"
    if parent_name.endswith("Attention"):
        return "attention"
    if "MLP" in parent_name or "FeedForward" in parent_name:
        return "MLP"
    return "other"


class Classifier:
    """Answers for one model: what each module is and why it stays (see :meth:`linear`, :meth:`other`)."""

    def __init__(self, model: nn.Module, multiple: int,
                 module_filter: Optional[Callable[[nn.Module, str], bool]] = None) -> None:
        self.model, self.multiple, self.module_filter = model, multiple, module_filter
        self.modules = dict(model.named_modules())
        self.heads = {id(m) for m in _output_heads(model)}
        self.adapters = _adapter_prefixes(self.modules)

    def parent(self, path: str) -> Optional[nn.Module]:
        return self.modules.get(path.rpartition(".")[0]) if path else None

    def role(self, path: str) -> str:
        """What the linear layer at ``path`` is for: attention, shared expert, MLP or other."""
        return _role(path, self.parent(path))

    def linear(self, path: str, module: nn.Linear) -> Verdict:
        """The verdict for an ``nn.Linear`` (or subclass) at ``path``."""
        parent = self.parent(path)
        role = _role(path, parent)
        if id(module) in self.heads or path.rpartition(".")[2] == "lm_head":
            return _by_rule("output head")
        if _is_router(path, parent):
            return _by_rule("router")
        if any(path.startswith(prefix + ".") or path == prefix for prefix in self.adapters):
            return Verdict("adapter", "PEFT adapter: a rank-r GEMM, kept as PEFT made it (in the compute dtype)")
        if "experts" in path.split("."):
            return Verdict("experts", "an expert's layer: experts run as grouped GEMMs (the expert swap and its"
                           " report); alone, its token count would change every step")
        if type(module) is not nn.Linear:
            return Verdict(role, f"a subclass of nn.Linear ({type(module).__name__}) with its own forward")
        if "forward" in module.__dict__:
            return Verdict(role, "its forward is replaced on the instance (a hook library's wrapper)")
        if not path:
            return Verdict(role, "the root module cannot be replaced in place")
        if not module.weight.is_floating_point():
            return Verdict(role, f"weight dtype {module.weight.dtype} is not a floating-point type")
        bad = [f"{name} {size}" for name, size in (("in_features", module.in_features),
                                                    ("out_features", module.out_features)) if size % self.multiple]
        if bad:
            return Verdict(role, f"{' and '.join(bad)} not a multiple of {self.multiple} (TE's quantized GEMMs"
                           " need it): stays nn.Linear in the compute dtype")
        if self.module_filter is not None and not self.module_filter(module, path):
            return Verdict(role, "module_filter returned False")
        return Verdict(role)

    def other(self, path: str, module: nn.Module) -> Optional[Verdict]:
        """The verdict for a module that is no linear layer but is kept by rule (embeddings, routers), else None."""
        if isinstance(module, nn.Embedding):
            return _by_rule("embedding")
        if type(module).__name__.endswith("Router") and isinstance(getattr(module, "weight", None), nn.Parameter):
            return _by_rule("router")
        return None


def _output_heads(model: nn.Module) -> list[nn.Module]:
    """What every transformers model inside ``model`` returns from ``get_output_embeddings()``."""
    found = []
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            try:
                result = get()
            except (AttributeError, NotImplementedError):
                continue
            if isinstance(result, nn.Module):
                found.append(result)
    return found


def _adapter_prefixes(modules: dict[str, nn.Module]) -> list[str]:
    """Paths of PEFT adapter containers: every child of a tuner layer (it has ``base_layer`` and
    ``get_base_layer``) except the ``base_layer`` the adapter wraps."""
    prefixes = []
    for path, module in modules.items():
        if not (isinstance(getattr(module, "base_layer", None), nn.Module)
                and callable(getattr(module, "get_base_layer", None))):
            continue
        prefixes += [f"{path}.{name}" if path else name for name, _ in module.named_children() if name != "base_layer"]
    return prefixes
