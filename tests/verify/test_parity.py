"""The parity arithmetic itself: tolerances, NaN/Inf, argmax only where the margin is clear."""

from __future__ import annotations

import numpy as np
import pytest

from btdeploy.artifacts.graph_names import Precision
from btdeploy.errors import BtDeployError
from btdeploy.model.configs import build_config, max_text_length
from btdeploy.model.heads import FP32, HEADS, INT8
from btdeploy.verify.parity import ParityRow, compare, format_rows, parse_batch_by_length, passes, shortfalls

LOGITS = HEADS["itm"].output("logits")
EMBEDS = HEADS["itc"].output("text_embeds")


def test_identical_outputs_pass() -> None:
    ref = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    stats = compare(ref, ref.copy(), LOGITS, FP32)
    assert stats.max_abs == 0 and stats.cosine > 0.9999999 and passes(stats, FP32)


def test_an_error_above_the_bound_fails() -> None:
    ref = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    got = ref.copy()
    got[2, 3] += 3e-4
    stats = compare(ref, got, EMBEDS, FP32)
    assert np.isclose(stats.max_abs, 3e-4, rtol=1e-3)
    assert not passes(stats, FP32)
    assert shortfalls(stats, FP32) == ["max_abs 3.00e-04 > 0.0001"]  # said with its number, nothing else missed


def test_nan_or_inf_fails_whatever_else() -> None:
    ref = np.ones((2, 2), dtype=np.float32)
    got = ref.copy()
    got[0, 0] = np.nan
    stats = compare(ref, got, LOGITS, FP32)
    assert stats.non_finite == 1 and not passes(stats, FP32)
    assert shortfalls(stats, FP32) == ["1 NaN or Inf values"]
    got[0, 0] = np.inf
    assert not passes(compare(ref, got, LOGITS, FP32), FP32)


def test_argmax_counts_only_clear_margins() -> None:
    ref = np.array([[0.0, 1.0], [0.0, 0.0001], [2.0, 0.0]], dtype=np.float32)
    # Row 1 is a near-tie (margin 1e-4 < 2e-4): its flip is not counted. Rows 0 and 2 agree.
    got = np.array([[0.0, 1.0], [0.0001, 0.0], [2.0, 0.0]], dtype=np.float32)
    stats = compare(ref, got, LOGITS, FP32)
    assert (stats.argmax_total, stats.argmax_counted, stats.argmax_agree) == (3, 2, 2)
    # A clear flip is counted and fails agreement.
    got[2] = [0.0, 2.0]
    stats = compare(ref, got, LOGITS, FP32)
    assert (stats.argmax_counted, stats.argmax_agree) == (2, 1)
    assert stats.argmax_agreement == 0.5 and not passes(stats, FP32)
    assert "argmax agreement 50.0% (1 of 2 clear positions) < 100%" in shortfalls(stats, FP32)


def test_a_reduced_precision_row_past_its_bound_passes_and_its_tolerance_says_why() -> None:
    # Large itm's trt-compat.int8 logits were off by 0.104 of range with cosine 0.99866: a PASS,
    # since the bound only sets which argmax margins count. Its row must not print "bound 0.1".
    ref = np.array([[4.0, -4.0], [-4.0, 4.0], [3.0, -3.0]], dtype=np.float32)
    got = ref.copy()
    got[0, 0] += 0.42  # 0.105 of the range 4
    stats = compare(ref, got, LOGITS, INT8)
    assert 0.1 < stats.of_range < 0.11 and stats.cosine > 0.99 and passes(stats, INT8)
    assert INT8.describe() == "cos>=0.99 argmax>=99% margin>0.2 of range"
    assert FP32.describe() == "abs<=0.0001 cos>=0.99999"
    table = format_rows([ParityRow("itm", "logits", "int8", INT8, stats)])
    row = table.splitlines()[2]
    assert row.endswith("PASS") and "margin>0.2 of range" in row and "bound" not in row


def test_cosine_sees_a_sign_flip_that_small_values_hide() -> None:
    ref = np.full((1, 16), 1e-6, dtype=np.float32)
    stats = compare(ref, -ref, EMBEDS, FP32)
    assert stats.max_abs < FP32.max_abs
    assert stats.cosine < 0 and not passes(stats, FP32)
    assert shortfalls(stats, FP32) == ["cosine -1.0000000 < 0.99999"]


def test_every_precision_a_backend_runs_has_a_tolerance_for_every_output() -> None:
    """check holds each output to its precision's declared tolerance: a precision some backend runs
    (bf16 on the PyTorch reference) without one would be a check that cannot run."""
    from btdeploy.backends.targets import TARGETS
    from btdeploy.model.heads import HEADS

    precisions = {precision for target in TARGETS.values() for _, precision in target.graphs}
    assert Precision.BF16 in precisions
    missing = [
        f"{head.name}.{output.name}: {precision}"
        for head in HEADS.values()
        for output in head.outputs
        for precision in precisions
        if precision not in output.tolerances
    ]
    assert missing == []


def test_bench_shapes_are_read_or_refused_in_one_line() -> None:
    config = build_config("tiny")
    limit = max_text_length(config)
    assert parse_batch_by_length(f"1x5,3x{limit}", config) == [(1, 5), (3, limit)]
    with pytest.raises(BtDeployError, match=r"--shapes '4by40': give batch x text length"):
        parse_batch_by_length("4by40", config)
    for bad in ("0x5", f"1x{limit + 1}", "1x0"):
        with pytest.raises(BtDeployError, match=rf"--shapes {bad}: batch at least 1, text length 1\.\.{limit}"):
            parse_batch_by_length(bad, config)
