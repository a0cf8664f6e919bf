"""Between benchmark rows: free the row's memory and reset TE's global quantization state, as a fresh process has it.

TE's delayed-scaling amax buffers keep every module that ever ran under DelayedScaling (also after the module is
gone) and update all of them at every autocast exit, so without this reset each later delayed-scaling row would
also pay for the modules of the rows before it.
"""

from __future__ import annotations

import gc

import torch


def fresh_te_state() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        return
    FP8GlobalStateManager.reset()
