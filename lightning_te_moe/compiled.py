"""Where a model is compiled: the plan must know (rule ``compile-no-delayed``) before the first compiled step.

A LightningModule can be compiled from outside (``torch.compile(lightning_module)``, which Lightning marks with
``_compiler_ctx``), or compile parts of itself: ``self.model = torch.compile(model)`` (an ``OptimizedModule``
child) or ``module.compile()`` (in place: ``_compiled_call_impl``), in ``__init__`` or ``configure_model``, both
of which run before the precision plugin converts the module.
"""

from __future__ import annotations

from torch import nn


def compiled_modules(module: nn.Module) -> list[str]:
    """The paths (``<root>`` for the module itself) of everything in ``module`` that runs compiled."""
    from torch._dynamo import OptimizedModule

    found = ["<root>"] if getattr(module, "_compiler_ctx", None) is not None else []
    for path, sub in module.named_modules():
        if isinstance(sub, OptimizedModule) or getattr(sub, "_compiled_call_impl", None) is not None:
            found.append(path or "<root>")
    return found
