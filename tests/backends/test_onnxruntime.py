"""The ONNX Runtime backend's sessions."""

from __future__ import annotations

import time
from pathlib import Path

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs


def test_an_idle_session_leaves_the_cores_to_the_next_one(tiny_export: Path) -> None:
    # ONNX Runtime's workers spin on after a run by default (about 33 ms of CPU on a 2-thread
    # pool), which slows whatever session or engine runs next in the process; btdeploy's
    # sessions stop spinning when a run ends.
    manifest = read_manifest(tiny_export / "itm")
    outputs = [o.name for o in get_head("itm").outputs]
    backend = OnnxRuntimeBackend(manifest.folder / "model.onnx", outputs, threads=2)
    feeds = sample_inputs(manifest.config, 2, 8, pad=False)
    idle_cpu_ms = []
    for _ in range(3):
        backend.run(feeds)
        started = time.process_time()
        time.sleep(0.3)
        idle_cpu_ms.append(1e3 * (time.process_time() - started))
    assert max(idle_cpu_ms) < 5.0, idle_cpu_ms
