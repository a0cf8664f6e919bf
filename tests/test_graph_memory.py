"""benchmarks/graph_memory.py's accounting of an allocator snapshot (the format of ``torch.cuda.memory._snapshot``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from graph_memory import free_by_stream, live_blocks  # noqa: E402

FRAME = [{"filename": "/x/site-packages/transformer_engine/pytorch/module/linear.py", "line": 7, "name": "forward"}]
SNAPSHOT = {"segments": [
    {"segment_pool_id": (0, 0), "stream": 0, "blocks": [
        {"state": "active_allocated", "size": 100, "frames": FRAME},
        {"state": "inactive", "size": 30, "frames": []}]},
    {"segment_pool_id": (0, 0), "stream": 7, "blocks": [
        {"state": "inactive", "size": 50, "frames": []},
        {"state": "active_pending_free", "size": 9, "frames": []}]},
    {"segment_pool_id": (1, 2), "stream": 7, "blocks": [
        {"state": "active_allocated", "size": 40, "frames": []},
        {"state": "inactive", "size": 20, "frames": []}]},
]}


def test_live_blocks_by_pool_and_the_frame_that_allocated_them() -> None:
    assert live_blocks(SNAPSHOT) == {("general", "transformer_engine/pytorch/module/linear.py:7 forward"): 100,
                                     ("graph pool", "other"): 40}


def test_reserved_but_free_memory_by_pool_and_stream() -> None:
    assert free_by_stream(SNAPSHOT) == {("general", 0): 30, ("general", 7): 50, ("graph pool", 7): 20}
