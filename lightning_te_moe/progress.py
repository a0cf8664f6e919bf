"""Plain-text progress for runs whose output is not a terminal (a log file, a pipe, CI).

Lightning's progress bars redraw one line in place: rich's prints nothing at all when stdout is not a
terminal, tqdm's fills a log with carriage returns. ``TextProgressBar`` prints whole lines instead: one every
``every_n_steps`` optimizer steps, one per validation, and one at the end. ``lightning-te-moe fit`` uses it
when stdout is not a terminal; in Python, pass it in ``Trainer(callbacks=[TextProgressBar()])``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning.pytorch.callbacks.progress import ProgressBar


class TextProgressBar(ProgressBar):
    """One printed line per ``every_n_steps`` training steps (default: the Trainer's ``log_every_n_steps``)."""

    def __init__(self, every_n_steps: Optional[int] = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"TextProgressBar(every_n_steps={every_n_steps}): must be a positive number of steps")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = 0.0
        self._printed_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._printed_step = time.monotonic(), trainer.global_step
        end = f" to step {trainer.max_steps}" if trainer.max_steps >= 0 else ""
        self._print(f"training from step {trainer.global_step}{end}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        every = self.every_n_steps or max(trainer.log_every_n_steps, 1)
        if step != self._printed_step and step % every == 0:
            self._printed_step = step
            elapsed = time.monotonic() - self._start
            of = f"/{trainer.max_steps}" if trainer.max_steps >= 0 else ""
            self._print(f"step {step}{of}  {self._metrics(trainer, pl_module)}  {_duration(elapsed)} elapsed")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._print(f"validation at step {trainer.global_step}: {self._metrics(trainer, pl_module, 'val')}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._print(f"training done at step {trainer.global_step} in {_duration(time.monotonic() - self._start)}")

    def _metrics(self, trainer: Any, pl_module: Any, prefix: str = "") -> str:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items()
                   if k != "v_num" and (k.startswith(prefix) if prefix else not k.startswith("val"))}
        return "  ".join(f"{k} {_number(v)}" for k, v in metrics.items())

    def _print(self, line: str) -> None:
        if self._enabled:
            print(f"[progress] {line}", flush=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
