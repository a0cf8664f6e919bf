"""Export a trained model to the original Hugging Face layout, loadable by ``from_pretrained``.

The swapped experts already write their ``state_dict`` in the original module's layout (``GroupedExperts``' state-dict
hook), so an export is the full, unsharded state dict of the transformers model under its original names, saved with
``save_pretrained``. Two ways in: :func:`export_hf` from a live (sharded or not) model, a collective under FSDP; and
:func:`export_checkpoint` from a saved Lightning checkpoint (one file, or a sharded distributed-checkpoint
directory), offline on one process:

    python -m lightning_te_moe.distributed.export CHECKPOINT OUT_DIR --config HF_CONFIG_DIR [--prefix model.]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn


def find_pretrained(module: nn.Module) -> Any:
    """The outermost transformers ``PreTrainedModel`` in ``module``; an error if there is none."""
    from transformers import PreTrainedModel

    for candidate in module.modules():
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise ValueError(f"{type(module).__name__} holds no transformers PreTrainedModel to export")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict on the CPU, in the original layout; under FSDP2 a collective (every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .sharding import is_sharded

    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return original_layout(model, state)


def original_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (of ``model``) with every swapped experts module's grouped keys in its original module's layout."""
    from ..experts import ExpertWeights, GroupedExperts

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if not isinstance(module, GroupedExperts) or prefix + "fc1.weight" not in state:
            continue
        weights = ExpertWeights(state.pop(prefix + "fc1.weight"), state.pop(prefix + "fc1.bias", None),
                                state.pop(prefix + "fc2.weight"), state.pop(prefix + "fc2.bias", None))
        state.update({prefix + k: v for k, v in module.codec.encode(weights).items()})
    return state


def export_hf(module: nn.Module, out_dir: str | Path, model: Optional[nn.Module] = None) -> Optional[Path]:
    """Save ``model`` (default :func:`find_pretrained` of ``module``) with ``save_pretrained`` into ``out_dir``.

    Every rank must call it when the model is sharded (the weights are gathered); rank 0 writes and gets the path,
    the other ranks None.
    """
    import torch.distributed as dist

    hf = model if model is not None else find_pretrained(module)
    state = full_state_dict(hf)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    path: Optional[Path] = None
    if rank == 0:
        path = _save(hf, state, Path(out_dir))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: str | Path, prefix: str = "model.") -> Path:
    """Convert a Lightning checkpoint (a ``.ckpt`` file or a distributed-checkpoint directory) of a module whose
    transformers model sits at ``prefix`` into a ``save_pretrained`` directory, with the model's config from
    ``config`` (a directory or a ``config.json``). Runs on one process; the model is built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..experts import swap_experts

    state = _checkpoint_state(Path(checkpoint))
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not ours:
        starts = sorted({k.split(".")[0] + "." for k in state})
        raise ValueError(f"export_checkpoint(prefix={prefix!r}): no weight of {checkpoint} starts with it; the"
                         f" checkpoint's top-level prefixes are {starts}")
    hf_config = AutoConfig.from_pretrained(str(config))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    swap_experts(hf)  # the swapped experts load either layout (a sharded checkpoint holds the grouped one)
    hf.load_state_dict(ours, strict=False, assign=True)
    missing = sorted(k for k, v in hf.state_dict().items() if v.is_meta)
    if missing:
        raise ValueError(f"export_checkpoint: {checkpoint} lacks {len(missing)} weight(s) of"
                         f" {type(hf).__name__} under {prefix!r}, e.g. {missing[:3]}")
    return _save(hf, full_state_dict(hf), Path(out_dir))


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The module weights of a Lightning checkpoint: a file's ``state_dict``, or a sharded directory's, consolidated."""
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["state_dict"]
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _save(hf: Any, state: dict[str, torch.Tensor], out: Path) -> Path:
    """``save_pretrained`` with the original class named in ``config.json`` (FSDP2 renames a sharded module's class)."""
    from torch.distributed.fsdp import FSDPModule

    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), state_dict=state)
    original = next(c for c in type(hf).__mro__ if not issubclass(c, FSDPModule))
    hf.config.architectures = [original.__name__]
    hf.config.save_pretrained(str(out))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_te_moe.distributed.export",
                                     description="Lightning checkpoint -> Hugging Face save_pretrained directory")
    parser.add_argument("checkpoint", help="a .ckpt file or a sharded (distributed checkpoint) directory")
    parser.add_argument("out_dir")
    parser.add_argument("--config", required=True, help="the model's Hugging Face config (directory or config.json)")
    parser.add_argument("--prefix", default="model.", help="where the transformers model sits in the LightningModule")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out_dir, args.config, args.prefix))


if __name__ == "__main__":
    main()
