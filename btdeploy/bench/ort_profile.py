"""ONNX Runtime's profiler, read back: kernel time per operator type over the last runs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def kernel_ms_per_op(session: Any, runs: int) -> dict[str, float]:
    """End `session`'s profile and return each operator type's kernel ms per run, averaged over
    its last `runs` runs (earlier runs are warm-up and are left out)."""
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("name") == "model_run"]
    before = model_runs[-runs - 1] if len(model_runs) > runs else None
    start = before["ts"] + before["dur"] if before else 0
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] > start:
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 1e3 / runs
    return dict(per_op)
