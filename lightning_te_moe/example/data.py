"""Byte-level text that every machine has: the Python standard library's own source files."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def stdlib_bytes(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the stdlib's ``.py`` files, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"\n".join(chunks)[:max_bytes]
    if len(text) < 10_000:
        raise RuntimeError(f"found only {len(text)} bytes of Python source under {root}; is the stdlib installed?")
    return text


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: inputs are the first ``seq_len``, targets shifted by one."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len
        self.count = (len(data) - 1) // seq_len
        if self.count < 1:
            raise ValueError(f"{len(data)} bytes are too few for one window of seq_len={seq_len}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.data[start : start + self.seq_len + 1].long()


class StdlibBytesDataModule(L.LightningDataModule):
    """Train/validation split of the stdlib source as bytes (vocabulary 256).

    Args:
        seq_len: tokens (bytes) per sample.
        batch_size: samples per batch.
        max_bytes: how much source to read.
        val_fraction: share of the bytes held out for validation (taken from the end).
        num_workers: DataLoader workers.
    """

    def __init__(self, seq_len: int = 128, batch_size: int = 16, max_bytes: int = 4_000_000,
                 val_fraction: float = 0.05, num_workers: int = 0) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.save_hyperparameters()
        self.train_set: Optional[ByteWindows] = None
        self.val_set: Optional[ByteWindows] = None

    def setup(self, stage: str) -> None:
        data = torch.frombuffer(bytearray(stdlib_bytes(self.hparams.max_bytes)), dtype=torch.uint8)
        split = int(len(data) * (1 - self.hparams.val_fraction))
        self.train_set = ByteWindows(data[:split], self.hparams.seq_len)
        self.val_set = ByteWindows(data[split:], self.hparams.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
