"""Ctrl-C loses nothing: save a checkpoint when the run is interrupted, and say where it is and how to resume.

Lightning catches ``KeyboardInterrupt`` in ``Trainer.fit``, calls every callback's ``on_exception`` and exits
with status 1 without a word. ``InterruptCheckpoint`` saves the training state there (weights, optimizer and
LR-scheduler state, the step, and the precision plugin's rung and decisions) and prints the path and the
resume call. It is not Lightning's ``OnExceptionCheckpoint``: with that callback in the Trainer, every ``fit``
without ``ckpt_path`` silently resumes from the newest checkpoint, so a fresh run of the main job's command
would continue (or, after a finished run, skip) the old one.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class InterruptCheckpoint(Checkpoint):
    """On Ctrl-C during ``fit``: save ``<dirpath>/<filename>.ckpt`` and print how to resume from it.

    Args:
        dirpath: where to save; default: the ``ModelCheckpoint``'s directory, else ``<default_root_dir>/checkpoints``.
        filename: the checkpoint's file name, without ``.ckpt``.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "interrupted") -> None:
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        #: ``path -> how to resume from it``; the CLI sets the exact command line.
        self.resume_hint: Callable[[str], str] = lambda path: f"trainer.fit(model, ckpt_path={path!r})"
        self.saved_path: Optional[str] = None

    def ckpt_path(self, trainer: Any) -> str:
        model_checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        dirpath = self.dirpath or getattr(model_checkpoint, "dirpath", None)
        return os.path.join(dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), f"{self.filename}.ckpt")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # another exception may leave a half-updated state (last.ckpt is the place to resume from then), and
        # before the optimizers exist there is no training state to save
        fitting = trainer.state.fn == TrainerFn.FITTING and trainer.optimizers
        if not (isinstance(exception, KeyboardInterrupt) and fitting):
            return
        path = self.ckpt_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            print(f"[lightning-te-moe] interrupted at step {trainer.global_step}: saved {path} (weights, optimizer and"
                  f" LR-scheduler state, step, precision rung and decisions)\n  resume with: {self.resume_hint(path)}",
                  file=sys.stderr, flush=True)
