"""TensorRT engines on a GPU: build FP16 and INT8 for tiny and base, run them, hold them to the
precision floors, and replay CUDA graphs. Marked `gpu`; skipped with the reason where there is
no NVIDIA GPU or no TensorRT (run: python -m pytest -m gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from btdeploy.backends.tensorrt.environment import gpu, tensorrt_version
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.verify.check import check_export

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if gpu() is None:
        return "no NVIDIA GPU visible to torch: the TensorRT tests need one"
    if tensorrt_version() is None:
        return "TensorRT is not installed (pip install 'tensorrt>=10.14')"
    return None


@pytest.fixture(scope="module")
def engines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from btdeploy.backends.tensorrt.build import build_engine
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.optimize.optimizer import optimize_head
    from btdeploy.quantize.quantizer import quantize_head

    preset = request.param
    out = tmp_path_factory.mktemp(f"engines-{preset}")
    heads = list(HEADS) if preset == "tiny" else ["itm", "mlm"]
    export_heads(resolve_model(preset), heads, out)
    cache = out / "timing.cache"
    for head in heads:
        optimize_head(out / head, "trt")
        for precision in ("fp16", "int8"):
            quantize_head(out / head, precision, "trt", calib_size=8)
            build_engine(out / head, precision, batch="1:4:8", seq_len="1:40:128", timing_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    return out


@pytest.mark.parametrize("engines", ["tiny", "base"], indirect=True)
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_meet_the_precision_floors(engines: Path, precision: str) -> None:
    rows = check_export(engines, None, (1, 3), (5, 40), backend="tensorrt", precision=precision)
    assert rows
    for row in rows:
        assert row.passed, (row.head, row.output, row.stats)


@pytest.mark.parametrize("engines", ["tiny"], indirect=True)
def test_cuda_graph_replay_matches_a_plain_run(engines: Path) -> None:
    import btdeploy

    plain = btdeploy.load(engines, head="itm", backend="tensorrt", precision="fp16")
    graphed = btdeploy.load(engines, head="itm", backend="tensorrt", precision="fp16", cuda_graphs=True)
    # Back to the first shape last: its graph replays after the context ran another shape.
    for seed, (batch, length) in enumerate([(2, 7), (2, 7), (4, 33), (2, 7)]):
        feeds = sample_inputs(plain.config, batch, length, seed=seed)
        expected = plain(**feeds).logits
        got = graphed(**feeds).logits
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("engines", ["tiny"], indirect=True)
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_threads_sharing_one_engine_each_get_their_own_answer(engines: Path, cuda_graphs: bool) -> None:
    """One execution context and one set of buffers per shape: runs from several threads take turns
    (without that, a second thread of the same shape overwrote the first one's inputs)."""
    from concurrent.futures import ThreadPoolExecutor

    import btdeploy

    model = btdeploy.load(engines, head="itm", backend="tensorrt", precision="fp16", cuda_graphs=cuda_graphs)
    cases = [sample_inputs(model.config, 1 + i % 2, 7, seed=i) for i in range(12)]  # shapes repeat on purpose
    alone = [model(**case).logits for case in cases]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(lambda case: model(**case).logits, cases), alone, strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("engines", ["tiny"], indirect=True)
def test_a_batch_outside_the_profile_is_refused(engines: Path) -> None:
    import btdeploy
    from btdeploy.errors import BtDeployError

    runtime = btdeploy.load(engines, head="itm", backend="tensorrt", precision="int8")
    with pytest.raises(BtDeployError, match="batch 9 is outside the engine's profile 1..8"):
        runtime(**sample_inputs(runtime.config, 9, 5))


@pytest.mark.parametrize("engines", ["base"], indirect=True)
def test_ctrl_c_cancels_an_engine_build_and_leaves_the_engines_as_they_were(engines: Path) -> None:
    """Minutes of native code: the stop is held, the progress monitor cancels the build at its
    next step, and KeyboardInterrupt is raised when the build returns, before anything is written."""
    import signal
    import threading
    import time

    from btdeploy.artifacts.files import sha256_of
    from btdeploy.backends.tensorrt.build import build_engine

    folder = engines / "itm"
    before = {p.name: sha256_of(p) for p in folder.iterdir() if p.is_file()}
    timer = threading.Timer(5.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_engine(folder, "fp16", batch="1:4:8", seq_len="1:40:128")  # no timing cache: a full build
    finally:
        timer.cancel()
    stopped_after = time.monotonic() - started
    print(f"build stopped {stopped_after - 5.0:.1f} s after Ctrl-C")
    assert stopped_after < 65, stopped_after
    assert {p.name: sha256_of(p) for p in folder.iterdir() if p.is_file()} == before  # no leftovers either
