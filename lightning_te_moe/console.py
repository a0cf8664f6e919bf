"""Printing for people: once per job (global rank 0), plain text or a rich renderable."""

from __future__ import annotations

from typing import Any


def print_rank_zero(content: Any) -> None:
    """Print ``content`` on global rank 0 only; rich renderables (the plan table) through rich."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    if isinstance(content, str):
        print(content)
    else:
        from rich.console import Console

        Console().print(content)
