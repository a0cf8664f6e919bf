"""``TERMSNorm``: a transformers RMSNorm whose forward and backward run as one TE kernel each on CUDA."""

from __future__ import annotations

from torch import Tensor, nn

from .kernel import te_rmsnorm


class TERMSNorm(nn.Module):
    """The replaced norm's own ``weight`` (the same parameter object) and epsilon, computed by TE.

    The state dict is the original's (one ``weight``, no TE ``_extra_state``). transformers' RMSNorm runs about
    seven elementwise kernels forward and ten backward over FP32 copies of its input, twice per decoder layer;
    this runs one each way and saves only the input and one FP32 value per row. CUDA tensors take TE's kernels;
    anything else (a CPU tensor) runs the original class's own forward on this module's weight.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = original.weight
        self.variance_epsilon: float = float(original.variance_epsilon)
        self.__dict__["_original"] = original  # not a submodule: the state dict holds ``weight`` once
        self.train(original.training)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.is_cuda:
            return te_rmsnorm(hidden_states, self.weight, self.variance_epsilon)
        return type(self.__dict__["_original"]).forward(self, hidden_states)

    def restore(self) -> nn.Module:
        """The original module, holding the current ``weight``."""
        original: nn.Module = self.__dict__["_original"]
        original.weight = self.weight
        original.train(self.training)
        return original

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, TE fused kernels"


def is_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm: ``*RMSNorm`` with a 1-D ``weight`` parameter and a float ``variance_epsilon``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))
