"""Whether ONNX Runtime really starts a GPU provider here.

onnxruntime-gpu lists CUDAExecutionProvider on any machine; the provider's libraries load only when
a session asks for it, and when they do not (a CUDA 12 build on a CUDA 13 machine, no cuDNN) ONNX
Runtime prints its reason to the process's stderr and runs on the CPU. A one-node session finds out
once per process, with that reason, before a real session or a bench is built on it.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from functools import cache

# ONNX Runtime's line for a provider library that does not load: "... with error: <the loader's reason>".
_LOAD_ERROR = re.compile(r"Failed to load library \S+ with error: (.+)")


@contextmanager
def _output_captured() -> Iterator[list[str]]:
    """What is printed meanwhile, as lines once the block ends: ONNX Runtime's C++ logger writes to
    file descriptor 2, and its Python fallback notice to sys.stdout."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to borrow (a daemon): the probe runs, without ONNX Runtime's reason
        yield lines
        return
    python_side = io.StringIO()
    with tempfile.TemporaryFile() as sink, redirect_stdout(python_side), redirect_stderr(python_side):
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())
            lines.extend(python_side.getvalue().splitlines())


@cache
def start_problem(provider: str) -> str | None:
    """Why ONNX Runtime does not start `provider` (a full provider name) here, or None when it does."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y"))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    failure: list[str] = []
    with _output_captured() as printed:
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
            started = provider in session.get_providers()
        except Exception as error:  # any failure to start is the answer
            started, failure = False, str(error).splitlines()
    if started:
        return None
    reasons = [match.group(1).strip() for line in failure + printed if (match := _LOAD_ERROR.search(line))]
    return f"ONNX Runtime could not start {provider} here" + (f" ({reasons[0]})" if reasons else "")
